"""Handlers that write and read model files: stage-1 checkpoints (:class:`SavePretrained`), ``model_info.json``
beside ``model.pt`` (:class:`SaveModelInfo`) and loading ``model.pt`` for evaluation and inference
(:class:`LoadModel`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events

from amvlm_monai.io.checkpoint import atomic_save, clean_stale_tmp, plain_config
from amvlm_monai.io.model_info import INFO_NAME, info_path, load_state, make_model_info, write_model_info
from amvlm_monai.networks.segmentation import build_network, state_shapes
from amvlm_monai.utils.distributed import is_main_process, unwrap
from amvlm_monai.utils.errors import DataError

logger = logging.getLogger(__name__)


class SaveModelInfo:
    """Write ``<save_dir>/model_info.json`` after the first training step, before any ``model.pt`` of the run.

    When training starts, the folder is checked for writing (a read-only output folder stops the run before its
    first step) and the record's ``network`` arguments are checked against the network being trained (same parameter
    names and shapes; when they differ, ``network_def`` was changed on the command line beyond the listed keys, the
    run stops with a message, since the file would describe another network). The file itself is written after the
    first iteration, so a run that is refused at its start (e.g. not to replace an earlier run's outputs) leaves the
    earlier run's file as it was.

    Args:
        save_dir: the folder ``model.pt`` is saved in (``ckpt_dir``).
        network: the trained network (student or teacher: the same architecture).
        network_args: the `build_segmentation_net` arguments of ``network_def``.
        image_size, multiclass, class_names, threshold, slice_axis, axcodes, modality: see `make_model_info`.
    """

    def __init__(self, save_dir: str | os.PathLike, network: torch.nn.Module, network_args: Mapping[str, Any],
                 image_size: int | Sequence[int], multiclass: bool = False,
                 class_names: Optional[Sequence[str]] = None, threshold: float = 0.5, slice_axis: int = 2,
                 axcodes: Optional[str] = "RAS", modality: str = "auto") -> None:
        self.path = Path(save_dir) / INFO_NAME
        self.network = network
        self.info = make_model_info(network_args, image_size, multiclass, class_names, threshold, slice_axis,
                                    axcodes, modality, intensity="slice_minmax")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.STARTED, self.check)
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def check(self, engine=None) -> None:
        """The folder can be written and the record describes the network being trained."""
        from amvlm_monai.utils.errors import check_writable

        check_writable(self.path.parent, "model folder (ckpt_dir)")
        net = getattr(self.network, "module", self.network)
        if state_shapes(build_network(self.info)) != state_shapes(net):
            raise DataError(f"{self.path}: network_args {self.info['network']} do not describe the network being "
                             "trained (network_def was changed beyond in_channels/out_channels/unet_size?); keep "
                             "the model info true by changing those keys instead.")

    def __call__(self, engine=None) -> Path:
        write_model_info(self.path, self.info)
        logger.info("model info: %s", self.path)
        return self.path


class LoadModel:
    """Load ``load_path`` into ``network`` when the engine starts, with one error naming the file when it cannot
    be read (`load_state`) or does not fit the network (the settings it was trained with differ).

    Args:
        load_path: the model file (``model.pt``: a state dict, or one under ``model``).
        network: the network to fill.
    """

    def __init__(self, load_path: str | os.PathLike, network: torch.nn.Module) -> None:
        self.load_path = Path(load_path)
        self.network = network

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        state = load_state(self.load_path)
        net = getattr(self.network, "module", self.network)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            first = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
            raise DataError(f"{self.load_path}: does not fit the network built from the settings given ({first}); "
                            f"check {info_path(self.load_path)} or the --image_size/--unet_size/--in_channels/"
                            "--out_channels flags.") from None






class SavePretrained:
    """Save a stage-1 checkpoint (``model``, ``config``, ``epoch`` and, when given, ``optimizer``) every ``interval``
    epochs and at the end, atomically (:func:`~amvlm_monai.io.checkpoint.atomic_save`); ``load_amvlm`` reads it back.
    Resuming a killed pretraining uses :class:`~amvlm_monai.engines.state.TrainingState`, not this file.

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
        if engine.has_event_handler(self, Events.COMPLETED):
            return
        engine.add_event_handler(Events.STARTED, lambda _: clean_stale_tmp(os.path.dirname(os.path.abspath(self.path))))
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():  # under torchrun rank 0 alone writes
            return
        save_pretrained(self.path, self.network, self.optimizer, engine.state.epoch)


def save_pretrained(path: str, network: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    epoch: Optional[int] = None) -> None:
    """Write a stage-1 checkpoint (``model``, ``config``, ``epoch`` and, if given, ``optimizer``) atomically."""
    net = unwrap(network)
    ckpt = {"model": net.state_dict(), "config": plain_config(net.config, path), "epoch": epoch}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    atomic_save(ckpt, path)
