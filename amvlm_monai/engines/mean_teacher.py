"""Stage-2 engine: one Mean-Teacher trainer that covers the supervised, Mean-Teacher and text-guided variants.

- Supervised only: no ``unlabeled_loader``.
- Mean-Teacher: ``unlabeled_loader`` and ``teacher``; pseudo labels are the teacher's probabilities.
- Text-guided (AMVLM): also ``guidance`` (:class:`TextGuidance`); pseudo labels fuse the teacher with the text mask,
  and, when the guidance has a ``tg_loss``, its decoder trains with L_tg in the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from amvlm_monai.engines.ema import TEACHER_BN, ema_update, own_batch_statistics, recompute_bn_statistics
from amvlm_monai.engines.guidance import TextGuidance
from amvlm_monai.engines.pretrainer import batch_names
from amvlm_monai.engines.step import OptimStep, check_finite, check_steps, scalars
from amvlm_monai.evaluation.metrics import segmentation_scores
from amvlm_monai.losses.semi import consistency_weight
from amvlm_monai.utils.precision import autocast

__all__ = ["MeanTeacherTrainer"]


@torch.no_grad()
def text_mask_dice(masks: torch.Tensor, label: torch.Tensor, multiclass: bool) -> Optional[torch.Tensor]:
    """Dice of the text masks (> 0.5) against the labels: how good the text prompts alone are (a diagnostic).

    The mean, over images and foreground classes present in the label, of the per-image Dice
    (:func:`~amvlm_monai.evaluation.metrics.segmentation_scores` with ``ignore_empty=True``).

    Args:
        masks: (B, K, H, W) text masks in [0, 1].
        label: (B, 1, H, W) binary, or class indices with K = C - 1 foreground masks.

    Returns:
        A scalar tensor, or None when no image of the batch has a foreground pixel.
    """
    if multiclass:
        target = F.one_hot(label[:, 0].long(), masks.shape[1] + 1).movedim(-1, 1)[:, 1:].float()
    else:
        target = (label > 0.5).float()
    dice, _ = segmentation_scores((masks > 0.5).float(), target, include_background=True, ignore_empty=True)
    dice = dice[~dice.isnan()]
    return dice.mean() if dice.numel() else None


class MeanTeacherTrainer(SupervisedTrainer):
    """Semi-supervised trainer: supervised loss on labelled batches, consistency to pseudo labels on unlabelled ones.

    Labelled and unlabelled batches come from two independent loaders. An epoch lasts
    ``max(len(labelled), len(unlabelled))`` steps (unless ``epoch_length`` is given); both iterators restart at
    every epoch, so every unlabelled image is used once per epoch, and the labelled loader cycles within it (an
    epoch boundary is then a complete resume point, see :class:`~amvlm_monai.engines.state.TrainingState`).
    After each step the teacher is an EMA of the student's parameters (alpha_t = min(1 - 1/(t+1), 0.99)); its BatchNorm
    statistics follow ``teacher_bn`` (see :mod:`amvlm_monai.engines.ema`).
    ``engine.state.output`` holds ``loss``, ``sup`` and, when active, ``consistency``, ``consistency_weight``, ``tg`` and
    ``text_mask_dice`` (the text masks' Dice against the labelled batch, every ``diagnostic_interval`` iterations: a
    diagnostic, not a loss).

    Args:
        device, max_epochs, train_data_loader (labelled: ``image`` (B,C,H,W), ``label`` (B,1,H,W), ``text``),
            network (the student), optimizer, loss_function (supervised: logits, label -> loss; multi-class labels
            are class indices (B, 1, H, W)), train_handlers:
            as for ``SupervisedTrainer``.
        unlabeled_loader: batches with ``image`` and ``text``; None trains supervised only.
        teacher: the EMA copy (:func:`~amvlm_monai.engines.ema.make_teacher`); needed with an unlabelled loader.
        consistency_loss: student logits vs pseudo-label probabilities (e.g. ``ConsistencyLoss``).
        consistency_max: w_max of the ramp-up; rampup_epochs: its length in epochs.
        guidance: optional :class:`TextGuidance`.
        multiclass: softmax outputs (one-hot labels built from index labels) instead of sigmoid.
        ema_max_alpha: the teacher's EMA ceiling (0.99).
        teacher_noise: std of the Gaussian noise (clipped at twice the std) added to the teacher's input, so that
            student and teacher see different perturbations (Tarvainen and Valpola's Mean-Teacher); 0 disables.
        teacher_bn: the teacher's BatchNorm statistics: "batch" (default: parameter-only EMA, the teacher labels with
            batch statistics and its running statistics follow its own activations), "recompute" (re-estimated on
            ``bn_batches`` unlabelled batches at every epoch start and before validation) or "ema" (averaged like
            the parameters; collapses on the demo, kept for comparison).
        bn_batches: unlabelled batches used by ``teacher_bn="recompute"``.
        amp, grad_clip: see :class:`~amvlm_monai.engines.step.OptimStep`.
        diagnostic_interval: compute ``text_mask_dice`` (the text masks of the labelled batch against its labels, which
            costs a pass of the frozen image tower) at iterations 1, 1 + N, 1 + 2N, ...; 0 never. L_tg and the pseudo
            labels use the unlabelled images only, as the authors' code does.

    Raises:
        ValueError: a run that would train nothing (:func:`~amvlm_monai.engines.step.check_steps`): no labelled or no
            unlabelled data, or a zero ``epoch_length``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Iterable,
                 network: nn.Module, optimizer: torch.optim.Optimizer, loss_function: Callable,
                 unlabeled_loader: Optional[Iterable] = None, teacher: Optional[nn.Module] = None,
                 consistency_loss: Optional[Callable] = None, consistency_max: float = 1.0,
                 rampup_epochs: float = 10.0, guidance: Optional[TextGuidance] = None, multiclass: bool = False,
                 ema_max_alpha: float = 0.99, teacher_noise: float = 0.1, teacher_bn: str = "batch",
                 bn_batches: int = 8, epoch_length: Optional[int] = None,
                 train_handlers: Optional[Sequence] = None, amp: bool = False, grad_clip: Optional[float] = None,
                 diagnostic_interval: int = 50, **kwargs: Any) -> None:
        if unlabeled_loader is not None and (teacher is None or consistency_loss is None):
            raise ValueError("an unlabeled_loader needs a teacher and a consistency_loss.")
        if guidance is not None and unlabeled_loader is None:
            raise ValueError("text guidance refines pseudo labels: it needs an unlabeled_loader.")
        check_steps(train_data_loader, epoch_length, "labelled training")  # before any handler is attached
        if unlabeled_loader is not None:
            check_steps(unlabeled_loader, None, "unlabelled training")
        if epoch_length is None and unlabeled_loader is not None:
            epoch_length = max(len(train_data_loader), len(unlabeled_loader))  # type: ignore[arg-type]
        device = torch.device(device)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader,
                         network=network, optimizer=optimizer, loss_function=loss_function,
                         epoch_length=epoch_length, train_handlers=train_handlers, amp=False, decollate=False,
                         **kwargs)
        self.unlabeled_loader = unlabeled_loader
        self.teacher = teacher
        self.consistency_loss = consistency_loss
        self.consistency_max = consistency_max
        self.rampup_epochs = rampup_epochs
        self.guidance = guidance
        self.multiclass = multiclass
        self.ema_max_alpha = ema_max_alpha
        if teacher_noise < 0:
            raise ValueError(f"teacher_noise must be >= 0, got {teacher_noise}.")
        self.teacher_noise = teacher_noise
        if teacher_bn not in TEACHER_BN:
            raise ValueError(f"teacher_bn must be one of {TEACHER_BN}, got {teacher_bn!r}.")
        if not isinstance(bn_batches, int) or bn_batches < 1:
            raise ValueError(f"bn_batches must be a positive int, got {bn_batches!r}.")
        self.teacher_bn = teacher_bn
        self.bn_batches = bn_batches
        if diagnostic_interval < 0:
            raise ValueError(f"diagnostic_interval must be >= 0, got {diagnostic_interval}.")
        self.diagnostic_interval = diagnostic_interval
        self.use_amp = amp
        params = list(network.parameters()) + (list(guidance.parameters()) if guidance is not None else [])
        self.step = OptimStep(optimizer, params, device, amp=amp, grad_clip=grad_clip)
        self._unlabeled_iter = None
        if unlabeled_loader is not None:
            if teacher_bn == "recompute":
                self.add_event_handler(Events.EPOCH_STARTED, lambda engine: engine.prepare_teacher())
            self.add_event_handler(Events.EPOCH_STARTED, self._restart_unlabeled)
        self.add_event_handler(Events.EPOCH_STARTED, self._restart_labeled)

    def _restart_unlabeled(self, engine: "MeanTeacherTrainer") -> None:
        self._unlabeled_iter = iter(self.unlabeled_loader)

    def prepare_teacher(self) -> None:
        """Make the teacher's BatchNorm statistics fit its weights before it labels or is validated.

        Only ``teacher_bn="recompute"`` has work to do: it re-estimates them on ``bn_batches`` unlabelled batches.
        """
        if self.teacher is None or self.teacher_bn != "recompute":
            return
        from itertools import islice

        images = (b["image"] for b in islice(self.unlabeled_loader, self.bn_batches))
        recompute_bn_statistics(self.teacher, images, self.state.device)

    def _restart_labeled(self, engine: "MeanTeacherTrainer") -> None:
        # a fresh labelled pass each epoch (ignite would otherwise carry a part-used iterator over), so that an
        # epoch boundary is a clean point to resume from
        engine.set_data(engine.data_loader)

    def _next_unlabeled(self) -> dict:
        try:
            return next(self._unlabeled_iter)
        except (StopIteration, TypeError):  # exhausted mid-epoch (epoch_length given) or not started
            self._restart_unlabeled(self)
            return next(self._unlabeled_iter)

    def _iteration(self, engine: "MeanTeacherTrainer", batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        x_l = batchdata["image"].to(device)
        y_l = batchdata["label"].to(device)
        n_l = x_l.shape[0]
        unl = engine._next_unlabeled() if engine.unlabeled_loader is not None else None
        x_all = x_l if unl is None else torch.cat([x_l, unl["image"].to(device)])
        engine.network.train()
        if engine.guidance is not None:
            engine.guidance.train()
        terms: dict[str, torch.Tensor] = {}
        with autocast(device, engine.use_amp):
            # labelled and unlabelled images go through the student separately: in one batch, BatchNorm would couple
            # them, and the supervised loss learns to exploit the unlabelled images' share of the batch statistics
            # (measured: the student's eval-mode foreground drifts from 2 % to 30 %, even with no consistency loss)
            logits = engine.network(x_l)
            terms["sup"] = engine.loss_function(logits, y_l if engine.multiclass else y_l.float()).mean()
            loss = terms["sup"]
            if unl is not None:
                x_u = x_all[n_l:]
                logits_u = engine.network(x_u)
                noise = (torch.randn_like(x_u) * engine.teacher_noise).clamp(-2 * engine.teacher_noise,
                                                                              2 * engine.teacher_noise)
                if engine.teacher_bn == "batch":
                    with own_batch_statistics(engine.teacher) as teacher:
                        teacher_logits = teacher(x_u + noise).float()
                else:
                    with torch.no_grad():
                        engine.teacher.eval()
                        teacher_logits = engine.teacher(x_u + noise).float()
                if engine.guidance is not None:
                    masks, tg = engine.guidance(x_u, list(unl["text"]))  # the frozen towers see unlabelled images only
                    if engine.diagnostic_interval and (engine.state.iteration - 1) % engine.diagnostic_interval == 0:
                        masks_l = engine.guidance.text_masks(x_l, list(batchdata["text"]))
                        dice = text_mask_dice(masks_l, y_l, engine.multiclass)
                        if dice is not None:
                            terms["text_mask_dice"] = dice
                    pseudo = engine.guidance.fuse(teacher_logits, masks.float(), engine.multiclass)
                    if tg is not None:
                        terms["tg"] = tg
                        loss = loss + engine.guidance.tg_weight * tg
                else:
                    pseudo = torch.softmax(teacher_logits, 1) if engine.multiclass else torch.sigmoid(teacher_logits)
                weight = consistency_weight(engine.state.epoch - 1, engine.consistency_max, engine.rampup_epochs)
                terms["consistency"] = engine.consistency_loss(logits_u.float(), pseudo.detach()).mean()
                terms["consistency_weight"] = torch.tensor(float(weight))
                loss = loss + weight * terms["consistency"]
        terms["loss"] = loss
        check_finite(terms, batch_names(batchdata))
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.step.backward(loss)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.step.update()
        if engine.teacher is not None:
            student = getattr(engine.network, "module", engine.network)  # unwrap DistributedDataParallel
            ema_update(engine.teacher, student, engine.state.iteration, engine.ema_max_alpha,
                       buffers=engine.teacher_bn == "ema")
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.state.output = scalars(terms)
        return engine.state.output
