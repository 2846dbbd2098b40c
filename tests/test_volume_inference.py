"""Volume inference: label maps overlay the input voxel for voxel (affine, shape, zooms), with known-answer networks."""

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import ITKReader
from monai.transforms import LoadImage
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from amvlm_monai.inference.volume import ResizedSliceNet, VolumeSegmenter, main, output_path, segment_volume
from amvlm_monai.io import clinical

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:nvImageCodec:UserWarning")

# non-RAS (axes permuted and flipped), anisotropic (0.7, 1.3, 3.0) mm, odd sizes
AFFINE = np.array([[0, 0, -3.0, 10.0], [-0.7, 0, 0, 20.0], [0, 1.3, 0, -5.0], [0, 0, 0, 1]])
SHAPE = (19, 23, 7)
T_HU = 45.5  # binary threshold in HU; inputs are integers, so no voxel sits on it


def hu_to_x(hu):
    """The network's input for a CT voxel: window (-160, 240) to [0, 1], then [-1, 1]."""
    return 2 * np.clip((np.asarray(hu, np.float64) + 160) / 400, 0, 1) - 1


def shift_net():
    """logit[i, j] = x[i, j + 1] - x(T_HU) (0 past the border): a threshold that looks one pixel along the slice's
    second in-plane axis, so slicing along the wrong axis or a flipped slice gives a different mask."""
    conv = torch.nn.Conv2d(1, 1, kernel_size=(1, 3), padding=(0, 1))
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 2] = 1.0
        conv.bias.fill_(-float(hu_to_x(T_HU)))
    return conv


def expected_shift(hu, axis):
    """The shift net's mask for slices along ``axis`` of ``hu``: the next voxel along the last in-plane axis."""
    last = max(a for a in range(3) if a != axis)
    x = hu_to_x(hu)
    nxt = np.zeros_like(x)  # zero padding = x of 0, below the threshold
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[last], dst[last] = slice(1, None), slice(None, -1)
    nxt[tuple(dst)] = x[tuple(src)]
    return (nxt - hu_to_x(T_HU) > 0).astype(np.uint8)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    hu = np.random.default_rng(0).integers(-300, 400, SHAPE).astype(np.int16)
    path = tmp_path_factory.mktemp("vol") / "case7.nii.gz"
    nib.save(nib.Nifti1Image(hu, AFFINE), path)
    return path, hu


def check_geometry(out, ref_path):
    o, ref = nib.load(out), nib.load(ref_path)
    assert o.shape == ref.shape
    np.testing.assert_allclose(o.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(o.header.get_zooms(), ref.header.get_zooms(), atol=1e-6)
    assert o.get_data_dtype() == np.uint8
    return np.asarray(o.dataobj)


@pytest.mark.parametrize("axis", [0, 2])
def test_non_ras_round_trip(volume, tmp_path, axis):
    path, hu = volume
    out = segment_volume(shift_net(), path, tmp_path, image_size=None, axis=axis, modality="CT")
    assert out == tmp_path / "case7_seg.nii.gz"
    seg = check_geometry(out, path)
    np.testing.assert_allclose(nib.load(out).header.get_zooms(), (0.7, 1.3, 3.0), atol=1e-6)
    exp = expected_shift(hu, axis)
    assert 0.2 < exp.mean() < 0.8
    np.testing.assert_array_equal(seg, exp)


def test_reoriented_slicing_written_back(volume, tmp_path):
    """axcodes='RAS': slices along A (axis 1 of the RAS volume); the label map still overlays the stored input."""
    path, hu = volume
    out = segment_volume(shift_net(), path, tmp_path, image_size=None, axis=1, modality="CT", axcodes="RAS")
    seg = check_geometry(out, path)
    to_ras = ornt_transform(io_orientation(AFFINE), axcodes2ornt("RAS"))
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(AFFINE))
    exp = apply_orientation(expected_shift(apply_orientation(hu, to_ras), axis=1), back)
    np.testing.assert_array_equal(seg, exp)
    assert not np.array_equal(seg, expected_shift(hu, axis=1))  # the reorientation mattered


