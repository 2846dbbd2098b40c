"""2D inference (`inferring`) on what clinics have: PNG and single DICOM files in one folder, or one file; a
multi-frame DICOM is refused naming the file."""

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from amvlm_monai.io.model_info import make_model_info, write_model_info
from amvlm_monai.networks.segmentation import build_segmentation_net
from amvlm_monai.transforms.pipelines import inference_transforms
from amvlm_monai.utils.errors import root_cause

ROOT = Path(__file__).resolve().parents[1]
QATA = ROOT / "bundles" / "qata_covid19_cxr_segmentation"


def run_bundle(bundle, run_id, configs, **overrides):
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        run(run_id=run_id, config_file=[str(bundle / "configs" / c) for c in configs],
            meta_file=str(bundle / "configs" / "metadata.json"), logging_file=str(bundle / "configs" / "logging.conf"),
            bundle_root=str(bundle), **overrides)
    finally:
        os.chdir(cwd)


def multiframe(path, frames=3):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stack = np.stack([ds.pixel_array + 10 * k for k in range(frames)]).astype(np.int16)
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.save_as(path)
    return path


def test_dicom_file_loads_as_a_2d_image(tmp_path):
    out = inference_transforms(32)({"image": get_testdata_file("CT_small.dcm")})["image"]
    assert out.shape == (1, 32, 32) and float(out.min()) >= -1 and float(out.max()) <= 1
    with pytest.raises(Exception) as e:
        inference_transforms(32)({"image": str(multiframe(tmp_path / "cine.dcm"))})
    msg = str(root_cause(e.value))
    assert msg.startswith(f"{tmp_path / 'cine.dcm'}: a dicom input of shape") and "is not a 2D image" in msg


def test_inferring_a_folder_of_png_and_dicom_files_and_one_file(tmp_path):
    bundle = tmp_path / QATA.name
    shutil.copytree(QATA, bundle, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    models = bundle / "models"
    models.mkdir()
    torch.manual_seed(0)
    net = build_segmentation_net()
    torch.save(net.state_dict(), models / "model.pt")
    write_model_info(models / "model_info.json", make_model_info(
        {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "size": None}, 32))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), inputs / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), inputs / "mr.DCM")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)).save(inputs / "xr.png")
    (inputs / "notes.txt").write_text("not an image")
    run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(inputs), output_masks_dir=str(tmp_path / "p"),
               num_workers=0)
    sizes = {p.name: Image.open(p).size for p in sorted((tmp_path / "p").iterdir())}
    assert sizes == {"ct_mask.png": (128, 128), "mr_mask.png": (64, 64), "xr_mask.png": (50, 40)}
    run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(inputs / "xr.png"),
               output_masks_dir=str(tmp_path / "one"), num_workers=0)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["xr_mask.png"]
    assert (np.asarray(Image.open(tmp_path / "one" / "xr_mask.png"))
            == np.asarray(Image.open(tmp_path / "p" / "xr_mask.png"))).all()
