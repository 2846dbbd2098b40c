import json

import numpy as np
import pytest
from PIL import Image

from amvlm_monai.data.datalist import load_datalist
from amvlm_monai.data.describe import describe_mask
from amvlm_monai.utils.errors import DataError
from data_prep.bmseg import convert_bmseg, main, patient_of

S = 32  # slice size
PATIENTS = {"P01": 3, "P02": 3, "P03": 2, "P04": 2, "P05": 2}  # patient -> slices


def lesion(seed):
    """A lesion mask: empty for seed % 3 == 0, else one square inside the bone."""
    m = np.zeros((S, S), np.uint8)
    if seed % 3:
        r, c = 6 + seed % 4, 4 + 2 * (seed % 5)
        m[r : r + 4, c : c + 5] = 255
    return m


def bone():
    m = np.zeros((S, S), np.uint8)
    m[4:28, 2:30] = 255
    return m


def make(root, ext=".png"):
    k = 0
    for p, n in PATIENTS.items():
        for i in range(n):
            name = f"{p}_{i:03d}"
            for folder, arr in (("image", np.random.default_rng(k).integers(0, 256, (S, S), dtype=np.uint8)),
                                ("bone mask", bone()), ("lesion mask", lesion(k))):
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / folder / (name + (ext if folder == "image" else ".png")))
            k += 1
    return root


