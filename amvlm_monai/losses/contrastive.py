"""Contrastive losses: per-row InfoNCE, global image-text contrast (L_ita), token-to-global contrast (L_local) and
the pooled patch-report contrast (L_mil, an option of this implementation, not in the paper).

All losses take embeddings that are **already L2-normalised** (the heads normalise; a loss never re-normalises), so
``sim(a, b) = a . b``. Masks are bool with True on real tokens; padded slots never change a result, whatever they hold.

Numerics: every loss here (and in :mod:`~amvlm_monai.losses.css` and :mod:`~amvlm_monai.losses.icl`) runs its
similarities, softmax and logsumexp in float32 (float64 inputs stay float64) with autocast switched off inside
(:func:`~amvlm_monai.losses.checks.float32_inputs`), and raises :class:`NonFiniteLossError` naming the loss when the
result is NaN or Inf (:func:`~amvlm_monai.losses.checks.check_finite`).

Logits follow open_clip's recipe "build logits, build labels, cross-entropy". The global negatives come from
``_gather``: under ``torchrun`` it all-gathers the other side's embeddings of every rank with gradient and offsets the
labels by ``rank * B`` (:func:`~amvlm_monai.utils.distributed.gather_with_grad`); in a single process it is the identity
with offset 0. Token averages are divided by the per-rank mean token count, so that the mean of the ranks' losses
(what DDP's gradient averaging optimises) is the loss of one process on the whole global batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.loss import _Loss

from amvlm_monai.losses.checks import (
    REDUCTIONS,
    NonFiniteLossError,
    check_choice,
    check_finite,
    check_mask,
    check_shape,
    check_temperature,
    float32_inputs,
    reduce,
)
from amvlm_monai.utils.distributed import gather_with_grad, mean_count

__all__ = [
    "NonFiniteLossError",
    "info_nce",
    "ImageTextContrastiveLoss",
    "LocalGlobalLoss",
    "PooledPatchTextLoss",
]

def info_nce(logits: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row InfoNCE: the cross-entropy of each row of ``logits`` against its target column.

    Args:
        logits: ``(N, M)`` scores (already divided by the temperature).
        targets: ``(N,)`` long column indices; default ``arange(N)`` (the diagonal, needs ``N <= M``).

    Returns:
        ``(N,)`` per-row losses ``-log softmax(logits[n])[targets[n]]``, computed in float32 (or float64).

    Example:
        >>> info_nce(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).shape
        torch.Size([2])
    """
    check_shape(logits, "logits", (None, None))
    n, m = logits.shape
    if targets is None:
        if n > m:
            raise ValueError(f"logits of shape {(n, m)}: the default diagonal targets need N <= M; pass targets.")
        targets = torch.arange(n, device=logits.device)
    else:
        check_shape(targets, "targets", (n,))
    with float32_inputs(logits) as (x,):
        return F.cross_entropy(x, targets.long(), reduction="none")


