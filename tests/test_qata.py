import json
import os

import numpy as np
import pytest
from openpyxl import Workbook
from PIL import Image

from amvlm_monai.data.datalist import load_datalist
from amvlm_monai.data.describe import describe_mask
from amvlm_monai.utils.errors import DataError
from data_prep.qata import convert_qata, main

LVIT = {"Train": ["covid_1", "covid_2", "covid_3", "covid_4"], "Val": ["covid_5", "covid_6"], "Test": ["covid_7"]}


def png(path, size=32, seed=0, mask=False):
    rng = np.random.default_rng(seed)
    if mask:
        arr = np.zeros((size, size), np.uint8)
        r, c = rng.integers(2, size - 10, 2)
        arr[r : r + 8, c : c + 8] = 255
    else:
        arr = rng.integers(0, 256, (size, size), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def sheet(path, header, rows):
    wb = Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    wb.save(path)


def sheet_of(root, split, beside=False):
    """Where a split's sheet lies: inside its split folder (LViT's README and release) or beside it."""
    return root / f"{split}_text.xlsx" if beside else root / f"{split}_Folder" / f"{split}_text.xlsx"


def make_lvit(root, beside=False):
    for k, (split, names) in enumerate(LVIT.items()):
        for i, name in enumerate(names):
            png(root / f"{split}_Folder" / "img" / f"{name}.png", seed=10 * k + i)
            png(root / f"{split}_Folder" / "labelcol" / f"mask_{name}.png", seed=10 * k + i, mask=True)
        rows = [(f"mask_{n}.png", f"Report of {n}.", "extra") for n in names]
        sheet(sheet_of(root, split, beside), ["Image", "Description", "Other"], rows)
    return root


def make_kaggle(root, n_train=10, n_test=2):
    for split, n in (("Train Set", n_train), ("Test Set", n_test)):
        for i in range(n):
            png(root / split / "Images" / f"{split[:2]}_{i}.png", seed=i)
            png(root / split / "Ground-truths" / f"mask_{split[:2]}_{i}.png", seed=i, mask=True)
    return root


def listing(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_lvit_layout(tmp_path):
    src = make_lvit(tmp_path / "QaTa-COV19")
    before = listing(src)
    path = main(["--src", str(tmp_path), "--out", str(tmp_path / "out"), "--seed", "0"])  # finds the sub-folder
    assert listing(src) == before
    raw = json.loads(path.read_text())
    assert {k: len(raw[k]) for k in ('training', 'validation', 'test')} == {"training": 4, "validation": 2, "test": 1}
    first = raw["training"][0]
    assert first == {
        "image": "../QaTa-COV19/Train_Folder/img/covid_1.png",
        "label": "../QaTa-COV19/Train_Folder/labelcol/mask_covid_1.png",
        "text": "Report of covid_1.",
        "id": "covid_1",
    }
    test = load_datalist(path, "test")
    assert test[0]["image"] == str(src / "Test_Folder" / "img" / "covid_7.png") and os.path.isfile(test[0]["label"])
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["datalist.json", "split_fewshot1.json", "split_fewshot10.json", "split_labeled25.json",
                     "split_labeled50.json"]
    split = load_datalist(tmp_path / "out" / "split_labeled50.json")
    assert [it["labeled"] for it in split].count(True) == 2 and len(split) == 4
    assert load_datalist(tmp_path / "out" / "split_labeled50.json", "validation") == load_datalist(path, "validation")


def test_lvit_sheets_beside_the_split_folders_give_the_same_datalist(tmp_path):
    """The release's placement (sheet inside each split folder) and the top-level one convert alike."""
    inside = convert_qata(make_lvit(tmp_path / "a" / "QaTa-COV19"), tmp_path / "out_a")
    beside = convert_qata(make_lvit(tmp_path / "b" / "QaTa-COV19", beside=True), tmp_path / "out_b")
    assert (tmp_path / "a" / "QaTa-COV19" / "Train_Folder" / "Train_text.xlsx").is_file()
    assert not (tmp_path / "b" / "QaTa-COV19" / "Train_Folder" / "Train_text.xlsx").exists()
    for key in ("training", "validation", "test"):
        a, b = load_datalist(inside, key), load_datalist(beside, key)
        assert [(x["id"], x["text"]) for x in a] == [(x["id"], x["text"]) for x in b] and a


def test_lvit_datasets_folder_holding_both_data_sets(tmp_path):
    """LViT's README tree: datasets/{Covid19,MoNuSeg}/{Train,Val,Test}_Folder; --src datasets takes Covid19."""
    from test_monuseg import make_lvit as make_monuseg_lvit

    make_lvit(tmp_path / "datasets" / "Covid19")
    make_monuseg_lvit(tmp_path / "datasets" / "MoNuSeg")
    path = convert_qata(tmp_path / "datasets", tmp_path / "out")
    assert all("/Covid19/" in it["image"] for it in load_datalist(path, "training"))


def test_lvit_two_different_sheets_for_one_split(tmp_path):
    src = make_lvit(tmp_path / "QaTa-COV19")
    sheet(sheet_of(src, "Val", beside=True), ["Image", "Description"], [("mask_covid_5.png", "Other text.")])
    with pytest.raises(DataError, match="a second, different Val_text.xlsx"):
        convert_qata(src, tmp_path / "out")
    (sheet_of(src, "Val")).unlink()
    (sheet_of(src, "Val", beside=True)).unlink()
    with pytest.raises(DataError) as e:
        convert_qata(src, tmp_path / "out")
    assert f"{sheet_of(src, 'Val')}: missing spreadsheet (also looked for {sheet_of(src, 'Val', True)})" in str(e.value)


def test_kaggle_layout_seeded_validation(tmp_path):
    src = make_kaggle(tmp_path / "QaTa-COV19-v2")
    before = listing(src)
    p0 = convert_qata(src, tmp_path / "o0", seed=0)
    assert listing(src) == before
    dl = json.loads(p0.read_text())
    assert {k: len(dl[k]) for k in ('training', 'validation', 'test')} == {"training": 8, "validation": 2, "test": 2}
    train_ids = {it["id"] for it in dl["training"]}
    assert train_ids.isdisjoint(it["id"] for it in dl["validation"])
    for it in load_datalist(p0, "validation"):
        assert it["text"] == describe_mask(np.asarray(Image.open(it["label"])))
        assert it["text"].endswith("lung.")
    assert convert_qata(src, tmp_path / "o0b", seed=0).read_bytes() == p0.read_bytes()
    other = json.loads(convert_qata(src, tmp_path / "o1", seed=1).read_text())
    assert {it["id"] for it in other["validation"]} != {it["id"] for it in dl["validation"]}


def break_missing_image(src):
    (src / "Train_Folder" / "img" / "covid_2.png").unlink()
    return ["Train_text.xlsx row 3", "covid_2.png"]


def break_mask_without_image(src):
    png(src / "Val_Folder" / "labelcol" / "mask_ghost.png", mask=True)
    return ["mask without an image", "mask_ghost.png"]


def break_no_description(src):
    sheet(sheet_of(src, "Test"), ["Image", "Description"], [("mask_covid_7.png", "  ")])
    return ["Test_text.xlsx row 2", "no Description", "mask_covid_7.png"]


def break_missing_column(src):
    sheet(sheet_of(src, "Val"), ["Image", "Text"], [("mask_covid_5.png", "x"), ("mask_covid_6.png", "y")])
    return ["Val_text.xlsx", "['Description']", "columns found: ['Image', 'Text']"]


def break_empty_split(src):
    for name in LVIT["Val"]:
        (src / "Val_Folder" / "img" / f"{name}.png").unlink()
        (src / "Val_Folder" / "labelcol" / f"mask_{name}.png").unlink()
    sheet(sheet_of(src, "Val"), ["Image", "Description"], [])
    return ["empty split", "Val_text.xlsx"]


def break_corrupt_png(src):
    p = src / "Train_Folder" / "labelcol" / "mask_covid_3.png"
    p.write_bytes(p.read_bytes()[:60])
    return ["corrupt PNG", "mask_covid_3.png"]


def break_size_mismatch(src):
    png(src / "Train_Folder" / "labelcol" / "mask_covid_4.png", size=16, mask=True)
    return ["mask_covid_4.png", "16x16", "32x32"]


def break_unlisted_image(src):
    png(src / "Test_Folder" / "img" / "extra.png")
    return ["extra.png", "not listed"]


@pytest.mark.parametrize(
    "breaker",
    [break_missing_image, break_mask_without_image, break_no_description, break_missing_column, break_empty_split,
     break_corrupt_png, break_size_mismatch, break_unlisted_image],
)
def test_lvit_errors_name_the_file_and_write_nothing(tmp_path, breaker):
    src = make_lvit(tmp_path / "src")
    expected = breaker(src)
    before = listing(src)
    with pytest.raises(DataError) as e:
        convert_qata(src, tmp_path / "out")
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "out").exists()
    assert listing(src) == before


def test_all_problems_reported_at_once(tmp_path):
    src = make_lvit(tmp_path / "src")
    expected = break_missing_image(src) + break_corrupt_png(src) + break_size_mismatch(src)
    with pytest.raises(DataError) as e:
        convert_qata(src, tmp_path / "out")
    assert len(e.value.problems) == 3 and all(t in str(e.value) for t in expected)


def test_kaggle_errors(tmp_path):
    src = make_kaggle(tmp_path / "k", n_train=3)
    png(src / "Train Set" / "Ground-truths" / "mask_orphan.png", mask=True)
    (src / "Test Set" / "Ground-truths" / "mask_Te_1.png").unlink()
    with pytest.raises(DataError) as e:
        convert_qata(src, tmp_path / "out")
    msg = str(e.value)
    assert "mask without an image" in msg and "mask_orphan.png" in msg
    assert "missing mask" in msg and "mask_Te_1.png" in msg
    single = make_kaggle(tmp_path / "k1", n_train=1)
    with pytest.raises(DataError, match="single image"):
        convert_qata(single, tmp_path / "out")


def test_bad_source_and_output_inside_source(tmp_path):
    with pytest.raises(DataError, match="no QaTa-COV19 layout"):
        convert_qata(tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        convert_qata(tmp_path / "nowhere", tmp_path / "out")
    src = make_kaggle(tmp_path / "k", n_train=2, n_test=1)
    before = listing(src)
    with pytest.raises(DataError, match="inside the source"):
        convert_qata(src, src / "out")
    assert listing(src) == before
