"""Resumable training state: networks, EMA teacher, optimiser, scheduler, scaler, engine counters, the best score
and random states in ``<prefix>_epoch=N.pt`` files (:class:`TrainingState`, ``--resume`` / ``--overwrite``),
rotated by ignite's ``Checkpoint`` and written atomically."""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from torch import nn

from amvlm_monai.io.checkpoint import CheckpointError, atomic_save, clean_stale_tmp, load_checkpoint
from amvlm_monai.utils.args import as_bool
from amvlm_monai.utils.distributed import is_main_process, unwrap

logger = logging.getLogger(__name__)






# ---- best model -----------------------------------------------------------------------------------------------------
class TrainableState:
    """State of a module without its frozen parameters (and the buffers of modules that have only frozen ones);
    extra states (``get_extra_state``) are kept.

    The text guidance of stage 2 holds the frozen stage-1 towers, rebuilt from the stage-1 checkpoint at start; only
    the decoder and the mask scale train. A fingerprint of the frozen tensors (their sums in float64) is kept, so
    that resuming over other towers is an error rather than a silently different model.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = unwrap(module, parallel_only=True)

    def _split(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        trainable_owner = {name for name, m in self.module.named_modules()
                           if any(p.requires_grad for p in m.parameters(recurse=False))}
        params = dict(self.module.named_parameters())
        keep, frozen = {}, {}
        for name, value in self.module.state_dict().items():
            owner = name.rpartition(".")[0]
            if name in params:
                (keep if params[name].requires_grad else frozen)[name] = value
            elif name.rpartition(".")[2] == "_extra_state":  # a module's own state (e.g. the text guidance's cache)
                keep[name] = value
            else:  # a buffer: kept with its module's trainable parameters
                (keep if owner in trainable_owner else frozen)[name] = value
        return keep, frozen

    @staticmethod
    def _fingerprint(frozen: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not frozen:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack([t.detach().double().sum().cpu() for t in frozen.values()])

    def state_dict(self) -> dict:
        keep, frozen = self._split()
        return {"trainable": keep, "frozen_names": sorted(frozen), "frozen_fingerprint": self._fingerprint(frozen)}

    def load_state_dict(self, state: Mapping) -> None:
        keep, frozen = self._split()
        missing, unexpected = set(keep) - set(state["trainable"]), set(state["trainable"]) - set(keep)
        if missing or unexpected or sorted(frozen) != list(state["frozen_names"]):
            raise CheckpointError(f"the saved {type(self.module).__name__} does not match this one: missing "
                                  f"{sorted(missing)}, unexpected {sorted(unexpected)}.")
        if not torch.allclose(self._fingerprint(frozen), state["frozen_fingerprint"].double(), rtol=1e-6, atol=1e-6):
            raise CheckpointError(f"the frozen weights of {type(self.module).__name__} differ from those of the run "
                                  "being resumed (was another stage-1 checkpoint given?).")
        self.module.load_state_dict(state["trainable"], strict=False)


def _randomizables(root: Any) -> list[Any]:
    """The MONAI ``Randomizable`` transforms of a data loader's dataset, in a fixed order (each once)."""
    from monai.transforms import Randomizable, Transform
    from monai.transforms.compose import Compose

    found, seen = [], set()

    def walk(obj: Any) -> None:
        if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, torch.Tensor, np.ndarray)):
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)
        elif isinstance(obj, torch.utils.data.DataLoader):
            walk(obj.dataset)
        elif isinstance(obj, torch.utils.data.Dataset):  # its transform, not its (possibly huge) data
            for key in ("transform", "dataset", "datasets"):
                walk(getattr(obj, key, None))
        elif isinstance(obj, (Transform, Compose)):
            if isinstance(obj, Randomizable) and isinstance(getattr(obj, "R", None), np.random.RandomState):
                found.append(obj)
            for value in vars(obj).values():
                if isinstance(value, (list, tuple, dict, Transform, Compose)):
                    walk(value)

    walk(root)
    return found


def _np_state(state: tuple) -> dict:
    name, keys, pos, has_gauss, gauss = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _np_tuple(state: Mapping) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


