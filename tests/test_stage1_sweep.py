"""scripts/stage1_sweep.py: loads a split as the bundle does, trains the chosen losses and scores them; its two
diagnostic switches change what they say they change."""

import pytest
import torch
from conftest import load_script


def _script():
    return load_script("stage1_sweep")


def test_load_split_matches_the_bundle_loader(demo_data):
    from amvlm_monai.data.datalist import load_datalist
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    images, masks, texts = _script().load_split(str(demo_data / "datalist.json"), "validation", 2)
    item = segmentation_transforms(32, labeled=True)(load_datalist(str(demo_data / "datalist.json"), "validation")[0])
    assert images.shape == (2, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(images[0], torch.as_tensor(item["image"]), atol=1e-5)
    assert torch.equal(masks[0], (torch.as_tensor(item["label"]) > 0).float())
    assert texts[0] == item["text"]


def test_local_layer_zero_gives_the_stem_tokens(tiny_amvlm):
    sweep = _script()
    enc = tiny_amvlm.image_encoder.eval()
    x = torch.randn(2, 1, 32, 32)
    last = enc(x).tokens
    sweep._local_tokens_from(enc, 0)
    out = enc(x)
    stem = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    assert torch.allclose(out.tokens, stem) and not torch.allclose(out.tokens, last)


def test_run_trains_and_reports(demo_data, capsys):
    import argparse

    sweep = _script()
    ns = argparse.Namespace(datalist=str(demo_data / "datalist.json"), n_train=16, n_val=4, steps=2, eval_every=1,
                            batch_size=4, lr=1e-3, head="linear", temperature=0.07, ita=1.0, mil=1.0,
                            pool_temperature=0.2, local=0.0, local_layer=None, patch_size=None, oracle=True, seed=0)
    rows = sweep.run(ns)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and 0.0 <= r["t2i_fact_r1"] <= 1.0 for r in rows)
    assert "initial mask Dice" in capsys.readouterr().out


def test_all_weights_zero_is_refused(demo_data):
    with pytest.raises(SystemExit) as err:
        _script().main(["--datalist", str(demo_data / "datalist.json"), "--ita", "0"])
    assert err.value.code == 2
