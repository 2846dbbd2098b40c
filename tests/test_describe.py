import numpy as np
import pytest

from amvlm_monai.data.describe import (
    Vocabulary,
    describe_levels,
    describe_mask,
    find_regions,
    number_word,
)


def blank(size=64):
    return np.zeros((size, size), np.uint8)


def test_empty_mask():
    assert describe_mask(blank()) == "No lesion is visible."
    assert describe_mask(blank(), vocab=Vocabulary(empty="Nothing.")) == "Nothing."


def test_radiological_left_right():
    m = blank()
    m[8:14, 44:50] = 255  # image top right -> patient's upper LEFT
    assert describe_mask(m) == "Unilateral pulmonary infection, one infected area, small upper left lung."
    m = blank()
    m[50:56, 6:12] = 1  # image bottom left -> patient's lower RIGHT
    assert describe_mask(m) == "Unilateral pulmonary infection, one infected area, small lower right lung."


def test_two_regions_bilateral_order_and_sizes():
    m = blank()
    m[8:14, 44:50] = 1  # 36 px = 0.9% of the image: small, patient's upper left
    m[44:60, 6:20] = 1  # 224 px = 5.5%: large, patient's lower right
    assert describe_mask(m) == (
        "Bilateral pulmonary infection, two infected areas, small upper left lung and large lower right lung."
    )


def test_counts_specks_and_number_words():
    m = blank()
    for k in range(3):  # three regions in the patient's right lung (image left), top to bottom
        m[4 + 20 * k : 10 + 20 * k, 4:10] = 1
    m[30, 50] = 1  # a 1-pixel speck: ignored with the default min_area (0.05% of 4096 = 3 px)
    text = describe_mask(m)
    assert text.startswith("Unilateral pulmonary infection, three infected areas, ")
    assert text.count("right lung") == 3 and "left" not in text
    assert text.index("upper") < text.index("middle") < text.index("lower")
    assert "four" in describe_mask(m, min_area=1)
    assert len(find_regions(m, min_area=0.0)) == 4
    assert [number_word(n) for n in (1, 2, 10, 11)] == ["one", "two", "ten", "11"]


def test_size_words_and_vertical_span():
    m = blank()
    m[2:62, 40:60] = 1  # one tall region covering all thirds, 1200 px = 29%: large
    assert describe_mask(m) == "Unilateral pulmonary infection, one infected area, large all left lung."
    m = blank()
    m[22:64, 40:46] = 1  # middle and lower thirds, 252 px = 6%: large; with bigger thresholds medium
    assert "middle lower left lung" in describe_mask(m)
    assert "medium middle lower" in describe_mask(m, size_thresholds=(0.01, 0.1))
    assert "middle lower left lung." in describe_mask(m, include_size=False)


def test_organ_mask_reference():
    m = blank()
    organ = blank()
    organ[32:64, :] = 1  # the organ is the lower half: thirds and sizes are taken within it
    m[34:38, 40:44] = 1  # top of the organ; 16 px of a 2048 px organ = 0.8%: small
    assert describe_mask(m) == "Unilateral pulmonary infection, one infected area, small middle left lung."
    assert describe_mask(m, organ_mask=organ) == (
        "Unilateral pulmonary infection, one infected area, small upper left lung."
    )


def test_bone_vocabulary_and_center_band():
    m = blank()
    m[10:16, 28:34] = 1  # just left of the image midline: patient's right, or central with a band
    m[50:56, 50:56] = 1
    assert describe_mask(m, organ="bone", finding="lesion") == (
        "Bone lesion, two lesions, small lower left and small upper right."
    )
    text = describe_mask(m, organ="bone", finding="lesion", center_band=0.2)
    assert text == "Bone lesion, two lesions, small lower left and small upper central."
    generic = describe_mask(m, organ="liver", finding="tumour")
    assert generic.startswith("Liver tumour, two tumours, ")


def test_many_regions_are_summarised():
    m = blank()
    for r in range(0, 60, 10):
        m[r : r + 4, 50:54] = 1  # six regions in the patient's left lung
    text = describe_mask(m, max_listed=4)
    assert text.startswith("Unilateral pulmonary infection, six infected areas, upper left lung")
    assert "small" not in text


def test_channels_tensor_like_and_determinism():
    m = blank()
    m[8:14, 44:50] = 1
    stacked = np.stack([m, blank()])  # (C, H, W): union of channels
    assert describe_mask(stacked) == describe_mask(m) == describe_mask(m.astype(bool))
    rng = np.random.default_rng(0)
    noisy = (rng.random((64, 64)) > 0.97).astype(np.uint8)
    assert describe_mask(noisy, min_area=1) == describe_mask(noisy.copy(), min_area=1)
    with pytest.raises(ValueError, match="mask"):
        describe_mask(np.zeros((2, 2, 2, 2)))


def test_describe_levels():
    names = ["background", "S", "L5", "L4", "L3"]
    lab = np.zeros((16, 16), np.int64)
    lab[0:4] = 3
    lab[4:8] = 2
    lab[8:9, 0] = 1  # a single voxel of S
    assert describe_levels(lab, names) == "Visible levels: S, L5, L4."
    assert describe_levels(lab, names, min_area=2) == "Visible levels: L5, L4."
    assert describe_levels(lab, {2: "L5", 3: "L4", 1: "S"}) == "Visible levels: S, L5, L4."
    assert describe_levels(np.zeros((4, 4)), names) == "No labelled structure is visible."
    lab[0, 0] = 9
    with pytest.raises(ValueError, match="9"):
        describe_levels(lab, names)
