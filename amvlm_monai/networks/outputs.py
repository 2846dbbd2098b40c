"""Containers shared by the encoders, heads and losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TokenOutput:
    """What an encoder (or a projection of it) returns.

    Attributes:
        cls: global token, ``(B, d)``.
        tokens: patch or word tokens, ``(B, N, d)``; words are packed to the front, padding after them.
        mask: ``(B, N)`` bool, True where a token is real (all True for image patches).
        attn: ``(B, N)`` last block's CLS->token attention averaged over heads (0 on padding), or None.
    """

    cls: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    attn: Optional[torch.Tensor] = None
