"""Ignite pieces the bundles use: stage-1 checkpoints, per-image segmentation scores, model selection, TensorBoard
logging with validation panels, evaluation panels, and the check behind ``--tracking mlflow``."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from amvlm_monai.checkpoint import atomic_save, clean_stale_tmp, plain_config
from amvlm_monai.distributed import gather_objects, gather_rows, is_distributed, is_main_process
from amvlm_monai.metrics import binarize, segmentation_scores, write_scores_csv

__all__ = ["SavePretrained", "save_pretrained", "SegmentationMetric", "SelectBestModel", "PseudoLabelQuality",
           "PanelSampler", "render_panels", "SavePanels", "TensorBoardHandler", "mlflow_is_not_rank0", "TrackingOutputs",
           "as_handler"]

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
        if not _is_writer():  # under torchrun rank 0 alone writes
            return
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
    With ``output_csv`` the per-image Dice and IoU and the file names are written when the metric is computed. Under
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
    columns, while the paired t-test (:func:`~amvlm_monai.metrics.paired_ttest`) reads Dice and IoU with the class
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
        self._ids += [os.path.basename(str(n)) for n in names]
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


def as_handler(handler: Any) -> Any:
    """``handler`` itself. A bundle's handler list names a handler defined elsewhere in the config (one object that
    other items refer to, e.g. the model selection kept in the resumable state) as ``{"_target_":
    "amvlm_monai.handlers.as_handler", "handler": "@best_model"}``: MONAI's ``check_properties`` reads the
    ``_target_`` of every entry of ``train#handlers``, so a bare ``"@best_model"`` entry breaks it."""
    return handler


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _names(image) -> Optional[list[str]]:
    meta = getattr(image, "meta", None) or {}
    names = meta.get("filename_or_obj")
    return [names] if isinstance(names, str) else (list(names) if names is not None else None)


# ---- panels ----------------------------------------------------------------------------------------------------
def _split_output(engine: Engine) -> list[dict]:
    """The evaluator's last batch as one dict per image: image, label, pred (logits), text, id, case, path."""
    out, batch = engine.state.output, engine.state.batch
    if isinstance(out, list):  # decollated outputs
        rows = [dict(o) for o in out]
    elif isinstance(out, dict) and "pred" in out:
        n = out["pred"].shape[0]
        rows = [{k: out[k][i] for k in ("image", "label", "pred") if out.get(k) is not None} for i in range(n)]
    else:
        return []
    n = len(rows)
    extra = batch if isinstance(batch, dict) else {}
    names = _names(rows[0].get("image")) if isinstance(out, list) else _names(out.get("image"))
    for i, row in enumerate(rows):
        for key in ("text", "id", "case"):
            values = extra.get(key)
            if isinstance(values, (list, tuple)) and len(values) == n:
                row[key] = values[i]
        if isinstance(out, list):
            path = _names(row.get("image"))
            row["path"] = path[0] if path else None
        else:
            row["path"] = names[i] if names and len(names) == n else None
        row.setdefault("id", os.path.basename(str(row["path"])) if row["path"] else None)
    return rows


class PanelSampler:
    """A reproducible sample of an evaluator's images for panels, drawn while it runs (nothing is read twice).

    Plain 2D images: ``num_images`` images drawn uniformly (reservoir sampling, seeded). Slices of volumes (items with
    a ``case`` key): up to ``per_case`` slices with a labelled voxel from each of the first ``num_images`` cases.

    Args:
        num_images: images (or cases, for volumes) to keep.
        per_case: labelled slices kept per case.
        seed: the sample's seed (the same images every validation).
    """

    def __init__(self, num_images: int = 8, per_case: int = 3, seed: int = 0) -> None:
        if num_images < 1 or per_case < 1:
            raise ValueError(f"num_images and per_case must be >= 1, got {num_images} and {per_case}.")
        self.num_images, self.per_case, self.seed = int(num_images), int(per_case), seed
        self.reset()

    def reset(self, *_: Any) -> None:
        self._rng = random.Random(self.seed)
        self._seen: dict[str, int] = {}
        self._kept: dict[str, list[dict]] = {}
        self._count = 0

    def update(self, engine: Engine) -> None:
        for row in _split_output(engine):
            row["index"] = self._count
            self._count += 1
            case = row.get("case")
            if case is None:
                group, cap = "", self.num_images
            else:
                label = row.get("label")
                if label is None or not bool((label > 0).any()):
                    continue
                group, cap = str(case), self.per_case
                if group not in self._kept and len(self._kept) >= self.num_images:
                    continue
            keep = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
            seen = self._seen[group] = self._seen.get(group, 0) + 1
            kept = self._kept.setdefault(group, [])
            if len(kept) < cap:
                kept.append(keep)
            else:
                j = self._rng.randrange(seen)
                if j < cap:
                    kept[j] = keep

    def items(self) -> list[dict]:
        """The kept images in the evaluator's order."""
        return sorted((r for rows in self._kept.values() for r in rows), key=lambda r: r["index"])


