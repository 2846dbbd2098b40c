"""Evaluation of stage 2: per-image Dice and IoU, score CSVs, and a paired t-test between two methods.

Rules (the method page, "Evaluation"):
- predictions are binarised at 0.5 after a sigmoid (binary) or by argmax (multi-class), see :func:`binarize`;
- Dice and IoU are computed per image and per foreground class with MONAI (``compute_dice`` / ``compute_iou``, the
  functions behind ``DiceMetric`` / ``MeanIoU``) with ``ignore_empty=False``: **a class absent from both the
  prediction and the label scores 1** (absent from the label only or the prediction only scores 0);
- which channels count: a single-channel (sigmoid) output's one channel *is* the foreground and is always scored;
  for multi-channel softmax outputs channel 0 is the background and is excluded unless ``include_background=True``;
- the reported Dice / mIoU is the mean over images of the per-image class mean; significance is a paired t-test over
  per-image scores matched by id (``alpha = 0.05``).

CLI: ``python -m amvlm_monai.evaluation.metrics compare a.csv b.csv [--metric dice] [--alpha 0.05]`` prints a JSON dict.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # torch and monai are imported where needed, so that the CSV / t-test CLI starts fast
    import torch


PathLike = Union[str, "os.PathLike[str]"]


def binarize(logits: torch.Tensor, multiclass: bool, threshold: float = 0.5) -> torch.Tensor:
    """Discrete prediction from network logits.

    Args:
        logits: ``(B, C, *spatial)``.
        multiclass: False: ``sigmoid(logits) > threshold`` per channel; True: one-hot of the argmax over C (C >= 2).
        threshold: probability threshold in (0, 1) for the binary case.

    Returns:
        ``(B, C, *spatial)`` float tensor of 0/1.

    Example:
        >>> binarize(torch.tensor([[[-1.0, 2.0]]]), multiclass=False)
        tensor([[[0., 1.]]])
    """
    import torch  # noqa: PLC0415

    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}.")
    if multiclass:
        c = logits.shape[1]
        if c < 2:
            raise ValueError(f"multiclass=True needs C >= 2 channels, got shape {tuple(logits.shape)}.")
        return torch.nn.functional.one_hot(logits.argmax(dim=1), c).movedim(-1, 1).to(logits.dtype)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}.")
    return (torch.sigmoid(logits) > threshold).to(logits.dtype)


def segmentation_scores(
    pred: torch.Tensor, label: torch.Tensor, include_background: bool = False, ignore_empty: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-class Dice and IoU of binarised predictions: the one Dice/IoU of the package (every score,
    diagnostic and stage-1 figure calls it).

    Args:
        pred: ``(B, C, *spatial)`` 0/1 prediction (see :func:`binarize`).
        label: ``(B, C, *spatial)`` 0/1 (one-hot for multi-class), or ``(B, 1, *spatial)`` class indices when C >= 2.
        include_background: score channel 0 too. Ignored for C = 1, whose channel is the foreground and is always
            scored.
        ignore_empty: False (the evaluation rule): a class absent from both prediction and label scores 1; True: a
            class absent from the label scores NaN (for means over the images that contain it, e.g. "Dice over
            images with a lesion"). MONAI's ``ignore_empty`` argument.

    Returns:
        ``(dice, iou)``, each ``(B, C')`` with ``C' = C`` (C = 1 or ``include_background``) or ``C - 1``.

    Example:
        >>> p = torch.tensor([[[[1., 1., 0., 0.]]]]); y = torch.tensor([[[[1., 0., 0., 0.]]]])
        >>> segmentation_scores(p, y)  # Dice 2*1/(2+1), IoU 1/2
        (tensor([[0.6667]]), tensor([[0.5000]]))
    """
    from monai.metrics import compute_dice, compute_iou  # noqa: PLC0415
    from monai.networks.utils import one_hot  # noqa: PLC0415

    if pred.ndim < 3:
        raise ValueError(f"pred must be (B, C, *spatial), got shape {tuple(pred.shape)}.")
    c = pred.shape[1]
    if c > 1 and label.shape[1] == 1 and label.shape[0] == pred.shape[0] and label.shape[2:] == pred.shape[2:]:
        label = one_hot(label.long(), num_classes=c)
    if label.shape != pred.shape:
        raise ValueError(
            f"label must have the pred shape {tuple(pred.shape)} (or (B, 1, ...) indices), got {tuple(label.shape)}."
        )
    for name, t in (("pred", pred), ("label", label)):
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be binarised (0/1 values); use binarize() on logits.")
    pred, label = pred.float(), label.float()
    include = bool(include_background) or c == 1
    dice = compute_dice(pred, label, include_background=include, ignore_empty=ignore_empty)
    iou = compute_iou(pred, label, include_background=include, ignore_empty=ignore_empty)
    return dice.float(), iou.float()


def _class_names(n: int, class_names: Optional[Sequence[str]]) -> List[str]:
    if class_names is None:
        return [str(i + 1) for i in range(n)]
    names = [str(x) for x in class_names]
    if len(names) != n:
        raise ValueError(f"class_names needs {n} entries (one per scored class), got {len(names)}.")
    if len(set(names)) != n or any(not x or "," in x for x in names):
        raise ValueError(f"class_names must be unique non-empty strings without commas, got {names!r}.")
    return names


