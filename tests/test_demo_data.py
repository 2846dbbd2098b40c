import numpy as np
import pytest
from openpyxl import load_workbook
from PIL import Image
from scipy import ndimage

from amvlm_monai.data.describe import LUNG_PARAPHRASES, describe_mask, find_regions, number_word
from data_prep.demo_data import DEFAULT_REGIME, QataParams, lesion_stats, main, make_case, make_demo_dataset

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
        image, mask, info = make_case(rng, 32, "v1")
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


# --- the regimes -------------------------------------------------------------------------------------------------

#: sha256 of make_case's v1 output (image, mask, report, info) for sizes 32/48/64 and six seeds each, computed with
#: the generator as it was before the qata regime existed (commit 8138464): the v1 regime must never change.
V1_SHA256 = "2df39ea293270cd6f6eda5081c935a054538fd9e08a123fb00b6edf94b77ffd1"


def v1_digest() -> str:
    import hashlib

    h = hashlib.sha256()
    for size in (32, 48, 64):
        for i in range(6):
            rng = np.random.default_rng([0, 0, i])
            image, mask, info = make_case(rng, size, "v1")
            h.update(image.tobytes())
            h.update(mask.tobytes())
            h.update(describe_mask(mask, rng=rng).encode())
            h.update(repr(sorted(info.items())).encode())
    return h.hexdigest()


def test_v1_regime_is_unchanged():
    assert v1_digest() == V1_SHA256


def test_v1_dataset_files_are_the_v1_cases(tmp_path):
    root = make_demo_dataset(tmp_path / "v1", 2, 1, 1, size=48, seed=5, regime="v1")
    rows = {r[0]: r[1] for r in list(load_workbook(root / "Val_text.xlsx").active.iter_rows(values_only=True))[1:]}
    rng = np.random.default_rng([5, 1, 0])
    image, mask, _ = make_case(rng, 48, "v1")
    assert np.array_equal(np.asarray(Image.open(root / "Val_Folder" / "img" / "val_0000.png")), image)
    assert np.array_equal(np.asarray(Image.open(root / "Val_Folder" / "labelcol" / "mask_val_0000.png")), mask)
    assert rows["mask_val_0000.png"] == describe_mask(mask, rng=rng)


@pytest.fixture(scope="module")
def qata_masks():
    return [make_case(np.random.default_rng([0, 0, i]), 64)[1] for i in range(100)]


def test_default_regime_is_qata():
    assert DEFAULT_REGIME == "qata"
    a = make_case(np.random.default_rng(3), 64)
    b = make_case(np.random.default_rng(3), 64, "qata", QataParams())
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_qata_regime_lesion_extent_counts_and_sides(qata_masks):
    s = lesion_stats(qata_masks, patch=8)
    # extent: large regions, several 8-px patches across (v1: 2 % foreground, 8 % of regions span 2 patches)
    assert 0.06 <= s["fg_mean"] <= 0.14, s
    assert s["span2_share"] >= 0.8 and s["patches_median"] >= 5, s
    # counts: almost every image has a lesion, most have two or more; never more than four regions
    assert s["empty_share"] <= 0.10, s
    assert sum(v for k, v in s["count_share"].items() if k >= 2) >= 0.45, s
    assert max(s["count_share"]) <= 4, s
    # sides: bilateral in most images with a lesion, but not all
    assert 0.45 <= s["bilateral_share"] <= 0.85, s
    # zones: mostly middle and lower, some upper
    z = s["zone_share"]
    assert z["middle"] > 0.6 and z["lower"] > z["upper"] > 0.0, s


def test_the_qata_bounds_reject_the_v1_regime():
    s = lesion_stats([make_case(np.random.default_rng([0, 0, i]), 64, "v1")[1] for i in range(60)], patch=8)
    assert not (0.06 <= s["fg_mean"] <= 0.14) and s["span2_share"] < 0.8 and s["empty_share"] > 0.10, s


