"""The stage-1 objective: L = w_ita L_ita + w_css L_CSS + w_local L_local + w_icl L_ICL (+ w_mil L_mil, an option).

A weight of 0 switches its term off and skips its computation (no cross-attention or PDT without CSS, no momentum
forward without ICL).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from amvlm_monai.losses.contrastive import ImageTextContrastiveLoss, LocalGlobalLoss, PooledPatchTextLoss
from amvlm_monai.losses.css import CSSLoss
from amvlm_monai.losses.icl import ICLLoss

__all__ = ["AMVLMLoss"]


class AMVLMLoss(nn.Module):
    """Weighted sum of the AMVLM pretraining losses, driven through an :class:`~amvlm_monai.networks.amvlm.AMVLM`.

    Args:
        ita_weight: global image-text contrast (paper's code: 1).
        css_weight: cross-modal similarity supervision (0.5).
        local_weight: token-to-global contrast (0.1).
        icl_weight: intra-modal contrastive learning (0.1).
        mil_weight: pooled patch-report contrast (:class:`~amvlm_monai.losses.contrastive.PooledPatchTextLoss`); not
            in the paper, so 0 by default.
        mil_pool_temperature: its soft-maximum temperature tau_p.
        temperature: tau of every contrastive term.
        pdt_mode: "modulate" (default), "soft_targets" or "none" (CSS without PDT supervision).
        token_weighting: "uniform" or "attention" (CLS-attention token weights in CSS).

    Example:
        >>> terms = AMVLMLoss()(model, images, tokens, images_aug, tokens_aug)  # doctest: +SKIP
        >>> terms["loss"].backward()  # doctest: +SKIP
    """

    def __init__(self, ita_weight: float = 1.0, css_weight: float = 0.5, local_weight: float = 0.1,
                 icl_weight: float = 0.1, temperature: float = 0.07, pdt_mode: str = "modulate",
                 token_weighting: str = "uniform", mil_weight: float = 0.0, mil_pool_temperature: float = 0.2) -> None:
        super().__init__()
        self.weights = {"ita": ita_weight, "css": css_weight, "local": local_weight, "icl": icl_weight,
                        "mil": mil_weight}
        for name, w in self.weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"{name}_weight must be a finite number >= 0, got {w}.")
        if not any(self.weights.values()):
            raise ValueError("every loss weight is 0: nothing to train.")
        self.ita = ImageTextContrastiveLoss(temperature)
        self.css = CSSLoss(temperature, pdt_mode=pdt_mode, token_weighting=token_weighting)
        self.local = LocalGlobalLoss(temperature)
        self.icl = ICLLoss(temperature, return_terms=True)
        self.mil = PooledPatchTextLoss(temperature, mil_pool_temperature)
        self.pdt_mode = pdt_mode

    @property
    def active(self) -> list[str]:
        """Names of the terms whose weight is not 0."""
        return [k for k, w in self.weights.items() if w > 0]

    def forward(self, model: nn.Module, images: torch.Tensor, tokens: dict[str, torch.Tensor],
                images_aug: torch.Tensor | None = None,
                tokens_aug: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Compute the active terms.

        Args:
            model: an AMVLM.
            images: (B, C, H, W) normalised images.
            tokens: tokenised reports (``input_ids``, ``attention_mask``, ``word_index``, each (B, L)).
            images_aug, tokens_aug: the ICL views (needed only when ``icl_weight > 0``).

        Returns:
            dict with ``loss`` (the weighted total) and each active term unweighted (``ita``, ``css``, ``local``,
            ``icl`` and the four ICL parts ``icl_coarse_image`` ..., ``mil``).
        """
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
        terms: dict[str, torch.Tensor] = {}
        if self.weights["ita"]:
            terms["ita"] = self.ita(img.cls, txt.cls)
        if self.weights["css"]:
            att_words, att_patches = model.cross_attend(img, txt)
            dists = None if self.pdt_mode == "none" else model.distributions(img, txt, att_words, att_patches)
            terms["css"] = self.css(img.tokens, att_words, txt.tokens, att_patches, txt.mask, dists=dists,
                                    patch_attn=img.attn, word_attn=txt.attn)
        if self.weights["local"]:
            terms["local"] = self.local(img.tokens, img.cls, txt.tokens, txt.mask, txt.cls)
        if self.weights["icl"]:
            if images_aug is None or tokens_aug is None:
                raise ValueError("icl_weight > 0 needs images_aug and tokens_aug (the augmented views).")
            img_a = model.momentum_encode_image(images_aug)
            txt_a = model.momentum_encode_text(tokens_aug)
            terms["icl"], parts = self.icl(img.cls, img_a.cls, img_a.tokens, txt.cls, txt_a.cls, txt_a.tokens,
                                           txt_a.mask)
            terms.update({f"icl_{k}": v.detach() for k, v in parts.items()})
        if self.weights["mil"]:
            terms["mil"] = self.mil(img.tokens, txt.cls)
        total = sum(self.weights[k] * terms[k] for k in self.active)
        terms["loss"] = total
        return terms
