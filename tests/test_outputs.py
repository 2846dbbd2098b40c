"""No result lost: every input gets its own output in volume and 2D inference (same-named inputs of two folders, two
inputs of one folder differing only in extension), an existing output is kept unless overwriting is asked for,
folders of NIfTI files and of DICOM series folders are inferred file by file, and evaluation panels and per-image
scores keep same-named images apart."""

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_inference_2d import QATA, run_bundle

from amvlm_monai.inference.volume import cli, main
from amvlm_monai.io.model_info import make_model_info, write_model_info
from amvlm_monai.io.outputs import output_paths, refuse_existing, relative_names
from amvlm_monai.networks.segmentation import build_segmentation_net
from amvlm_monai.utils.errors import root_cause

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:nvImageCodec:UserWarning")

NET = {"channels": (4, 8), "strides": (2,)}


def listing(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny U-Net's state dict; its settings come from the flags (no model_info.json)."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.manual_seed(0)
    torch.save(build_segmentation_net(**NET).state_dict(), path)
    return path


def volume_args(model, inputs, output, *extra):
    return ["--model", str(model), "--input", *map(str, inputs), "--output", str(output), "--image-size", "16",
            "--axis", "2", "--modality", "CT", "--channels", "4", "8", "--strides", "2", *extra]


def nifti(path, seed, shape=(16, 16, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    hu = np.random.default_rng(seed).integers(-200, 300, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return path


def dicom_series(folder, seed, n=2):
    """``n`` slices of CT_small.dcm, one series."""
    folder.mkdir(parents=True)
    uid = generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), k + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 2.0 * k]
        ds.PixelData = (ds.pixel_array + 50 * (k + seed)).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{k:04d}")  # no extension, as scanners write them
    return folder


# ---- output names --------------------------------------------------------------------------------------------------


def test_output_paths_keep_relative_folders_and_extensions_and_refuse_what_still_collides(tmp_path):
    assert output_paths(["p01/t2.nii.gz", "p02/t2.nii.gz"], "out", "_seg.nii.gz") == [
        Path("out/p01/t2_seg.nii.gz"), Path("out/p02/t2_seg.nii.gz")]
    assert output_paths(["d/t2.nii.gz", "d/t1.nii"], "out", "_seg.nii.gz") == [
        Path("out/t2_seg.nii.gz"), Path("out/t1_seg.nii.gz")]  # one folder: bare names, as before
    assert output_paths(["d/scan.tif", "d/scan.jpg", "d/other.png", "e/scan.png"], "o", "_mask.png") == [
        Path("o/d/scan_tif_mask.png"), Path("o/d/scan_jpg_mask.png"), Path("o/d/other_mask.png"),
        Path("o/e/scan_mask.png")]
    # anchors: files found in a folder keep their path below it, even when only one sub-folder holds any
    assert output_paths(["in/p01/a.png"], "o", "_mask.png", anchors=["in"]) == [Path("o/p01/a_mask.png")]
    with pytest.raises(ValueError) as e:  # differ only in case: one file on macOS and Windows
        output_paths(["d/Scan.png", "d/scan.png"], "o", "_mask.png")
    assert str(e.value) == (f"d/scan.png: its output {Path('o/scan_mask.png')} would also be the output of "
                            "d/Scan.png; rename one of them.")
    with pytest.raises(ValueError, match="d/a_tif.png: its output .* would also be the output of d/a.tif"):
        output_paths(["d/a.tif", "d/a.png", "d/a_tif.png"], "o", "_mask.png")
    assert [str(n) for n in relative_names(["/x/p01/a.png", "/x/p02/a.png", "/x/b.png"])] == [
        "p01/a.png", "p02/a.png", "b.png"]
    (tmp_path / "b_mask.png").write_bytes(b"")
    refuse_existing([tmp_path / "a_mask.png"])
    with pytest.raises(FileExistsError) as e:
        refuse_existing([tmp_path / "a_mask.png", tmp_path / "b_mask.png"], "--overwrite true")
    assert e.value.filename == str(tmp_path / "b_mask.png")
    assert e.value.strerror == "exists already; pass --overwrite true to replace it"


# ---- volume inference ----------------------------------------------------------------------------------------------


def test_volume_same_names_in_two_folders_and_overwrite(model, tmp_path, capsys):
    a, b = nifti(tmp_path / "p01" / "t2.nii.gz", 0), nifti(tmp_path / "p02" / "t2.nii.gz", 1)
    out = tmp_path / "out"
    written = main(volume_args(model, [a, b], out))
    assert written == [out / "p01" / "t2_seg.nii.gz", out / "p02" / "t2_seg.nii.gz"]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    for src, seg in zip((a, b), written):  # each output is its own input's: same shape and affine
        o, i = nib.load(seg), nib.load(src)
        assert o.shape == i.shape and np.allclose(o.affine, i.affine)
    before = listing(out)
    (out / "p02" / "t2_seg.nii.gz").write_bytes(b"an earlier result")
    before = listing(out)
    with pytest.raises(SystemExit) as e:
        main(volume_args(model, [a, b], out))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {out / 'p01' / 't2_seg.nii.gz'}: exists already (and 1 more "
                                               "of this run's outputs); pass --overwrite to replace them")
    assert listing(out) == before  # nothing written, not even the first
    assert cli(volume_args(model, [a, b], out, "--overwrite")) == 0  # the console entry point's exit status
    after = listing(out)
    assert set(after) == set(before) and after["p02/t2_seg.nii.gz"] != b"an earlier result"
    nib.load(out / "p02" / "t2_seg.nii.gz")


def test_volume_folder_of_nifti_files_and_of_dicom_series_folders(model, tmp_path, capsys):
    study = tmp_path / "study"
    nifti(study / "a.nii.gz", 0)
    nifti(study / "sub" / "a.nii", 1)  # the same stem one folder down
    nifti(study / "b.nii.gz", 2, shape=(12, 14, 2))
    (study / "b.json").write_text("{}")  # a sidecar: skipped, and said so
    written = main(volume_args(model, [study], tmp_path / "out"))
    assert written == [tmp_path / "out" / n for n in ("a_seg.nii.gz", "b_seg.nii.gz", "sub/a_seg.nii.gz")]
    assert nib.load(written[1]).shape == (12, 14, 2)
    captured = capsys.readouterr()
    assert "1 file in the input folders is neither NIfTI nor in a DICOM series folder, skipped: " in captured.err
    assert str(study / "b.json") in captured.err
    for _ in range(2):  # an output folder inside the input folder is not read as input on the next run
        inside = main(volume_args(model, [study], study / "preds", "--overwrite"))
        assert inside == [study / "preds" / p.relative_to(tmp_path / "out") for p in written]
    capsys.readouterr()
    dicoms = tmp_path / "dicoms"
    dicom_series(dicoms / "p01" / "series", 0)
    dicom_series(dicoms / "p02" / "series", 1)
    written = main(volume_args(model, [dicoms], tmp_path / "dout"))
    assert written == [tmp_path / "dout" / p / "series_seg.nii.gz" for p in ("p01", "p02")]
    assert [nib.load(w).shape for w in written] == [(128, 128, 2)] * 2
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    (tmp_path / "empty" / "notes" / "a.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(volume_args(model, [tmp_path / "empty"], tmp_path / "eout"))
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'empty'}: holds no NIfTI files and no DICOM "
                                               "series folders (its sub-folders searched too).")
    assert not (tmp_path / "eout").exists()


def test_the_series_hint_names_the_flag(model, tmp_path, capsys):
    mr2 = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests", "98892003", "MR2")
    with pytest.raises(SystemExit) as e:
        main(volume_args(model, [mr2], tmp_path / "out"))
    assert e.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"error: {mr2}: holds ") and "pick one with --series-uid UID" in first
    assert "series_uid=..." not in first


