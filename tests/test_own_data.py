"""Your own data in one command: a folder or a datalist -> datalist.json and the split files."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import train_qata_bundle
from PIL import Image

from amvlm_monai.data.datalist import load_datalist
from amvlm_monai.data.describe import describe_mask
from data_prep.own_data import main, prepare


def write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root, n=10, size=32, prefix="P{}_img{}", mask_name="{}.png"):
    """``n`` images (two per patient) with 0/255 masks; reports.csv for the first three."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = prefix.format(i // 2, i)
        mask = np.zeros((size, size), np.uint8)
        mask[4 + i: 12 + i, 3:11] = 255
        write(root / "images" / f"{name}.png", rng.integers(0, 255, (size, size), dtype=np.uint8))
        write(root / "masks" / mask_name.format(name), mask)
        names.append(name)
    rows = "image,text\n" + "".join(f"{n}.png,Report {k} of {n}.\n" for k, n in enumerate(names[:3]))
    (root / "reports.csv").write_text(rows)
    return root, names


def listing(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_to_datalist_and_splits(tmp_path):
    src, names = make_folder(tmp_path / "my_folder")
    before = listing(src)
    path = main(["--src", str(src), "--out", str(tmp_path / "my_data"), "--fractions", "0.5", "--few-shot", "0.2"])
    assert listing(src) == before
    sections = {s: load_datalist(path, s) for s in ("training", "validation", "test")}
    assert [len(v) for v in sections.values()] == [7, 1, 2]  # 20 % test, 10 % of the rest
    items = {it["id"]: it for v in sections.values() for it in v}
    assert sorted(items) == sorted(names)
    assert items[names[1]]["text"] == f"Report 1 of {names[1]}."  # from reports.csv
    mask = np.asarray(Image.open(items[names[5]]["label"]))
    assert items[names[5]]["text"] == describe_mask(mask) and items[names[5]]["text"].endswith("lung.")
    split = json.loads((tmp_path / "my_data" / "split_labeled50.json").read_text())
    assert split["split"]["n_labeled"] == 4 and split["split"]["n_unlabeled"] == 3
    assert sum(it["labeled"] for it in load_datalist(tmp_path / "my_data" / "split_fewshot20.json")) == 1
    assert split["data_roots"] == ["../my_folder"]


def test_patient_grouping_and_mask_prefix(tmp_path):
    src, _ = make_folder(tmp_path / "src", n=12, mask_name="mask_{}.png")
    path = prepare(tmp_path / "out", src=src, patient_regex=r"^(P\d+)_", fractions=(0.5,), few_shot=())
    where = {}
    for section in ("training", "validation", "test"):
        for it in load_datalist(path, section):
            assert where.setdefault(it["patient"], section) == section  # a patient never on two sides
    assert len(where) == 6
    split = json.loads((tmp_path / "out" / "split_labeled50.json").read_text())
    assert split["split"]["group_key"] == "patient"
    flags = {}
    for it in split["training"]:
        assert flags.setdefault(it["patient"], it["labeled"]) == it["labeled"]


def test_datalist_input_keeps_its_sections_and_fields(tmp_path):
    src, names = make_folder(tmp_path / "proj")
    items = [{"image": f"proj/images/{n}.png", "label": f"proj/masks/{n}.png", "site": "A"} for n in names]
    items[0]["text"] = "Given report."
    (tmp_path / "list.json").write_text(json.dumps({"training": items[:6], "validation": items[6:8],
                                                    "test": items[8:]}))
    path = prepare(tmp_path / "out", datalist=tmp_path / "list.json", fractions=(0.5,), few_shot=())
    train = load_datalist(path, "training")
    assert [it["id"] for it in train] == names[:6] and train[0]["text"] == "Given report."
    assert train[0]["site"] == "A" and len(load_datalist(path, "test")) == 2
    with pytest.raises(Exception, match="would be overwritten"):
        prepare(tmp_path / "out", datalist=tmp_path / "out" / "datalist.json")


def test_bad_folder_gives_error_lines_and_writes_nothing(tmp_path, capsys):
    src, names = make_folder(tmp_path / "src")
    (src / "masks" / f"{names[2]}.png").unlink()
    bad = np.zeros((32, 32), np.uint8)
    bad[0, :4] = [1, 7, 128, 255]
    write(src / "masks" / f"{names[3]}.png", bad)
    write(src / "masks" / f"{names[4]}.png", np.zeros((16, 16), np.uint8))
    before = listing(src)
    with pytest.raises(SystemExit) as e:
        main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert lines[0].startswith(f"error: {src / 'images' / names[2]}.png: image without a mask")
    assert lines[1].startswith(f"error: {src / 'masks' / names[3]}.png: mask values {{0, 1, 7, 128, 255}}")
    assert f"{names[4]}.png: mask is 16x16" in lines[2]
    assert not (tmp_path / "out").exists() and listing(src) == before
    with pytest.raises(SystemExit):
        main(["--src", str(src), "--out", str(src / "out")])
    assert "inside the source folder" in capsys.readouterr().err and listing(src) == before


def test_training_on_a_plain_datalist_says_what_to_do(tmp_path):
    """A datalist without labelled/unlabelled flags used as a split file: one message naming it and the command."""
    from amvlm_monai.utils.errors import root_cause

    src, _ = make_folder(tmp_path / "src")
    path = prepare(tmp_path / "data", src=src, fractions=(0.5,), few_shot=())
    with pytest.raises(Exception) as e:
        train_qata_bundle(tmp_path, path, use_text=False)
    msg = str(root_cause(e.value))
    assert msg.startswith(f"{path}: no unlabelled training items") and "python -m data_prep.own_data" in msg


def test_supervised_training_on_a_split_without_unlabelled_items(tmp_path):
    """100 % labels (no unlabelled item): the supervised variant trains; only semi-supervised training needs them."""
    src, _ = make_folder(tmp_path / "src")
    path = prepare(tmp_path / "data", src=src, fractions=(0.5,), few_shot=())
    train_qata_bundle(tmp_path, path, variants=("supervised",), unet_size="light", batch_size=2)
    assert (tmp_path / "m" / "model.pt").is_file()
