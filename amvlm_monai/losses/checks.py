"""Argument checks, float32 numerics and reductions shared by every loss of the package.

Each loss validates its options in ``__init__`` and its tensors in ``forward`` with these checks (a ``ValueError``
naming the argument), runs its similarities in float32 with autocast off (:func:`float32_inputs`) and raises
:class:`NonFiniteLossError` naming the loss when the result is NaN or Inf (:func:`check_finite`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

__all__ = [
    "REDUCTIONS",
    "NonFiniteLossError",
    "check_finite",
    "float32_inputs",
    "check_temperature",
    "check_choice",
    "check_shape",
    "check_mask",
    "masked_log_softmax",
    "reduce",
]

REDUCTIONS = ("mean", "sum", "none")


class NonFiniteLossError(ValueError, FloatingPointError):
    """A loss came out NaN or Inf (caught by ``except ValueError`` and ``except FloatingPointError`` alike)."""


def check_finite(value: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``value`` unchanged, or raise :class:`NonFiniteLossError` naming ``name`` if any entry is NaN/Inf."""
    if not bool(torch.isfinite(value.detach()).all()):
        raise NonFiniteLossError(
            f"{name}: the loss is not finite ({value.detach().flatten()[:4].tolist()} ...); "
            "check the inputs for NaN/Inf (embeddings must be finite and L2-normalised)."
        )
    return value


@contextlib.contextmanager
def float32_inputs(*tensors: Optional[torch.Tensor]) -> Iterator[tuple]:
    """Context manager: autocast off, and the given tensors promoted to at least float32 (None passes through).

    Example:
        >>> with float32_inputs(torch.ones(2, dtype=torch.bfloat16), None) as (a, b):
        ...     a.dtype, b
        (torch.float32, None)
    """
    dev = next((t.device.type for t in tensors if t is not None), "cpu")
    out = tuple(None if t is None else t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)
    try:
        ctx = torch.autocast(device_type=dev, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to switch off
        ctx = contextlib.nullcontext()
    with ctx:
        yield out


def check_temperature(value: float, name: str = "temperature") -> float:
    """Validate a temperature (a finite number > 0) and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_choice(value: str, name: str, allowed: tuple) -> str:
    """Validate a string option against its allowed values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    return value


def check_shape(t: torch.Tensor, name: str, shape: tuple) -> None:
    """Raise ValueError unless ``t`` is a tensor of ``shape`` (None entries match any size)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}.")


def check_mask(mask: torch.Tensor, name: str, shape: tuple) -> None:
    """Raise ValueError unless ``mask`` is a bool tensor of ``shape`` (True = real token)."""
    check_shape(mask, name, shape)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = real token), got dtype {mask.dtype}.")


def masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim restricted to ``valid`` entries; 0 at invalid entries and in rows with none.

    Never produces NaN (forward or backward), whatever the invalid entries hold.
    """
    valid = valid.expand_as(logits)
    has_any = valid.any(-1, keepdim=True)
    x = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
    x = torch.where(has_any, x, torch.zeros_like(x))
    logp = torch.log_softmax(x, dim=-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-sample losses: "mean", "sum" or "none" (returned as is)."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample
