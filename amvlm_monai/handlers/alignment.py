"""The stage-1 validation handler: :func:`~amvlm_monai.evaluation.alignment.evaluate_alignment` every few epochs,
after the BatchNorm refresh, keeping the best checkpoint and its figures."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from typing import Any, Optional

import torch

from amvlm_monai.evaluation.alignment import FACT_KEYS, evaluate_alignment, refresh_bn_statistics
from amvlm_monai.utils.distributed import is_main_process

logger = logging.getLogger(__name__)


class AlignmentValidation:
    """Pretraining validation: :func:`evaluate_alignment` every ``interval`` epochs on a labelled split.

    Every metric goes to the trainer's ``state.metrics`` as ``val_<name>`` and to the log (recalls, exact-pair and
    fact-level, beside their chance levels). When ``save_path`` is given, the checkpoint with the best ``key_metric`` is kept there (the format
    of :class:`~amvlm_monai.handlers.checkpoint.SavePretrained`), with ``<stem>.json`` giving its epoch and metrics.

    Args:
        loader: batches with ``image``, ``label``, ``text`` (the validation split, no augmentation).
        network: the AMVLM being pretrained.
        save_path: where to keep the best checkpoint; None only logs.
        key_metric: a key of :func:`evaluate_alignment` to maximise.
        interval: epochs between validations.
        bn_loader: training batches (``image``, ``text``) on which :func:`refresh_bn_statistics` re-estimates the
            BatchNorm statistics before each validation (so also before each save); None leaves them as training
            left them.
        bn_images: images to refresh them on.
    """

    def __init__(self, loader: Iterable[dict], network: torch.nn.Module, save_path: Optional[str] = None,
                 key_metric: str = "alignment", interval: int = 1, bn_loader: Optional[Iterable[dict]] = None,
                 bn_images: int = 256) -> None:
        self.loader = loader
        self.bn_loader = bn_loader
        self.bn_images = int(bn_images)
        self.network = network
        self.save_path = os.fspath(save_path) if save_path else None
        self.key_metric = key_metric
        self.interval = max(1, int(interval))
        self.best: Optional[dict] = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Any) -> None:
        from amvlm_monai.handlers.checkpoint import save_pretrained

        if self.bn_loader is not None:
            refresh_bn_statistics(self.network, self.bn_loader, engine.state.device, self.bn_images)
        metrics = evaluate_alignment(self.network, self.loader, engine.state.device)
        if self.key_metric not in metrics:
            raise KeyError(f"AlignmentValidation: no metric '{self.key_metric}' (have {sorted(metrics)}).")
        engine.state.metrics.update({f"val_{k}": v for k, v in metrics.items()})
        epoch = engine.state.epoch
        r = " ".join(f"{d}@{k[-1]} {metrics[f'{d}_r{k[-1]}']:.3f} (chance {metrics[f'{d}_r{k[-1]}_chance']:.3f})"
                     for d in ("i2t", "t2i") for k in ("r1", "r5") if f"{d}_{k}" in metrics)
        facts = ", ".join(f"{what} " + " ".join(f"{d}@1 {metrics[f'{d}_{name}_r1']:.3f} (chance "
                                                 f"{metrics[f'{d}_{name}_r1_chance']:.3f})" for d in ("i2t", "t2i"))
                          for name, what in zip(FACT_KEYS, ("count+sides", "count+sides+zones"))
                          if math.isfinite(metrics.get(f"i2t_{name}_r1", float("nan"))))
        logger.info("epoch %d stage-1 validation (%d images, %d distinct reports): %s; same facts %s; localisation "
                    "AUC %.3f, initial text-mask Dice %.3f (all-ones mask %.3f); alignment %.3f", epoch, metrics["n_images"],
                    metrics["n_reports"], r, facts or "n/a (labels not binary)", metrics["loc_auc"],
                    metrics["initial_mask_dice"], metrics["ones_dice"], metrics["alignment"])
        value = metrics[self.key_metric]
        if self.best is None or (math.isfinite(value) and value > self.best["value"]):
            self.best = {"epoch": epoch, "metric": self.key_metric, "value": value, "metrics": metrics}
            if self.save_path and is_main_process():
                save_pretrained(self.save_path, self.network, epoch=epoch)
                with open(os.path.splitext(self.save_path)[0] + ".json", "w") as f:
                    json.dump(self.best, f, indent=1)
                logger.info("epoch %d: kept as %s (%s %.4f)", epoch, self.save_path, self.key_metric, value)
        engine.state.metrics["val_best_" + self.key_metric] = self.best["value"]

    def state_dict(self) -> dict:
        """The best validation so far (part of the resumable pretraining state)."""
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
