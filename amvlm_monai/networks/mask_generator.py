"""Text mask generator of stage 2: frozen stage-1 patch embeddings -> trainable gated decoder -> text masks.

Pipeline (the method page, "Stage 2"): a frozen patch encoder (stage-1 image encoder + local head) gives
L2-normalised patch embeddings on an ``h x w`` grid; a small decoder of ``num_blocks`` gated residual up-sampling
blocks turns them into a dense ``D x (2^n h) x (2^n w)`` map, L2-normalised over D; the similarity of every location
with a text embedding ``t`` gives the text mask ``T = sigmoid(w (sim - b))`` with learnable scalars ``w`` and ``b``.
Only the decoder, ``w`` and ``b`` are trainable.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from amvlm_monai.utils.shapes import spatial_size

__all__ = ["GatedUpBlock", "TextMaskGenerator"]


class GatedUpBlock(nn.Module):
    """Nearest up-sampling x2 followed by a gated 3x3 conv residual (TCL's ``ResConv(upsample=True, gate=True)``).

    ``x = up(x); x = x + tanh(g) * conv(act(norm(x)))`` with the gate ``g`` initialised to 0, so that a fresh block is
    exactly nearest-neighbour up-sampling and the residual branch is switched on by training.

    Args:
        dim: channels D (kept).
        norm: ``"none"`` (the authors' decoder) or ``"group"`` (GroupNorm with one group, batch independent).
    """

    def __init__(self, dim: int, norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "group"):
            raise ValueError(f"norm must be one of ('none', 'group'), got {norm!r}.")
        self.norm = nn.GroupNorm(1, dim) if norm == "group" else nn.Identity()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w) -> (B, D, 2h, 2w)``."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x + torch.tanh(self.gate) * self.conv(self.act(self.norm(x)))


class TextMaskGenerator(nn.Module):
    """Text-guided soft masks from a frozen patch encoder and text embeddings.

    Args:
        patch_encoder: module ``images (B, C, H, W) -> (B, P, D)`` L2-normalised patch embeddings with
            ``P = h * w`` in row-major order. It is frozen here: ``requires_grad=False`` on all its parameters, kept in
            eval mode even when ``.train()`` is called on this module, and run in ``torch.inference_mode()``.
        grid_size: patch grid ``(h, w)`` (an int means square).
        embed_dim: D, the embedding dimension of the patches and of the text.
        num_blocks: gated up-sampling blocks; the dense map is ``2**num_blocks`` times the grid (2 -> 4x, e.g.
            14 -> 56). Each block starts as pure nearest up-sampling (zero-initialised tanh gate).
        w_init: initial mask sharpness ``w`` (learnable scalar).
        b_init: initial similarity threshold ``b`` (learnable scalar).
        norm: normalisation inside the decoder blocks, ``"none"`` (the authors') or ``"group"``.

    Example:
        >>> class Patches(nn.Module):  # 8x8 pixel patches of a 1-channel image as (B, P, 64) embeddings
        ...     def forward(self, x):
        ...         return F.normalize(F.unfold(x, 8, stride=8).transpose(1, 2), dim=-1)
        >>> gen = TextMaskGenerator(Patches(), grid_size=4, embed_dim=64)
        >>> gen(torch.rand(2, 1, 32, 32), F.normalize(torch.randn(2, 1, 64), dim=-1)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(
        self,
        patch_encoder: nn.Module,
        grid_size: Union[int, Sequence[int]],
        embed_dim: int,
        num_blocks: int = 2,
        w_init: float = 10.0,
        b_init: float = 0.25,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if not isinstance(patch_encoder, nn.Module):
            raise ValueError(f"patch_encoder must be an nn.Module, got {type(patch_encoder).__name__}.")
        grid = spatial_size(grid_size, "grid_size")
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}.")
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}.")
        self.grid_size: Tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.embed_dim = embed_dim
        self.patch_encoder = patch_encoder
        self.patch_encoder.requires_grad_(False)
        self.patch_encoder.eval()
        self.decoder = nn.Sequential(*[GatedUpBlock(embed_dim, norm=norm) for _ in range(num_blocks)])
        self.w = nn.Parameter(torch.tensor(float(w_init)))
        self.b = nn.Parameter(torch.tensor(float(b_init)))

    @property
    def dense_size(self) -> Tuple[int, int]:
        """Spatial size ``(h', w')`` of the dense map: the grid times ``2**num_blocks``."""
        f = 2 ** len(self.decoder)
        return self.grid_size[0] * f, self.grid_size[1] * f

    def train(self, mode: bool = True) -> "TextMaskGenerator":
        """Set train/eval mode on the decoder; the frozen patch encoder always stays in eval mode."""
        super().train(mode)
        self.patch_encoder.eval()
        return self

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """Dense embeddings ``(B, C, H, W) -> (B, D, h', w')``, L2-normalised over D (``h' = 2**num_blocks * h``)."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}.")
        with torch.inference_mode():  # the frozen tower: no autograd bookkeeping at all
            patches = self.patch_encoder(images)
        patches = patches.clone()  # a normal tensor again, so that the decoder may save it for its backward
        h, w = self.grid_size
        if patches.ndim != 3 or patches.shape[0] != images.shape[0] or patches.shape[1:] != (h * w, self.embed_dim):
            raise ValueError(
                f"patch_encoder output must be (B, P={h * w}, D={self.embed_dim}) for B={images.shape[0]}, "
                f"got {tuple(patches.shape)}."
            )
        grid = patches.detach().transpose(1, 2).reshape(patches.shape[0], self.embed_dim, h, w)
        return F.normalize(self.decoder(grid), dim=1)

    def similarity(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity maps ``<dense(h, w), t_k>``: dense ``(B, D, h', w')``, text ``(B, K, D)`` or ``(K, D)``
        -> ``(B, K, h', w')``. Inputs are taken as already L2-normalised (nothing is re-normalised here)."""
        if dense.ndim != 4 or dense.shape[1] != self.embed_dim:
            raise ValueError(f"dense must be (B, D={self.embed_dim}, h, w), got {tuple(dense.shape)}.")
        if text.ndim == 2 and text.shape[1] == self.embed_dim:
            return torch.einsum("bdhw,kd->bkhw", dense, text)
        if text.ndim == 3 and text.shape[0] == dense.shape[0] and text.shape[2] == self.embed_dim:
            return torch.einsum("bdhw,bkd->bkhw", dense, text)
        raise ValueError(
            f"text must be (B={dense.shape[0]}, K, D={self.embed_dim}) or (K, D={self.embed_dim}), "
            f"got {tuple(text.shape)}."
        )

    def masks(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Soft masks ``sigmoid(w (sim - b))`` at the dense resolution.

        Args:
            dense: ``(B, D, h', w')`` from :meth:`dense`.
            text: ``(B, K, D)`` per-image prompts (K = 1 for the paired report, K = C for one prompt per class) or
                ``(K, D)`` prompts shared by the batch (``(B, D)`` reports used as shared prompts gives the
                ``(B, B, h', w')`` masks of every text on every image, as the extended L_tg needs).

        Returns:
            ``(B, K, h', w')`` in (0, 1).
        """
        return torch.sigmoid(self.w * (self.similarity(dense, text) - self.b))

    @staticmethod
    def upsample(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of ``(B, K, h', w')`` masks to ``size = (H, W)`` (``align_corners=False``)."""
        return F.interpolate(masks, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Text masks at the image size.

        Args:
            images: ``(B, C, H, W)``.
            text: ``(B, K, D)`` L2-normalised prompt embeddings (or ``(K, D)`` shared by the batch).

        Returns:
            ``(B, K, H, W)`` soft masks in (0, 1), bilinearly up-sampled from the dense resolution.
        """
        return self.upsample(self.masks(self.dense(images), text), images.shape[-2:])