def listing(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def sections(path):
    return {s: load_datalist(path, s) for s in ("training", "validation", "test")}


def test_convert_patient_level(tmp_path):
    src = make(tmp_path / "data" / "BM-Seg")
    before = listing(src)
    path = main(["--src", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--seed", "0"])
    assert listing(src) == before
    dl = sections(path)
    assert sum(len(v) for v in dl.values()) == 12 and all(dl.values())
    owners = {}
    for section, items in dl.items():
        for it in items:
            assert owners.setdefault(it["patient"], section) == section  # a patient is on one side only
            assert it["patient"] == it["id"][:3] and it["image"] == str(src / "image" / f"{it['id']}.png")
            assert it["label"] == str(tmp_path / "out" / "labels" / f"{it['id']}.png")
            k = list(PATIENTS).index(it["patient"])
            k = sum(list(PATIENTS.values())[:k]) + int(it["id"][4:])
            np.testing.assert_array_equal(np.asarray(Image.open(it["label"])), lesion(k))
            b = bone() > 0
            assert it["text"] == describe_mask(lesion(k), organ="bone", finding="lesion", organ_mask=b)
            assert it["text"] == "No lesion is visible." if k % 3 == 0 else it["text"].startswith("Bone lesion, one")
    raw = json.loads(path.read_text())
    assert raw["training"][0]["label"].startswith("labels/") and set(raw["training"][0]) == {
        "image", "label", "text", "id", "patient"}
    for name in ("split_labeled25.json", "split_labeled50.json", "split_fewshot1.json", "split_fewshot10.json"):
        split = json.loads((tmp_path / "out" / name).read_text())
        flags = {}
        for it in split["training"]:
            assert flags.setdefault(it["patient"], it["labeled"]) == it["labeled"]  # labelled by patient
        assert split["split"]["group_key"] == "patient" and True in flags.values()
    again = convert_bmseg(tmp_path / "data", tmp_path / "out2", seed=0)
    for name in ("datalist.json", "split_labeled25.json"):
        a, b = (again.parent / name).read_text(), (path.parent / name).read_text()
        assert a == b
    others = [{it["patient"] for it in sections(convert_bmseg(src, tmp_path / f"s{s}", seed=s))["test"]}
              for s in (1, 2, 3)]
    assert any(o != {it["patient"] for it in dl["test"]} for o in others)


def test_text_relative_to_bone_and_jpeg_images(tmp_path):
    src = make(tmp_path / "src", ext=".jpg")  # JPEG slices, PNG masks: paired by name without extension
    path = convert_bmseg(src, tmp_path / "a")
    img = load_datalist(path, "training")[0]["image"]
    assert img.endswith(".jpg")
    texts = {it["id"]: it["text"] for s in sections(path).values() for it in s}
    plain = {it["id"]: it["text"] for s in sections(convert_bmseg(src, tmp_path / "b", bone_relative=False)).values()
             for it in s}
    # lesion 4x5 px, image-left (patient's right), upper third; 20 px = 3.0% of the bone (small below 4%) but 2.0%
    # of the image (medium from 1%)
    assert texts["P01_001"] == "Bone lesion, one lesion, small upper right."
    assert plain["P01_001"] == "Bone lesion, one lesion, medium upper right."
    assert texts["P02_000"] == plain["P02_000"] == "No lesion is visible."


def test_jpeg_mask_is_binarised(tmp_path):
    src = make(tmp_path / "src")
    m = lesion(1)
    (src / "lesion mask" / "P01_001.png").unlink()
    noisy = np.clip(m.astype(int) + np.random.default_rng(0).integers(-40, 40, m.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(src / "lesion mask" / "P01_001.jpg", quality=60)
    it = next(it for s in sections(convert_bmseg(src, tmp_path / "out")).values() for it in s if it["id"] == "P01_001")
    np.testing.assert_array_equal(np.asarray(Image.open(it["label"])), m)


def test_patient_regex(tmp_path):
    assert patient_of("P07_slice012") == "P07" and patient_of("P07-12") == "P07" and patient_of("nosep") is None
    assert patient_of("img_pat3_s1", r"_(?P<patient>pat\d+)_") == "pat3"
    src = tmp_path / "src"
    for i, p in enumerate(["pat1", "pat2", "pat3"] * 2):
        for folder, arr in (("Images", np.full((S, S), i, np.uint8)), ("bone_masks", bone()),
                            ("Lesion Masks", lesion(i + 1))):
            (src / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(src / folder / f"img_{p}_s{i}.png")
    with pytest.raises(DataError, match=r"1 patient\(s\) \['img'\]"):  # the default regex reads "img"
        convert_bmseg(src, tmp_path / "out")
    path = convert_bmseg(src, tmp_path / "out", patient_regex=r"_(pat\d+)_")
    dl = sections(path)
    assert [len(v) for v in dl.values()] == [2, 2, 2]
    assert {it["patient"] for v in dl.values() for it in v} == {"pat1", "pat2", "pat3"}


def break_missing_lesion(src):
    (src / "lesion mask" / "P02_001.png").unlink()
    return ["missing lesion mask", "P02_001.png"]


def break_missing_bone(src):
    (src / "bone mask" / "P03_000.png").unlink()
    return ["missing bone mask", "P03_000.png"]


def break_mask_size(src):
    Image.fromarray(np.zeros((16, S), np.uint8)).save(src / "lesion mask" / "P01_002.png")
    return ["P01_002.png", "32x16", "32x32"]


def break_bone_size(src):
    Image.fromarray(np.zeros((S, 20), np.uint8)).save(src / "bone mask" / "P04_000.png")
    return ["bone mask/P04_000.png", "20x32"]


def break_mask_without_image(src):
    Image.fromarray(lesion(1)).save(src / "lesion mask" / "P09_000.png")
    return ["lesion mask without an image", "P09_000.png"]


def break_corrupt_image(src):
    p = src / "image" / "P05_001.png"
    p.write_bytes(p.read_bytes()[:50])
    return ["corrupt PNG", "P05_001.png"]


def break_no_patient(src):
    for folder in ("image", "bone mask", "lesion mask"):
        (src / folder / "P05_000.png").rename(src / folder / "scan7.png")
    return ["no patient id", "scan7.png"]


def break_duplicate_name(src):
    Image.fromarray(lesion(1)).save(src / "lesion mask" / "P01_000.tif")
    return ["two files named P01_000", "lesion mask"]


def break_missing_folder(src):
    for p in (src / "bone mask").iterdir():
        p.unlink()
    (src / "bone mask").rmdir()
    return ["missing folder", "bone mask"]


@pytest.mark.parametrize(
    "breaker",
    [break_missing_lesion, break_missing_bone, break_mask_size, break_bone_size, break_mask_without_image,
     break_corrupt_image, break_no_patient, break_duplicate_name, break_missing_folder],
)
def test_errors_name_the_file_and_write_nothing(tmp_path, breaker):
    src = make(tmp_path / "src")
    expected = breaker(src)
    before = listing(src)
    with pytest.raises(DataError) as e:
        convert_bmseg(src, tmp_path / "out")
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "out").exists()
    assert listing(src) == before


def test_all_problems_at_once_and_output_inside_source(tmp_path):
    src = make(tmp_path / "src")
    expected = break_missing_lesion(src) + break_corrupt_image(src) + break_mask_size(src)
    with pytest.raises(DataError) as e:
        convert_bmseg(src, tmp_path / "out")
    assert len(e.value.problems) == 3 and all(t in str(e.value) for t in expected)
    src = make(tmp_path / "ok")
    before = listing(src)
    with pytest.raises(DataError, match="inside the source"):
        convert_bmseg(src, src / "out")
    with pytest.raises(DataError, match="no BM-Seg layout"):
        convert_bmseg(src / "image", tmp_path / "out")
    assert listing(src) == before
