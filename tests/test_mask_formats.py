"""Every mask format people save is read by one rule, in the converter's check and in training alike: palette PNGs
by their indices, 8- and 16-bit grey, RGB (equal channels, or black and one colour), float NIfTI; only masks that
really are not binary are refused, with the values found."""

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from amvlm_monai.data.datalist import load_datalist
from amvlm_monai.data.describe import describe_mask
from amvlm_monai.io.clinical import binary_mask, label_indices
from amvlm_monai.transforms.pipelines import segmentation_transforms
from amvlm_monai.utils.errors import root_cause
from data_prep.own_data import main

SIZE = 32


def shape_mask(i: int) -> np.ndarray:
    """A bool (SIZE, SIZE) mask: one square whose place depends on ``i``."""
    m = np.zeros((SIZE, SIZE), bool)
    m[3 + i: 11 + i, 4 + 2 * i: 12 + 2 * i] = True
    return m


def palette(m: np.ndarray, colours=((0, 0, 0), (255, 0, 0))) -> Image.Image:
    """Indices 0/1 with a palette whose index 1 is red: as grey ("L") it would be 76, the colour's luminance."""
    arr = np.ascontiguousarray(m, np.uint8)
    im = Image.frombytes("P", arr.shape[::-1], arr.tobytes())
    im.putpalette([c for rgb in colours for c in rgb] + [0] * (768 - 3 * len(colours)))
    return im


def rgb(m: np.ndarray, colour=(255, 255, 255)) -> Image.Image:
    return Image.fromarray((m[..., None] * np.array(colour, np.uint8)).astype(np.uint8), "RGB")


#: name -> (the mask as saved, its suffix)
FORMATS = {
    "palette": lambda m: palette(m),
    "grey01": lambda m: Image.fromarray(m.astype(np.uint8)),
    "grey255": lambda m: Image.fromarray(m.astype(np.uint8) * 255),
    "u16_01": lambda m: Image.fromarray(m.astype(np.uint16)),
    "u16_255": lambda m: Image.fromarray(m.astype(np.uint16) * 255),
    "u16_65535": lambda m: Image.fromarray(m.astype(np.uint16) * 65535),
    "rgb_grey": lambda m: rgb(m),
    "rgb_red": lambda m: rgb(m, (200, 0, 0)),
    "rgba_white": lambda m: Image.fromarray(np.dstack([m * 255] * 3 + [np.full(m.shape, 255)]).astype(np.uint8)),
    "grey_alpha": lambda m: Image.fromarray(np.dstack([m * 255, np.full(m.shape, 255)]).astype(np.uint8)),  # LA
}


def make_folder(root):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (name, save) in enumerate(FORMATS.items()):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        save(shape_mask(i % 8)).save(root / "masks" / f"{name}.png")
    return root


def test_own_data_reads_every_binary_mask_format(tmp_path):
    src = make_folder(tmp_path / "src")
    assert Image.open(src / "masks" / "palette.png").mode == "P"
    assert Image.open(src / "masks" / "u16_65535.png").mode.startswith("I;16")
    path = main(["--src", str(src), "--out", str(tmp_path / "out")])
    items = {it["id"]: it for s in ("training", "validation", "test") for it in load_datalist(path, s)}
    assert sorted(items) == sorted(FORMATS)
    for i, name in enumerate(FORMATS):  # the report written from each mask is the one of its square
        assert items[name]["text"] == describe_mask(shape_mask(i % 8)), name
        # training reads the mask the same way: the same square, in {0, 1}
        out = segmentation_transforms(image_size=SIZE, with_text=False)(items[name])["label"]
        assert torch.equal(out[0].bool(), torch.from_numpy(shape_mask(i % 8).T)), name  # MONAI arrays are (W, H)


def three_classes(m):
    arr = m.astype(np.uint8)
    arr[0:2, 0:2] = 2
    return arr


def two_colours(m):
    arr = np.asarray(rgb(m, (255, 0, 0))).copy()
    arr[0:2, 0:2] = (0, 255, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("save, found", [
    (lambda m: palette(three_classes(m), ((0, 0, 0), (255, 0, 0), (0, 0, 255))),
     "mask values {0, 1, 2} are not binary"),  # palette indices of three classes
    (lambda m: Image.fromarray(m.astype(np.uint16) * 300), "mask values {0, 300} are not binary"),
    (two_colours, "mask colours {(0, 0, 0), (0, 255, 0), (255, 0, 0)} are not binary"),
])
def test_masks_that_are_not_binary_are_refused_with_their_values(tmp_path, capsys, save, found):
    src = make_folder(tmp_path / "src")
    bad = src / "masks" / "grey255.png"
    m = shape_mask(2)
    m[20:26, 20:26] = True
    save(m).save(bad)
    with pytest.raises(SystemExit) as e:
        main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {bad}: {found}"), line
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception) as e:  # training refuses it with the same words
        segmentation_transforms(image_size=SIZE, with_text=False)({"image": str(src / "images" / "grey255.png"),
                                                                   "label": str(bad)})
    assert str(root_cause(e.value)).startswith(f"{bad}: {found}")


def test_float_nifti_masks_and_labels(tmp_path):
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32), np.eye(4)), image)
    m = shape_mask(1)
    nib.save(nib.Nifti1Image(m.astype(np.float32), np.eye(4)), tmp_path / "mask.nii.gz")
    out = segmentation_transforms(image_size=SIZE, with_text=False)({"image": str(image),
                                                                     "label": str(tmp_path / "mask.nii.gz")})
    assert torch.equal(out["label"][0].bool(), torch.from_numpy(m))  # NIfTI arrays are (x, y) as stored
    soft = m.astype(np.float32) * 0.5  # a resampled mask
    soft[0, 0] = 1.0
    nib.save(nib.Nifti1Image(soft, np.eye(4)), tmp_path / "soft.nii.gz")
    with pytest.raises(Exception) as e:
        segmentation_transforms(image_size=SIZE, with_text=False)({"image": str(image),
                                                                   "label": str(tmp_path / "soft.nii.gz")})
    assert str(root_cause(e.value)).startswith(f"{tmp_path / 'soft.nii.gz'}: mask values {{0, 0.5, 1}} are not binary")
    vol = np.zeros((8, 8, 4), np.float32)  # a 3D float mask: one channel, 0/1
    vol[2:5, 2:5, 1:3] = 1
    assert torch.equal(binary_mask(torch.from_numpy(vol)[None]), torch.from_numpy(vol)[None])


def test_class_index_labels_by_the_same_rule():
    pal = np.asarray(palette(np.array([[0, 1], [2, 1]], np.uint8), ((0, 0, 0), (255, 0, 0), (0, 0, 255))))
    assert label_indices(pal[None], num_classes=3).tolist() == [[[0.0, 1.0], [2.0, 1.0]]]  # indices, not colours
    grey_as_rgb = np.repeat(np.array([[[0, 3]]], np.uint16), 3, axis=0)
    assert label_indices(grey_as_rgb).tolist() == [[[0.0, 3.0]]]
    with pytest.raises(ValueError, match=r"x.png: label values 0..3 are outside the class set 0..2"):
        label_indices(grey_as_rgb, "x.png", num_classes=3)