class RandomState:
    """Every random state a training run draws from: Python, NumPy, torch (CPU and CUDA), and the private
    generators of MONAI's random transforms in the given data loaders (``set_determinism`` seeds them once, at the
    loaders' creation; they advance with every epoch)."""

    def __init__(self, loaders: Iterable[Any] = ()) -> None:
        self.transforms = _randomizables(list(loaders))

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": _np_state(np.random.get_state()),
                 "torch": torch.get_rng_state(), "transforms": [_np_state(t.R.get_state()) for t in self.transforms]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        if len(state["transforms"]) != len(self.transforms):
            raise CheckpointError(f"the saved state has {len(state['transforms'])} random transforms, this run "
                                  f"{len(self.transforms)}: the data pipeline changed.")
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(_np_tuple(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        for t, s in zip(self.transforms, state["transforms"]):
            t.R.set_state(_np_tuple(s))


class _EngineState:
    """The trainer's epoch, iteration and epoch length (ignite's ``Engine.state_dict``), restored keeping this run's
    ``max_epochs`` so that a resumed run can train longer."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        return dict(self.engine.state_dict())

    def load_state_dict(self, state: Mapping) -> None:
        max_epochs, length = self.engine.state.max_epochs, self.engine.state.epoch_length
        if length is not None and state["epoch_length"] != length:
            raise CheckpointError(f"the run being resumed had {state['epoch_length']} iterations per epoch, this one "
                                  f"{length}: batch size or data changed, so it cannot continue where it stopped.")
        self.engine.load_state_dict(state)
        if max_epochs is not None:
            if self.engine.state.epoch >= max_epochs:  # nothing left to train: ignite would end at once, exit 0
                raise CheckpointError(f"the run being resumed already trained {self.engine.state.epoch} epochs, so "
                                      f"--max_epochs {max_epochs} leaves nothing to train; give --max_epochs > "
                                      f"{self.engine.state.epoch} to train longer.")
            self.engine.state.max_epochs = max_epochs


class _AtomicSaver(BaseSaveHandler):
    """ignite's save handler for :class:`TrainingState`: :func:`~amvlm_monai.io.checkpoint.atomic_save` into a
    folder, on the main process only."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Optional[Mapping] = None) -> None:
        if is_main_process():
            atomic_save(checkpoint, self.folder / filename)

    def remove(self, filename: str) -> None:
        if is_main_process():
            (self.folder / filename).unlink(missing_ok=True)


class TrainingState:
    """Trainer handler: a resumable state every ``interval`` epochs, and ``resume`` from the latest one.

    The state file ``<save_dir>/<prefix>_epoch=<N>.pt`` (written by :func:`atomic_save`; the ``n_saved`` latest are
    kept) holds each object of ``to_save`` (its ``state_dict``), the trainer's epoch and iteration, its AMP grad
    scaler when it has one (``engine.step.scaler``), and the random states of Python, NumPy, torch and of the random
    transforms of the trainer's data loaders (``engine.data_loader`` and ``engine.unlabeled_loader``). A resumed run
    restarts at the epoch boundary after the last save; with ``set_determinism`` it then gives the same weights as an
    uninterrupted run (single process; with several ranks only rank 0's random state is saved).

    When the run starts:

    - ``resume`` true: the latest state in ``save_dir`` is loaded; when there is none, the run starts afresh
      (unless an earlier run's ``outputs`` exist: then there is nothing to resume from and it is an error).
    - ``resume`` false and an earlier run left ``outputs`` or states in ``save_dir``: an error unless ``overwrite``
      is true; then the old states are removed (the outputs are replaced as this run saves new ones).

    Args:
        save_dir: folder of the states (the run's checkpoint folder).
        to_save: name -> object with ``state_dict``/``load_state_dict`` (networks, optimiser, scheduler, a
            :class:`~amvlm_monai.handlers.selection.SelectBestModel`); None values are skipped (e.g. the teacher of the supervised variant).
        prefix: file name prefix, one per run that may share the folder (``train_state``; stage 1: the checkpoint's name
            and ``_state``, e.g. ``amvlm_mil_state``).
        interval: epochs between saves (the last epoch is always saved); 0 saves only at the end.
        n_saved: number of states kept.
        resume: continue from the latest state (bool, or "true"/"false" as given on the command line).
        overwrite: allow a fresh run to replace an earlier run's outputs.
        outputs: files of an earlier run that a fresh run would replace (``model.pt``, ``amvlm_pretrained.pt``).
        partial: names in ``to_save`` saved without their frozen parameters (:class:`TrainableState`).
    """

    def __init__(self, save_dir: str | os.PathLike, to_save: Mapping[str, Any], prefix: str = "train_state",
                 interval: int = 1, n_saved: int = 1, resume: Any = False, overwrite: Any = False,
                 outputs: Sequence[str | os.PathLike] = (), partial: Sequence[str] = ()) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ValueError(f"prefix must be letters, digits, '_' or '-', got '{prefix}'.")
        if int(interval) < 0 or int(n_saved) < 1:
            raise ValueError(f"interval must be >= 0 and n_saved >= 1, got {interval} and {n_saved}.")
        unknown = set(partial) - set(to_save)
        if unknown:
            raise ValueError(f"partial names {sorted(unknown)} are not in to_save {sorted(to_save)}.")
        self.save_dir = Path(save_dir)
        self.prefix = prefix
        self.interval = int(interval)
        self.n_saved = int(n_saved)
        self.resume = as_bool(resume, "resume")
        self.overwrite = as_bool(overwrite, "overwrite")
        self.outputs = [Path(p) for p in outputs]
        self.objects = {k: (TrainableState(v) if k in partial else v) for k, v in to_save.items() if v is not None}
        self.resumed_from: Optional[Path] = None
        self._saved_iteration: Optional[int] = None

    _RE = r"^{prefix}_epoch=(\d+)\.pt$"

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if engine.has_event_handler(self.start, Events.STARTED):
            return
        engine.add_event_handler(Events.STARTED, self.start)
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _epochs(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of this stage's states in ``save_dir``, oldest first."""
        if not self.save_dir.is_dir():
            return []
        pattern = re.compile(self._RE.format(prefix=re.escape(self.prefix)))
        return sorted((int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := pattern.match(p.name)))

    def states(self) -> list[Path]:
        """This stage's states in ``save_dir``, oldest first."""
        return [p for _, p in self._epochs()]

    def _complete(self, engine) -> None:
        """Add what the engine holds (known only once it is built, i.e. when it starts)."""
        scaler = getattr(getattr(engine, "step", None), "scaler", None)
        if scaler is not None:
            self.objects["scaler"] = scaler
        loaders = [getattr(engine, k, None) for k in ("data_loader", "unlabeled_loader")]
        self.objects["random"] = RandomState([x for x in loaders if x is not None])
        self.objects["trainer"] = _EngineState(engine)

    def start(self, engine) -> None:
        from ignite.handlers import Checkpoint

        self._complete(engine)
        clean_stale_tmp(self.save_dir)
        self.checkpoint = Checkpoint(self.objects, _AtomicSaver(self.save_dir), filename_prefix=self.prefix,
                                     n_saved=self.n_saved, global_step_transform=lambda e, _: e.state.epoch,
                                     filename_pattern="{filename_prefix}_epoch={global_step}.{ext}")
        states = self.states()
        earlier = [p for p in self.outputs if p.exists()] + states
        if self.resume and states:
            self.load(states[-1], engine)
            # the states already on disk take part in the rotation of those this run saves
            self.checkpoint.load_state_dict({"_saved": [(epoch, p.name) for epoch, p in self._epochs()]})
            return
        if earlier and not self.overwrite:
            hint = ("there is no state to resume from (" + self.prefix + "_epoch=N.pt)" if self.resume else
                    "add --resume true to continue that run")
            raise FileExistsError(
                f"an earlier run left {', '.join(map(str, earlier))}; {hint}, or add --overwrite true to start "
                "afresh and replace them.")
        if earlier:
            logger.warning(f"--overwrite: starting afresh; {', '.join(map(str, earlier))} from an earlier run "
                           "will be replaced.")
            if is_main_process():
                for p in states:
                    p.unlink(missing_ok=True)
        elif self.resume:
            logger.info(f"--resume: no {self.prefix}_epoch=N.pt in {self.save_dir}; starting afresh.")

    def load(self, path: Path, engine) -> None:
        state = load_checkpoint(path, map_location="cpu")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: not a training state (a {type(state).__name__}).")
        missing, unexpected = set(self.objects) - set(state), set(state) - set(self.objects)
        if missing or unexpected:
            raise CheckpointError(f"{path}: does not match this run's configuration: it lacks {sorted(missing)} "
                                  f"and has {sorted(unexpected)} in addition (another variant or AMP setting?).")
        from ignite.handlers import Checkpoint

        order = [k for k in self.objects if k not in ("trainer", "random")] + ["trainer", "random"]
        try:
            Checkpoint.load_objects({k: self.objects[k] for k in order}, {k: state[k] for k in order})
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: does not match this run's networks or optimiser: {e}") from None
        self.resumed_from = path
        self._saved_iteration = engine.state.iteration
        logger.info(f"resumed from {path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}.")

    def save(self, engine) -> None:
        if engine.state.iteration == self._saved_iteration:
            return
        self.checkpoint(engine)  # ignite's rotation of the n_saved latest states, written by _AtomicSaver
        self._saved_iteration = engine.state.iteration
        logger.info(f"saved the training state {self.save_dir / self.checkpoint.last_checkpoint}")
