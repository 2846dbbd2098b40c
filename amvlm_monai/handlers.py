"""Ignite pieces the bundles use: stage-1 checkpoints and per-image segmentation scores."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from amvlm_monai.checkpoint import atomic_save, clean_stale_tmp, plain_config
from amvlm_monai.metrics import binarize, segmentation_scores, write_scores_csv

__all__ = ["SavePretrained", "SegmentationMetric"]


class SavePretrained:
    """Save a stage-1 checkpoint (``model``, ``config``, ``epoch`` and, when given, ``optimizer``) every ``interval``
    epochs and at the end, atomically (:func:`~amvlm_monai.checkpoint.atomic_save`); ``load_amvlm`` reads it back.
    Resuming a killed pretraining uses :class:`~amvlm_monai.checkpoint.TrainingState`, not this file.

    Args:
        path: the checkpoint file (its folder is created).
        network: the AMVLM (its ``config`` attribute is saved so stage 2 rebuilds it without the stage-1 config).
        optimizer: saved with the model when given (the resumable state has it in any case).
        interval: epochs between saves.
    """

    def __init__(self, path: str, network: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 interval: int = 1) -> None:
        self.path = os.fspath(path)
        self.network = network
        self.optimizer = optimizer
        self.interval = max(1, int(interval))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: clean_stale_tmp(os.path.dirname(os.path.abspath(self.path))))
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        net = getattr(self.network, "module", self.network)
        ckpt = {"model": net.state_dict(), "config": plain_config(net.config, self.path), "epoch": engine.state.epoch}
        if self.optimizer is not None:
            ckpt["optimizer"] = self.optimizer.state_dict()
        atomic_save(ckpt, self.path)  # a kill mid-save never leaves a truncated checkpoint behind


class SegmentationMetric(Metric):
    """Per-image Dice and IoU (both computed; ``metric`` picks the one returned) as an ignite metric.

    Reads ``(pred, label)`` from the engine output: ``pred`` logits (B, C, H, W), ``label`` (B, 1, H, W) binary mask
    or class indices. Predictions are binarised (sigmoid > 0.5, or argmax for ``multiclass``); scores follow
    :func:`~amvlm_monai.metrics.segmentation_scores` (a class absent from both prediction and label scores 1).
    With ``output_csv`` the per-image scores and file names are written when the metric is computed.

    Args:
        metric: "dice" or "iou".
        multiclass: softmax/argmax predictions with index labels (background channel 0 excluded).
        output_csv: per-image CSV path, or None.
        class_names: CSV column names per scored class.
        output_transform: engine output -> (pred, label, names or None).
    """

    def __init__(self, metric: str = "dice", multiclass: bool = False, output_csv: Optional[str] = None,
                 class_names: Optional[list[str]] = None,
                 output_transform: Callable = lambda out: (out["pred"], out["label"], _names(out.get("image"))),
                 device: str | torch.device = "cpu") -> None:
        if metric not in ("dice", "iou"):
            raise ValueError(f"metric must be 'dice' or 'iou', got '{metric}'.")
        self.metric = metric
        self.multiclass = multiclass
        self.output_csv = output_csv
        self.class_names = class_names
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._ids: list[str] = []
        self._dice: list[torch.Tensor] = []
        self._iou: list[torch.Tensor] = []

    def update(self, output) -> None:
        pred, label, names = output
        pred = binarize(pred.detach().float(), multiclass=self.multiclass)
        if self.multiclass:
            target = torch.nn.functional.one_hot(label[:, 0].long(), pred.shape[1]).movedim(-1, 1).to(pred)
        else:
            target = (label > 0.5).to(pred)
        dice, iou = segmentation_scores(pred, target, include_background=not self.multiclass)
        start = len(self._ids)
        names = list(names) if names is not None else [f"case_{start + i}" for i in range(dice.shape[0])]
        self._ids += [os.path.basename(str(n)) for n in names]
        self._dice.append(dice.cpu())
        self._iou.append(iou.cpu())

    def compute(self) -> float:
        if not self._dice:
            raise RuntimeError("SegmentationMetric needs at least one batch before it can be computed.")
        dice, iou = torch.cat(self._dice), torch.cat(self._iou)
        if self.output_csv:
            os.makedirs(os.path.dirname(os.path.abspath(self.output_csv)), exist_ok=True)
            write_scores_csv(self.output_csv, self._ids, dice, iou, self.class_names)
        return float((dice if self.metric == "dice" else iou).mean())


def _names(image) -> Optional[list[str]]:
    meta = getattr(image, "meta", None) or {}
    names = meta.get("filename_or_obj")
    return [names] if isinstance(names, str) else (list(names) if names is not None else None)