class ImageTextContrastiveLoss(_Loss):
    """L_ita: symmetric InfoNCE between image and report CLS embeddings (CLIP / MGCA's global loss).

    ``S = img @ txt.T / tau``; ``L = (CE(S, I) + CE(S^T, I)) / 2``.

    Args:
        temperature: tau (> 0), default 0.07.
        reduction: "mean" | "sum" | "none" (per-sample ``(CE_i2t[i] + CE_t2i[i]) / 2``, shape ``(B,)``).
    """

    def __init__(self, temperature: float = 0.07, reduction: str = "mean") -> None:
        check_choice(reduction, "reduction", REDUCTIONS)
        super().__init__(reduction=reduction)
        self.temperature = check_temperature(temperature)

    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Negatives from every process and the label offset of this one (single process: ``(x, 0)``)."""
        return gather_with_grad(x)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """
        Args:
            img: ``(B, D)`` L2-normalised image CLS embeddings.
            txt: ``(B, D)`` L2-normalised report CLS embeddings; row i is paired with ``img[i]``.

        Returns:
            scalar (``"mean"``/``"sum"``) or ``(B,)`` (``"none"``).

        Example:
            >>> x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
            >>> ImageTextContrastiveLoss()(x, x).shape
            torch.Size([])
        """
        check_shape(img, "img", (None, None))
        check_shape(txt, "txt", tuple(img.shape))
        with float32_inputs(img, txt) as (img, txt):
            all_txt, offset = self._gather(txt)
            all_img, _ = self._gather(img)
            labels = torch.arange(img.shape[0], device=img.device) + offset
            i2t = info_nce(img @ all_txt.T / self.temperature, labels)
            t2i = info_nce(txt @ all_img.T / self.temperature, labels)
            loss = reduce((i2t + t2i) / 2, self.reduction)
        return check_finite(loss, type(self).__name__)


def variance_weights(sim: torch.Tensor, mask: torch.Tensor, positives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Uncertainty weights of L_local from token-to-global similarities (detached, in [0, 1]).

    Args:
        sim: ``(B, N, M)`` ``sim[i, n, j]`` = similarity of token n of sample i to global embedding j.
        mask: ``(B, N)`` bool, real tokens.
        positives: ``(B,)`` column of each sample's own global embedding; default ``arange(B)``.

    Returns:
        ``(B, N)``: ``w[i, n] = var_i_n / max_{n' real} var_i_n'`` where ``var_i_n`` is the population variance over
        the negatives ``j != positives[i]`` of ``sim[i, n, j]``; 0 on padding. A sample whose variances are all 0
        (e.g. B <= 2: one negative or none) gets weight 1 on every real token, i.e. the unweighted loss.
    """
    b, _, m = sim.shape
    sim = sim.detach()
    if positives is None:
        positives = torch.arange(b, device=sim.device)
    neg = (torch.arange(m, device=sim.device)[None, :] != positives[:, None])[:, None, :]  # (B, 1, M): j != i
    n_neg = max(m - 1, 1)
    mean = torch.where(neg, sim, 0.0).sum(-1, keepdim=True) / n_neg
    var = torch.where(neg, (sim - mean) ** 2, 0.0).sum(-1) / n_neg  # (B, N)
    var = torch.where(mask, var, 0.0)
    vmax = var.amax(dim=1, keepdim=True)
    flat = vmax <= 1e-12
    w = var / torch.where(flat, torch.ones_like(vmax), vmax)
    w = torch.where(flat, torch.ones_like(w), w)
    return torch.where(mask, w, 0.0)


