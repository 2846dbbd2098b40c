import numpy as np
import pytest
from openpyxl import load_workbook
from PIL import Image

from amvlm_monai.data.describe import LUNG_PARAPHRASES, describe_mask, find_regions, number_word
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
            # the report states the mask's facts in a wording drawn by the image's own generator, after the image
            split = list(FOLDERS).index(folder)
            rng = np.random.default_rng([0, split, int(mask_name.split("_")[-1][:4])])
            make_case(rng, 48)
            assert text == describe_mask(m, rng=rng)
            regions = find_regions(m)
            if regions:
                assert number_word(len(regions)) in text.lower()
            else:
                assert text in LUNG_PARAPHRASES["empty"]
            assert len(np.unique(np.asarray(image))) > 20  # a real image, not a constant


def test_reports_vary_in_wording_but_not_in_facts():
    m = np.zeros((64, 64), np.uint8)
    m[8:14, 44:50] = 1  # patient's upper left, small
    m[44:60, 6:20] = 1  # patient's lower right, large
    rng = np.random.default_rng(0)
    texts = {describe_mask(m, rng=rng) for _ in range(40)}
    assert len(texts) > 20  # varied wording
    for t in texts:
        low = t.lower()
        assert "two" in low and "upper" in low and "lower" in low and "left" in low and "right" in low
        assert low.index("left") < low.index("right")  # the patient's left region is listed first
    assert describe_mask(m) == describe_mask(m)  # without a generator: the one fixed sentence
    assert len({describe_mask(np.zeros((8, 8)), rng=rng) for _ in range(40)}) == len(LUNG_PARAPHRASES["empty"])


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
