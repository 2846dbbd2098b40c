"""Exponential moving average (EMA) teacher for the Mean Teacher of stage 2.

The teacher is a frozen copy of the student, updated after each student step by
``theta_T <- alpha_t theta_T + (1 - alpha_t) theta_S`` with ``alpha_t = min(1 - 1 / (t + 1), max_alpha)``, applied to
parameters **and** floating-point buffers (BatchNorm running mean/var); integer buffers (``num_batches_tracked``) are
copied. The teacher stays in eval mode (BatchNorm uses the averaged running statistics, dropout off).
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Optional

import torch
import torch.nn as nn

from amvlm_monai.networks.momentum import momentum_update

__all__ = ["EMATeacher", "make_teacher", "ema_update", "ema_alpha"]


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


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, EMATeacher) else module


@torch.no_grad()
def ema_update(
    teacher: nn.Module,
    student: nn.Module,
    step: Optional[int] = None,
    max_alpha: float = 0.99,
    alpha: Optional[float] = None,
) -> float:
    """In-place EMA of ``student`` into ``teacher``: parameters and floating buffers averaged, other buffers copied.

    Args:
        teacher: the EMA copy (an :class:`EMATeacher` or a plain module with the student's structure).
        student: the trained network (an :class:`EMATeacher` wrapper is unwrapped as well).
        step: global step t (int >= 0) giving ``alpha_t = min(1 - 1/(t+1), max_alpha)``.
        max_alpha: cap of ``alpha_t`` (0.99 in the method).
        alpha: a fixed momentum in [0, 1] instead of the step schedule (e.g. 0.995 for stage-1 momentum encoders);
            give exactly one of ``step`` and ``alpha``.

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
    momentum_update(_unwrap(teacher), _unwrap(student), a)  # the one EMA step: parameters and buffers
    return a