@torch.no_grad()
def text_masks(guidance: torch.nn.Module, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Soft text masks (B, K, H, W) of a :class:`~amvlm_monai.networks.guidance.TextGuidance` for images (B, C, H, W)
    and their reports (K = 1) or the guidance's class prompts (K = C - 1)."""
    gen = guidance.generator
    device = gen.w.device
    images = images.to(device).float()
    masks = gen.masks(gen.dense(images), guidance.prompts(texts, device))
    return gen.upsample(masks, images.shape[-2:]).cpu()


def render_panels(items: list[dict], multiclass: bool = False, guidance: Optional[torch.nn.Module] = None
                  ) -> list[tuple[dict, Any]]:
    """Panels (:func:`~amvlm_monai.visualize.segmentation_panel`) of sampled items, each with its Dice in the title.

    Returns:
        ``[(info, rgb array)]`` with info ``id``, ``image`` (its file), ``report``, ``dice`` and ``foreground`` (the
        labelled fraction of the image).
    """
    from amvlm_monai.metrics import segmentation_scores
    from amvlm_monai.visualize import segmentation_panel

    if not items:
        return []
    masks = None
    texts = [r.get("text") for r in items]
    if guidance is not None and all(isinstance(t, str) and t for t in texts):
        masks = text_masks(guidance, torch.stack([r["image"] for r in items]), texts)
    out = []
    for k, r in enumerate(items):
        logits, label = r["pred"].float()[None], r.get("label")
        pred = binarize(logits, multiclass=multiclass)
        info = {"id": str(r.get("id")), "image": r.get("path"), "report": r.get("text"), "dice": None,
                "foreground": None}
        title = info["id"]
        if label is not None:
            target = label[None].float() if multiclass else (label[None] > 0.5).float()
            dice, _ = segmentation_scores(pred, target, include_background=not multiclass)
            info["dice"] = float(dice.mean())
            info["foreground"] = float((label > 0).float().mean())
            title = f"{title}  Dice {info['dice']:.2f}"
        shown = pred[0].argmax(0) if multiclass else pred[0, 0]
        picture = segmentation_panel(r["image"], label, shown, masks[k] if masks is not None else None,
                                     report=r.get("text"), title=title, multiclass=multiclass)
        out.append((info, picture))
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"


class SavePanels:
    """Evaluation panels as PNG files: image, ground truth, prediction, text mask and report for a sample of images
    (:class:`PanelSampler`), plus ``index.json`` (id, source image, report, Dice, labelled fraction per panel).

    The text mask needs a stage-1 model: ``guidance`` (a live
    :class:`~amvlm_monai.networks.guidance.TextGuidance`), or ``checkpoint`` (a stage-1 checkpoint; its mask generator
    then has the initial, untrained decoder, i.e. the stage-1 patch-report similarity through
    ``sigmoid(w (sim - b))``). Without either, or when the file is missing, panels have no text mask.

    Args:
        output_dir: folder of the PNG files.
        num_images, per_case, seed: see :class:`PanelSampler`.
        multiclass: class-index labels and arg-max predictions.
        checkpoint: stage-1 checkpoint for the text masks (optional).
        class_prompts: multi-class data: one prompt per foreground class (as the training config's).
        text_model: override the text model folder recorded in the checkpoint.
        guidance: a TextGuidance to use instead of ``checkpoint``.
    """

    def __init__(self, output_dir: str, num_images: int = 8, per_case: int = 3, multiclass: bool = False,
                 checkpoint: Optional[str] = None, class_prompts: Optional[list[str]] = None,
                 text_model: Optional[str] = None, guidance: Optional[torch.nn.Module] = None, seed: int = 0) -> None:
        self.output_dir = os.fspath(output_dir)
        self.sampler = PanelSampler(num_images, per_case, seed)
        self.multiclass = multiclass
        self.checkpoint = checkpoint
        self.class_prompts = class_prompts
        self.text_model = text_model
        self.guidance = guidance

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.sampler.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.sampler.update)
        engine.add_event_handler(Events.COMPLETED, self)

    def _guidance(self, device) -> Optional[torch.nn.Module]:
        if self.guidance is not None or not self.checkpoint:
            return self.guidance
        if not os.path.isfile(self.checkpoint):
            logger.info(f"no stage-1 checkpoint at {self.checkpoint}: panels without text masks.")
            return None
        from amvlm_monai.networks.guidance import build_text_guidance

        return build_text_guidance(self.checkpoint, use_tg=False, class_prompts=self.class_prompts,
                                   text_model=self.text_model, device=device).eval()

    def __call__(self, engine: Engine) -> None:
        from amvlm_monai.visualize import save_png

        panels = render_panels(self.sampler.items(), self.multiclass, self._guidance(engine.state.device))
        index = []
        for info, picture in panels:
            name = f"{_safe(info['id'])}.png"
            save_png(picture, os.path.join(self.output_dir, name))
            index.append(dict(info, file=name))
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "index.json"), "w") as f:
            json.dump(index, f, indent=1)
        logger.info(f"{len(index)} panels written to {self.output_dir}")