class LocalGlobalLoss(nn.Module):
    """L_local: token-to-global InfoNCE, weighted per token by an uncertainty weight (the authors' code).

    Image direction: for every patch p a ``B x B`` InfoNCE between ``v_i^p`` and all ``t_j^cls`` (target j = i),
    ``L_img = 1/(B P) sum_{i,p} w_{i,p} CE_{i,p}``. Text direction: the mirror, words ``t_i^w`` against all
    ``v_j^cls``, ``L_txt = 1/|R| sum_{(i,w) in R} w_{i,w} CE_{i,w}`` with R the real (i, w) pairs (padded slots
    contribute nothing and do not count). ``L_local = (L_img + L_txt) / 2``.

    Uncertainty weight (the spec leaves the exact form open; this is the definition used here):
    ``w_{i,n} = Var_{j != i}[sim(x_i^n, g_j)] / max_{n' real} Var_{j != i}[sim(x_i^{n'}, g_j)]``, population
    variance over the B-1 negatives, computed without gradient (see :func:`variance_weights`). Why: a token whose
    similarity is the same to every other sample's global embedding (background patches, stop words) cannot tell
    the reports apart and its InfoNCE is mostly noise, whereas a token whose similarity spreads over the negatives
    carries sample-specific content whose matching is ambiguous (alignment multiplicity) and deserves the signal.
    Dividing by the sample's maximum maps the weights to [0, 1] without a free scale, so the most uncertain token of
    each sample keeps weight 1. The weights are detached so the model cannot lower the loss by flattening its own
    similarity profile. With B <= 2 there is at most one negative, the variance is 0 and every real token gets 1.

    A plain module, not a ``_Loss``: its mean runs over the tokens of the whole batch, so it has no per-sample
    ``reduction``.

    Args:
        temperature: tau (> 0), default 0.07.
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Global embeddings from every process and the label offset of this one (single process: ``(x, 0)``)."""
        return gather_with_grad(x)

    def _direction(self, tokens: torch.Tensor, mask: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        all_glob, offset = self._gather(glob)
        b, n, _ = tokens.shape
        sim = torch.einsum("bnd,jd->bnj", tokens, all_glob)  # (B, N, B_all)
        pos = torch.arange(b, device=tokens.device) + offset
        ce = info_nce(sim.reshape(b * n, -1) / self.temperature, pos.repeat_interleave(n)).reshape(b, n)
        w = variance_weights(sim, mask, pos)
        ce = torch.where(mask, ce * w, 0.0)
        return ce.sum() / mean_count(mask.sum()).clamp_min(1)

    def forward(self, patches: torch.Tensor, img_cls: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                txt_cls: torch.Tensor) -> torch.Tensor:
        """
        Args:
            patches: ``(B, P, D)`` L2-normalised patch embeddings (all real).
            img_cls: ``(B, D)`` L2-normalised image CLS embeddings.
            words: ``(B, W, D)`` L2-normalised word embeddings (padded slots may hold anything).
            word_mask: ``(B, W)`` bool, True on real words.
            txt_cls: ``(B, D)`` L2-normalised report CLS embeddings.

        Returns:
            scalar ``(L_img + L_txt) / 2``.

        Example:
            >>> n = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)
            >>> m = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
            >>> LocalGlobalLoss()(n(3, 4, 8), n(3, 8), n(3, 3, 8), m, n(3, 8)).shape
            torch.Size([])
        """
        check_shape(patches, "patches", (None, None, None))
        b, _, d = patches.shape
        check_shape(img_cls, "img_cls", (b, d))
        check_shape(words, "words", (b, None, d))
        check_mask(word_mask, "word_mask", tuple(words.shape[:2]))
        check_shape(txt_cls, "txt_cls", (b, d))
        with float32_inputs(patches, img_cls, words, txt_cls) as (patches, img_cls, words, txt_cls):
            words = torch.where(word_mask[..., None], words, 0.0)  # garbage in padding never reaches the graph
            patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
            l_img = self._direction(patches, patch_mask, txt_cls)
            l_txt = self._direction(words, word_mask, img_cls)
            loss = (l_img + l_txt) / 2
        return check_finite(loss, type(self).__name__)


class PooledPatchTextLoss(nn.Module):
    """L_mil: image-report contrast on patch similarities pooled by a soft maximum (multiple-instance learning).

    Not in the paper; an option of this implementation (``mil_weight`` in ``pretrain.json``, 0 by default). The image
    is a bag of patches and matches a report through its best-matching patches:
    ``S_ij = tau_p * log sum_p exp(sim(v_i^p, t_j^cls) / tau_p)``, then the symmetric InfoNCE of L_ita on ``S / tau``:
    ``L = (CE(S / tau, I) + CE(S^T / tau, I)) / 2``. ``tau_p -> 0`` pools by the maximum, large ``tau_p`` by the
    mean plus ``tau_p log P``.

    Why: the text mask of stage 2 is the similarity of each patch with the report, so the patches must be what
    matches the report. L_local asks *every* patch to pick its own report out of the batch; background patches look
    alike in every image and cannot, and their pull towards the mean report leaves them about as similar to a report
    as the lesion patches are. Pooling lets the few patches that tell the reports apart carry the match, and a
    background patch that scores high against every report raises the negatives as much as the positive, which
    costs loss (tested).
    What it changed on the demo: ``docs/method.md``, "Measurements behind the defaults".

    A plain module, not a ``_Loss``: its mean runs over the tokens of the whole batch, so it has no per-sample
    ``reduction``.

    Args:
        temperature: tau (> 0) of the contrast, default 0.07.
        pool_temperature: tau_p (> 0) of the soft maximum, default 0.2 (on the demo's validation split 0.2 and 0.5
            did best among 0.05, 0.1, 0.2, 0.5).
    """

    def __init__(self, temperature: float = 0.07, pool_temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.pool_temperature = check_temperature(pool_temperature, "pool_temperature")

    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows from every process and the row offset of this one (single process: ``(x, 0)``)."""
        return gather_with_grad(x)

    def pooled(self, patches: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """``(B, P, D)`` patches and ``(N, D)`` reports -> ``(B, N)`` pooled similarities ``S``."""
        sim = torch.einsum("bpd,nd->bpn", patches, txt)
        return self.pool_temperature * torch.logsumexp(sim / self.pool_temperature, dim=1)

    def forward(self, patches: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """
        Args:
            patches: ``(B, P, D)`` L2-normalised patch embeddings.
            txt: ``(B, D)`` L2-normalised report CLS embeddings; row i is paired with image i.

        Returns:
            scalar.

        Example:
            >>> n = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)
            >>> PooledPatchTextLoss()(n(3, 4, 8), n(3, 8)).shape
            torch.Size([])
        """
        check_shape(patches, "patches", (None, None, None))
        b, _, d = patches.shape
        check_shape(txt, "txt", (b, d))
        with float32_inputs(patches, txt) as (patches, txt):
            all_txt, offset = self._gather(txt)
            rows = self.pooled(patches, all_txt)  # this rank's images against every report, (B, B_all)
            all_rows, _ = self._gather(rows)  # every image against every report, (B_all, B_all)
            labels = torch.arange(b, device=patches.device) + offset
            i2t = info_nce(rows / self.temperature, labels)
            t2i = info_nce(all_rows[:, offset:offset + b].T / self.temperature, labels)
            loss = ((i2t + t2i) / 2).mean()
        return check_finite(loss, type(self).__name__)
