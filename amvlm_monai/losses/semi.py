"""Semi-supervised pieces of stage 2: pseudo-label fusion, consistency loss, ramp-up, supervised loss factory.

Conventions: binary tasks have C = 1 (or C independent sigmoid channels) and use sigmoid; multi-class tasks have
C >= 2 softmax channels with channel 0 the background.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch.nn.modules.loss import _Loss

from amvlm_monai.losses.checks import REDUCTIONS

__all__ = [
    "fuse_pseudo_labels",
    "ConsistencyLoss",
    "sigmoid_rampup",
    "consistency_weight",
    "build_supervised_loss",
    "AUTHORS_FUSION_RANGE",
]

_MODES = ("logit", "authors")

# Range of mode="authors" for text masks in [0, 1]: sigmoid(P_T + T) with P_T, T in [0, 1].
AUTHORS_FUSION_RANGE = (0.5, 1.0 / (1.0 + math.exp(-2.0)))  # (0.5, 0.8808)


def fuse_pseudo_labels(
    teacher_logits: torch.Tensor,
    text_mask: torch.Tensor,
    lam: float = 1.0,
    mode: str = "logit",
    multiclass: bool = False,
    eps: float = 1e-6,
    detach: bool = True,
) -> torch.Tensor:
    """Fuse the teacher's prediction with the text mask into soft pseudo labels ``Y_u``.

    - ``mode="logit"``, binary: ``Y = sigmoid(teacher_logits + lam * logit(T))``. The teacher's logits *are*
      ``logit(P_T)``, so this is ``sigmoid(logit(P_T) + lam logit(T))``: a product of experts, where ``T = 0.5`` leaves
      the teacher unchanged. ``T`` is clamped to ``[eps, 1 - eps]`` before the logit.
    - ``mode="logit"``, multi-class: ``Y = softmax_c(teacher_logits_c + lam * log T_c)`` over channels, ``T_c``
      clamped below at ``eps``. ``text_mask`` needs one channel per class, background included (e.g. from a
      background prompt).
    - ``mode="authors"`` (binary only, kept for comparison; a defect of the released code): ``Y = sigmoid(P_T + T)``
      with ``P_T = sigmoid(teacher_logits)``, a double sigmoid. For ``T`` in [0, 1] its output lies in
      ``[0.5, sigmoid(2) ~ 0.881]`` (:data:`AUTHORS_FUSION_RANGE`): a pixel can never be labelled background. (In the
      released pipeline ``T`` itself had passed through one more sigmoid, ``T >= 0.5``, raising the floor to
      ``sigmoid(0.5) ~ 0.62``.)

    Args:
        teacher_logits: ``(B, C, *spatial)`` raw teacher outputs (before sigmoid/softmax).
        text_mask: ``(B, C, *spatial)`` text masks in [0, 1] at the same resolution.
        lam: weight lambda >= 0 of the text term (0 gives the teacher alone).
        mode: ``"logit"`` (default) or ``"authors"``.
        multiclass: softmax over channels (C >= 2) instead of per-channel sigmoid.
        eps: clamp for the logit/log of ``T``.
        detach: return a target without gradient (default), so the consistency loss trains only the student.

    Returns:
        ``(B, C, *spatial)`` probabilities.

    Example:
        >>> fuse_pseudo_labels(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.8)).flatten()
        tensor([0.8000, 0.8000, 0.8000, 0.8000])
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}.")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}.")
    if teacher_logits.ndim < 3:
        raise ValueError(f"teacher_logits must be (B, C, *spatial), got shape {tuple(teacher_logits.shape)}.")
    if text_mask.shape != teacher_logits.shape:
        raise ValueError(
            f"text_mask must have the teacher_logits shape {tuple(teacher_logits.shape)}, got {tuple(text_mask.shape)}."
        )
    if multiclass and teacher_logits.shape[1] < 2:
        raise ValueError(
            f"multiclass=True needs C >= 2 channels, got teacher_logits shape {tuple(teacher_logits.shape)}."
        )
    if mode == "authors":
        if multiclass:
            raise ValueError(
                "mode='authors' is binary only (the released code has no multi-class path); use mode='logit'."
            )
        out = torch.sigmoid(torch.sigmoid(teacher_logits) + text_mask)
    elif multiclass:
        out = torch.softmax(teacher_logits + lam * torch.log(text_mask.clamp(min=eps)), dim=1)
    else:
        out = torch.sigmoid(teacher_logits + lam * torch.logit(text_mask, eps=eps))
    return out.detach() if detach else out


