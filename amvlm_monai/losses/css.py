"""L_CSS: cross-modal similarity supervision, with the PDT's Wasserstein distances supervising the similarities.

Inside each image-report pair, every patch ``v^p`` has an attended-words vector ``t~^p`` (cross-attention over the
report's real words) and every real word ``t^w`` an attended-patches vector ``v~^w``. L_V2T contrasts each patch
with the attended vectors of the other patches of the same image (and back); L_T2V mirrors it over the real words.
The PDT gives each of these tokens a diagonal Gaussian ``(mu, sigma)``; their pairwise squared 2-Wasserstein
distance modulates the logits (default) or defines soft targets. Inputs are L2-normalised embeddings; masks are
bool, True on real tokens.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch.nn.modules.loss import _Loss

from amvlm_monai.losses.checks import (
    REDUCTIONS,
    check_choice,
    check_finite,
    check_mask,
    check_shape,
    check_temperature,
    float32_inputs,
    masked_log_softmax,
    reduce,
)

__all__ = ["w2_pairwise", "attention_token_weights", "CSSLoss"]

_PDT_MODES = ("modulate", "soft_targets", "none")
_WEIGHTINGS = ("uniform", "attention")
_DIST_KEYS = ("patches", "att_words", "words", "att_patches")


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(B, N, M)`` = ||a||^2 + ||b||^2 - 2 a.b, clamped at 0."""
    d = a.pow(2).sum(-1)[:, :, None] + b.pow(2).sum(-1)[:, None, :] - 2 * torch.einsum("bnd,bmd->bnm", a, b)
    return d.clamp_min(0)