def test_resized_slices(tmp_path):
    """image_size differs from the slices: per-slice constant volumes come back exact; a half-space stays put."""
    k = np.arange(SHAPE[2])
    hu = np.broadcast_to(np.where(k % 3 == 0, 300, -300), SHAPE).astype(np.int16)  # constant in each slice
    nib.save(nib.Nifti1Image(hu, AFFINE), tmp_path / "const.nii")
    conv = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(-float(hu_to_x(T_HU)))
    seg = check_geometry(segment_volume(conv, tmp_path / "const.nii", tmp_path, image_size=32, axis=2,
                                        modality="CT"), tmp_path / "const.nii")
    np.testing.assert_array_equal(seg, hu > T_HU)
    i = np.arange(SHAPE[0])[:, None, None]
    half = np.broadcast_to(np.where(i < 6, 300, -300), SHAPE).astype(np.int16)
    nib.save(nib.Nifti1Image(half, AFFINE), tmp_path / "half.nii")
    seg = check_geometry(segment_volume(conv, tmp_path / "half.nii", tmp_path, image_size=(48, 40), axis=2,
                                        modality="CT"), tmp_path / "half.nii")
    far = np.abs(np.arange(SHAPE[0]) - 5.5) > 1.5  # away from the edge, interpolation cannot flip a voxel
    np.testing.assert_array_equal(seg[far], (half > T_HU)[far])


def test_slice_minmax_scales_each_slice(tmp_path):
    """slice_minmax: each slice min-maxed on its own (as in 2D training), so scaled copies of one slice agree."""
    pattern = np.random.default_rng(1).random(SHAPE[1:]).astype(np.float32)  # (23, 7) slices along axis 0
    vol = np.stack([(k + 1) * 50.0 * pattern + 30.0 * k for k in range(SHAPE[0])])
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "mr.nii.gz")
    conv = torch.nn.Conv2d(1, 1, 1)  # foreground where the network input is above 0 (the slice's mid-range)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    out = segment_volume(conv, tmp_path / "mr.nii.gz", tmp_path, image_size=None, axis=0, slice_minmax=True)
    seg = check_geometry(out, tmp_path / "mr.nii.gz")
    m = (pattern - pattern.min()) / (pattern.max() - pattern.min())
    np.testing.assert_array_equal(seg, np.broadcast_to(m > 0.5, SHAPE))
    other = segment_volume(conv, tmp_path / "mr.nii.gz", tmp_path / "vol", image_size=None, axis=0)  # volume-wide
    assert not np.array_equal(np.asarray(nib.load(other).dataobj), seg)


def test_multiclass_writes_class_indices(volume, tmp_path):
    path, hu = volume
    conv = torch.nn.Conv2d(1, 3, 1)  # logits (-10x - 5, 0, 10x - 5): class 0 below x=-0.5, 2 above 0.5, else 1
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-10.0, 0.0, 10.0]).view(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([-5.0, 0.0, -5.0]))
    hu = np.where(np.isin(hu, (-60, 140)), hu + 1, hu)  # x = -0.5 / 0.5 would tie
    nib.save(nib.Nifti1Image(hu.astype(np.int16), AFFINE), tmp_path / "mc.nii.gz")
    seg = check_geometry(segment_volume(conv, tmp_path / "mc.nii.gz", tmp_path / "out", image_size=None, axis=0,
                                        modality="CT", multiclass=True), tmp_path / "mc.nii.gz")
    exp = np.where(hu < -60, 0, np.where(hu > 140, 2, 1))
    assert set(np.unique(exp)) == {0, 1, 2}
    np.testing.assert_array_equal(seg, exp)


