import numpy as np
import pytest
from openpyxl import load_workbook
from PIL import Image

from amvlm_monai.data.describe import describe_mask
from data_prep.demo_data import main, make_case, make_demo_dataset

FOLDERS = {
    "Train_Folder": ("Train_text.xlsx", 3),
    "Val_Folder": ("Val_text.xlsx", 2),
    "Test_Folder": ("Test_text.xlsx", 2),
}


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "qata", 3, 2, 2, size=48, seed=0)


def test_layout_names_columns_and_text(demo):
    for folder, (sheet, n) in FOLDERS.items():
        images = sorted(p.name for p in (demo / folder / "img").iterdir())
        masks = sorted(p.name for p in (demo / folder / "labelcol").iterdir())
        assert len(images) == n and masks == [f"mask_{x}" for x in images]
        ws = load_workbook(demo / sheet).active
        rows = list(ws.iter_rows(values_only=True))
        assert rows[0] == ("Image", "Description")
        assert sorted(r[0] for r in rows[1:]) == masks  # Image = the mask file name
        for mask_name, text in rows[1:]:
            image = Image.open(demo / folder / "img" / mask_name[len("mask_") :])
            mask = Image.open(demo / folder / "labelcol" / mask_name)
            assert image.mode == "L" and mask.mode == "L" and image.size == mask.size == (48, 48)
            m = np.asarray(mask)
            assert set(np.unique(m).tolist()) <= {0, 255}
            assert text == describe_mask(m)
            assert len(np.unique(np.asarray(image))) > 20  # a real image, not a constant


def test_same_seed_same_bytes_other_seed_differs(tmp_path, demo):
    again = make_demo_dataset(tmp_path / "a", 3, 2, 2, size=48, seed=0)
    assert files(again) == files(demo)
    other = make_demo_dataset(tmp_path / "b", 3, 2, 2, size=48, seed=1)
    fa, fb = files(again), files(other)
    assert fa.keys() == fb.keys()
    assert fa["Train_Folder/img/train_0000.png"] != fb["Train_Folder/img/train_0000.png"]


def test_existing_output_and_cli(tmp_path, demo):
    with pytest.raises(FileExistsError):
        make_demo_dataset(demo, 1, 1, 1, size=48)
    root = main(["--out", str(tmp_path / "cli"), "--n-train", "1", "--n-val", "1", "--n-test", "1", "--size", "32"])
    assert (root / "Test_Folder" / "labelcol" / "mask_test_0000.png").is_file()
    main(["--out", str(root), "--n-train", "2", "--n-val", "1", "--n-test", "1", "--size", "32", "--overwrite"])
    assert len(list((root / "Train_Folder" / "img").iterdir())) == 2
    with pytest.raises(ValueError, match="size"):
        make_case(np.random.default_rng(0), 16)


def test_lesions_and_distractors_are_drawn():
    rng = np.random.default_rng(0)
    seen = {"lesions": set(), "distractors": set()}
    for _ in range(24):
        image, mask, info = make_case(rng, 32)
        for k in seen:
            seen[k].add(info[k])
        assert (mask > 0).any() == (info["lesions"] > 0)
    assert seen["lesions"] >= {0, 1, 2} and seen["distractors"] >= {0, 1, 2}


def test_xlsx_has_no_time_stamps(demo):
    import zipfile

    with zipfile.ZipFile(demo / "Train_text.xlsx") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        core = z.read("docProps/core.xml").decode()
    assert core.count("2000-01-01T00:00:00Z") == 2  # created and modified
