"""The bad-input corpus (issue 10, section 4): each bad input, generated here, gives a clear message naming the
file before any work is done, and the source folder is left as it was. One case per test."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from amvlm_monai.utils.errors import root_cause

ROOT = Path(__file__).resolve().parents[1]
QATA = ROOT / "bundles" / "qata_covid19_cxr_segmentation"
TINY = {"preset": "small", "image_size": 32, "batch_size": 4, "unlabeled_batch_size": 4, "num_workers": 0,
        "amp": False, "max_epochs": 1, "cache_rate": 0.0}


def listing(root):
    """Every file under ``root`` with its bytes and modification time: the source-unchanged check."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err) and "Traceback" not in "\n".join(err), err
    return err


def tiny_model(folder):
    """A tiny saved U-Net (state dict) and the volume-inference flags that describe it."""
    from amvlm_monai.networks.segmentation import build_segmentation_net

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_segmentation_net(channels=(4, 8), strides=(2,)).state_dict(), folder / "model.pt")
    return ["--model", str(folder / "model.pt"), "--image-size", "16", "--channels", "4", "8", "--strides", "2"]


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


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    dst = tmp_path_factory.mktemp("bad_bundle") / QATA.name
    shutil.copytree(QATA, dst, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    return dst


def _can_write(folder):
    try:
        fd, name = tempfile.mkstemp(dir=folder)
        os.close(fd)
        os.unlink(name)
        return True
    except OSError:
        return False


@pytest.fixture
def readonly(tmp_path):
    """A folder nobody can write to (chmod 555; for root, which ignores it, the immutable attribute)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if _can_write(folder):  # running as root
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable or _can_write(folder):
            folder.chmod(0o755)
            pytest.skip("no way to make a read-only folder here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


# ---- masks with values other than the documented 0/1 or 0/255 ---------------------------------------------------


def test_mask_values_in_a_converter(tmp_path, capsys):
    from test_qata import make_lvit

    from data_prep.qata import main

    src = make_lvit(tmp_path / "QaTa-COV19")
    mask = src / "Train_Folder" / "labelcol" / "mask_covid_2.png"
    arr = np.zeros((32, 32), np.uint8)
    arr[0, :4] = [0, 1, 7, 128]
    Image.fromarray(arr).save(mask)
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {mask}: mask values {{0, 1, 7, 128}} are not binary")
    assert listing(src) == before and not (tmp_path / "out").exists()


def test_mask_values_in_training(tmp_path):
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    src = tmp_path / "data"
    src.mkdir()
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(src / "a.png")
    arr = np.zeros((16, 16), np.uint8)
    arr[2:6, 2:6], arr[8:10, 8:10] = 7, 128
    Image.fromarray(arr).save(src / "mask_a.png")
    before = listing(src)
    with pytest.raises(Exception) as e:
        segmentation_transforms(image_size=16)({"image": str(src / "a.png"), "label": str(src / "mask_a.png"),
                                                 "text": "A report."})
    msg = str(root_cause(e.value))
    assert msg.startswith(f"{src / 'mask_a.png'}: mask values {{0, 7, 128}} are not binary")
    assert listing(src) == before


# ---- NaN or infinite voxels --------------------------------------------------------------------------------------


def test_nan_voxels_in_the_mrspineseg_converter(tmp_path, capsys):
    from test_mrspineseg import make

    from data_prep.mrspineseg import main

    src = make(tmp_path / "src")
    case = src / "train" / "MR" / "Case2.nii.gz"
    img = nib.load(case)
    data = img.get_fdata().astype(np.float32)
    data[1, 2, 1] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), case)
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {case}: 1 NaN and 0 infinite voxels")
    assert listing(src) == before and not (tmp_path / "out").exists()


def test_inf_voxels_in_volume_inference(tmp_path, capsys):
    from amvlm_monai.inference.volume import main

    src = tmp_path / "src"
    src.mkdir()
    vol = np.random.default_rng(0).normal(0, 1, (8, 9, 5)).astype(np.float32)
    vol[2, 3, 4] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), src / "inf.nii.gz")
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(tiny_model(tmp_path / "m") + ["--input", str(src / "inf.nii.gz"), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {src / 'inf.nii.gz'}: 0 NaN and 1 infinite values")
    assert listing(src) == before and not list((tmp_path / "out").glob("*"))


def test_nan_image_in_training(tmp_path):
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    src = tmp_path / "data"
    src.mkdir()
    img = np.random.default_rng(0).normal(0, 1, (16, 16)).astype(np.float32)
    img[3, 3] = np.nan
    nib.save(nib.Nifti1Image(img, np.eye(4)), src / "s1.nii.gz")
    nib.save(nib.Nifti1Image((img > 0).astype(np.uint8), np.eye(4)), src / "s1_label.nii.gz")
    before = listing(src)
    with pytest.raises(Exception) as e:
        segmentation_transforms(image_size=16, augment=True)({"image": str(src / "s1.nii.gz"),
                                                               "label": str(src / "s1_label.nii.gz"), "text": "T."})
    assert str(root_cause(e.value)).startswith(f"{src / 's1.nii.gz'}: 1 NaN and 0 infinite values")
    assert listing(src) == before


def test_non_finite_loss_names_the_image_files(tmp_path):
    """With augmentation the images lose their metadata; the loss check still names the files of the batch."""
    from monai.data import DataLoader, Dataset

    from amvlm_monai.engines.pretrainer import batch_names
    from amvlm_monai.engines.step import check_finite
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    items = []
    for i in range(2):
        Image.fromarray(np.full((16, 16), 50 * i, np.uint8)).save(tmp_path / f"img{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / f"mask{i}.png")
        items.append({"image": str(tmp_path / f"img{i}.png"), "label": str(tmp_path / f"mask{i}.png"),
                      "text": "No lesion.", "id": f"id{i}"})
    batch = next(iter(DataLoader(Dataset(items, segmentation_transforms(16, augment=True)), batch_size=2)))
    with pytest.raises(FloatingPointError) as e:
        check_finite({"loss": torch.tensor(float("nan"))}, batch_names(batch))
    assert f"{tmp_path / 'img0.png'}, {tmp_path / 'img1.png'}" in str(e.value)


# ---- volume inference: 4D NIfTI, RGBA PNG, non-DICOM .dcm, empty file ---------------------------------------------


def test_4d_nifti_in_volume_inference(tmp_path, capsys):
    from amvlm_monai.inference.volume import main

    src = tmp_path / "src"
    src.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5, 3), np.float32), np.eye(4)), src / "fmri.nii.gz")
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(tiny_model(tmp_path / "m") + ["--input", str(src / "fmri.nii.gz"), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {src / 'fmri.nii.gz'}: a 4D NIfTI holding 3 volumes of shape (8, 9, 5)")
    assert listing(src) == before


def test_rgba_png_in_volume_inference_is_segmented(tmp_path):
    """An RGBA PNG (alpha dropped, colour averaged to grey, as in training) gives a label map of its size."""
    from amvlm_monai.inference.volume import main

    src = tmp_path / "src"
    src.mkdir()
    rgba = np.random.default_rng(0).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "photo.png")
    before = listing(src)
    (out,) = main(tiny_model(tmp_path / "m") + ["--input", str(src / "photo.png"), "--output", str(tmp_path / "o")])
    seg = nib.load(out)
    assert seg.shape == (30, 20) and set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    assert listing(src) == before


def test_non_dicom_dcm_file_in_volume_inference(tmp_path, capsys):
    from amvlm_monai.inference.volume import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "scan.dcm").write_bytes(b"this is a text file, not DICOM\n" * 20)
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(tiny_model(tmp_path / "m") + ["--input", str(src / "scan.dcm"), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = error_lines(capsys)  # one line, not every reader's traceback
    assert line.startswith(f"error: {src / 'scan.dcm'}: not a DICOM file") and len(line) < 300
    assert listing(src) == before


def test_zero_byte_file_in_volume_inference(tmp_path, capsys):
    from amvlm_monai.inference.volume import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.nii.gz").write_bytes(b"")
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(tiny_model(tmp_path / "m") + ["--input", str(src / "empty.nii.gz"), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = error_lines(capsys)
    assert line == f"error: {src / 'empty.nii.gz'}: empty file (0 bytes); nothing to read (an interrupted copy?)."
    assert listing(src) == before


def test_zero_byte_file_in_2d_inference(tmp_path):
    from amvlm_monai.transforms.pipelines import inference_transforms

    src = tmp_path / "src"
    src.mkdir()
    (src / "x.png").write_bytes(b"")
    before = listing(src)
    with pytest.raises(Exception) as e:
        inference_transforms(16)({"image": str(src / "x.png")})
    assert str(root_cause(e.value)).startswith(f"{src / 'x.png'}: empty file (0 bytes)")
    assert listing(src) == before


def test_non_dicom_dcm_file_in_2d_inference(tmp_path):
    from amvlm_monai.transforms.pipelines import inference_transforms

    src = tmp_path / "src"
    src.mkdir()
    (src / "x.dcm").write_bytes(os.urandom(600))
    before = listing(src)
    with pytest.raises(Exception) as e:
        inference_transforms(16)({"image": str(src / "x.dcm")})
    assert str(root_cause(e.value)).startswith(f"{src / 'x.dcm'}: not a DICOM file")
    assert listing(src) == before


# ---- truncated checkpoints ----------------------------------------------------------------------------------------


def truncate(src_file, dst):
    data = Path(src_file).read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_stage1_checkpoint_in_training(bundle, demo_data, tiny_amvlm, tmp_path):
    full = tmp_path / "full.pt"
    torch.save({"model": tiny_amvlm.state_dict(), "config": tiny_amvlm.config}, full)
    bad = truncate(full, tmp_path / "ckpt" / "amvlm_pretrained.pt")
    before = listing(demo_data.parent)
    with pytest.raises(Exception) as e:
        run_bundle(bundle, "training", ["train.json"], dataset_dir=str(demo_data), pretrained_path=str(bad),
                   ckpt_dir=str(tmp_path / "out"), **TINY)
    assert str(root_cause(e.value)).startswith(f"{bad}: not a readable PyTorch checkpoint")
    assert not (tmp_path / "out" / "model.pt").exists() and listing(demo_data.parent) == before


def test_truncated_model_in_evaluation(bundle, demo_data, tmp_path):
    from amvlm_monai.io.model_info import make_model_info, write_model_info
    from amvlm_monai.networks.segmentation import build_segmentation_net

    models = tmp_path / "models"
    torch.save(build_segmentation_net().state_dict(), tmp_path / "full.pt")
    bad = truncate(tmp_path / "full.pt", models / "model.pt")
    write_model_info(models / "model_info.json",
                     make_model_info({"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "size": None}, 32))
    before = listing(demo_data.parent)
    with pytest.raises(Exception) as e:
        run_bundle(bundle, "evaluating", ["train.json", "evaluate.json"], dataset_dir=str(demo_data),
                   output_dir=str(models), eval_dir=str(tmp_path / "eval"), num_workers=0)
    assert str(root_cause(e.value)).startswith(f"{bad}: not a readable PyTorch checkpoint")
    assert listing(demo_data.parent) == before


def test_truncated_checkpoint_in_the_uncertainty_report(tiny_amvlm, tmp_path, capsys):
    from amvlm_monai.evaluation.uncertainty import main

    torch.save({"model": tiny_amvlm.state_dict(), "config": tiny_amvlm.config}, tmp_path / "full.pt")
    bad = truncate(tmp_path / "full.pt", tmp_path / "src" / "amvlm_pretrained.pt")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "src" / "a.png")
    before = listing(tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(bad), "--image", str(tmp_path / "src" / "a.png"), "--reports", "A.", "B."])
    assert e.value.code == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {bad}: not a readable PyTorch checkpoint")
    assert listing(tmp_path / "src") == before


# ---- read-only output folders: refused before any work -----------------------------------------------------------


def test_read_only_output_folder_in_training(bundle, demo_data, readonly):
    before = listing(demo_data.parent)
    with pytest.raises(Exception) as e:
        run_bundle(bundle, "training", ["train.json", "variants/supervised.json"], dataset_dir=str(demo_data),
                   ckpt_dir=str(readonly), **TINY)
    err = root_cause(e.value)
    assert isinstance(err, OSError) and err.filename == str(readonly)
    assert "cannot be written" in str(err) and "nothing was started" in str(err)
    assert listing(demo_data.parent) == before and not list(readonly.iterdir())


def test_read_only_output_folder_in_volume_inference(tmp_path, readonly, capsys):
    from amvlm_monai.inference.volume import main

    src = tmp_path / "src"
    src.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5), np.float32), np.eye(4)), src / "v.nii.gz")
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(tiny_model(tmp_path / "m") + ["--input", str(src / "v.nii.gz"), "--output", str(readonly)])
    assert e.value.code == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {readonly}: output folder cannot be written")
    assert listing(src) == before


def test_read_only_output_folder_in_2d_inference(bundle, demo_data, readonly):
    images = demo_data.parent / "raw" / "Test_Folder" / "img"
    before = listing(demo_data.parent)
    with pytest.raises(Exception) as e:
        run_bundle(bundle, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(readonly),
                   num_workers=0)
    err = root_cause(e.value)
    assert isinstance(err, OSError) and err.filename == str(readonly)
    assert listing(demo_data.parent) == before


# ---- datalist paths that leave the data folder ----------------------------------------------------------------------


def _datalist_with(tmp_path, image_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "img" / "a.png")
    item = {"image": image_path, "label": "img/a.png", "text": "T.", "id": "a"}
    (data / "datalist.json").write_text(json.dumps({"training": [item]}))
    return data


def test_datalist_path_with_dotdot(tmp_path):
    from amvlm_monai.data.datalist import load_datalist
    from amvlm_monai.utils.errors import DataError

    data = _datalist_with(tmp_path, "../elsewhere/a.png")
    before = listing(data)
    with pytest.raises(DataError) as e:
        load_datalist(data / "datalist.json")
    outside = os.path.normpath(tmp_path / "elsewhere" / "a.png")
    assert e.value.problems[0].startswith(f"{outside}: image of training[0] in {data / 'datalist.json'} lies outside")
    assert "allow_outside_paths true" in str(e.value)
    assert load_datalist(data / "datalist.json", allow_outside=True)[0]["image"] == outside
    assert listing(data) == before


def test_datalist_absolute_path(tmp_path):
    from amvlm_monai.data.datalist import load_datalist
    from amvlm_monai.utils.errors import DataError

    data = _datalist_with(tmp_path, "/etc/hostname")
    before = listing(data)
    with pytest.raises(DataError) as e:
        load_datalist(data / "datalist.json")
    assert e.value.problems[0].startswith("/etc/hostname: image of training[0]")
    assert listing(data) == before


def test_datalist_path_outside_in_a_bundle_run(bundle, demo_data, tmp_path):
    """The bundles refuse it too, before training; --allow_outside_paths true lets it through."""
    split = json.loads((demo_data / "split_labeled25.json").read_text())
    split.pop("data_roots")  # the converter's record of the source folder is what allows its paths
    (tmp_path / "split_labeled25.json").write_text(json.dumps(split))
    for name in ("datalist.json",):
        shutil.copy(demo_data / name, tmp_path / name)
    before = listing(demo_data.parent)
    with pytest.raises(Exception) as e:
        run_bundle(bundle, "training", ["train.json", "variants/supervised.json"], dataset_dir=str(tmp_path),
                   ckpt_dir=str(tmp_path / "out"), **TINY)
    assert "lies outside the data folder" in str(root_cause(e.value)) and str(tmp_path) in str(root_cause(e.value))
    assert not (tmp_path / "out" / "model.pt").exists() and listing(demo_data.parent) == before