def write_ct_series(folder, n=5, spacing=2.0):
    """CT_small.dcm as ``n`` slices (shuffled names, scrambled InstanceNumbers); slice k: raw + 150 k."""
    os.makedirs(folder)
    uid, rng, hu = generate_uid(), np.random.default_rng(3), []
    names, numbers = rng.permutation(n), rng.permutation(n) + 1
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), int(numbers[k])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + spacing * k]
        arr = ds.pixel_array + 150 * k
        ds.PixelData = arr.astype(np.int16).tobytes()
        ds.save_as(os.path.join(folder, f"{names[k]}.dcm"))
        hu.append(arr * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(hu, -1)  # (rows, cols, n) in position order


def test_dicom_series_round_trip(tmp_path, monkeypatch):
    hu = write_ct_series(tmp_path / "series1")
    itk_img = LoadImage(reader=ITKReader(), image_only=True)(str(tmp_path / "series1"))  # the geometry to match
    out = segment_volume(shift_net(), tmp_path / "series1", tmp_path / "out", image_size=None, axis=2)
    assert out.name == "series1_seg.nii.gz"
    o = nib.load(out)
    assert o.shape == tuple(itk_img.shape) == (128, 128, 5)
    np.testing.assert_allclose(o.affine, itk_img.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(o.affine[:3, 2], [0, 0, 2.0], atol=1e-4)
    seg = np.asarray(o.dataobj)
    np.testing.assert_array_equal(seg, expected_shift(hu.transpose(1, 0, 2), axis=2))  # arrays are (x=col, y=row)
    monkeypatch.setattr(clinical, "_has_itk", lambda: False)  # the pydicom fallback writes the same map
    o2 = nib.load(segment_volume(shift_net(), tmp_path / "series1", tmp_path / "out2", image_size=None, axis=2))
    np.testing.assert_allclose(o2.affine, o.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(o2.dataobj), seg)


def test_cli_with_unet_state_dict(volume, tmp_path):
    from amvlm_monai.networks.segmentation import build_segmentation_net

    path, _ = volume
    torch.manual_seed(0)
    net = build_segmentation_net(out_channels=3, channels=(4, 8), strides=(2,))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    args = ["--model", str(tmp_path / "model.pt"), "--input", str(path), "--output", str(tmp_path / "pred"),
            "--image-size", "16", "--axis", "1", "--modality", "CT", "--out-channels", "3", "--multiclass",
            "--channels", "4", "8", "--strides", "2"]
    (out,) = main(args)
    seg = check_geometry(out, path)
    assert set(np.unique(seg)) <= {0, 1, 2}
    with pytest.raises(SystemExit):  # a state dict that does not fit the network asked for
        main(args[:-5] + ["--channels", "4", "16", "--strides", "2"])
    mr2 = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests", "98892003", "MR2")
    with pytest.raises(SystemExit):  # a folder of several series: the CLI reports it instead of a traceback
        main(args[:3] + [mr2] + args[4:])


def test_options_and_shapes(tmp_path):
    net = ResizedSliceNet(torch.nn.Conv2d(1, 2, 1), image_size=32)
    assert net(torch.zeros(3, 1, 19, 23)).shape == (3, 2, 19, 23)
    mr2 = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests", "98892003", "MR2")
    with pytest.raises(ValueError, match="pick one with --series-uid"):
        segment_volume(torch.nn.Conv2d(1, 1, 1), mr2, tmp_path)
    with pytest.raises(ValueError, match="axis"):
        VolumeSegmenter(torch.nn.Conv2d(1, 1, 1), axis=3)
    with pytest.raises(ValueError, match="image_size"):
        ResizedSliceNet(torch.nn.Identity(), image_size=(0, 4))
    with pytest.raises(ValueError, match="1 output channel"):
        VolumeSegmenter(torch.nn.Conv2d(1, 2, 1)).labels(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="multiclass needs"):
        VolumeSegmenter(torch.nn.Conv2d(1, 1, 1), multiclass=True).labels(torch.zeros(1, 4, 4, 4))
    (tmp_path / "s.1").mkdir()  # a series folder keeps its whole name
    assert output_path(tmp_path / "s.1", "o") == output_path("a/s.1.nii.gz", "o") == output_path("s.1.nii", "o") \
        == output_path("b/s.1.png", "o") == output_path(tmp_path / "s.1.dcm", "o") == output_path("s.1.dcm", "o")
    assert str(output_path("c.nii.gz", "o")) == os.path.join("o", "c_seg.nii.gz")
