"""Per-image Dice/IoU (both-empty = 1), binarize, score CSVs, paired t-test and its CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from amvlm_monai.evaluation.metrics import (
    binarize,
    main,
    paired_ttest,
    read_scores_csv,
    segmentation_scores,
    write_scores_csv,
)


def _img(*rows):
    return torch.tensor(rows, dtype=torch.float32)[None]  # (1, H, W)


def test_binary_by_hand_including_empty_rules():
    pred = torch.stack([_img([1, 1], [0, 0]), _img([0, 0], [0, 0]), _img([0, 0], [0, 0]), _img([1, 0], [0, 0])])
    label = torch.stack([_img([1, 0], [0, 0]), _img([0, 0], [0, 0]), _img([0, 1], [1, 0]), _img([0, 0], [0, 0])])
    dice, iou = segmentation_scores(pred, label)  # C = 1: the channel is the foreground, always scored
    assert dice.shape == (4, 1) and iou.shape == (4, 1)
    # overlap 1 of (2, 1); both empty -> 1; label only -> 0; prediction only -> 0
    assert dice.flatten().tolist() == pytest.approx([2 / 3, 1.0, 0.0, 0.0])
    assert iou.flatten().tolist() == pytest.approx([1 / 2, 1.0, 0.0, 0.0])
    d2, _ = segmentation_scores(pred, label, include_background=True)
    torch.testing.assert_close(d2, dice)


def test_multiclass_by_hand_excludes_background():
    # classes 0 (bg), 1, 2 on a 2x3 image; class 2 absent in both
    pred_idx = torch.tensor([[[0, 1, 1], [0, 0, 1]]])
    lab_idx = torch.tensor([[[0, 1, 0], [1, 0, 1]]])
    pred = torch.nn.functional.one_hot(pred_idx, 3).permute(0, 3, 1, 2).float()
    label = torch.nn.functional.one_hot(lab_idx, 3).permute(0, 3, 1, 2).float()
    dice, iou = segmentation_scores(pred, label)
    # class 1: pred {01, 02, 12}, label {01, 10, 12}: overlap 2 -> Dice 4/6, IoU 2/4; class 2: empty both -> 1
    assert dice[0].tolist() == pytest.approx([2 / 3, 1.0])
    assert iou[0].tolist() == pytest.approx([0.5, 1.0])
    d_bg, i_bg = segmentation_scores(pred, label, include_background=True)
    # background: pred {00, 10, 11}, label {00, 02, 11}: overlap 2 -> 2/3, 2/4
    assert d_bg[0].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert i_bg[0].tolist() == pytest.approx([0.5, 0.5, 1.0])
    # label given as class indices (B, 1, H, W)
    d_idx, i_idx = segmentation_scores(pred, lab_idx[:, None])
    torch.testing.assert_close(d_idx, dice)
    torch.testing.assert_close(i_idx, iou)


def _numpy_scores(pred, label):
    p, y = pred.numpy().astype(bool), label.numpy().astype(bool)
    b, c = p.shape[:2]
    dice, iou = np.zeros((b, c)), np.zeros((b, c))
    for i in range(b):
        for k in range(c):
            inter = np.logical_and(p[i, k], y[i, k]).sum()
            union = np.logical_or(p[i, k], y[i, k]).sum()
            total = p[i, k].sum() + y[i, k].sum()
            dice[i, k] = 1.0 if total == 0 else 2 * inter / total
            iou[i, k] = 1.0 if union == 0 else inter / union
    return dice, iou


def test_matches_independent_numpy_formulation():
    g = torch.Generator().manual_seed(0)
    pred = (torch.rand(4, 3, 6, 6, generator=g) > 0.7).float()
    label = (torch.rand(4, 3, 6, 6, generator=g) > 0.7).float()
    pred[0, 1] = 0
    label[0, 1] = 0  # one both-empty case
    pred[1, 2] = 0  # one label-only case
    dice, iou = segmentation_scores(pred, label, include_background=True)
    nd, ni = _numpy_scores(pred, label)
    np.testing.assert_allclose(dice.numpy(), nd, rtol=1e-6)
    np.testing.assert_allclose(iou.numpy(), ni, rtol=1e-6)
    dice_fg, _ = segmentation_scores(pred, label)
    np.testing.assert_allclose(dice_fg.numpy(), nd[:, 1:], rtol=1e-6)
    # 3D volumes work the same way
    d3, _ = segmentation_scores(pred[:, :, None].expand(4, 3, 2, 6, 6), label[:, :, None].expand(4, 3, 2, 6, 6), True)
    np.testing.assert_allclose(d3.numpy(), nd, rtol=1e-6)


def test_binarize():
    logits = torch.tensor([-1.0, 0.0, 0.1, 3.0]).reshape(1, 1, 2, 2)
    assert binarize(logits, multiclass=False).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]  # sigmoid(0) = .5 is not > .5
    assert binarize(logits, multiclass=False, threshold=0.9).flatten().tolist() == [0.0, 0.0, 0.0, 1.0]
    mc = torch.tensor([[0.1, 2.0], [1.0, -1.0], [0.5, 0.0]]).reshape(1, 3, 1, 2)
    out = binarize(mc, multiclass=True)
    assert out[0, :, 0, 0].tolist() == [0.0, 1.0, 0.0] and out[0, :, 0, 1].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="multiclass"):
        binarize(logits, multiclass=True)
    with pytest.raises(ValueError, match="threshold"):
        binarize(logits, multiclass=False, threshold=1.0)


def test_score_input_errors():
    with pytest.raises(ValueError, match="binarised"):
        segmentation_scores(torch.full((1, 1, 2, 2), 0.7), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="label"):
        segmentation_scores(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 3))


def test_csv_round_trip(tmp_path):
    dice = torch.tensor([[0.5, 1.0], [1 / 3, 0.0], [0.123456789, 0.987654321]], dtype=torch.float64)
    iou = dice / 2
    path = tmp_path / "sub" / "scores.csv"
    write_scores_csv(path, ["a", "b", "c"], dice, iou, class_names=["liver", "kidney"])
    header = path.read_text().splitlines()[0]
    assert header == "id,dice,iou,dice_liver,dice_kidney,iou_liver,iou_kidney"
    got = read_scores_csv(path)
    assert got["ids"] == ["a", "b", "c"] and got["class_names"] == ["liver", "kidney"]
    np.testing.assert_array_equal(got["dice_per_class"], dice.numpy())
    np.testing.assert_array_equal(got["iou_per_class"], iou.numpy())
    np.testing.assert_allclose(got["dice"], dice.numpy().mean(1))
    np.testing.assert_allclose(got["iou"], iou.numpy().mean(1))
    write_scores_csv(tmp_path / "b.csv", ["x"], np.array([0.25]), np.array([0.125]))
    got = read_scores_csv(tmp_path / "b.csv")
    assert got["class_names"] == ["1"] and got["dice"].tolist() == [0.25]
    with pytest.raises(ValueError, match="class_names"):
        write_scores_csv(tmp_path / "c.csv", ["x"], np.array([[0.1, 0.2]]), np.array([[0.1, 0.2]]), ["one"])
    with pytest.raises(ValueError, match="unique"):
        write_scores_csv(tmp_path / "c.csv", ["x", "x"], np.array([0.1, 0.2]), np.array([0.1, 0.2]))


def _write(tmp_path, name, ids, d):
    path = tmp_path / name
    write_scores_csv(path, ids, np.asarray(d), np.asarray(d) * 0.5)
    return path


def test_paired_ttest_against_scipy_and_by_hand(tmp_path):
    a = [0.9, 0.8, 0.7, 0.6, 0.75]
    b = [0.85, 0.8, 0.6, 0.5, 0.7]
    pa = _write(tmp_path, "a.csv", ["i1", "i2", "i3", "i4", "i5"], a)
    order = [4, 2, 0, 3, 1]  # B lists the same images in another order
    pb = _write(tmp_path, "b.csv", [f"i{k + 1}" for k in order], [b[k] for k in order])
    res = paired_ttest(pa, pb)
    ref = stats.ttest_rel(a, b)
    assert res["t"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    d = np.array(a) - np.array(b)  # by hand: t = mean(d) / (sd(d) / sqrt(n))
    assert res["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(5)))
    assert res["mean_diff"] == pytest.approx(0.06) and res["n"] == 5
    assert res["significant"] == (ref.pvalue < 0.05)
    assert paired_ttest(pa, pb, alpha=0.5)["significant"] is True
    assert paired_ttest(pa, pb, metric="iou")["t"] == pytest.approx(ref.statistic)
    assert paired_ttest(pa, pb, metric="dice_1")["t"] == pytest.approx(ref.statistic)
    same = paired_ttest(pa, pa)
    assert same["significant"] is False and same["mean_diff"] == 0.0


def test_paired_ttest_errors(tmp_path):
    pa = _write(tmp_path, "a.csv", ["i1", "i2", "i3"], [0.1, 0.2, 0.3])
    pb = _write(tmp_path, "b.csv", ["i1", "i2", "i4"], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"only in A \['i3'\].*only in B \['i4'\]"):
        paired_ttest(pa, pb)
    with pytest.raises(ValueError, match="hausdorff"):
        paired_ttest(pa, pa, metric="hausdorff")
    one = _write(tmp_path, "one.csv", ["i1"], [0.1])
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest(one, one)
    assert main(["compare", str(pa), str(pb)]) == 2


def test_cli_compare(tmp_path, capsys):
    pa = _write(tmp_path, "a.csv", ["i1", "i2", "i3"], [0.9, 0.8, 0.75])
    pb = _write(tmp_path, "b.csv", ["i1", "i2", "i3"], [0.7, 0.75, 0.6])
    assert main(["compare", str(pa), str(pb), "--metric", "iou"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "iou" and out["n"] == 3
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "amvlm_monai.evaluation.metrics", "compare", str(pa), str(pb)],
        capture_output=True, text=True, cwd=root, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["t"] == pytest.approx(stats.ttest_rel([0.9, 0.8, 0.75], [0.7, 0.75, 0.6]).statistic)
