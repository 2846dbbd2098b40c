import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from amvlm_monai.data.datalist import load_datalist
from amvlm_monai.data.spine import DISCS, SPINE_CLASSES, SPINE_PROMPTS, VERTEBRAE, describe_spine
from amvlm_monai.utils.errors import DataError
from data_prep.mrspineseg import convert_mrspineseg, main

SHAPE = (6, 8, 4)  # stored axes: inferior, posterior, right (a sagittal stack along the last axis)
AFFINE = np.array([[0.0, 0.0, 3.5, -10.0], [0.0, -0.6, 0.0, 20.0], [-0.7, 0.0, 0.0, 30.0], [0, 0, 0, 1]])
N_CASES = 5


def volume(n):
    return np.random.default_rng(n).normal(100, 20, SHAPE).astype(np.float32)


def labels(n):
    lab = np.zeros(SHAPE, np.uint8)
    lab[0:2, 1:4, 1] = 1  # S on sagittal slice 1
    lab[3:5, 2:5, 1] = 12  # L4/L5 on slice 1
    lab[1:3, 4:7, 2] = 2 + n % 3  # L5, L4 or L3 on slice 2; slices 0 and 3 empty
    return lab


def save(arr, path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def make(root, n_cases=N_CASES):
    for n in range(1, n_cases + 1):
        save(volume(n), root / "train" / "MR" / f"Case{n}.nii.gz")
        save(labels(n), root / "train" / "Mask" / f"mask_case{n}.nii.gz")
    return root


def listing(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_spine_classes_and_prompts():
    assert len(SPINE_CLASSES) == 20 and SPINE_CLASSES[0] == "background"
    assert SPINE_CLASSES[1] == "S" and SPINE_CLASSES[2] == "L5" and SPINE_CLASSES[10] == "T9"
    assert SPINE_CLASSES[11] == "L5/S" and SPINE_CLASSES[16] == "T12/L1" and SPINE_CLASSES[19] == "T9/T10"
    assert len(VERTEBRAE) == 10 and len(DISCS) == 9
    assert sorted(SPINE_PROMPTS) == list(range(1, 20)) and len(set(SPINE_PROMPTS.values())) == 19
    assert SPINE_PROMPTS[1] == "The sacrum." and SPINE_PROMPTS[3] == "The L4 vertebra."
    assert SPINE_PROMPTS[12] == "The L4/L5 intervertebral disc."
    assert describe_spine(np.array([[12, 0], [3, 1]])) == "Visible levels: S, L4, L4/L5."


def test_slices_geometry_and_text(tmp_path):
    src = make(tmp_path / "data" / "MRSpineSeg")
    before = listing(src)
    path = main(["--src", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--seed", "0"])
    assert listing(src) == before
    dl = {s: load_datalist(path, s) for s in ("training", "validation", "test")}
    assert [len({it["case"] for it in v}) for v in dl.values()] == [3, 1, 1]  # 20% test, 10% of the rest
    assert sum(len(v) for v in dl.values()) == 2 * N_CASES  # only slices 1 and 2 hold labels
    owners = {}
    for section, items in dl.items():
        for it in items:
            assert owners.setdefault(it["case"], section) == section
            n, i = int(it["case"][4:]), it["slice"]
            assert it["id"] == f"Case{n}_s{i:03d}" and i in (1, 2)
            img, lab = nib.load(it["image"]), nib.load(it["label"])
            assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
            a, b = img.get_fdata(), np.asarray(lab.dataobj)
            assert a.shape == b.shape == (8, 6)  # canonical (anterior, superior) plane
            # canonical RAS: R = stored axis 2, A = stored axis 1 flipped, S = stored axis 0 flipped
            np.testing.assert_allclose(a, volume(n)[::-1, ::-1, i].T, rtol=1e-6)
            np.testing.assert_array_equal(b, labels(n)[::-1, ::-1, i].T)
            for j, k in ((0, 0), (7, 5), (3, 2)):  # same world point as the source voxel
                world = img.affine @ [j, k, 0, 1]
                np.testing.assert_allclose(world, AFFINE @ [5 - k, 7 - j, i, 1], atol=1e-4)
            assert nib.aff2axcodes(img.affine)[:2] == ("A", "S")
            expected = "Visible levels: S, L4/L5." if i == 1 else f"Visible levels: {SPINE_CLASSES[2 + n % 3]}."
            assert it["text"] == expected
    raw = json.loads(path.read_text())
    assert raw["test"][0]["image"].startswith("images/Case") and set(raw["test"][0]) == {
        "image", "label", "text", "id", "case", "slice"}
    for name in ("split_labeled25.json", "split_labeled50.json", "split_fewshot1.json", "split_fewshot10.json"):
        split = json.loads((tmp_path / "out" / name).read_text())
        flags = {}
        for it in split["training"]:
            assert flags.setdefault(it["case"], it["labeled"]) == it["labeled"]
        assert split["split"]["group_key"] == "case"
    again = convert_mrspineseg(tmp_path / "data", tmp_path / "again", seed=0)
    assert again.read_text() == path.read_text()
    assert (again.parent / "split_fewshot10.json").read_text() == (path.parent / "split_fewshot10.json").read_text()
    tests = [{it["case"] for it in load_datalist(convert_mrspineseg(src, tmp_path / f"s{s}", seed=s), "test")}
             for s in (1, 2, 3)]
    assert any(t != {it["case"] for it in dl["test"]} for t in tests)


def test_monai_reads_a_slice(tmp_path):
    from monai.transforms import LoadImage

    path = convert_mrspineseg(make(tmp_path / "src", 3), tmp_path / "out")
    it = load_datalist(path, "training")[0]
    img = LoadImage(image_only=True)(it["image"])
    assert tuple(img.shape) == (8, 6)
    np.testing.assert_allclose(np.asarray(img), nib.load(it["image"]).get_fdata(), rtol=1e-6)


def test_keep_empty_and_axis(tmp_path):
    src = make(tmp_path / "src", 3)
    dl = json.loads(convert_mrspineseg(src, tmp_path / "all", keep_empty=True).read_text())
    items = [it for v in dl.values() for it in v]
    assert len(items) == 3 * SHAPE[2]
    assert sorted(it["text"] for it in items if it["slice"] in (0, 3)) == ["No labelled structure is visible."] * 6
    dl = json.loads(convert_mrspineseg(src, tmp_path / "ax0", axis=0).read_text())  # stored axis 0 = S
    items = [it for v in dl.values() for it in v]
    assert len(items) == 3 * 5  # rows 0-4 of stored axis 0 hold labels
    assert nib.load(tmp_path / "ax0" / items[0]["image"]).shape == (4, 8)


def break_shape(src):
    save(np.zeros((6, 8, 5), np.uint8), src / "train" / "Mask" / "mask_case2.nii.gz")
    return ["mask_case2.nii.gz", "shape (6, 8, 5)", "Case2.nii.gz"]


def break_affine(src):
    moved = AFFINE.copy()
    moved[0, 3] += 5
    save(labels(3), src / "train" / "Mask" / "mask_case3.nii.gz", moved)
    return ["mask_case3.nii.gz", "another affine", "Case3.nii.gz"]


def break_label_values(src):
    lab = labels(4)
    lab[0, 0, 0] = 25
    save(lab, src / "train" / "Mask" / "mask_case4.nii.gz")
    return ["mask_case4.nii.gz", "label values [25]", "0..19"]


def break_float_labels(src):
    lab = labels(4).astype(np.float32)
    lab[0, 0, 0] = 1.5
    save(lab, src / "train" / "Mask" / "mask_case4.nii.gz")
    return ["mask_case4.nii.gz", "[1.5]"]


def break_case_without_mask(src):
    (src / "train" / "Mask" / "mask_case5.nii.gz").unlink()
    return ["case without a mask", "Case5.nii.gz"]


def break_mask_without_case(src):
    save(labels(9), src / "train" / "Mask" / "mask_case9.nii.gz")
    return ["mask without a case", "mask_case9.nii.gz"]


def break_truncated(src):
    p = src / "train" / "MR" / "Case1.nii.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    return ["truncated NIfTI", "Case1.nii.gz"]


def break_garbage(src):
    (src / "train" / "Mask" / "mask_case2.nii.gz").write_bytes(b"not a nifti file")
    return ["corrupt or truncated NIfTI", "mask_case2.nii.gz"]


def break_name(src):
    save(volume(1), src / "train" / "MR" / "scan1.nii.gz")
    return ["unexpected file name", "scan1.nii.gz"]


def break_empty_mask(src):
    save(np.zeros(SHAPE, np.uint8), src / "train" / "Mask" / "mask_case1.nii.gz")
    return ["mask_case1.nii.gz", "no labelled voxel"]


@pytest.mark.parametrize(
    "breaker",
    [break_shape, break_affine, break_label_values, break_float_labels, break_case_without_mask,
     break_mask_without_case, break_truncated, break_garbage, break_name, break_empty_mask],
)
def test_errors_name_the_file_and_write_nothing(tmp_path, breaker):
    src = make(tmp_path / "src")
    expected = breaker(src)
    before = listing(src)
    with pytest.raises(DataError) as e:
        convert_mrspineseg(src, tmp_path / "out")
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "out").exists()
    assert listing(src) == before


def test_all_problems_at_once_and_output_inside_source(tmp_path):
    src = make(tmp_path / "src")
    expected = break_shape(src) + break_truncated(src) + break_case_without_mask(src)
    with pytest.raises(DataError) as e:
        convert_mrspineseg(src, tmp_path / "out")
    assert len(e.value.problems) == 3 and all(t in str(e.value) for t in expected)
    src = make(tmp_path / "ok", 3)
    before = listing(src)
    with pytest.raises(DataError, match="inside the source"):
        convert_mrspineseg(src, src / "train" / "out")
    with pytest.raises(DataError, match="no MRSpineSeg layout"):
        convert_mrspineseg(src / "train" / "MR", tmp_path / "out")
    with pytest.raises(DataError, match="at least 3"):
        convert_mrspineseg(make(tmp_path / "two", 2), tmp_path / "out")
    assert listing(src) == before
    assert not (tmp_path / "out").exists()
