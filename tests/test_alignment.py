"""Stage-1 validation metrics: retrieval recall with chance levels, localisation AUC, text-mask Dice."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.alignment import localisation_scores, retrieval_recall, roc_auc


def _brute_recall(sim, index, k):
    """Independent formulation: sort every row / column and look for a correct item among the first k."""
    n, u = len(sim), len(sim[0])
    i2t = sum(index[i] in sorted(range(u), key=lambda j: -sim[i][j])[:k] for i in range(n)) / n
    t2i = 0.0
    for j in range(u):
        best = sorted(range(n), key=lambda i: -sim[i][j])[:k]
        t2i += any(index[i] == j for i in best)
    return i2t, t2i / u


def _brute_chance(n, members, k):
    """Chance that k of n images drawn at random contain one of ``members``: by enumeration."""
    draws = list(itertools.combinations(range(n), k))
    return sum(any(i in members for i in d) for d in draws) / len(draws)


def test_retrieval_recall_against_sorting_and_enumeration():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    txt = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3])  # reports 1 and 3 are shared by several images
    sim = (img @ txt.T).tolist()
    for k in (1, 2):
        out = retrieval_recall(img, txt, index, ks=(k,))
        i2t, t2i = _brute_recall(sim, index.tolist(), k)
        assert out[f"i2t_r{k}"] == pytest.approx(i2t) and out[f"t2i_r{k}"] == pytest.approx(t2i)
        assert out[f"i2t_r{k}_chance"] == pytest.approx(k / 4)
        chance = sum(_brute_chance(7, {i for i in range(7) if index[i] == j}, k) for j in range(4)) / 4
        assert out[f"t2i_r{k}_chance"] == pytest.approx(chance)


def test_perfect_alignment_and_the_own_report_by_hand():
    e = torch.eye(3)
    out = retrieval_recall(e, e, torch.arange(3), ks=(1, 5))
    assert out["i2t_r1"] == out["t2i_r1"] == 1.0 and out["i2t_r1_chance"] == pytest.approx(1 / 3)
    assert out["i2t_r5"] == 1.0 and out["i2t_r5_chance"] == 1.0  # k >= U: every report is retrieved
    # image 0 prefers report 1 over its own report 0: a miss at k = 1, a hit at k = 2
    img = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = retrieval_recall(img, txt, torch.tensor([0, 1]), ks=(1,))
    assert out["i2t_r1"] == 0.5  # image 1 finds report 1
    assert out["t2i_r1"] == 1.0  # report 0's best image is image 0 (0.6 > 0.0), report 1's is image 1 (1.0 > 0.8)
    with pytest.raises(ValueError, match="text_index"):
        retrieval_recall(img, txt, torch.tensor([0]))


def test_roc_auc_by_hand_and_by_pairs():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5  # a tie counts half
    assert math.isnan(roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))
    g = torch.Generator().manual_seed(1)
    s, y = torch.randint(0, 5, (40,), generator=g).float(), torch.rand(40, generator=g) > 0.6
    pos, neg = s[y], s[~y]
    pairs = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert roc_auc(s, y) == pytest.approx(float(pairs))


def test_localisation_by_hand():
    sim = torch.zeros(2, 2, 2)
    sim[0, 0, 0] = 0.9  # image 0: the top-left patch is similar to the report, and the lesion is there
    labels = torch.zeros(2, 1, 4, 4)
    labels[0, 0, :2, :2] = 1
    out = localisation_scores(sim, labels, bias=0.25)
    assert out["n_lesion_images"] == 1  # image 1 has no lesion: not scored
    up = F.interpolate(sim[:1, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    assert out["loc_auc"] == pytest.approx(roc_auc(up, labels[0, 0] > 0))
    pred = up > 0.25
    target = labels[0, 0] > 0
    assert out["text_mask_dice"] == pytest.approx(float(2 * (pred & target).sum() / (pred.sum() + target.sum())))
    assert out["ones_dice"] == pytest.approx(2 * 4 / (16 + 4))
    assert out["loc_auc"] > 0.9


def test_evaluate_alignment_on_a_tiny_model(tiny_amvlm):
    from amvlm_monai.alignment import evaluate_alignment
    from conftest import REPORTS

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float()
    batches = [{"image": torch.randn(2, 1, 32, 32, generator=g), "label": labels[i:i + 2],
                "text": [REPORTS[i], REPORTS[1]]} for i in (0, 2)]
    tiny_amvlm.train()
    out = evaluate_alignment(tiny_amvlm, batches, ks=(1, 5))
    assert tiny_amvlm.training  # restored
    assert out["n_images"] == 4 and out["n_reports"] == 3  # REPORTS[1] twice
    assert out["i2t_r5"] == 1.0 and out["n_lesion_images"] == 4
    for key in ("i2t_r1", "t2i_r1", "loc_auc", "text_mask_dice", "ones_dice"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["alignment"] == pytest.approx((out["i2t_r5"] + out["t2i_r5"] + out["loc_auc"]) / 3)


def test_the_cli_scores_a_checkpoint_on_a_split(tiny_amvlm, demo_data, tmp_path, capsys):
    import json

    from amvlm_monai.alignment import main
    from amvlm_monai.handlers import save_pretrained

    ckpt = tmp_path / "amvlm.pt"
    save_pretrained(str(ckpt), tiny_amvlm)
    assert main(["--checkpoint", str(ckpt), "--datalist", str(demo_data / "datalist.json"), "--key", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 4 and 0 <= out["loc_auc"] <= 1 and "t2i_r5_chance" in out
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--datalist", str(demo_data / "datalist.json")])
    assert err.value.code == 2 and "missing.pt" in capsys.readouterr().err
