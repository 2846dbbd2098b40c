"""Ignite pieces the bundles use: stage-1 checkpoints, per-image segmentation scores and model selection."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from amvlm_monai.checkpoint import atomic_save, clean_stale_tmp, plain_config
from amvlm_monai.metrics import binarize, segmentation_scores, write_scores_csv

__all__ = ["SavePretrained", "save_pretrained", "SegmentationMetric", "SelectBestModel", "PseudoLabelQuality"]

logger = logging.getLogger(__name__)


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside an EMA teacher or a DistributedDataParallel wrapper."""
    while hasattr(net, "module") and isinstance(net.module, torch.nn.Module):
        net = net.module
    return net


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
        save_pretrained(self.path, self.network, self.optimizer, engine.state.epoch)


def save_pretrained(path: str, network: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    epoch: Optional[int] = None) -> None:
    """Write a stage-1 checkpoint (``model``, ``config``, ``epoch`` and, if given, ``optimizer``) atomically."""
    net = _unwrap(network)
    ckpt = {"model": net.state_dict(), "config": plain_config(net.config, path), "epoch": epoch}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    atomic_save(ckpt, path)


class SegmentationMetric(Metric):
    """Per-image segmentation scores as an ignite metric; ``metric`` picks the one returned.

    Reads ``(pred, label)`` from the engine output: ``pred`` logits (B, C, H, W), ``label`` (B, 1, H, W) binary mask
    or class indices. Predictions are binarised (sigmoid > 0.5, or argmax for ``multiclass``); scores follow
    :func:`~amvlm_monai.metrics.segmentation_scores` (a class absent from both prediction and label scores 1).
    With ``output_csv`` the per-image Dice and IoU and the file names are written when the metric is computed.

    Metrics:
        ``"dice"``, ``"iou"``: the paper's per-image means (absent from both scores 1).
        ``"dice_present"``: mean Dice over the (image, class) pairs whose label contains the class; a predictor that
            predicts nothing scores 0, so it is the model-selection metric (plain Dice rewards empty predictions on
            images without lesions). Falls back to ``"dice"`` when no label contains any class.
        ``"fg_fraction"`` / ``"label_fg_fraction"``: mean fraction of foreground pixels (any foreground class) in the
            predictions / labels, to spot a collapsing model.

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
        self._ids += [os.path.basename(str(n)) for n in names]
        for key, value in (("dice", dice), ("iou", iou), ("present", fg_label.flatten(2).sum(-1) > 0),
                           ("fg", fg_pred.amax(1).flatten(1).mean(1)), ("label_fg", fg_label.amax(1).flatten(1).mean(1))):
            self._scores[key].append(value.detach().cpu())

    def compute(self) -> float:
        if not self._ids:
            raise RuntimeError("SegmentationMetric needs at least one batch before it can be computed.")
        s = {k: torch.cat(v) for k, v in self._scores.items()}
        if self.output_csv:
            os.makedirs(os.path.dirname(os.path.abspath(self.output_csv)), exist_ok=True)
            write_scores_csv(self.output_csv, self._ids, s["dice"], s["iou"], self.class_names)
        if self.metric == "dice_present":
            return float(s["dice"][s["present"]].mean()) if s["present"].any() else float(s["dice"].mean())
        key = {"fg_fraction": "fg", "label_fg_fraction": "label_fg"}.get(self.metric, self.metric)
        return float(s[key].mean())


class SelectBestModel:
    """Validate every network given (the student and its teacher) and keep the best one seen as the model file.

    Every ``interval`` epochs: the trainer's ``prepare_teacher()`` runs when it has one (teacher BatchNorm statistics,
    see :class:`~amvlm_monai.engines.mean_teacher.MeanTeacherTrainer`); the validator runs once per network; all its
    metrics go to the trainer's ``state.metrics`` as ``<network>_<metric>`` and to the log. When the best
    network's ``key_metric`` beats every earlier validation, its plain state dict is written to ``save_dir/filename``
    (atomically) and ``save_dir/<stem>.json`` says which network it is, from which epoch, with every score.
    A warning is logged when a network's predicted foreground fraction falls below ``collapse_ratio`` times the
    labels' (a model collapsing to background).

    Args:
        validator: a ``SupervisedEvaluator`` whose metrics include ``key_metric`` (and ``fg_metric`` /
            ``label_fg_metric`` for the collapse warning).
        networks: name -> network; None entries are skipped (e.g. no teacher in a supervised run).
        save_dir: folder of the model file.
        key_metric: the validator metric to maximise; pick one where predicting nothing scores low
            (``SegmentationMetric(metric="dice_present")``).
        filename: the model file name.
        interval: epochs between validations.
        fg_metric, label_fg_metric: the validator metrics with the predicted and the labelled foreground fractions.
        collapse_ratio: warn when predicted foreground < ``collapse_ratio`` x labelled foreground.
    """

    def __init__(self, validator: Any, networks: Mapping[str, Optional[torch.nn.Module]], save_dir: str,
                 key_metric: str = "val_dice_present", filename: str = "model.pt", interval: int = 1,
                 fg_metric: str = "val_fg_fraction", label_fg_metric: str = "val_label_fg_fraction",
                 collapse_ratio: float = 0.1) -> None:
        self.validator = validator
        self.networks = {k: v for k, v in networks.items() if v is not None}
        if not self.networks:
            raise ValueError("SelectBestModel needs at least one network.")
        self.save_dir = os.fspath(save_dir)
        self.key_metric = key_metric
        self.filename = filename
        self.interval = max(1, int(interval))
        self.fg_metric, self.label_fg_metric = fg_metric, label_fg_metric
        self.collapse_ratio = collapse_ratio
        self.best: Optional[dict] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def validate(self, epoch: int) -> dict[str, dict[str, float]]:
        """Run the validator on each network; name -> its metrics."""
        scores = {}
        original = self.validator.network
        try:
            for name, net in self.networks.items():
                self.validator.network = net
                self.validator.run(epoch)
                scores[name] = {k: float(v) for k, v in self.validator.state.metrics.items()
                                if isinstance(v, (int, float))}
        finally:
            self.validator.network = original
        return scores

    def __call__(self, engine: Engine) -> None:
        if callable(getattr(engine, "prepare_teacher", None)):
            engine.prepare_teacher()
        epoch = engine.state.epoch
        scores = self.validate(epoch)
        for name, metrics in scores.items():
            if self.key_metric not in metrics:
                raise KeyError(f"SelectBestModel: the validator has no metric '{self.key_metric}' "
                               f"(it has {sorted(metrics)}).")
            engine.state.metrics.update({f"{name}_{k}": v for k, v in metrics.items()})
            logger.info("epoch %d validation, %s: %s", epoch, name,
                        ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
            fg, label_fg = metrics.get(self.fg_metric), metrics.get(self.label_fg_metric)
            if fg is not None and label_fg and fg < self.collapse_ratio * label_fg:
                logger.warning("epoch %d: the %s predicts %.3f %% foreground, under %.0f %% of the labels' %.3f %%: "
                               "it is collapsing to background.", epoch, name, 100 * fg, 100 * self.collapse_ratio,
                               100 * label_fg)
        name = max(scores, key=lambda n: _finite(scores[n][self.key_metric]))
        value = _finite(scores[name][self.key_metric])
        if self.best is None or value > self.best["value"]:
            self.best = {"network": name, "epoch": epoch, "metric": self.key_metric, "value": value,
                         "scores": scores}
            if _is_writer():
                path = os.path.join(self.save_dir, self.filename)
                atomic_save(_unwrap(self.networks[name]).state_dict(), path)
                with open(os.path.splitext(path)[0] + ".json", "w") as f:
                    json.dump(self.best, f, indent=1)
            logger.info("epoch %d: kept the %s (%s %.4f) as %s", epoch, name, self.key_metric, value, self.filename)
        engine.state.metrics["best_" + self.key_metric] = self.best["value"]

    def state_dict(self) -> dict:
        """The best validation so far (part of the resumable training state)."""
        return {"best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = state["best"]


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
        guidance: the :class:`~amvlm_monai.networks.guidance.TextGuidance`, or None (teacher only).
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
                    inter = (p & y).flatten(1).sum(1).float()
                    dice = 2 * inter / (p.flatten(1).sum(1) + y.flatten(1).sum(1)).clamp_min(1)
                    sums.setdefault(f"pseudo_{name}_dice", []).extend(dice[present].tolist())
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
        if self.output_csv and _is_writer():
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