# ---- 2D inference (the bundles' `inferring`) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("b") / QATA.name
    shutil.copytree(QATA, root, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(build_segmentation_net().state_dict(), root / "models" / "model.pt")
    write_model_info(root / "models" / "model_info.json", make_model_info(
        {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "size": None}, 32))
    return root


def test_inferring_keeps_same_named_images_apart_and_existing_masks(bundle, tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    sizes = {"p01/scan.png": (40, 50), "p02/scan.png": (36, 44), "scan.tif": (32, 48), "scan.jpg": (48, 32),
             "other.png": (33, 35)}
    for name, (h, w) in sizes.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(images / name)
    out = tmp_path / "pred"
    run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(out),
               num_workers=0)
    masks = {"p01/scan_mask.png": (40, 50), "p02/scan_mask.png": (36, 44), "scan_tif_mask.png": (32, 48),
             "scan_jpg_mask.png": (48, 32), "other_mask.png": (33, 35)}
    assert {k: Image.open(out / k).size[::-1] for k in listing(out)} == masks  # one mask per image, its own size
    kept = out / "p02" / "scan_mask.png"
    kept.write_bytes(b"an earlier result")
    before = listing(out)
    with pytest.raises(Exception) as e:
        run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(out),
                   num_workers=0)
    err = root_cause(e.value)
    assert isinstance(err, FileExistsError) and err.filename == str(out / "other_mask.png")
    assert err.strerror == "exists already (and 4 more of this run's outputs); pass --overwrite true to replace them"
    assert listing(out) == before
    run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(out),
               num_workers=0, overwrite="true")
    assert Image.open(kept).size == (44, 36)
    # an output folder inside the input folder is not read as input on the next run
    inside = images / "masks"
    run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(inside),
               num_workers=0)
    run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(inside),
               num_workers=0, overwrite=True)
    assert sorted(listing(inside)) == sorted(masks)


