"""L_ICL: intra-modal contrastive learning between a sample and its augmented view (momentum encoder).

Coarse terms contrast CLS with augmented CLS; fine terms contrast CLS with the augmented view's tokens, slot by slot
over the batch (under ``torchrun`` the global batch: the augmented views of every rank are gathered). Inputs are
L2-normalised embeddings; the word mask is bool, True on real words.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from amvlm_monai.losses.checks import (
    check_finite,
    check_mask,
    check_shape,
    check_temperature,
    float32_inputs,
    masked_log_softmax,
)
from amvlm_monai.losses.contrastive import info_nce
from amvlm_monai.utils.distributed import gather, mean_count, rank

__all__ = ["ICLLoss"]


class ICLLoss(nn.Module):
    """L_ICL = mean of four InfoNCE terms, each with the augmented view ``a`` as the other side.

    - coarse image: ``-1/B sum_i log softmax_j(sim(v_i^cls, v_{j,a}^cls) / tau)|_{j=i}``; coarse text likewise.
    - fine image: ``-1/(B P) sum_i sum_p log softmax_j(sim(v_i^cls, v_{j,a}^p) / tau)|_{j=i}`` (for each patch slot
      p, the sample's CLS must pick its own augmented patch p among the batch's patches p).
    - fine text: the same over word slots, with padding: only real (i, p) pairs are terms (and the mean is over them),
      and the softmax over j only includes texts j whose slot p is a real word. A slot that is real in one text only
      gives a term of 0 (a softmax over itself); a batch without any real word gives ``fine_text = 0``.

    A plain module, not a ``_Loss``: its terms are means over the tokens of the whole batch, so it has no per-sample
    ``reduction``.

    Args:
        temperature: tau (> 0), default 0.07.
        return_terms: also return ``dict(coarse_image, coarse_text, fine_image, fine_text)``.
    """

    def __init__(self, temperature: float = 0.07, return_terms: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        if not isinstance(return_terms, bool):
            raise ValueError(f"return_terms must be True or False, got {return_terms!r}.")
        self.return_terms = return_terms

    def _fine(self, cls: torch.Tensor, tokens_aug: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over real (i, p) of ``-log softmax_{j: mask[j, p]}(sim(cls_i, tokens_aug[j, p]) / tau)|_{j=i}``.

        Under ``torchrun`` j runs over the global batch (the augmented views are gathered without gradient: they
        come from the momentum encoders).
        """
        b, n, _ = tokens_aug.shape
        all_tokens, all_mask = gather(tokens_aug), gather(mask)
        logits = torch.einsum("id,jpd->ipj", cls, all_tokens) / self.temperature  # (B_i, N, B_j)
        valid = all_mask.T[None].expand(b, n, all_tokens.shape[0])  # column j of row (i, p): slot p of j is real
        logp = masked_log_softmax(logits, valid)
        rows = torch.arange(b, device=cls.device)
        own = logp[rows, :, rows + rank() * b]  # (B, N): logp[i, p, i]
        return -torch.where(mask, own, 0.0).sum() / mean_count(mask.sum()).clamp_min(1)

    def forward(self, img_cls: torch.Tensor, img_cls_aug: torch.Tensor, patches_aug: torch.Tensor,
                txt_cls: torch.Tensor, txt_cls_aug: torch.Tensor, words_aug: torch.Tensor,
                word_mask_aug: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """
        Args:
            img_cls: ``(B, D)`` image CLS embeddings (online encoder).
            img_cls_aug: ``(B, D)`` image CLS of the augmented views (momentum encoder).
            patches_aug: ``(B, P, D)`` patch embeddings of the augmented views.
            txt_cls: ``(B, D)`` report CLS embeddings (online encoder).
            txt_cls_aug: ``(B, D)`` report CLS of the augmented reports.
            words_aug: ``(B, W, D)`` word embeddings of the augmented reports (padding may hold anything).
            word_mask_aug: ``(B, W)`` bool, True on real words of the augmented reports.

        Returns:
            scalar L_ICL, or ``(loss, terms)`` with ``return_terms=True``.

        Example:
            >>> n = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)
            >>> m = torch.tensor([[True, True, False], [True, True, True]])
            >>> loss, terms = ICLLoss(return_terms=True)(n(2, 8), n(2, 8), n(2, 4, 8), n(2, 8), n(2, 8), n(2, 3, 8), m)
            >>> sorted(terms)
            ['coarse_image', 'coarse_text', 'fine_image', 'fine_text']
        """
        check_shape(img_cls, "img_cls", (None, None))
        b, d = img_cls.shape
        check_shape(img_cls_aug, "img_cls_aug", (b, d))
        check_shape(patches_aug, "patches_aug", (b, None, d))
        check_shape(txt_cls, "txt_cls", (b, d))
        check_shape(txt_cls_aug, "txt_cls_aug", (b, d))
        check_shape(words_aug, "words_aug", (b, None, d))
        check_mask(word_mask_aug, "word_mask_aug", tuple(words_aug.shape[:2]))
        tensors = (img_cls, img_cls_aug, patches_aug, txt_cls, txt_cls_aug, words_aug)
        with float32_inputs(*tensors) as (v, va, pa, t, ta, wa):
            wa = torch.where(word_mask_aug[..., None], wa, 0.0)  # garbage in padding never reaches the graph
            patch_mask = torch.ones(pa.shape[:2], dtype=torch.bool, device=pa.device)
            own = torch.arange(b, device=v.device) + rank() * b  # each row's own augmented view among all ranks'
            terms = {
                "coarse_image": info_nce(v @ gather(va).T / self.temperature, own).mean(),
                "coarse_text": info_nce(t @ gather(ta).T / self.temperature, own).mean(),
                "fine_image": self._fine(v, pa, patch_mask),
                "fine_text": self._fine(t, wa, word_mask_aug),
            }
            loss = torch.stack(list(terms.values())).mean()
        check_finite(loss, type(self).__name__)
        return (loss, terms) if self.return_terms else loss