# ---- TensorBoard -----------------------------------------------------------------------------------------------
def _scalars(output: Any) -> dict:
    if isinstance(output, dict):
        return {k: float(v) for k, v in output.items()
                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
    if isinstance(output, (int, float)) or (isinstance(output, torch.Tensor) and output.numel() == 1):
        return {"loss": float(output)}
    return {}


class TensorBoardHandler:
    """TensorBoard for a trainer (ignite's ``TensorboardLogger``): every scalar of the trainer's output (the loss and
    each term) per iteration, the learning rate of every parameter group, every validation metric after each epoch,
    and panels of a few validation images (:func:`render_panels`; text masks from ``guidance`` when given).

    Validation metrics are whatever the run computes: the trainer's ``state.metrics`` at the end of each epoch (where
    :class:`SelectBestModel` puts ``student_val_mean_dice``, ``teacher_...`` and the stage-1 alignment validation puts
    its recalls and AUC), and, when the trainer validates through MONAI's ``ValidationHandler``, its validator's
    metrics after each run.

    Args:
        log_dir: the event-file folder (``tensorboard --logdir`` on it or on a parent).
        optimizer: its learning rates are logged (``lr/group_<i>``), or None.
        evaluator: the validation engine whose images make the panels (default: the validator of the trainer's
            ``ValidationHandler``, if any).
        guidance: a TextGuidance for the panels' text masks, or None.
        num_panels: validation images shown as panels (0: none).
        multiclass: class-index labels and arg-max predictions in the panels.
        every_n_iterations: log the training scalars every n iterations.
        output_transform: trainer output -> dict of scalars (default: every scalar entry of the output dict).
    """

    def __init__(self, log_dir: str, optimizer: Optional[torch.optim.Optimizer] = None,
                 evaluator: Optional[Engine] = None, guidance: Optional[torch.nn.Module] = None,
                 num_panels: int = 4, multiclass: bool = False, every_n_iterations: int = 1,
                 output_transform: Optional[Callable] = None) -> None:
        self.log_dir = os.fspath(log_dir)
        self.optimizer = optimizer
        self.evaluator = evaluator
        self.guidance = guidance
        self.sampler = PanelSampler(num_panels) if num_panels > 0 else None
        self.multiclass = multiclass
        self.every = max(1, int(every_n_iterations))
        self.output_transform = output_transform or _scalars
        self.logger = None
        self._hooked = False

    def attach(self, trainer: Engine) -> None:
        from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, OutputHandler, TensorboardLogger

        os.makedirs(self.log_dir, exist_ok=True)
        self.logger = tb = TensorboardLogger(log_dir=self.log_dir)
        tb.attach(trainer, OutputHandler(tag="train", output_transform=self.output_transform),
                  event_name=Events.ITERATION_COMPLETED(every=self.every))
        if self.optimizer is not None:
            tb.attach(trainer, OptimizerParamsHandler(self.optimizer, param_name="lr"),
                      event_name=Events.ITERATION_STARTED(every=self.every))
        trainer.add_event_handler(Events.STARTED, self._hook_validation)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_metrics)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: tb.writer.flush())
        trainer.add_event_handler(Events.COMPLETED, lambda e: tb.close())

    def _epoch_metrics(self, trainer: Engine) -> None:
        for name, value in _scalars(dict(trainer.state.metrics)).items():
            self.logger.writer.add_scalar(f"validation/{name}", value, trainer.state.epoch)

    def _hook_validation(self, trainer: Engine) -> None:
        """At the run's start, once the trainer has all its handlers: find a ValidationHandler's validator."""
        if self._hooked:
            return
        self._hooked = True
        from ignite.handlers.tensorboard_logger import OutputHandler, global_step_from_engine

        validators = [h.validator for h in _handlers_of(trainer) if type(h).__name__ == "ValidationHandler"]
        validators = [v for v in validators if v is not None]
        if validators:  # its metrics stay on the validator: log them after each of its runs
            step = global_step_from_engine(trainer)
            self.logger.attach(validators[0], OutputHandler(tag="validation", metric_names="all",
                                                            global_step_transform=step), event_name=Events.COMPLETED)
        evaluator = self.evaluator if self.evaluator is not None else (validators[0] if validators else None)
        if evaluator is not None and self.sampler is not None:
            evaluator.add_event_handler(Events.STARTED, self.sampler.reset)
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, self.sampler.update)
            evaluator.add_event_handler(Events.COMPLETED, lambda e: self._panels(trainer, e))

    def _panels(self, trainer: Engine, evaluator: Engine) -> None:
        prefix = "validation_panels/"
        network = getattr(evaluator, "network", None)
        for owner in _handlers_of(trainer):  # the run validates several networks (student, teacher): name them
            for name, net in (getattr(owner, "networks", None) or {}).items():
                if net is network:
                    prefix = f"validation_panels/{name}/"
        for info, picture in render_panels(self.sampler.items(), self.multiclass, self.guidance):
            self.logger.writer.add_image(prefix + _safe(info["id"]), picture, global_step=trainer.state.epoch,
                                         dataformats="HWC")
        self.logger.writer.flush()


