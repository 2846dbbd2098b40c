"""Model selection: :class:`SelectBestModel` validates the student and the teacher and keeps the better one as
``model.pt``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events

from amvlm_monai.handlers.metrics import _finite
from amvlm_monai.io.checkpoint import atomic_save
from amvlm_monai.utils.distributed import is_main_process, unwrap

logger = logging.getLogger(__name__)


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
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
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
            if is_main_process():
                path = os.path.join(self.save_dir, self.filename)
                atomic_save(unwrap(self.networks[name]).state_dict(), path)
                with open(os.path.splitext(path)[0] + ".json", "w") as f:
                    json.dump(self.best, f, indent=1)
            logger.info("epoch %d: kept the %s (%s %.4f) as %s", epoch, name, self.key_metric, value, self.filename)
        engine.state.metrics["best_" + self.key_metric] = self.best["value"]

    def state_dict(self) -> dict:
        """The best validation so far (part of the resumable training state)."""
        return {"best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = state["best"]


def as_handler(handler: Any) -> Any:
    """``handler`` itself. A bundle's handler list names a handler defined elsewhere in the config (one object that
    other items refer to, e.g. the model selection kept in the resumable state) as ``{"_target_":
    "amvlm_monai.handlers.selection.as_handler", "handler": "@best_model"}``: MONAI's ``check_properties`` reads the
    ``_target_`` of every entry of ``train#handlers``, so a bare ``"@best_model"`` entry breaks it."""
    return handler
