"""Mixed precision by device: :func:`amp_dtype` picks bfloat16 where the device computes it natively (GPUs with
bfloat16, CPUs with AVX512-BF16/AMX), float16 on older GPUs, float32 elsewhere; :func:`autocast` is the matching
context (a no-op in float32)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def cpu_bf16_supported() -> bool:
    """True when this CPU multiplies bfloat16 matrices natively (oneDNN with AVX512-BF16 or AMX).

    Without it PyTorch emulates bfloat16 matrix products, tens of times slower than float32 (measured on an AVX2
    EPYC: 0.5 vs 26 GFLOP/s), so automatic mixed precision stays off on such CPUs.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device: torch.device | str, amp: bool | str = True) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` on ``device``, or None for full float32.

    Args:
        device: where the step runs.
        amp: False (float32); True or ``"auto"``: bfloat16 where the device computes it natively (CUDA with
            bfloat16 support, a CPU with AVX512-BF16/AMX), else float16 on CUDA, else float32;
            ``"bf16"``/``"bfloat16"`` or ``"fp16"``/``"float16"`` force a dtype.

    Example:
        >>> amp_dtype("cpu", False) is None
        True
    """
    device = torch.device(device)
    if amp is False or amp is None:
        return None
    if isinstance(amp, str) and amp.lower() in _DTYPES:
        return _DTYPES[amp.lower()]
    if amp is not True and not (isinstance(amp, str) and amp.lower() == "auto"):
        raise ValueError(f"amp must be True, False, 'auto', 'bf16' or 'fp16', got {amp!r}.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_supported() else None
    return None


def autocast(device: torch.device, enabled: bool | str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``enabled`` (a dtype, or an ``amp`` value for :func:`amp_dtype`); a no-op for None/False."""
    dtype = enabled if isinstance(enabled, torch.dtype) else amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
