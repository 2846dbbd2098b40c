"""Probability distribution transformer (PDT): a diagonal Gaussian (mu, sigma) per token.

Follows MAP's ``DisTrans`` (Ji et al., CVPR 2023), which the AMVLM code uses:

    x' = LN(GELU(Linear(x)))
    h  = MultiHeadSelfAttention(x')                    # q/k/v projections, no output projection, width D
    h1, h2 = h[..., :D/2], h[..., D/2:]                # the two halves of the attention output
    mu        = x + Linear(h1);   mu = mu + MLP(LN(mu))
    log_sigma = Linear(h2);       log_sigma = log_sigma + MLP(LN(log_sigma))
    sigma     = exp(log_sigma)

Design choice (as in MAP): the attention output keeps width D and is split into two D/2 halves (with an even
number of heads, each half is the output of half of the heads); each half is projected back to D. Padding keys
are masked out of the attention; padded tokens get mu = sigma = 0 so nothing about padding leaks out.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["PDT"]


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop))


class PDT(nn.Module):
    """Token set -> per-token diagonal Gaussians ``(mu, sigma)``.

    Args:
        dim: token width D (even, divisible by ``num_heads``).
        num_heads: attention heads (paper: 8).
        mlp_ratio: hidden width of the two MLPs relative to D (MAP: 4).
        dropout: dropout on attention probabilities, projections and MLPs (MAP: 0.1).
        qkv_bias: bias in the q/k/v projection (MAP: False).

    Example::

        >>> pdt = PDT(16, num_heads=4).eval()
        >>> mu, sigma = pdt(torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool())
        >>> mu.shape, bool((sigma[0, :3] > 0).all()), bool((sigma[0, 3:] == 0).all())
        (torch.Size([2, 5, 16]), True, True)
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even number >= 2, got {dim}.")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        hidden = int(dim * mlp_ratio)
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(dropout)
        self.mu_proj = nn.Linear(dim // 2, dim)
        self.logsig_proj = nn.Linear(dim // 2, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mu_mlp = _Mlp(dim, hidden, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.logsig_mlp = _Mlp(dim, hidden, dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: ``(B, N, D)`` tokens.
            mask: ``(B, N)`` bool, True on real tokens (keys outside it are ignored); None = all real.

        Returns:
            ``mu (B, N, D)`` and ``sigma (B, N, D) = exp(log_sigma) > 0``; both 0 on padding.
        """
        if x.ndim != 3 or x.shape[2] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}.")
        b, n, d = x.shape
        if mask is not None:
            if mask.shape != (b, n):
                raise ValueError(f"mask must have shape {(b, n)}, got {tuple(mask.shape)}.")
            mask = mask.bool()
            # zero padded inputs so that non-finite garbage cannot reach real tokens through 0 * inf
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        h = self.norm1(self.act(self.fc(x)))
        q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = self.attn_drop(scores.softmax(dim=-1))
        h = (attn @ v).transpose(1, 2).reshape(b, n, d)
        h1, h2 = h[..., : d // 2], h[..., d // 2:]
        mu = x + self.proj_drop(self.mu_proj(h1))
        mu = mu + self.mu_mlp(self.norm2(mu))
        log_sigma = self.proj_drop(self.logsig_proj(h2))
        log_sigma = log_sigma + self.logsig_mlp(self.norm3(log_sigma))
        sigma = log_sigma.exp()
        if mask is not None:
            pad = ~mask.unsqueeze(-1)
            mu, sigma = mu.masked_fill(pad, 0.0), sigma.masked_fill(pad, 0.0)
        return mu, sigma