def test_lesion_stats_on_a_known_mask():
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 40:50] = 1  # 20 x 10 px, patient's left, upper and middle thirds: 3 x 2 patches
    m[40:44, 4:8] = 1  # 4 x 4 px in one patch, patient's right, middle and lower thirds (3 rows + 1 row)
    s = lesion_stats([m, np.zeros((64, 64))], patch=8)
    assert s["fg_mean"] == pytest.approx((200 + 16) / 4096 / 2)
    assert s["count_share"] == {0: 0.5, 2: 0.5} and s["empty_share"] == 0.5
    assert s["bilateral_share"] == 1.0 and s["regions"] == 2
    assert s["span2_share"] == 0.5 and s["patches_median"] == 3.5
    assert s["zone_share"] == {"upper": 0.5, "middle": 1.0, "lower": 0.5}


def test_qata_masks_mark_the_added_opacity():
    dark = QataParams(amplitude=(0.0, 0.0))  # the same draws, lesions without brightness
    for i in range(10):
        image, mask, info = make_case(np.random.default_rng([1, 0, i]), 64)
        plain, same_mask, _ = make_case(np.random.default_rng([1, 0, i]), 64, params=dark)
        m = mask > 0
        assert np.array_equal(mask, same_mask)
        assert len(find_regions(m)) == info["lesions"]  # lesions never touch: the report's count is the objects'
        if m.any():
            added = image.astype(float) - plain
            assert added[m].mean() > 10  # a visible opacity (8-bit levels) where the mask is ...
            far = ~ndimage.binary_dilation(m, iterations=3)
            assert added[far].mean() < 1  # ... and none away from it


def test_qata_dataset_same_bytes_any_workers_other_seed_differs(tmp_path):
    a = make_demo_dataset(tmp_path / "a", 3, 2, 2, size=64, seed=0)
    b = make_demo_dataset(tmp_path / "b", 3, 2, 2, size=64, seed=0, workers=2)
    c = make_demo_dataset(tmp_path / "c", 3, 2, 2, size=64, seed=1)
    fa, fb, fc = files(a), files(b), files(c)
    assert fa == fb
    assert fa.keys() == fc.keys() and fa["Train_Folder/img/train_0000.png"] != fc["Train_Folder/img/train_0000.png"]
    other = make_demo_dataset(tmp_path / "d", 3, 2, 2, size=64, seed=0, params=QataParams(amplitude=(0.3, 0.4)))
    assert files(other)["Train_Folder/img/train_0000.png"] != fa["Train_Folder/img/train_0000.png"]


def test_regime_and_param_arguments(tmp_path):
    with pytest.raises(ValueError, match="regime"):
        make_case(np.random.default_rng(0), 64, "nope")
    with pytest.raises(ValueError, match="params"):
        make_case(np.random.default_rng(0), 64, "v1", QataParams())
    with pytest.raises(ValueError, match="unknown QataParams"):
        QataParams().replace(amplitudes=(0.1, 0.2))
    assert QataParams().replace(amplitude=[0.1, 0.2]).amplitude == (0.1, 0.2)
    root = main(["--out", str(tmp_path / "p"), "--n-train", "1", "--n-val", "1", "--n-test", "1",
                 "--param", "amplitude=[0.3,0.4]", "--param", "lesion_counts=[0,1,0,0,0]"])
    mask = np.asarray(Image.open(root / "Train_Folder" / "labelcol" / "mask_train_0000.png"))
    assert len(find_regions(mask)) == 1
    v1 = main(["--out", str(tmp_path / "v1"), "--n-train", "1", "--n-val", "1", "--n-test", "1", "--size", "48",
               "--regime", "v1"])
    image, mask, _ = make_case(np.random.default_rng([0, 0, 0]), 48, "v1")
    assert np.array_equal(np.asarray(Image.open(v1 / "Train_Folder" / "img" / "train_0000.png")), image)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--regime", "v1", "--param", "amplitude=[0.1,0.2]"])
