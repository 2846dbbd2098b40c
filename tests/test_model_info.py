"""Inference that knows its model: a tiny training run saves model_info.json; `inferring`, `evaluating` and volume
inference then need only the model and the input, and give what the right flags give."""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SPINE = ROOT / "bundles" / "mrspineseg_spine_mr_segmentation"
#: the CPU U-Net preset
LIGHT = "light"
TINY = {"unet_size": LIGHT, "image_size": 32, "batch_size": 4, "num_workers": 0, "amp": False, "max_epochs": 1,
        "cache_rate": 0.0}


def run_bundle(bundle, run_id, configs, **overrides):
    """``python -m monai.bundle run`` in-process, from the bundle folder; configs may be absolute paths."""
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        run(run_id=run_id, config_file=[str(c) if os.path.isabs(c) else str(bundle / "configs" / c) for c in configs],
            meta_file=str(bundle / "configs" / "metadata.json"), logging_file=str(bundle / "configs" / "logging.conf"),
            bundle_root=str(bundle), **overrides)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The spine bundle trained for one epoch (supervised, 32 px, light U-Net) on converted MRSpineSeg-layout data."""
    from test_mrspineseg import make

    from data_prep.mrspineseg import convert_mrspineseg

    tmp = tmp_path_factory.mktemp("spine")
    bundle = tmp / SPINE.name
    shutil.copytree(SPINE, bundle, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    src = make(tmp / "src")
    data = tmp / "data"
    convert_mrspineseg(src, data, seed=0)
    tiny = tmp / "tiny.json"  # a config file keeps a null unet_size, which a command-line override would lose
    tiny.write_text(json.dumps(TINY))
    run_bundle(bundle, "training", ["train.json", "variants/supervised.json", str(tiny)], dataset_dir=str(data))
    return bundle, data, src


def test_training_saves_what_inference_needs(trained):
    bundle, _, _ = trained
    info = json.loads((bundle / "models" / "model_info.json").read_text())
    assert info["network"] == {"spatial_dims": 2, "in_channels": 1, "out_channels": 20, "size": LIGHT}
    assert info["image_size"] == [32, 32] and info["multiclass"] is True and len(info["class_names"]) == 19
    assert info["slicing"] == {"axis": 0, "axcodes": "RAS"}  # data_prep.mrspineseg's sagittal RAS slices
    assert info["intensity"] == "slice_minmax" and info["modality"] == "MR"
    from amvlm_monai.networks.segmentation import build_network

    build_network(info).load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))


def test_inferring_and_evaluating_need_only_model_and_input(trained, tmp_path):
    bundle, data, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((data / "images").glob("*.nii.gz"))[:3]:
        shutil.copy(f, images / f.name)
    run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(tmp_path / "a"))
    right = tmp_path / "right.json"  # the training run's settings, given by hand
    right.write_text(json.dumps({"image_size": 32, "in_channels": 1, "out_channels": 20, "multiclass": True,
                                 "unet_size": LIGHT, "threshold": 0.5}))
    models = tmp_path / "models_without_info"
    models.mkdir()
    shutil.copy(bundle / "models" / "model.pt", models / "model.pt")
    run_bundle(bundle, "inferring", ["inference.json", str(right)], input_dir=str(images),
               output_masks_dir=str(tmp_path / "b"), output_dir=str(models))
    a, b = sorted((tmp_path / "a").glob("*")), sorted((tmp_path / "b").glob("*"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 3
    for x, y, img in zip(a, b, sorted(images.iterdir())):
        np.testing.assert_array_equal(np.asarray(nib.load(x).dataobj), np.asarray(nib.load(y).dataobj))
        assert nib.load(x).shape == nib.load(img).shape  # each mask overlays its slice in world space
        np.testing.assert_allclose(nib.load(x).affine, nib.load(img).affine, atol=1e-5)
    with pytest.raises(Exception) as err:  # without the info and without flags: a message naming the file
        run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images),
                   output_masks_dir=str(tmp_path / "c"), output_dir=str(models))
    from amvlm_monai.utils.errors import root_cause

    assert str(models / "model_info.json") in str(root_cause(err.value))
    run_bundle(bundle, "evaluating", ["train.json", "evaluate.json"], dataset_dir=str(data), num_workers=0)
    scores = (bundle / "eval" / "scores_test.csv").read_text().splitlines()
    assert len(scores) > 1 and "L5" in scores[0]


def test_volume_inference_needs_only_model_and_input(trained, tmp_path):
    """A volume stored as inferior-posterior-right (not RAS): the model info's RAS sagittal slicing, 32 px and
    per-slice min-max give what the right flags give; the old defaults (axis 0 as stored, 224 px, volume-wide
    intensity) give another map."""
    from amvlm_monai.inference.volume import main

    bundle, _, src = trained
    case = src / "train" / "MR" / "Case2.nii.gz"
    (auto,) = main(["--bundle", str(bundle), "--input", str(case), "--output", str(tmp_path / "auto")])
    models = tmp_path / "models_without_info"
    models.mkdir()
    shutil.copy(bundle / "models" / "model.pt", models / "model.pt")
    flags = ["--image-size", "32", "--axis", "0", "--axcodes", "RAS", "--slice-minmax", "--multiclass",
             "--in-channels", "1", "--out-channels", "20"] + (["--size", LIGHT] if LIGHT else [])
    (manual,) = main(["--model", str(models / "model.pt"), "--input", str(case), "--output", str(tmp_path / "man")]
                     + flags)
    seg = np.asarray(nib.load(auto).dataobj)
    assert seg.shape == nib.load(case).shape and len(np.unique(seg)) >= 2
    np.testing.assert_allclose(nib.load(auto).affine, nib.load(case).affine, atol=1e-6)
    np.testing.assert_array_equal(seg, np.asarray(nib.load(manual).dataobj))
    (old,) = main(["--model", str(models / "model.pt"), "--input", str(case), "--output", str(tmp_path / "old"),
                   "--multiclass", "--out-channels", "20", "--axcodes", "none", "--no-slice-minmax"]
                  + (["--size", LIGHT] if LIGHT else []))
    assert not np.array_equal(np.asarray(nib.load(old).dataobj), seg)


def test_save_model_info_checks_at_start_and_writes_after_the_first_step(tmp_path):
    from amvlm_monai.handlers.checkpoint import SaveModelInfo
    from ignite.engine import Engine

    from amvlm_monai.io.model_info import read_model_info
    from amvlm_monai.networks.segmentation import build_segmentation_net
    from amvlm_monai.utils.errors import DataError

    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "size": None}
    seen = []
    engine = Engine(lambda e, b: seen.append((tmp_path / "model_info.json").exists()))
    SaveModelInfo(tmp_path, build_segmentation_net(out_channels=2), args, 32, multiclass=True).attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    assert seen == [False, True, True]  # written after the first step, not at the start
    info = read_model_info(tmp_path / "model.pt")
    assert info["out_channels"] == 2 and info["image_size"] == [32, 32] and info["multiclass"]
    wrong = Engine(lambda e, b: None)
    SaveModelInfo(tmp_path / "w", build_segmentation_net(out_channels=3), args, 32).attach(wrong)
    with pytest.raises(DataError, match="do not describe the network being trained"):
        wrong.run([0], max_epochs=1)
    assert not (tmp_path / "w" / "model_info.json").exists()


def test_read_model_info_returns_the_defaults_only_when_the_file_is_missing(tmp_path, caplog):
    from amvlm_monai.io.model_info import make_model_info, read_model_info, write_model_info
    from amvlm_monai.utils.errors import DataError

    defaults = {"image_size": 224, "in_channels": 1, "out_channels": 1, "unet_size": "paper"}
    with caplog.at_level("WARNING"):
        info = read_model_info(tmp_path / "model.pt", defaults=defaults)
    assert info == defaults and info is not defaults
    assert "model_info.json: no model info" in caplog.text
    (tmp_path / "model_info.json").write_text("{")
    with pytest.raises(DataError, match="unreadable model info"):  # a broken file is not replaced by defaults
        read_model_info(tmp_path / "model.pt", defaults=defaults)
    write_model_info(tmp_path / "model_info.json", make_model_info({"in_channels": 1, "out_channels": 2}, 32))
    assert read_model_info(tmp_path / "model.pt", defaults=defaults)["out_channels"] == 2
