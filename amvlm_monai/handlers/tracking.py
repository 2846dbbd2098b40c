"""Experiment tracking: TensorBoard with every loss term, learning rates, validation metrics and panels
(:class:`TensorBoardHandler`), and the checks behind ``--tracking mlflow``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events

from amvlm_monai.handlers.panels import PanelSampler, _safe, render_panels
from amvlm_monai.utils.args import as_bool
from amvlm_monai.utils.distributed import is_main_process

logger = logging.getLogger(__name__)


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
        evaluator: the validation engine whose images make the panels, or None.
        networks: name -> network that ``evaluator`` validates (e.g. student and teacher): its panels are tagged with
            the name of the network it ran; None tags none.
        evaluator_metrics: also log ``evaluator``'s own metrics after each of its runs (for runs that validate with
            MONAI's ``ValidationHandler``, whose metrics stay on the evaluator; this package's model selection and
            stage-1 validation put theirs in the trainer's ``state.metrics``, which is always logged).
        overwrite, resume: the run's ``--overwrite`` and ``--resume``: a run that starts afresh over an earlier one
            (``overwrite`` without ``resume``) removes the earlier run's event files from ``log_dir``, so TensorBoard
            shows one run, not two interleaved; a resumed run appends to them.
        guidance: a TextGuidance for the panels' text masks, or None.
        num_panels: validation images shown as panels (0: none).
        multiclass: class-index labels and arg-max predictions in the panels.
        every_n_iterations: log the training scalars every n iterations.
        output_transform: trainer output -> dict of scalars (default: every scalar entry of the output dict).
    """

    def __init__(self, log_dir: str, optimizer: Optional[torch.optim.Optimizer] = None,
                 evaluator: Optional[Engine] = None, guidance: Optional[torch.nn.Module] = None,
                 num_panels: int = 4, multiclass: bool = False, every_n_iterations: int = 1,
                 output_transform: Optional[Callable] = None, networks: Optional[Mapping[str, torch.nn.Module]] = None,
                 evaluator_metrics: bool = False, overwrite: Any = False, resume: Any = False) -> None:
        self.log_dir = os.fspath(log_dir)
        self.optimizer = optimizer
        self.evaluator = evaluator
        self.guidance = guidance
        self.sampler = PanelSampler(num_panels) if num_panels > 0 else None
        self.multiclass = multiclass
        self.every = max(1, int(every_n_iterations))
        self.output_transform = output_transform or _scalars
        self.networks = dict(networks or {})
        self.evaluator_metrics = bool(evaluator_metrics)
        self.fresh = as_bool(overwrite, "overwrite") and not as_bool(resume, "resume")
        self.logger = None

    def attach(self, trainer: Engine) -> None:
        from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, OutputHandler, TensorboardLogger

        os.makedirs(self.log_dir, exist_ok=True)
        if self.fresh and is_main_process():
            for old in Path(self.log_dir).glob("events.out.tfevents.*"):
                old.unlink()
        self.logger = tb = TensorboardLogger(log_dir=self.log_dir)
        tb.attach(trainer, OutputHandler(tag="train", output_transform=self.output_transform),
                  event_name=Events.ITERATION_COMPLETED(every=self.every))
        if self.optimizer is not None:
            tb.attach(trainer, OptimizerParamsHandler(self.optimizer, param_name="lr"),
                      event_name=Events.ITERATION_STARTED(every=self.every))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_metrics)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: tb.writer.flush())
        trainer.add_event_handler(Events.COMPLETED, lambda e: tb.close())
        evaluator = self.evaluator
        if evaluator is None:
            return
        if self.evaluator_metrics:
            from ignite.handlers.tensorboard_logger import global_step_from_engine

            tb.attach(evaluator, OutputHandler(tag="validation", metric_names="all",
                                               global_step_transform=global_step_from_engine(trainer)),
                      event_name=Events.COMPLETED)
        if self.sampler is not None:
            evaluator.add_event_handler(Events.STARTED, self.sampler.reset)
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, self.sampler.update)
            evaluator.add_event_handler(Events.COMPLETED, lambda e: self._panels(trainer, e))

    def _epoch_metrics(self, trainer: Engine) -> None:
        for name, value in _scalars(dict(trainer.state.metrics)).items():
            self.logger.writer.add_scalar(f"validation/{name}", value, trainer.state.epoch)

    def _panels(self, trainer: Engine, evaluator: Engine) -> None:
        prefix = "validation_panels/"
        network = getattr(evaluator, "network", None)
        for name, net in self.networks.items():  # the run validates several networks (student, teacher): name them
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
    return not is_main_process()


def _handlers_of(engine: Engine) -> list:
    """The objects whose methods are attached to ``engine`` (handler instances such as ``ValidationHandler`` or
    ``MLFlowHandler``). ignite has no public way to list an engine's handlers, hence ``engine._event_handlers``: the
    one place that reads it, for :class:`TrackingOutputs`, which has no other way to reach handlers that MONAI's
    ``--tracking`` adds to the config."""
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
        from monai.handlers import MLFlowHandler

        sample = {"loss": 1.0}
        for owner in _handlers_of(engine):
            transform = getattr(owner, "output_transform", None)
            if not isinstance(owner, MLFlowHandler) or transform is None or transform is _scalars:
                continue
            try:
                good = isinstance(transform(sample), (int, float, dict, torch.Tensor))
            except Exception:
                good = False
            if not good:
                owner.output_transform = _scalars
