"""L_tg, the text-guided contrastive loss that trains the text mask generator's decoder (stage 2).

Standard form (the slides): for each image i, ``v_i`` is the mask-weighted average of its dense embeddings under the
mask ``T_i`` of its **paired** report, L2-normalised; ``S_ij = s <v_i, t_j>``;
``L_tg = (CE(S, I) + CE(S^T, I)) / 2``, a symmetric InfoNCE with a learnable logit scale ``s``.

Extended form (``extended=True``, the authors' code: TCL's ``ExtendedInfoNCE``): image i is pooled under the mask
of **every** text j, ``v_(i,j)``, and ``S_ij = s <v_(i,j), t_j>``; then the same two cross-entropies: over texts j
for image i (target j = i) and over images i for text j (target i = j). So the negatives of a pair are the other
texts' masks on the same image (rows) and the same text's masks on the other images (columns).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from amvlm_monai.losses.checks import REDUCTIONS

__all__ = ["TextGuidedLoss", "masked_pool"]



def masked_pool(dense: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mask-weighted average of dense embeddings, ``sum_hw m x / (sum_hw m + eps)``, **not** normalised.

    Args:
        dense: ``(B, D, h, w)``.
        masks: ``(B, K, h, w)`` non-negative weights (K masks per image).

    Returns:
        ``(B, K, D)``.
    """
    weights = masks / (masks.sum(dim=(2, 3), keepdim=True) + eps)
    return torch.einsum("bdhw,bkhw->bkd", dense, weights)


class TextGuidedLoss(_Loss):
    """Symmetric InfoNCE between text-masked image embeddings and report embeddings (L_tg).

    The logit scale is learnable and stored as ``logit_scale = log(s)`` (CLIP/TCL style) with ``s`` initialised to
    ``1 / temperature`` and clamped at ``max_scale`` in :meth:`forward` (read it as :attr:`scale`). Pooled image
    embeddings are L2-normalised (part of the definition of ``v``); the text embeddings must already be
    L2-normalised and are used as given.

    Args:
        temperature: initial temperature tau, ``s = 1 / tau`` at init (> 0).
        max_scale: upper clamp of ``s`` (> 0), 100 as in CLIP/TCL.
        extended: False: masks ``(B, h, w)`` of the paired reports; True: masks ``(B, B, h, w)`` of every report on
            every image (TCL's ExtendedInfoNCE, the authors' code).
        eps: added to the mask sums in the weighted average.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``; ``"none"`` gives ``(B,)``, the mean of row i (image i against
            all texts) and column i (text i against all images).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        max_scale: float = 100.0,
        extended: bool = False,
        eps: float = 1e-6,
        reduction: str = "mean",
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        super().__init__(reduction=reduction)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
        if not (math.isfinite(max_scale) and max_scale > 0):
            raise ValueError(f"max_scale must be a positive finite number, got {max_scale!r}.")
        if not isinstance(extended, bool):
            raise ValueError(f"extended must be True or False, got {extended!r}.")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}.")
        self.max_scale = float(max_scale)
        self.extended = extended
        self.eps = float(eps)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def scale(self) -> torch.Tensor:
        """The logit scale in use: ``exp(logit_scale)`` clamped at ``max_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def _check(self, dense: torch.Tensor, masks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if dense.ndim != 4:
            raise ValueError(f"dense must be (B, D, h, w), got shape {tuple(dense.shape)}.")
        b, d, h, w = dense.shape
        if text.shape != (b, d):
            raise ValueError(f"text must be (B={b}, D={d}), got shape {tuple(text.shape)}.")
        if self.extended:
            if masks.shape != (b, b, h, w):
                raise ValueError(
                    f"masks must be (B, B, h, w) = {(b, b, h, w)} with extended=True, got {tuple(masks.shape)}."
                )
            return masks
        if masks.shape == (b, 1, h, w):
            return masks
        if masks.shape != (b, h, w):
            raise ValueError(f"masks must be (B, h, w) = {(b, h, w)} (or (B, 1, h, w)), got {tuple(masks.shape)}.")
        return masks.unsqueeze(1)

    def logits(self, dense: torch.Tensor, masks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scaled similarity matrix ``S (B, B)``: row i = image i, column j = text j (see :meth:`forward`)."""
        masks = self._check(dense, masks, text)
        v = F.normalize(masked_pool(dense, masks, self.eps), dim=-1)  # (B, 1, D) or (B, B, D)
        if self.extended:
            sim = torch.einsum("ijd,jd->ij", v, text)  # <v_(i,j), t_j>
        else:
            sim = v[:, 0] @ text.t()  # <v_i, t_j>
        return self.scale * sim

    def forward(self, dense: torch.Tensor, masks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dense: ``(B, D, h, w)`` dense image embeddings (L2-normalised over D by the generator).
            masks: standard: ``(B, h, w)`` (or ``(B, 1, h, w)``), mask of report i on image i;
                extended: ``(B, B, h, w)``, ``masks[i, j]`` = mask of report j on image i.
            text: ``(B, D)`` L2-normalised report embeddings.

        Returns:
            Scalar (``"mean"``/``"sum"``) or ``(B,)`` (``"none"``).

        Raises:
            ValueError: on shape mismatches (naming the argument) or a non-finite loss (naming the non-finite input).

        Example:
            >>> loss = TextGuidedLoss()
            >>> dense = F.normalize(torch.randn(2, 8, 4, 4), dim=1)
            >>> text = F.normalize(torch.randn(2, 8), dim=-1)
            >>> loss(dense, torch.rand(2, 4, 4), text).shape
            torch.Size([])
        """
        logits = self.logits(dense, masks, text)
        target = torch.arange(logits.shape[0], device=logits.device)
        rows = F.cross_entropy(logits, target, reduction="none")  # image i: over texts j
        cols = F.cross_entropy(logits.t(), target, reduction="none")  # text i: over images j
        per_sample = 0.5 * (rows + cols)
        if not bool(torch.isfinite(per_sample).all()):
            named = (("dense", dense), ("masks", masks), ("text", text))
            bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
            raise ValueError(
                "TextGuidedLoss is not finite"
                + (f": non-finite values in {', '.join(bad)}." if bad else f" (logit scale {float(self.scale):.4g}).")
            )
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample
