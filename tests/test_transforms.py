"""Text views, report checks and the transform chains of both stages."""

import numpy as np
import pytest
import torch
from PIL import Image

from amvlm_monai.transforms.pipelines import pretrain_transforms, segmentation_transforms
from amvlm_monai.transforms.views import BinarizeLabeld, CheckTextd, TextView, TextViewd, ToGrayscaled

REPORT = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."


def test_text_view_shuffles_clauses_and_keeps_words_without_drop():
    view = TextView(drop_prob=0.0)
    outs = {view.set_random_state(s)(REPORT) for s in range(20)}
    assert len(outs) > 1  # clause order changes with the seed
    for out in outs:
        assert out.endswith(".")
        assert sorted(out.rstrip(".").split(", ")) == sorted(REPORT.rstrip(".").split(", "))


def test_text_view_drops_about_the_right_share_of_words():
    view = TextView(drop_prob=0.3, shuffle=False).set_random_state(0)
    n_words = len(REPORT.split())
    kept = [len(view(REPORT).split()) for _ in range(400)]
    share = 1 - np.mean(kept) / n_words
    assert 0.2 < share < 0.4


def test_text_view_never_empty_and_deterministic():
    view = TextView(drop_prob=0.99)
    assert all(view(w).strip(".") for w in ["lung.", "a b", "x, y."])
    a = TextViewd("text", "text_aug", drop_prob=0.5).set_random_state(3)({"text": REPORT})
    b = TextViewd("text", "text_aug", drop_prob=0.5).set_random_state(3)({"text": REPORT})
    assert a["text_aug"] == b["text_aug"] and a["text"] == REPORT


def test_text_view_rejects_bad_probability():
    with pytest.raises(ValueError, match="drop_prob"):
        TextView(drop_prob=1.0)


@pytest.mark.parametrize("text, match", [(None, "no report"), ("   ", "empty"), (3, "expected str")])
def test_check_text_names_the_file(text, match):
    with pytest.raises(ValueError, match=match) as err:
        CheckTextd("text")({"image": "/data/img_7.png", "text": text})
    assert "img_7.png" in str(err.value)
    with pytest.raises(ValueError, match="img_7"):
        CheckTextd("text")({"image": "/data/img_7.png"})


def test_grayscale_and_binarize():
    rgb = torch.stack([torch.full((2, 2), v) for v in (0.0, 3.0, 6.0)])
    assert torch.allclose(ToGrayscaled("image")({"image": rgb})["image"], torch.full((1, 2, 2), 3.0))
    lab = torch.tensor([[[0.0, 255.0], [0.0, 10.0]]])
    assert BinarizeLabeld("label", strict=False)({"label": lab})["label"].tolist() == [[[0.0, 1.0], [0.0, 1.0]]]
    with pytest.raises(ValueError, match=r"mask values \{0, 10, 255\} are not binary"):
        BinarizeLabeld("label")({"label": lab})
    for ok in ([[[0.0, 255.0]]], [[[1.0, 0.0]]], [[[0.0, 0.0]]], [[[255.0, 255.0]]]):
        out = BinarizeLabeld("label")({"label": torch.tensor(ok)})["label"]
        assert out.tolist() == [[[float(v > 0) for v in ok[0][0]]]]


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((40, 48)) * 255).astype(np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 30:40] = 255
    Image.fromarray(img).convert("RGB").save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "mask_a.png")
    return {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "mask_a.png"), "text": REPORT}


def test_pretrain_chain_gives_two_views_in_range(pair):
    out = pretrain_transforms(image_size=32).set_random_state(1)(pair)
    assert out["image"].shape == out["image_aug"].shape == (1, 32, 32)
    for key in ("image", "image_aug"):
        assert out[key].min() >= -1.0 - 1e-5 and out[key].max() <= 1.0 + 1e-5
    # the view is augmented before normalisation and keeps a real intensity range (not cast to near-black)
    assert out["image_aug"].std() > 0.2
    assert isinstance(out["text_aug"], str) and out["text"] == REPORT
    same = pretrain_transforms(image_size=32, augment=False)(pair)
    assert torch.equal(same["image"], same["image_aug"]) and same["text_aug"] == REPORT


def test_segmentation_chain_label_binary_and_aligned(pair):
    out = segmentation_transforms(image_size=32)(pair)
    assert out["image"].shape == out["label"].shape == (1, 32, 32)
    assert set(out["label"].unique().tolist()) == {0.0, 1.0}
    # the mask lies in rows 5..15 and columns 30..40 of a 40 x 48 image; MONAI's PIL reader puts the image's x axis
    # first (reverse indexing), and after resizing the mask stays upper right
    xs, ys = torch.nonzero(out["label"][0], as_tuple=True)
    assert xs.float().mean() > 16 and ys.float().mean() < 16


def test_color_chain_keeps_three_channels_and_multiclass_labels_stay_indices(tmp_path):
    from amvlm_monai.transforms.views import LabelIndexd, ToColord

    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "he.png")
    lab = np.zeros((20, 20), np.uint8)
    lab[:10] = 2
    lab[10:, :5] = 7
    Image.fromarray(lab).save(tmp_path / "lab.png")
    item = {"image": str(tmp_path / "he.png"), "label": str(tmp_path / "lab.png"), "text": REPORT}
    out = segmentation_transforms(image_size=16, in_channels=3, multiclass=True)(item)
    assert out["image"].shape == (3, 16, 16)
    assert out["image"][0].mean() > out["image"][1].mean()  # red stays red
    assert set(out["label"].unique().tolist()) == {0.0, 2.0, 7.0}
    grey = torch.ones(1, 2, 2)
    assert ToColord("image")({"image": grey})["image"].shape == (3, 2, 2)
    with pytest.raises(ValueError, match="outside the class set 0..4"):
        LabelIndexd("label", num_classes=5)({"label": torch.full((1, 2, 2), 7.0)})
    colour = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="one channel of class indices"):
        LabelIndexd("label")({"label": colour})
    with_alpha = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 255.0)])  # LA: grey indices + alpha
    assert LabelIndexd("label")({"label": with_alpha})["label"].tolist() == [[[3.0, 3.0], [3.0, 3.0]]]
    with pytest.raises(ValueError, match=r"values \{0, 0.5\} are not whole"):
        LabelIndexd("label")({"label": torch.tensor([[[0.0, 0.5]]])})
    with pytest.raises(ValueError, match="in_channels"):
        segmentation_transforms(in_channels=2)
