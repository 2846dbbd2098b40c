"""Projection heads (MGCA's global and local embeddings): encoder width d -> joint space D, L2-normalised.

Two kinds: ``"mlp"``, MGCA's Linear -> BN -> ReLU -> Linear -> BN (the paper's, the default), and ``"linear"``, one
linear map (CLIP's projection), with no batch dependence. The BatchNorm of ``"mlp"`` standardises every batch, which
is what lets a tower trained from scratch start: its embeddings of similar images are nearly equal at first and the
batch standardisation spreads them (with linear heads the demo's image embeddings collapsed; ``docs/method.md``).
Its running statistics must then fit the final weights: the stage-1 validation re-estimates them
(:func:`~amvlm_monai.evaluation.alignment.refresh_bn_statistics`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlobalHead", "LocalHead", "KINDS"]


#: the kinds of projection head
KINDS = ("mlp", "linear")


def _mlp(in_dim: int, out_dim: int, hidden_dim: int, kind: str = "mlp") -> nn.Sequential:
    for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}.")
    if kind not in KINDS:
        raise ValueError(f"head kind must be one of {KINDS}, got {kind!r}.")
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
        nn.BatchNorm1d(out_dim, affine=False),
    )


def _project(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` L2-normalised, computed in the head's own dtype with autocast off (float32 unless the weights were
    cast, as for a frozen bfloat16 tower).

    Under bfloat16 autocast the head's BatchNorm, which normalises over the batch in training, scales the rounding
    noise between nearly equal embeddings (templated reports) up to unit variance. Measured on CUDA, one step of the
    tiny test model with MiniLM's first layer: L_ita 1.01 under autocast against 0.21 in float32, 0.24 with the
    head in float32; the heads are a few small matrices, so this costs nothing measurable.
    """
    dtype = next(mlp.parameters()).dtype
    with torch.autocast(x.device.type, enabled=False):
        return F.normalize(mlp(x.to(dtype)), dim=-1)


class GlobalHead(nn.Module):
    """Linear -> BN -> ReLU -> Linear -> BN (no affine) (``kind="mlp"``) or one Linear (``kind="linear"``), then L2
    normalisation; for CLS tokens.

    BatchNorm in training mode needs B >= 2.

    Args:
        in_dim: encoder width d.
        out_dim: joint embedding width D (paper: 128).
        hidden_dim: hidden width (paper: 2048; unused by ``"linear"``).
        kind: ``"mlp"`` (MGCA's, the paper's) or ``"linear"`` (see the module docstring).

    Example::

        >>> head = GlobalHead(32, out_dim=8, hidden_dim=16)
        >>> head(torch.randn(4, 32)).norm(dim=-1)  # all ones
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int = 2048, kind: str = "mlp") -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = _mlp(in_dim, out_dim, hidden_dim, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, d) -> (B, D)``, unit L2 norm per row."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (B, {self.in_dim}), got {tuple(x.shape)}.")
        return _project(self.mlp, x)


class LocalHead(nn.Module):
    """The :class:`GlobalHead` MLP applied to every real token (same as MGCA's 1x1 ``Conv1d`` local embedding).

    Real tokens are gathered first, so BatchNorm statistics (training mode) are computed over the real tokens of
    the whole batch only; padding never influences any output. Padding slots come back as zeros.

    Args:
        in_dim: encoder width d.
        out_dim: joint embedding width D (paper: 128).
        hidden_dim: hidden width (paper: 2048; unused by ``"linear"``).
        kind: ``"mlp"`` or ``"linear"``, as :class:`GlobalHead`.

    Example::

        >>> head = LocalHead(32, out_dim=8, hidden_dim=16)
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> y = head(torch.randn(2, 3, 32), mask)  # (2, 3, 8); y[0, 2] == y[1, 1:] == 0
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int = 2048, kind: str = "mlp") -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = _mlp(in_dim, out_dim, hidden_dim, kind)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, N, d)`` tokens.
            mask: ``(B, N)`` bool, True on real tokens; None = all real.

        Returns:
            ``(B, N, D)``: unit-norm embeddings on real tokens, zeros on padding.
        """
        if x.ndim != 3 or x.shape[2] != self.in_dim:
            raise ValueError(f"x must have shape (B, N, {self.in_dim}), got {tuple(x.shape)}.")
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}.")
        if mask is None or bool(mask.all()):  # e.g. image patches: no gather/scatter copies, same result
            b, n, _ = x.shape
            return _project(self.mlp, x.reshape(b * n, -1)).reshape(b, n, -1)
        mask = mask.bool()
        out = x.new_zeros(*x.shape[:2], self.out_dim, dtype=next(self.mlp.parameters()).dtype)
        if mask.any():
            out[mask] = _project(self.mlp, x[mask])
        return out