# ---- experiment tracking -----------------------------------------------------------------------------------------
MLFLOW_MISSING = ("--tracking mlflow needs the mlflow package, which is not installed here: "
                  "pip install 'amvlm-monai[mlflow]' (or: pip install mlflow).")


def mlflow_is_not_rank0() -> bool:
    """The ``is_not_rank0`` value of MONAI's mlflow tracking settings (``--tracking mlflow`` disables its handlers
    on ranks > 0 with it); the bundles define it so that a missing ``mlflow`` stops the run with a clear message
    before anything is trained, instead of failing inside the handler's construction."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        logger.error(MLFLOW_MISSING)
        raise ImportError(MLFLOW_MISSING)
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized() and dist.get_rank() > 0)


def _handlers_of(engine: Engine) -> list:
    """The objects whose methods are attached to ``engine`` (handler instances such as ``ValidationHandler`` or
    ``MLFlowHandler``). ignite has no public way to list an engine's handlers, hence ``engine._event_handlers``."""
    owners, seen = [], set()
    for entries in getattr(engine, "_event_handlers", {}).values():
        for entry in entries:
            func = entry[0]
            if hasattr(func, "_parent"):  # a handler wrapped by an event filter (e.g. every=n)
                func = func._parent()
            owner = getattr(func, "__self__", func)
            if id(owner) not in seen:
                seen.add(id(owner))
                owners.append(owner)
    return owners


class TrackingOutputs:
    """Let experiment-tracking handlers read this package's trainer outputs.

    ``--tracking mlflow`` adds MONAI's ``MLFlowHandler`` with ``output_transform=from_engine(["loss"], first=True)``,
    written for decollated outputs (a list of dicts). The trainers here output one dict of scalars (``loss`` and every
    term), for which that transform gives a tuple that mlflow rejects. When the trainer starts, this handler finds the
    tracking handlers attached to it and, where their transform does not give a number or a dict for such an output,
    gives them every scalar of the output instead (so each loss term is tracked).
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        sample = {"loss": 1.0}
        for owner in _handlers_of(engine):
            transform = getattr(owner, "output_transform", None)
            if type(owner).__name__ != "MLFlowHandler" or transform is None or transform is _scalars:
                continue
            try:
                good = isinstance(transform(sample), (int, float, dict, torch.Tensor))
            except Exception:
                good = False
            if not good:
                owner.output_transform = _scalars
