"""Metric handlers: per-image segmentation scores (:class:`SegmentationMetric`, incl. the Dice over images with a
lesion and foreground fractions) and the quality of the pseudo labels against hidden labels
(:class:`PseudoLabelQuality`)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from amvlm_monai.evaluation.metrics import binarize, segmentation_scores, write_scores_csv
from amvlm_monai.io.outputs import relative_names
from amvlm_monai.utils.distributed import gather_objects, gather_rows, is_distributed, is_main_process

logger = logging.getLogger(__name__)


class SegmentationMetric(Metric):
    """Per-image segmentation scores as an ignite metric; ``metric`` picks the one returned.

    Reads ``(pred, label)`` from the engine output: ``pred`` logits (B, C, H, W), ``label`` (B, 1, H, W) binary mask
    or class indices. Predictions are binarised (sigmoid > 0.5, or argmax for ``multiclass``); scores follow
    :func:`~amvlm_monai.evaluation.metrics.segmentation_scores` (a class absent from both prediction and label scores 1).
    With ``output_csv`` the per-image Dice and IoU and the file names are written when the metric is computed (each
    image's path relative to the images' common folder: ``a.png`` when they share one, ``p01/a.png`` and
    ``p02/a.png`` when two folders hold one name). Under
    ``torchrun`` each rank scores its shard of the data and ``compute`` gathers every rank's per-image scores first, so
    all ranks return the same value (and rank 0 writes the CSV).

    Metrics:
        ``"dice"``, ``"iou"``: the paper's per-image means (absent from both scores 1).
        ``"dice_present"``: mean Dice over the (image, class) pairs whose label contains the class; a predictor that
            predicts nothing scores 0, so it is the model-selection metric (plain Dice rewards empty predictions on
            images without lesions). Falls back to ``"dice"`` when no label contains any class.
        ``"fg_fraction"`` / ``"label_fg_fraction"``: mean fraction of foreground pixels (any foreground class) in the
            predictions / labels, to spot a collapsing model.
    The per-image, per-class scores of the returned metric also go to ``engine.state.metric_details[name]``, as
    MONAI's metric handlers do with ``save_details=True``, so that ``MetricsSaver(metric_details=...)`` writes its raw
    and summary reports. ``output_csv`` stays because those reports are one file per metric with generic ``class0..``
    columns, while the paired t-test (:func:`~amvlm_monai.evaluation.metrics.paired_ttest`) reads Dice and IoU with the class
    names, keyed by image id, from one file.

    Args:
        metric: one of ``METRICS``.
        multiclass: softmax/argmax predictions with index labels (background channel 0 excluded).
        output_csv: per-image CSV path, or None.
        class_names: CSV column names per scored class.
        output_transform: engine output -> (pred, label, names or None).
    """

    METRICS = ("dice", "iou", "dice_present", "fg_fraction", "label_fg_fraction")

    def __init__(self, metric: str = "dice", multiclass: bool = False, output_csv: Optional[str] = None,
                 class_names: Optional[list[str]] = None,
                 output_transform: Callable = lambda out: (out["pred"], out["label"], _names(out.get("image"))),
                 device: str | torch.device = "cpu") -> None:
        if metric not in self.METRICS:
            raise ValueError(f"metric must be one of {self.METRICS}, got '{metric}'.")
        self.metric = metric
        self.multiclass = multiclass
        self.output_csv = output_csv
        self.class_names = class_names
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._ids: list[str] = []
        self._scores: dict[str, list[torch.Tensor]] = {k: [] for k in ("dice", "iou", "present", "fg", "label_fg")}

    def update(self, output) -> None:
        pred, label, names = output
        pred = binarize(pred.detach().float(), multiclass=self.multiclass)
        if self.multiclass:
            target = torch.nn.functional.one_hot(label[:, 0].long(), pred.shape[1]).movedim(-1, 1).to(pred)
        else:
            target = (label > 0.5).to(pred)
        dice, iou = segmentation_scores(pred, target, include_background=not self.multiclass)
        fg_pred, fg_label = (pred[:, 1:], target[:, 1:]) if self.multiclass else (pred, target)
        start = len(self._ids)
        names = list(names) if names is not None else [f"case_{start + i}" for i in range(dice.shape[0])]
        self._ids += [str(n) for n in names]  # full paths: same-named images of two folders stay two rows
        for key, value in (("dice", dice), ("iou", iou), ("present", fg_label.flatten(2).sum(-1) > 0),
                           ("fg", fg_pred.amax(1).flatten(1).mean(1)), ("label_fg", fg_label.amax(1).flatten(1).mean(1))):
            self._scores[key].append(value.detach().cpu())

    def compute(self) -> float:
        s = {k: torch.cat(v) for k, v in self._scores.items() if v}
        ids = list(self._ids)
        if is_distributed():  # every rank scored its shard: all ranks select models on the same, whole-set value
            s, ids = {k: gather_rows(v) for k, v in s.items()}, gather_objects(ids)
        if not ids:
            raise RuntimeError("SegmentationMetric needs at least one batch before it can be computed.")
        ids = [str(n) for n in relative_names(ids)]  # file names; with the folder where two folders hold one name
        if self.output_csv and is_main_process():
            os.makedirs(os.path.dirname(os.path.abspath(self.output_csv)), exist_ok=True)
            write_scores_csv(self.output_csv, ids, s["dice"], s["iou"], self.class_names)
        if self.metric == "dice_present":
            return float(s["dice"][s["present"]].mean()) if s["present"].any() else float(s["dice"].mean())
        key = {"fg_fraction": "fg", "label_fg_fraction": "label_fg"}.get(self.metric, self.metric)
        return float(s[key].mean())

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        details = getattr(engine.state, "metric_details", None)
        if not isinstance(details, dict):
            details = engine.state.metric_details = {}
        key = {"dice_present": "dice", "fg_fraction": "fg", "label_fg_fraction": "label_fg"}.get(self.metric,
                                                                                                   self.metric)
        details[name] = torch.cat(self._scores[key])


class PseudoLabelQuality:
    """Diagnostic of stage 2: how good are the pseudo labels on the unlabelled images?

    Every ``interval`` epochs the teacher (eval mode, after ``prepare_teacher()``), the text masks of the paired
    reports and their fusion (the pseudo labels the student learns from) are thresholded at 0.5 and scored against
    the **hidden** labels of the unlabelled training images (``splits.hidden_label_items``; they never reach
    training): Dice over the images that contain a lesion, and the foreground fraction. The figures go to the
    trainer's ``state.metrics`` as ``pseudo_<source>_dice`` / ``pseudo_<source>_fg``, to the log and, with
    ``output_csv``, one row per epoch to a CSV. Binary segmentation only.

    Args:
        loader: batches with ``image``, ``label`` (the hidden masks) and ``text``.
        teacher: the EMA teacher.
        guidance: the :class:`~amvlm_monai.engines.guidance.TextGuidance`, or None (teacher only).
        output_csv: CSV path, or None.
        interval: epochs between runs.
    """

    def __init__(self, loader: Any, teacher: torch.nn.Module, guidance: Optional[torch.nn.Module] = None,
                 output_csv: Optional[str] = None, interval: int = 1) -> None:
        self.loader = loader
        self.teacher = teacher
        self.guidance = guidance
        self.output_csv = os.fspath(output_csv) if output_csv else None
        self.interval = max(1, int(interval))

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    @torch.no_grad()
    def scores(self, device: torch.device | str) -> dict[str, float]:
        """``pseudo_<teacher|text|fused>_<dice|fg>`` and ``pseudo_label_fg`` over the loader."""
        sums: dict[str, list[float]] = {}
        was_training = self.guidance.training if self.guidance is not None else False
        if self.guidance is not None:
            self.guidance.eval()
        try:
            for batch in self.loader:
                x = batch["image"].to(device)
                y = batch["label"].to(device) > 0.5
                if y.shape[1] != 1:
                    raise ValueError("PseudoLabelQuality scores binary segmentation only.")
                logits = self.teacher(x).float()
                preds = {"teacher": torch.sigmoid(logits) > 0.5}
                if self.guidance is not None:
                    masks = self.guidance.text_masks(x, list(batch["text"])).float()
                    preds["text"] = masks[:, :1] > 0.5
                    preds["fused"] = self.guidance.fuse(logits, masks, multiclass=False) > 0.5
                present = y.flatten(1).any(1)
                for name, p in preds.items():
                    dice, _ = segmentation_scores(p.float(), y.float(), ignore_empty=True)  # NaN: no lesion
                    sums.setdefault(f"pseudo_{name}_dice", []).extend(dice[present, 0].tolist())
                    sums.setdefault(f"pseudo_{name}_fg", []).extend(p.flatten(1).float().mean(1).tolist())
                sums.setdefault("pseudo_label_fg", []).extend(y.flatten(1).float().mean(1).tolist())
        finally:
            if self.guidance is not None:
                self.guidance.train(was_training)
        return {k: sum(v) / len(v) if v else float("nan") for k, v in sums.items()}

    def __call__(self, engine: Engine) -> None:
        if callable(getattr(engine, "prepare_teacher", None)):
            engine.prepare_teacher()
        scores = self.scores(engine.state.device)
        engine.state.metrics.update(scores)
        logger.info("epoch %d pseudo labels vs the hidden labels of the unlabelled images: %s", engine.state.epoch,
                    ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if self.output_csv and is_main_process():
            import csv

            new = not os.path.exists(self.output_csv)
            os.makedirs(os.path.dirname(os.path.abspath(self.output_csv)), exist_ok=True)
            with open(self.output_csv, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["epoch", *scores])
                if new:
                    writer.writeheader()
                writer.writerow({"epoch": engine.state.epoch, **scores})


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _names(image) -> Optional[list[str]]:
    meta = getattr(image, "meta", None) or {}
    names = meta.get("filename_or_obj")
    return [names] if isinstance(names, str) else (list(names) if names is not None else None)
