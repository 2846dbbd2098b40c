"""Clinical inputs: every format through the chain, series sorting and selection, intensity by modality, errors."""

import os
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import ITKReader, MetaTensor, PydicomReader
from monai.transforms import Compose
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from amvlm_monai.io.clinical import (
    IntensityByModality,
    clinical_load_chain,
    detect_format,
    load_clinical,
    reader_for,
    resolve_modality,
)
from amvlm_monai.io import clinical

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")
MR2_FOLDER = os.path.join(os.path.dirname(CT_SMALL), "dicomdirtests", "98892003", "MR2")  # 3 localizer series

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:nvImageCodec:UserWarning")


def write_ct_series(folder, n=4, spacing=2.5, uid=None, seed=0, prefix="IM"):
    """``n`` slices of CT_small.dcm at z0 + spacing * k; slice k holds raw pixels + 100 k. File names are shuffled and
    InstanceNumbers scrambled, so only ImagePositionPatient gives the order. Returns (uid, HU slices in position
    order as (rows, cols) arrays)."""
    os.makedirs(folder, exist_ok=True)
    uid = uid or generate_uid()
    rng = np.random.default_rng(seed)
    names, numbers = rng.permutation(n), rng.permutation(n) + 1
    hu = []
    for k in range(n):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(numbers[k])
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + spacing * k]
        arr = ds.pixel_array + 100 * k
        ds.PixelData = arr.astype(np.int16).tobytes()
        ds.save_as(os.path.join(folder, f"{prefix}{names[k]:04d}"))  # no suffix, as scanners write them
        hu.append(arr.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return uid, hu


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "ct"
    uid, hu = write_ct_series(folder)
    return folder, uid, hu


def window(hu, lo=-160.0, hi=240.0):
    return np.clip((np.asarray(hu, np.float64) - lo) / (hi - lo), 0, 1)


def test_detect_format(tmp_path, series):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "a.png")
    assert detect_format(CT_SMALL) == "dicom"
    assert detect_format(series[0]) == "dicom_series"
    assert detect_format(os.path.join(NIB_DATA, "anatomical.nii")) == "nifti"
    assert detect_format(os.path.join(NIB_DATA, "example4d.nii.gz")) == "nifti"
    assert detect_format(tmp_path / "a.png") == "image"
    assert detect_format(next(series[0].iterdir())) == "dicom"  # no suffix: the DICOM preamble decides
    with pytest.raises(ValueError, match="notes.txt"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no DICOM files"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        detect_format(tmp_path / "missing.nii")


def test_single_dicom_ct_window():
    out = Compose(clinical_load_chain(["image"]))({"image": CT_SMALL})["image"]
    ds = pydicom.dcmread(CT_SMALL)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert isinstance(out, MetaTensor) and out.shape == (1, 128, 128) and out.dtype == torch.float32
    assert out.meta["modality"] == "CT" and out.meta["intensity"] == "ct_window(-160, 240)"
    np.testing.assert_allclose(out[0].numpy(), window(hu).T, atol=1e-6)  # readers index (x, y) = (column, row)
    assert out.affine.shape == (4, 4) and np.allclose(out.affine[:2, :2].abs().diagonal(), 0.661468)


def test_single_dicom_mr_zscore():
    out = Compose(clinical_load_chain(["image"]))({"image": MR_SMALL})["image"]
    x = pydicom.dcmread(MR_SMALL).pixel_array.astype(np.float64).T
    nz = x != 0
    z = (x - x[nz].mean()) / x[nz].std()
    expected = np.where(nz, (np.clip(z, -3, 3) + 3) / 6, 0.0)
    assert out.shape == (1, 64, 64) and out.meta["modality"] == "MR"
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_mr_normalisation_stats():
    vol = np.zeros((1, 6, 6, 4), np.float32)
    vol[0, 1:5, 1:5, 1:3] = np.arange(1, 33, dtype=np.float32).reshape(4, 4, 2) ** 1.5  # skewed foreground
    vol[0, 2, 2, 2] = 5000.0  # a bright outlier
    img = MetaTensor(torch.from_numpy(vol))
    out = IntensityByModality("MR")(img).numpy()
    fg = vol != 0
    z = (vol[fg] - vol[fg].mean()) / vol[fg].std()  # population std, as MONAI
    assert np.all(out[~fg] == 0)  # background stays 0
    np.testing.assert_allclose(out[fg], (np.clip(z, -3, 3) + 3) / 6, atol=1e-6)
    assert out[0, 2, 2, 2] == pytest.approx(1.0)  # the outlier is clipped at +3 sd
    pct = IntensityByModality("MR", mr_norm="percentile", percentiles=(5, 95))(img).numpy()
    lo, hi = np.percentile(vol, [5, 95])
    np.testing.assert_allclose(pct, np.clip((vol - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_ct_window_by_hand():
    hu = torch.tensor([[-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0]])
    np.testing.assert_allclose(IntensityByModality("CT")(hu).numpy(), [[0, 0, 0.5, 0.75, 1, 1]], atol=1e-6)
    np.testing.assert_allclose(IntensityByModality("ct", ct_window=(-1000, 1000))(hu).numpy(),
                               [[0, 0.42, 0.52, 0.57, 0.62, 1]], atol=1e-6)
    xr = IntensityByModality("XR")(torch.tensor([[2.0, 4.0, 6.0]]))
    np.testing.assert_allclose(xr.numpy(), [[0, 0.5, 1]])


def test_modality_detection():
    def mt(meta):
        return MetaTensor(torch.zeros(1, 2, 2), meta=meta)

    assert resolve_modality(mt({"modality": "CT"})) == "CT"
    assert resolve_modality(mt({"0008|0060": "MR "})) == "MR"  # ITKReader's tag key
    assert resolve_modality(mt({"00080060": {"vr": "CS", "Value": ["DX"]}})) == "DX"  # PydicomReader's JSON form
    assert resolve_modality(mt({"source_format": "image"})) == "IMAGE"
    assert resolve_modality(mt({})) is None
    assert resolve_modality(mt({"modality": "CT"}), "mr") == "MR"  # explicit wins
    # a DICOM file read with auto gets the CT window; the same file forced to XR gets min-max
    img = load_clinical(CT_SMALL)
    auto, forced = IntensityByModality()(img), IntensityByModality("XR")(img)
    assert auto.meta["intensity"].startswith("ct_window") and forced.meta["intensity"] == "minmax"
    assert not torch.allclose(auto, forced)


def test_series_sorted_by_position_itk(series):
    folder, uid, hu = series
    assert isinstance(reader_for(folder), ITKReader)
    img = load_clinical(folder)
    assert img.shape == (1, 128, 128, 4) and img.meta["modality"] == "CT"
    for k in range(4):  # slice k of the array is the k-th position, whatever the file names and InstanceNumbers
        np.testing.assert_allclose(img[0, :, :, k].numpy(), hu[k].T)
    aff = img.affine.numpy()
    np.testing.assert_allclose(aff[:3, 2], [0, 0, 2.5], atol=1e-4)  # slice step along +z (RAS), ascending
    np.testing.assert_allclose(aff[:3, 3], [158.135803, 179.035797, -75.699997], atol=1e-4)  # LPS -> RAS origin


def test_series_pydicom_fallback(series, monkeypatch):
    folder, uid, hu = series
    ref = load_clinical(folder)
    monkeypatch.setattr(clinical, "_has_itk", lambda: False)
    reader = reader_for(folder)
    assert isinstance(reader, PydicomReader) and not isinstance(reader, ITKReader)
    img = load_clinical(folder)
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.numpy(), ref.numpy())
    np.testing.assert_allclose(img.affine.numpy(), ref.affine.numpy(), atol=1e-4)


def test_nifti_any_orientation(tmp_path):
    path = os.path.join(NIB_DATA, "anatomical.nii")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = Compose(clinical_load_chain(["image"]))({"image": path})["image"]
    assert not [w for w in caught if "modality" in str(w.message)]  # no warning per file: said once, in the log
    ref = nib.load(path)
    assert out.shape == (1, *ref.shape) and out.meta["intensity"] == "percentiles(0.5, 99.5)"
    np.testing.assert_allclose(out.affine.numpy(), ref.affine, atol=1e-5)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    # non-RAS, anisotropic, given as CT: geometry untouched, values windowed
    affine = np.array([[0, 0, -3.0, 10], [-0.7, 0, 0, 20], [0, 1.3, 0, -5], [0, 0, 0, 1]])
    hu = np.random.default_rng(0).integers(-400, 500, (5, 6, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "v.nii.gz")
    ct = Compose(clinical_load_chain(["image"], modality="CT"))({"image": str(tmp_path / "v.nii.gz")})["image"]
    np.testing.assert_allclose(ct.affine.numpy(), affine, atol=1e-6)
    np.testing.assert_allclose(ct[0].numpy(), window(hu), atol=1e-6)


def test_2d_images(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(10, 200, (20, 30)).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray((gray.astype(np.uint16) * 100)).save(tmp_path / "g16.tif")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.jpg", quality=95)
    chain = Compose(clinical_load_chain(["image"]))
    expected = (gray.T - gray.min()) / (gray.max() - gray.min())
    for name in ("g.png", "g16.tif"):
        out = chain({"image": str(tmp_path / name)})["image"]
        assert out.shape == (1, 30, 20) and out.meta["source_format"] == "image", name
        np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
    rgb = chain({"image": str(tmp_path / "rgb.jpg")})["image"]
    assert rgb.shape == (1, 30, 20) and rgb.meta["intensity"] == "minmax"
    assert np.abs(rgb[0].numpy() - expected).mean() < 0.05  # JPEG is lossy


def test_several_series_error_and_pick(tmp_path):
    folder = tmp_path / "study"
    uid_a, _ = write_ct_series(folder, n=3, seed=1, prefix="A")
    uid_b, hu_b = write_ct_series(folder, n=2, spacing=5.0, seed=2, prefix="B")
    with pytest.raises(ValueError) as err:
        load_clinical(folder)
    msg = str(err.value)
    assert str(folder) in msg and uid_a in msg and uid_b in msg and "series_uid" in msg
    img = load_clinical(folder, series_uid=uid_b)
    assert img.shape == (1, 128, 128, 2)
    np.testing.assert_allclose(img[0, :, :, 1].numpy(), hu_b[1].T)
    with pytest.raises(ValueError, match="no series with SeriesInstanceUID 1.2.3"):
        load_clinical(folder, series_uid="1.2.3")
    with pytest.raises(ValueError, match="series folders only"):
        load_clinical(CT_SMALL, series_uid=uid_a)


def test_real_multi_series_folder_lists_uids():
    found = [pydicom.dcmread(os.path.join(MR2_FOLDER, f), stop_before_pixels=True).SeriesInstanceUID
             for f in os.listdir(MR2_FOLDER)]
    with pytest.raises(ValueError) as err:
        load_clinical(MR2_FOLDER)
    assert MR2_FOLDER in str(err.value) and all(uid in str(err.value) for uid in set(found))
    assert len(set(found)) == 3
    with pytest.raises(ValueError, match="mixes slice orientations"):  # a three-plane localizer is no volume
        load_clinical(MR2_FOLDER, series_uid=sorted(set(found), key=found.count)[-1])


@pytest.mark.parametrize("src", [CT_SMALL, os.path.join(NIB_DATA, "example4d.nii.gz")])
def test_truncated_file_named(tmp_path, src):
    name = "cut.dcm" if src.endswith(".dcm") else "cut.nii.gz"
    data = open(src, "rb").read()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        load_clinical(tmp_path / name)
    assert str(err.value).startswith(str(tmp_path / name)) and err.value.__cause__ is not None


def test_invalid_options():
    with pytest.raises(ValueError, match="mr_norm"):
        IntensityByModality(mr_norm="minmax")
    with pytest.raises(ValueError, match="ct_window"):
        IntensityByModality(ct_window=(240, -160))
    with pytest.raises(ValueError, match="percentiles"):
        IntensityByModality(percentiles=(99, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IntensityByModality("CT")(torch.zeros(1, 2, 2))  # no warning when the modality is given