def _as_2d(name: str, x: Union["torch.Tensor", np.ndarray, Sequence[float]]) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (N,) or (N, C'), got shape {arr.shape}.")
    return arr


def write_scores_csv(
    path: PathLike,
    ids: Sequence[str],
    dice: Union["torch.Tensor", np.ndarray],
    iou: Union["torch.Tensor", np.ndarray],
    class_names: Optional[Sequence[str]] = None,
) -> None:
    """Write per-image scores: columns ``id, dice, iou`` (class means) then ``dice_<name>``, ``iou_<name>`` per class.

    Args:
        path: output CSV (parent folders are created).
        ids: N unique image ids.
        dice: ``(N, C')`` (or ``(N,)``) per-image, per-class Dice from :func:`segmentation_scores`.
        iou: same shape, IoU.
        class_names: C' names; default ``"1", "2", ...`` (the foreground label values when the background is left out).
    """
    d, j = _as_2d("dice", dice), _as_2d("iou", iou)
    ids = [str(i) for i in ids]
    if d.shape != j.shape or d.shape[0] != len(ids):
        raise ValueError(f"ids ({len(ids)}), dice {d.shape} and iou {j.shape} must agree in N and C'.")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique.")
    names = _class_names(d.shape[1], class_names)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "dice", "iou"] + [f"dice_{n}" for n in names] + [f"iou_{n}" for n in names])
        for k, i in enumerate(ids):
            row = [d[k].mean(), j[k].mean(), *d[k], *j[k]]
            writer.writerow([i] + [repr(float(v)) for v in row])


def _read_table(path: PathLike) -> Tuple[List[str], Dict[str, np.ndarray]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            raise ValueError(f"{path}: not a scores CSV (no 'id' column).")
        rows = list(reader)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids.")
    cols = {k: np.array([float(r[k]) for r in rows], dtype=np.float64) for k in reader.fieldnames if k != "id"}
    return ids, cols


def read_scores_csv(path: PathLike) -> Dict[str, object]:
    """Read a CSV written by :func:`write_scores_csv`.

    Returns:
        dict with ``ids`` (list of str), ``dice`` and ``iou`` ``(N,)`` class means, ``dice_per_class`` and
        ``iou_per_class`` ``(N, C')``, ``class_names`` (list of str); arrays are float64 numpy.
    """
    ids, cols = _read_table(path)
    names = [k[len("dice_"):] for k in cols if k.startswith("dice_")]
    n = len(ids)
    return {
        "ids": ids,
        "dice": cols["dice"],
        "iou": cols["iou"],
        "dice_per_class": np.stack([cols[f"dice_{c}"] for c in names], axis=1) if names else np.zeros((n, 0)),
        "iou_per_class": np.stack([cols[f"iou_{c}"] for c in names], axis=1) if names else np.zeros((n, 0)),
        "class_names": names,
    }


def paired_ttest(csv_a: PathLike, csv_b: PathLike, metric: str = "dice", alpha: float = 0.05) -> Dict[str, object]:
    """Paired t-test (``scipy.stats.ttest_rel``) of per-image scores of method A against method B, matched by id.

    Args:
        csv_a: scores CSV of method A.
        csv_b: scores CSV of method B (the same ids, any order).
        metric: a score column: ``"dice"``, ``"iou"`` (class means) or a per-class column such as ``"dice_1"``.
        alpha: significance level in (0, 1).

    Returns:
        dict ``t``, ``p`` (two-sided), ``mean_diff`` (mean of A - B), ``n``, ``significant`` (``p < alpha``; False
        when p is NaN, e.g. identical scores), plus ``metric`` and ``alpha``.

    Raises:
        ValueError: ids that differ between the files (listed), a missing column, fewer than 2 images.
    """
    from scipy import stats  # noqa: PLC0415

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    ids_a, cols_a = _read_table(csv_a)
    ids_b, cols_b = _read_table(csv_b)
    for path, cols in ((csv_a, cols_a), (csv_b, cols_b)):
        if metric not in cols:
            raise ValueError(f"metric {metric!r} is not a column of {path}; columns: {sorted(cols)}.")
    if set(ids_a) != set(ids_b):
        only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
        raise ValueError(
            f"the two CSVs score different images: {len(only_a)} only in A {only_a[:5]}, "
            f"{len(only_b)} only in B {only_b[:5]}."
        )
    if len(ids_a) < 2:
        raise ValueError(f"a paired t-test needs at least 2 images, got {len(ids_a)}.")
    pos_b = {i: k for k, i in enumerate(ids_b)}
    a = cols_a[metric]
    b = cols_b[metric][[pos_b[i] for i in ids_a]]
    res = stats.ttest_rel(a, b)
    t, p = float(res.statistic), float(res.pvalue)
    return {
        "metric": metric,
        "t": t,
        "p": p,
        "mean_diff": float(np.mean(a - b)),
        "n": len(ids_a),
        "alpha": float(alpha),
        "significant": bool(not math.isnan(p) and p < alpha),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``compare A.csv B.csv [--metric dice] [--alpha 0.05]`` prints the t-test as JSON."""
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.evaluation.metrics", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_ = sub.add_parser("compare", help="paired t-test of per-image scores of two methods (CSV files)")
    cmp_.add_argument("csv_a")
    cmp_.add_argument("csv_b")
    cmp_.add_argument("--metric", default="dice")
    cmp_.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        result = paired_ttest(args.csv_a, args.csv_b, metric=args.metric, alpha=args.alpha)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