# ---- evaluation: panels and per-image scores -----------------------------------------------------------------------


def test_panels_and_scores_of_same_named_images(tmp_path):
    from ignite.engine import Engine

    from amvlm_monai.evaluation.metrics import read_scores_csv
    from amvlm_monai.handlers.metrics import SegmentationMetric
    from amvlm_monai.handlers.panels import SavePanels, panel_files
    from monai.data import MetaTensor

    names = ["/data/test/p01/scan.png", "/data/test/p02/scan.png", "/data/test/p02/other.png"]
    label = torch.zeros(3, 1, 8, 8)
    label[:, :, :4] = 1
    pred = torch.where(label > 0, 5.0, -5.0)
    pred[1] = -5.0  # the second scan: nothing found, Dice 0
    image = MetaTensor(torch.randn(3, 1, 8, 8), meta={"filename_or_obj": names})
    batch = {"image": image, "label": label, "pred": pred, "text": ["r1", "r2", "r3"],
             "id": ["scan", "scan", "other"]}

    def step(engine, _):
        engine.state.batch = batch
        return {"image": image, "label": label, "pred": pred}

    engine = Engine(step)
    engine.state.device = torch.device("cpu")
    SegmentationMetric("dice", output_csv=str(tmp_path / "scores.csv")).attach(engine, "dice")
    SavePanels(str(tmp_path / "panels"), num_images=8).attach(engine)
    engine.run([0], max_epochs=1)
    scores = read_scores_csv(tmp_path / "scores.csv")
    assert scores["ids"] == ["p01/scan.png", "p02/scan.png", "p02/other.png"]
    assert scores["dice"].tolist() == [1.0, 0.0, 1.0]
    assert sorted(p.name for p in (tmp_path / "panels").glob("*.png")) == ["other.png", "p01_scan.png",
                                                                           "p02_scan.png"]
    assert panel_files([{"id": "a b"}, {"id": "a_b"}, {"id": "A_B"}]) == ["a_b.png", "a_b_2.png", "A_B_3.png"]