def w2_pairwise(mu_a: torch.Tensor, sig_a: torch.Tensor, mu_b: torch.Tensor, sig_b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared 2-Wasserstein distance between diagonal Gaussians.

    ``W2^2(a_n, b_m) = ||mu_a[n] - mu_b[m]||^2 + ||sig_a[n] - sig_b[m]||^2`` for every pair (n, m) of each sample
    (truly pairwise, not only n = m); sigma is a standard deviation (``exp(log_sigma)``), not a log.

    Args:
        mu_a, sig_a: ``(B, N, D)`` means and standard deviations of set a.
        mu_b, sig_b: ``(B, M, D)`` of set b.

    Returns:
        ``(B, N, M)``, >= 0, differentiable in all four inputs.

    Example:
        >>> mu, sig = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
        >>> w2_pairwise(mu, sig, mu + 1, sig).shape
        torch.Size([1, 2, 2])
    """
    check_shape(mu_a, "mu_a", (None, None, None))
    b, _, d = mu_a.shape
    check_shape(sig_a, "sig_a", tuple(mu_a.shape))
    check_shape(mu_b, "mu_b", (b, None, d))
    check_shape(sig_b, "sig_b", tuple(mu_b.shape))
    with float32_inputs(mu_a, sig_a, mu_b, sig_b) as (mu_a, sig_a, mu_b, sig_b):
        return _sq_dist(mu_a, mu_b) + _sq_dist(sig_a, sig_b)


def attention_token_weights(attn: torch.Tensor, mask: torch.Tensor, low: float = 0.1,
                            high: float = 0.9) -> torch.Tensor:
    """Per-token weights from CLS->token attention (MGCA's recipe): clip, zero padding, renormalise.

    Each row's attention is clipped to its ``[low, high]`` quantiles (linear interpolation) computed over the real
    tokens only, set to 0 on padding and divided by its sum. A row whose clipped attention sums to 0 gets uniform
    weights over its real tokens; a row without real tokens is all 0.

    Args:
        attn: ``(B, N)`` non-negative attention (padding may hold anything).
        mask: ``(B, N)`` bool, True on real tokens.
        low, high: quantile levels, ``0 <= low <= high <= 1``.

    Returns:
        ``(B, N)`` weights, each row summing to 1 over its real tokens.

    Example:
        >>> w = attention_token_weights(torch.tensor([[0.7, 0.2, 0.1, 9.0]]), torch.tensor([[True, True, True, False]]))
        >>> round(float(w.sum()), 6), float(w[0, 3])
        (1.0, 0.0)
    """
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"low and high must satisfy 0 <= low <= high <= 1, got low={low}, high={high}.")
    check_shape(attn, "attn", (None, None))
    check_mask(mask, "mask", tuple(attn.shape))
    with float32_inputs(attn) as (a,):
        a = torch.where(mask, a, torch.full_like(a, float("nan")))
        q = torch.tensor([low, high], dtype=a.dtype, device=a.device)
        lo, hi = torch.nanquantile(a, q, dim=1, keepdim=True)  # NaN for rows without real tokens
        a = torch.minimum(torch.maximum(a, lo), hi)
        a = torch.where(mask, a, torch.zeros_like(a))
        total = a.sum(1, keepdim=True)
        uniform = mask.to(a.dtype) / mask.sum(1, keepdim=True).clamp_min(1)
        ok = total > 0
        return torch.where(ok, a / torch.where(ok, total, torch.ones_like(total)), uniform)


def _check_dist(dists: Mapping, key: str, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if key not in dists:
        raise ValueError(f"dists is missing key {key!r}; it needs {_DIST_KEYS}, each a (mu, sigma) pair.")
    pair = dists[key]
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"dists[{key!r}] must be a (mu, sigma) pair.")
    mu, sig = pair
    check_shape(mu, f"dists[{key!r}] mu", (ref.shape[0], ref.shape[1], None))
    check_shape(sig, f"dists[{key!r}] sigma", tuple(mu.shape))
    return mu, sig


class CSSLoss(_Loss):
    """L_CSS = (L_V2T + L_T2V) / 2, contrast inside each pair between tokens and their attended counterparts.

    For sample i, with ``S[p, k] = sim(v^p, t~^k) / tau`` over its P patch slots:
    ``l_V2T(p) = -(log softmax_k S[p, k]|_{k=p} + log softmax_k S^T[p, k]|_{k=p}) / 2`` (the second term is
    ``sim(t~^p, v^k) / tau``), and ``L_V2T,i = sum_p a_p l_V2T(p)``. L_T2V is the mirror with words ``t^w``
    against attended patches ``v~^k`` over the real words only (padded rows and columns excluded). Token weights
    ``a``: ``"uniform"`` = 1 / (number of real tokens); ``"attention"`` = :func:`attention_token_weights` of the
    CLS->token attention (detached). A sample without real words contributes 0 to L_T2V.

    PDT supervision (``pdt_mode``), with ``W = w2_pairwise`` between a token set and its attended set:

    - ``"modulate"`` (default, the authors' code): ``c = sigmoid(W / (||mu_a - mu_b||^2 + eps))``, logits
      ``S' = 1 - (1 - S) * c`` (S already divided by tau), then the cross-entropy; the second term uses ``S'^T``.
    - ``"soft_targets"``: targets ``q = softmax(-W / soft_temperature)`` per row (``W^T`` for the second term),
      loss = soft cross-entropy ``-sum_k q_k log softmax(S)_k``.
    - ``"none"``: plain CSS; ``dists`` is ignored.

    Gradients reach the PDT through ``dists`` in ``"modulate"`` and ``"soft_targets"``.

    Args:
        temperature: tau (> 0), default 0.07.
        pdt_mode: "modulate" | "soft_targets" | "none".
        token_weighting: "uniform" | "attention".
        soft_temperature: tau_w (> 0) of the soft targets.
        eps: (> 0) stabiliser of the modulation's denominator.
        reduction: "mean" | "sum" | "none" (per-sample ``(L_V2T,i + L_T2V,i) / 2``, shape ``(B,)``).
    """

    def __init__(self, temperature: float = 0.07, pdt_mode: str = "modulate", token_weighting: str = "uniform",
                 soft_temperature: float = 1.0, eps: float = 1e-6, reduction: str = "mean") -> None:
        check_choice(reduction, "reduction", REDUCTIONS)
        super().__init__(reduction=reduction)
        self.temperature = check_temperature(temperature)
        self.pdt_mode = check_choice(pdt_mode, "pdt_mode", _PDT_MODES)
        self.token_weighting = check_choice(token_weighting, "token_weighting", _WEIGHTINGS)
        self.soft_temperature = check_temperature(soft_temperature, "soft_temperature")
        self.eps = check_temperature(eps, "eps")

    def _direction(self, x: torch.Tensor, att: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                   dist_x: Optional[tuple], dist_att: Optional[tuple]) -> torch.Tensor:
        """Per-sample loss ``(B,)`` of one direction: tokens x ``(B, N, D)`` against attended tokens att."""
        s = torch.einsum("bnd,bkd->bnk", x, att) / self.temperature  # s[n, k] = sim(x^n, att^k) / tau
        valid = mask[:, :, None] & mask[:, None, :]  # symmetric, so it also serves the transposed term
        targets = [None, None]  # None: hard target k = n; else soft targets per row
        if self.pdt_mode != "none":
            d_mu = _sq_dist(dist_x[0], dist_att[0])
            w2 = d_mu + _sq_dist(dist_x[1], dist_att[1])  # (B, N, N): rows x^n, columns att^k
            if self.pdt_mode == "modulate":
                s = 1 - (1 - s) * torch.sigmoid(w2 / (d_mu + self.eps))
            else:
                targets = [torch.where(valid, masked_log_softmax(-m / self.soft_temperature, valid).exp(), 0.0)
                           for m in (w2, w2.transpose(1, 2))]
        diag = torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
        per_token = torch.zeros_like(weights)
        for logits, q in zip((s, s.transpose(1, 2)), targets):  # second term: sim(att^n, x^k) / tau
            logp = masked_log_softmax(logits, valid)  # 0 at invalid entries and on padded rows
            per_token = per_token - (logp * (diag if q is None else q)).sum(-1) / 2
        return (torch.where(mask, per_token, 0.0) * weights).sum(-1)

    def forward(self, patches: torch.Tensor, att_words: torch.Tensor, words: torch.Tensor,
                att_patches: torch.Tensor, word_mask: torch.Tensor, dists: Optional[Mapping] = None,
                patch_attn: Optional[torch.Tensor] = None, word_attn: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            patches: ``(B, P, D)`` L2-normalised patch embeddings ``v^p``.
            att_words: ``(B, P, D)`` attended words ``t~^p`` of each patch (normalised).
            words: ``(B, W, D)`` L2-normalised word embeddings ``t^w`` (padding may hold anything).
            att_patches: ``(B, W, D)`` attended patches ``v~^w`` of each word.
            word_mask: ``(B, W)`` bool, True on real words.
            dists: ``{"patches", "att_words", "words", "att_patches"} -> (mu, sigma)``, each ``(B, N, Dm)`` with N
                the token count of the matching tensor; required unless ``pdt_mode == "none"``.
            patch_attn: ``(B, P)`` CLS->patch attention; required with ``token_weighting="attention"``.
            word_attn: ``(B, W)`` CLS->word attention; required with ``token_weighting="attention"``.

        Returns:
            scalar, or ``(B,)`` with ``reduction="none"``.

        Example:
            >>> n = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)
            >>> m = torch.tensor([[True, True, False], [True, True, True]])
            >>> CSSLoss(pdt_mode="none")(n(2, 4, 8), n(2, 4, 8), n(2, 3, 8), n(2, 3, 8), m).shape
            torch.Size([])
        """
        check_shape(patches, "patches", (None, None, None))
        b, p, d = patches.shape
        check_shape(att_words, "att_words", (b, p, d))
        check_shape(words, "words", (b, None, d))
        w = words.shape[1]
        check_shape(att_patches, "att_patches", (b, w, d))
        check_mask(word_mask, "word_mask", (b, w))
        patch_mask = torch.ones(b, p, dtype=torch.bool, device=patches.device)
        dv = dt = (None, None)
        if self.pdt_mode != "none":
            if dists is None:
                raise ValueError(f"pdt_mode={self.pdt_mode!r} needs dists (the PDT's (mu, sigma) of {_DIST_KEYS}); "
                                 "pass them or use pdt_mode='none'.")
            dv = (_check_dist(dists, "patches", patches), _check_dist(dists, "att_words", att_words))
            dt = (_check_dist(dists, "words", words), _check_dist(dists, "att_patches", att_patches))
            for (ma, _), (mb, _), pair in ((dv[0], dv[1], "patches/att_words"), (dt[0], dt[1], "words/att_patches")):
                if ma.shape[-1] != mb.shape[-1]:
                    raise ValueError(f"dists {pair}: mu dims differ ({ma.shape[-1]} vs {mb.shape[-1]}).")
        if self.token_weighting == "attention":
            if patch_attn is None or word_attn is None:
                raise ValueError("token_weighting='attention' needs patch_attn (B, P) and word_attn (B, W).")
            check_shape(patch_attn, "patch_attn", (b, p))
            check_shape(word_attn, "word_attn", (b, w))
            a_v = attention_token_weights(patch_attn.detach(), patch_mask)
            a_t = attention_token_weights(word_attn.detach(), word_mask)
        else:
            a_v, a_t = patch_mask, word_mask  # made uniform below, in the computation dtype
        flat = [patches, att_words, words, att_patches]
        if self.pdt_mode != "none":
            flat += [*dv[0], *dv[1], *dt[0], *dt[1]]
        with float32_inputs(*flat) as flat:
            # zero the padded word slots of every word-side tensor: garbage (even NaN) never reaches the graph
            word_side = {2, 3, 8, 9, 10, 11}
            flat = [torch.where(word_mask[..., None], x, 0.0) if i in word_side else x for i, x in enumerate(flat)]
            v, tv, t, vt = flat[:4]
            pv = pt = (None, None)
            if self.pdt_mode != "none":
                pv = ((flat[4], flat[5]), (flat[6], flat[7]))
                pt = ((flat[8], flat[9]), (flat[10], flat[11]))
            a_v, a_t = a_v.to(v.dtype), a_t.to(v.dtype)
            if self.token_weighting == "uniform":
                a_v, a_t = a_v / p, a_t / a_t.sum(1, keepdim=True).clamp_min(1)
            l_v2t = self._direction(v, tv, patch_mask, a_v, *pv)
            l_t2v = self._direction(t, vt, word_mask, a_t, *pt)
            loss = reduce((l_v2t + l_t2v) / 2, self.reduction)
        return check_finite(loss, type(self).__name__)
