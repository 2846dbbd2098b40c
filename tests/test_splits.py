import json
import os

import pytest

from amvlm_monai.data.datalist import load_datalist, read_datalist, write_datalist
from amvlm_monai.data.splits import (
    few_shot_subset,
    labeled_items,
    partition,
    semi_supervised_split,
    split_name,
    unlabeled_items,
    write_splits,
)
from amvlm_monai.utils.errors import DataError


def make_items(n, groups=None):
    items = []
    for i in range(n):
        it = {"image": f"img/{i}.png", "label": f"lab/mask_{i}.png", "text": f"t{i}", "id": f"case{i}"}
        if groups:
            it["patient"] = f"p{i % groups}"
        items.append(it)
    return items


def ids(items):
    return [it["id"] for it in items]


def test_semi_supervised_fraction_flags_and_hidden_labels():
    items = make_items(40)
    split = semi_supervised_split(items, 0.25, seed=0)
    assert ids(split) == ids(items)  # input order kept
    lab, unlab = labeled_items(split), unlabeled_items(split)
    assert len(lab) == 10 and len(unlab) == 30
    assert all(it["labeled"] and "label" in it for it in lab)
    assert all(not it["labeled"] and "label" not in it and it["label_hidden"] for it in unlab)
    assert set(ids(lab)).isdisjoint(ids(unlab)) and set(ids(lab)) | set(ids(unlab)) == set(ids(items))
    assert "label" in items[0] and "labeled" not in items[0]  # the input is not modified


def test_reproducible_order_independent_nested_and_seeded():
    items = make_items(50)
    a = ids(labeled_items(semi_supervised_split(items, 0.5, seed=3)))
    b = ids(labeled_items(semi_supervised_split(items[::-1], 0.5, seed=3)))
    assert sorted(a) == sorted(b)
    assert a == ids(labeled_items(semi_supervised_split(items, 0.5, seed=3)))
    assert set(ids(labeled_items(semi_supervised_split(items, 0.25, seed=3)))) < set(a)  # nested
    assert set(ids(few_shot_subset(items, 0.1, seed=3))) < set(ids(few_shot_subset(items, 0.5, seed=3)))
    assert set(a) != set(ids(labeled_items(semi_supervised_split(items, 0.5, seed=4))))


def test_few_shot_counts():
    items = make_items(7145)
    assert len(few_shot_subset(items, 0.01, seed=0)) == 71  # QaTa 1%
    assert len(few_shot_subset(make_items(30), 0.01, seed=0)) == 1  # at least one
    assert len(few_shot_subset(make_items(5), 1.0)) == 5
    with pytest.raises(ValueError, match="fraction"):
        few_shot_subset(items[:5], 0.0)
    with pytest.raises(ValueError, match="fraction"):
        semi_supervised_split(items[:5], 1.5, seed=0)


def test_group_level_split():
    items = make_items(46, groups=7)  # patients of 6-7 slices
    for frac in (0.1, 0.25, 0.5):
        split = semi_supervised_split(items, frac, seed=1, group_key="patient")
        lab = {it["patient"] for it in split if it["labeled"]}
        unlab = {it["patient"] for it in split if not it["labeled"]}
        assert lab and unlab and lab.isdisjoint(unlab)
    sel, rest = partition(items, 0.3, seed=2, group_key="patient")
    assert {it["patient"] for it in sel}.isdisjoint({it["patient"] for it in rest})
    assert 7 <= len(sel) <= 20 and len(sel) + len(rest) == 46
    few = few_shot_subset(items, 0.01, seed=0, group_key="patient")
    assert len({it["patient"] for it in few}) == 1 and len(few) >= 6
    with pytest.raises(DataError, match="patient"):
        partition(make_items(3), 0.5, group_key="patient")


