"""Exponential moving average (EMA) teacher for the Mean Teacher of stage 2.

The teacher is a frozen copy of the student, updated after each student step by
``theta_T <- alpha_t theta_T + (1 - alpha_t) theta_S`` with ``alpha_t = min(1 - 1 / (t + 1), max_alpha)``.

Its BatchNorm statistics (``TEACHER_BN`` modes, chosen by the trainer's ``teacher_bn``):

- ``"batch"`` (default): only the parameters are averaged; the teacher normalises with the statistics of the batch it
  labels (as in Tarvainen and Valpola's Mean-Teacher code) and its running statistics follow its own activations
  (:func:`own_batch_statistics`), so in eval mode it uses statistics that fit its own averaged weights;
- ``"recompute"``: only the parameters are averaged; the running statistics are re-estimated on unlabelled
  batches (:func:`recompute_bn_statistics`) before the teacher labels an epoch and before it is validated;
- ``"ema"``: the running statistics are averaged like the parameters and the teacher runs in eval mode. An average
  of the student's statistics does not fit the averaged weights, activations shrink layer by layer and the teacher
  drifts to predicting background (``docs/method.md``, "Measurements behind the defaults"); kept for comparison only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
import torch.nn as nn

from amvlm_monai.networks.batchnorm import refresh_batchnorm
from amvlm_monai.networks.momentum import momentum_update
from amvlm_monai.utils.distributed import unwrap

__all__ = ["EMATeacher", "make_teacher", "ema_update", "ema_alpha", "own_batch_statistics", "recompute_bn_statistics",
           "TEACHER_BN"]

TEACHER_BN = ("batch", "recompute", "ema")


class EMATeacher(nn.Module):
    """Wrapper that keeps an EMA copy frozen and in eval mode, whatever ``.train()`` a parent module calls.

    ``forward`` delegates to the wrapped network; ``module`` is the plain network (export or load
    ``teacher.module.state_dict()`` into a network built by the same factory).

    Args:
        module: the network to wrap (used as is, not copied).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.module.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        """Ignore ``mode``: the teacher is always in eval mode."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def make_teacher(student: nn.Module) -> EMATeacher:
    """Deep copy of ``student`` with ``requires_grad=False``, wrapped in :class:`EMATeacher` (always eval mode)."""
    return EMATeacher(copy.deepcopy(student))


def ema_alpha(step: int, max_alpha: float = 0.99) -> float:
    """``alpha_t = min(1 - 1 / (t + 1), max_alpha)``: 0 at t = 0 (teacher := student), then 1/2, 2/3, ...

    Example:
        >>> ema_alpha(0), ema_alpha(1), ema_alpha(3), ema_alpha(10**6)
        (0.0, 0.5, 0.75, 0.99)
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(
            f"step must be a non-negative int (the global step), got {step!r}; pass alpha= for a fixed momentum."
        )
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f"max_alpha must be in [0, 1], got {max_alpha!r}.")
    return min(1.0 - 1.0 / (int(step) + 1), float(max_alpha))




@torch.no_grad()
def ema_update(
    teacher: nn.Module,
    student: nn.Module,
    step: Optional[int] = None,
    max_alpha: float = 0.99,
    alpha: Optional[float] = None,
    buffers: bool = True,
) -> float:
    """In-place EMA of ``student`` into ``teacher``: parameters and floating buffers averaged, other buffers copied.

    Args:
        teacher: the EMA copy (an :class:`EMATeacher` or a plain module with the student's structure).
        student: the trained network (an :class:`EMATeacher` wrapper is unwrapped as well).
        step: global step t (int >= 0) giving ``alpha_t = min(1 - 1/(t+1), max_alpha)``.
        max_alpha: cap of ``alpha_t`` (0.99 in the method).
        alpha: a fixed momentum in [0, 1] instead of the step schedule (e.g. 0.995 for stage-1 momentum encoders);
            give exactly one of ``step`` and ``alpha``.
        buffers: average the floating buffers too (BatchNorm statistics, ``teacher_bn="ema"``); False keeps the
            teacher's own.

    Returns:
        The alpha used.

    Raises:
        ValueError: bad step/alpha, or parameter/buffer names or shapes that differ between the two modules.
    """
    if (step is None) == (alpha is None):
        raise ValueError("give exactly one of step (schedule) and alpha (fixed momentum).")
    if alpha is None:
        a = ema_alpha(step, max_alpha)  # type: ignore[arg-type]
    else:
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
        a = float(alpha)
    momentum_update(unwrap(teacher), unwrap(student), a, buffers=buffers)  # the one EMA step
    return a


@contextlib.contextmanager
def own_batch_statistics(teacher: nn.Module) -> Iterator[nn.Module]:
    """Run the teacher's forward passes in train mode inside the block, without gradients.

    BatchNorm then normalises with the batch's statistics and updates the teacher's running statistics from its own
    activations (``teacher_bn="batch"``); the teacher is back in eval mode afterwards. Dropout would be active too:
    the stage-2 networks have none by default.
    """
    inner = unwrap(teacher)
    inner.train(True)
    try:
        with torch.no_grad():
            yield teacher
    finally:
        inner.train(False)


@torch.no_grad()
def recompute_bn_statistics(network: nn.Module, images: Iterable[torch.Tensor], device: torch.device | str) -> int:
    """Re-estimate every BatchNorm layer's running statistics as the plain average over ``images`` batches.

    The network's weights are not changed; it is left in eval mode (``teacher_bn="recompute"``). This is
    :func:`~amvlm_monai.networks.batchnorm.refresh_batchnorm` for batches of tensors, on the inner module of an
    :class:`EMATeacher`.

    Returns:
        The number of images seen; with no batches at all the statistics are left as they were.
    """
    inner = unwrap(network)
    seen = refresh_batchnorm(inner, lambda x: inner(x.to(device)).shape[0], images)
    inner.train(False)
    return seen
