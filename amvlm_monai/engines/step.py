"""What both trainers share: mixed precision, a non-finite check, scaled backward, clipping and the optimiser step,
and the refusal of a run that would train nothing (:func:`check_steps`).

Why this is not ``SupervisedTrainer(amp=True)``: MONAI's AMP step autocasts on CUDA only (``torch.autocast("cuda")``)
and always creates a float16 ``GradScaler``; it has no CPU bfloat16 path, no bfloat16-without-scaler path, no gradient
clipping between unscaling and the step, and both trainers here compute several losses per step. The trainers still
are ``SupervisedTrainer`` s (events, handlers, ``optim_set_to_none``); only the step itself is this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Optional

import torch

from amvlm_monai.utils.precision import amp_dtype, autocast


def trainable_parameters(modules: Iterable[torch.nn.Module | None]) -> list[torch.nn.Parameter]:
    """The parameters that need gradients over several modules (None entries skipped), each once."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in (module.parameters() if module is not None else ()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def check_finite(terms: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Raise FloatingPointError naming every non-finite term (and ``where``: e.g. the batch's files).

    Kept instead of ignite's ``TerminateOnNan``, which looks at the output after the optimiser step has already
    applied the non-finite gradients, names no term or file, and ends the run as if it had finished.
    """
    bad = {k: float(v.detach().float().mean()) for k, v in terms.items()
           if isinstance(v, torch.Tensor) and not torch.isfinite(v.detach()).all()}
    if bad:
        raise FloatingPointError(f"non-finite loss {bad}{' at ' + where if where else ''}; "
                                 "lower the learning rate, disable AMP, or check the inputs.")


def _size(obj: object) -> Optional[int]:
    try:
        return len(obj)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_steps(loader: Iterable, epoch_length: Optional[int], what: str = "training") -> None:
    """Refuse a run that would train nothing (MONAI and ignite skip it with a warning and end as if it had finished).

    Args:
        loader: the trainer's data loader (its size, ``dataset``, ``batch_size`` and ``drop_last`` are looked at when
            it has them).
        epoch_length: iterations per epoch (None: the loader's length).
        what: what the loader holds, for the message (e.g. "labelled training").

    Raises:
        ValueError: ``--batch_size: ...`` when every batch is dropped as incomplete, else naming the empty data or
            the zero epoch length.
    """
    batches = _size(loader)
    items = _size(getattr(loader, "dataset", None))
    if batches == 0:
        size, drop = getattr(loader, "batch_size", None), getattr(loader, "drop_last", False)
        if items:
            if drop and size and size > items:
                raise ValueError(f"--batch_size: {size} is more than the {items} {what} items and incomplete batches "
                                 f"are dropped (drop_last): no step would run; allowed: an integer from 1 to {items}")
            raise ValueError(f"{what} data: {items} items give no batch: no step would run")
        raise ValueError(f"{what} data: no items: nothing to train on (an empty split?)")
    if epoch_length is not None and epoch_length < 1:
        raise ValueError(f"--epoch_length: {epoch_length} iterations per epoch: no step would run; allowed: an "
                         "integer >= 1")


def scalars(terms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Detached Python floats of scalar tensors (what the engines put in ``engine.state.output``)."""
    return {k: float(v.detach()) for k, v in terms.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


class OptimStep:
    """Backward (through a grad scaler for float16); then optional gradient-norm clipping, the optimiser step, and the
    gradients released (``set_to_none``) right after it, so that they do not occupy memory during the next forward.

    Args:
        optimizer: the optimiser.
        params: the parameters to clip (all trainable ones of the step).
        device: where the step runs.
        amp: see :func:`amp_dtype`; the scaler is used for float16 only (bfloat16 has float32's range).
        grad_clip: max gradient norm; None or <= 0 disables clipping.

    Attributes:
        dtype: the autocast dtype (None: float32).
        scaler: the ``torch.amp.GradScaler`` of float16, else None.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                 device: torch.device, amp: bool | str = False, grad_clip: float | None = 1.0) -> None:
        self.optimizer = optimizer
        self.params = [p for p in params if p.requires_grad]
        self.grad_clip = grad_clip if grad_clip and grad_clip > 0 and math.isfinite(grad_clip) else None
        self.dtype = amp_dtype(device, amp)
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if self.dtype == torch.float16 else None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward's autocast context (a no-op in float32)."""
        return autocast(device, self.dtype)

    def clip(self) -> Optional[torch.Tensor]:
        """``clip_grad_norm_`` to ``grad_clip``; returns the total norm (None when not clipping).

        A non-finite norm raises before the optimiser steps, except under a float16 grad scaler, which skips such a
        step itself.
        """
        if self.grad_clip is None:
            return None
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return None
        try:
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip, error_if_nonfinite=self.scaler is None)
        except RuntimeError as e:
            if "non-finite" not in str(e):
                raise
            raise FloatingPointError("non-finite gradient norm; lower the learning rate or check the inputs.") from None

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled under float16 (the gradients are unscaled at :meth:`update`)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self) -> None:
        """Clip, step and release the gradients (after the engine's ``BACKWARD_COMPLETED`` handlers ran)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.clip()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, loss: torch.Tensor) -> None:
        """:meth:`backward` then :meth:`update`, for callers without events."""
        self.backward(loss)
        self.update()


def param_groups(model: torch.nn.Module, lr: float, text_lr: float, text_prefix: str = "text_encoder.") -> list[dict]:
    """Optimiser groups for pretraining: the pretrained text encoder at ``text_lr``, everything else at ``lr``.

    A BERT-family encoder fine-tuned at the rate that suits a ViT trained from scratch collapses (every report then
    embeds alike); the paper uses 3e-5 for both. Only trainable parameters are listed, each once.
    """
    text, rest = [], []
    for name, p in model.named_parameters():
        if name.startswith(text_prefix) and text_lr == 0:
            p.requires_grad_(False)  # a frozen text tower: no gradients, no optimiser state, no wasted backward
        if p.requires_grad:
            (text if name.startswith(text_prefix) else rest).append(p)
    groups = [{"params": rest, "lr": lr}]
    if text:
        groups.append({"params": text, "lr": text_lr})
    return groups