def test_empty_split_errors(tmp_path):
    with pytest.raises(DataError, match="empty"):
        semi_supervised_split([], 0.5, seed=0)
    with pytest.raises(DataError, match="empty"):
        write_splits({"training": [], "test": make_items(2)}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(DataError, match="no 'label'"):
        semi_supervised_split([{"id": "a", "image": "a.png"}], 0.5)


def test_write_splits_files(tmp_path):
    data = tmp_path / "data"
    items = [{**it, "image": str(data / it["image"]), "label": str(data / it["label"])} for it in make_items(20)]
    datalist = {"training": items, "validation": items[:2], "test": items[2:4]}
    out = tmp_path / "splits"
    paths = write_splits(datalist, out, seed=0)
    assert sorted(paths) == ["split_fewshot1", "split_fewshot10", "split_labeled25", "split_labeled50"]
    assert split_name("fewshot", 0.005) == "split_fewshot0p5.json"
    raw = json.loads((out / "split_labeled25.json").read_text())
    assert raw["split"]["n_labeled"] == 5 and raw["split"]["kind"] == "semi_supervised"
    assert raw["training"][0]["image"] == "../data/img/0.png"  # relative to the split file's folder
    with pytest.raises(DataError, match="lies outside the data folder"):  # the files are not in splits/
        load_datalist(out / "split_labeled25.json")
    train = load_datalist(out / "split_labeled25.json", allow_outside=True)
    assert sum(it["labeled"] for it in train) == 5
    assert all(os.path.isabs(it["image"]) for it in train)
    hidden = [it for it in train if not it["labeled"]]
    assert hidden[0]["label_hidden"] == str(data / "lab" / f"mask_{hidden[0]['id'][4:]}.png")
    assert load_datalist(out / "split_fewshot1.json", "test", allow_outside=True) == datalist["test"]
    # the same from a datalist file, and again: identical bytes
    write_datalist(datalist, tmp_path / "dl" / "datalist.json")
    again = write_splits(tmp_path / "dl" / "datalist.json", tmp_path / "dl", seed=0)
    assert again["split_labeled50"].read_bytes() == paths["split_labeled50"].read_bytes()


def test_split_files_beside_or_away_from_their_datalist(tmp_path):
    """Files inside the datalist's folder load as they are; split files written elsewhere list that folder under
    data_roots; a path leaving both (../, absolute) needs allow_outside."""
    data = tmp_path / "data"
    items = [{**it, "image": str(data / it["image"]), "label": str(data / it["label"])} for it in make_items(6)]
    write_datalist({"training": items, "validation": items[:1], "test": items[1:2]}, data / "datalist.json")
    write_splits(data / "datalist.json", data, fractions=(0.5,), few_shot=())
    assert "data_roots" not in json.loads((data / "split_labeled50.json").read_text())
    assert len(load_datalist(data / "split_labeled50.json")) == 6
    write_splits(data / "datalist.json", tmp_path / "elsewhere", fractions=(0.5,), few_shot=())
    raw = json.loads((tmp_path / "elsewhere" / "split_labeled50.json").read_text())
    assert raw["data_roots"] == ["../data"]
    assert [it["id"] for it in load_datalist(tmp_path / "elsewhere" / "split_labeled50.json")] == \
        [it["id"] for it in items]
    raw["test"][0]["image"] = "../../secret.png"
    (tmp_path / "elsewhere" / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(DataError) as e:
        load_datalist(tmp_path / "elsewhere" / "bad.json", "test")
    assert str(tmp_path.parent / "secret.png") in str(e.value) and "allow_outside" in str(e.value)
    assert load_datalist(tmp_path / "elsewhere" / "bad.json", "test", allow_outside=True)[0]["image"] == \
        str(tmp_path.parent / "secret.png")


def test_load_datalist_errors(tmp_path):
    p = tmp_path / "dl.json"
    with pytest.raises(DataError, match="dl.json"):
        load_datalist(p)  # missing file
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_datalist(p)
    p.write_text(json.dumps({"training": [{"image": "a.png", "label": "b.png", "text": "t", "id": "a"}]}))
    with pytest.raises(DataError, match=r"no section 'test'.*training"):
        load_datalist(p, "test")
    p.write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="empty"):
        load_datalist(p)
    assert load_datalist(p, allow_empty=True) == []
    good = {"image": "a.png", "label": "b.png", "text": "t", "id": "a"}
    bad = [good, {"image": "c.png", "id": "c"}, {**good, "labeled": False}, "x"]
    p.write_text(json.dumps({"training": bad}))
    with pytest.raises(DataError) as e:
        load_datalist(p)
    msg = str(e.value)
    assert "dl.json: training[1]" in msg and "['label', 'text']" in msg
    assert "training[2]" in msg and "label_hidden" in msg
    assert "training[3]" in msg and "training[0]" not in msg
    assert read_datalist(p)["training"][1]["image"] == str(tmp_path / "c.png")
    p.write_text(json.dumps({"training": [{"image": "c.png", "id": "c"}]}))
    assert load_datalist(p, required=("image",))[0]["image"] == str(tmp_path / "c.png")