def sigmoid_rampup(epoch: float, length: float) -> float:
    """Sigmoid-shaped ramp-up ``exp(-5 (1 - t)^2)`` with ``t = clip(epoch / length, 0, 1)``; 1.0 when ``length == 0``.

    Example:
        >>> sigmoid_rampup(0, 10), sigmoid_rampup(5, 10), sigmoid_rampup(10, 10)
        (0.006737946999085467, 0.2865047968601901, 1.0)
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length!r}.")
    if length == 0:
        return 1.0
    t = min(max(float(epoch) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def consistency_weight(epoch: float, w_max: float, length: float) -> float:
    """``w(t) = w_max * sigmoid_rampup(epoch, length)`` (keys ``consistency_weight`` and ``rampup_epochs``)."""
    if w_max < 0:
        raise ValueError(f"w_max must be >= 0, got {w_max!r}.")
    return float(w_max) * sigmoid_rampup(epoch, length)


class ConsistencyLoss(_Loss):
    """Dice + cross-entropy of the student's logits against soft pseudo labels.

    Binary: MONAI ``DiceLoss(sigmoid=True, soft_label=True)`` + ``BCEWithLogits``; multi-class: ``DiceLoss(softmax=True,
    soft_label=True)`` + soft-target cross-entropy ``-sum_c y_c log softmax(x)_c``. ``soft_label=True`` makes the Dice
    term exactly 0 when the student's probabilities equal the targets (MONAI's default formulation does not). The CE
    term is minimal (equal to the targets' entropy, with zero gradient) at the same point.

    Args:
        multiclass: softmax/CE over channels (C >= 2) instead of sigmoid/BCE.
        dice_weight: weight of the Dice term (>= 0).
        ce_weight: weight of the (B)CE term (>= 0); not both 0.
        include_background: keep channel 0 in the Dice term (multi-class only; MONAI's default True).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over samples; ``"none"`` gives ``(B,)``: per sample, Dice
            averaged over channels plus CE averaged over pixels (and channels for BCE).
    """

    def __init__(
        self,
        multiclass: bool = False,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = True,
        reduction: str = "mean",
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        super().__init__(reduction=reduction)
        if not (math.isfinite(dice_weight) and dice_weight >= 0):
            raise ValueError(f"dice_weight must be a finite number >= 0, got {dice_weight!r}.")
        if not (math.isfinite(ce_weight) and ce_weight >= 0):
            raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}.")
        if dice_weight == 0 and ce_weight == 0:
            raise ValueError("dice_weight and ce_weight cannot both be 0.")
        self.multiclass = bool(multiclass)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.dice = DiceLoss(
            include_background=include_background or not multiclass,
            sigmoid=not multiclass,
            softmax=multiclass,
            soft_label=True,
            reduction="none",
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: student logits ``(B, C, *spatial)``.
            target: soft targets in [0, 1] of the same shape (e.g. from :func:`fuse_pseudo_labels`; multi-class targets
                sum to 1 over channels).

        Returns:
            Scalar (``"mean"``/``"sum"``) or ``(B,)`` (``"none"``).

        Example:
            >>> target = torch.full((2, 1, 4, 4), 0.9)
            >>> ConsistencyLoss()(torch.logit(target), target)  # Dice 0 + BCE = entropy(0.9)
            tensor(0.3251)
        """
        if input.ndim < 3:
            raise ValueError(f"input must be (B, C, *spatial), got shape {tuple(input.shape)}.")
        if target.shape != input.shape:
            raise ValueError(f"target must have the input shape {tuple(input.shape)}, got {tuple(target.shape)}.")
        if self.multiclass and input.shape[1] < 2:
            raise ValueError(f"multiclass=True needs C >= 2 channels, got input shape {tuple(input.shape)}.")
        target = target.to(input.dtype)
        b = input.shape[0]
        per_sample = input.new_zeros(b)
        if self.dice_weight:
            per_sample = per_sample + self.dice_weight * self.dice(input, target).reshape(b, -1).mean(dim=1)
        if self.ce_weight:
            if self.multiclass:
                ce = -(target * F.log_softmax(input, dim=1)).sum(dim=1)
            else:
                ce = F.binary_cross_entropy_with_logits(input, target, reduction="none")
            per_sample = per_sample + self.ce_weight * ce.reshape(b, -1).mean(dim=1)
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample


def build_supervised_loss(
    multiclass: bool = False,
    include_background: bool = True,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> DiceCELoss:
    """Supervised Dice + CE on labelled images: a MONAI ``DiceCELoss``.

    - binary (``multiclass=False``): ``DiceCELoss(sigmoid=True)`` with Dice + ``BCEWithLogits``; labels ``(B, C, ...)``
      in {0, 1} (C = 1: the foreground).
    - multi-class: ``DiceCELoss(softmax=True, to_onehot_y=True)``; labels are class indices ``(B, 1, ...)``.

    Args:
        multiclass: see above.
        include_background: keep channel 0 in the Dice term (multi-class; irrelevant for one channel).
        lambda_dice: weight of the Dice term (>= 0).
        lambda_ce: weight of the CE term (>= 0).
    """
    return DiceCELoss(
        include_background=include_background or not multiclass,
        sigmoid=not multiclass,
        softmax=bool(multiclass),
        to_onehot_y=bool(multiclass),
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
    )
