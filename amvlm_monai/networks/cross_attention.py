"""Single-head cross-attention inside an image-report pair (the CSS module)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["CrossAttention"]


class CrossAttention(nn.Module):
    """Each query token attends over the real tokens of its own sample's context.

    ``out_q = sum_k softmax_k((Wq q).(Wk c_k) / sqrt(D)) Wv c_k`` over the context tokens k with
    ``context_mask`` True. With ``qkv_projections=False`` (the authors' code) ``Wq = Wk = Wv = I``, i.e.
    ``softmax(q c^T / sqrt(D)) c``. A query whose context is entirely padding gets a zero vector (no NaN).

    Args:
        dim: token width D of both query and context.
        qkv_projections: learn bias-free linear Q, K, V maps (default, as on the slides).

    Example::

        >>> ca = CrossAttention(8, qkv_projections=False)
        >>> out = ca(torch.randn(2, 4, 8), torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
        >>> out.shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, dim: int, qkv_projections: bool = True) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}.")
        self.dim = dim
        self.qkv_projections = qkv_projections
        self.scale = dim**-0.5
        if qkv_projections:
            self.q = nn.Linear(dim, dim, bias=False)
            self.k = nn.Linear(dim, dim, bias=False)
            self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None,
                return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query: ``(B, Nq, D)``.
            context: ``(B, Nk, D)``.
            context_mask: ``(B, Nk)`` bool, True on real context tokens; None = all real.
            return_attn: also return the attention weights.

        Returns:
            ``(B, Nq, D)`` attended context, and ``(B, Nq, Nk)`` weights (rows sum to 1 over real context
            tokens, 0 on padding, all 0 for an all-padding context) when ``return_attn``.
        """
        if query.ndim != 3 or query.shape[2] != self.dim:
            raise ValueError(f"query must have shape (B, Nq, {self.dim}), got {tuple(query.shape)}.")
        if context.ndim != 3 or context.shape[2] != self.dim or context.shape[0] != query.shape[0]:
            raise ValueError(
                f"context must have shape ({query.shape[0]}, Nk, {self.dim}), got {tuple(context.shape)}."
            )
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask must have shape {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}."
                )
            context_mask = context_mask.bool()
            # padded values never reach the output, even if they are inf/NaN
            context = context.masked_fill(~context_mask.unsqueeze(-1), 0.0)
        if self.qkv_projections:
            q, k, v = self.q(query), self.k(context), self.v(context)
        else:
            q, k, v = query, context, context
        scores = (q @ k.transpose(1, 2)) * self.scale  # (B, Nq, Nk)
        if context_mask is not None:
            keep = context_mask.unsqueeze(1)
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            attn = scores.softmax(dim=-1) * keep  # zero rows where the whole context is padding
        else:
            attn = scores.softmax(dim=-1)
        out = attn @ v
        return (out, attn) if return_attn else out
