"""Stage-1 engine: one AMVLM pretraining step per batch on ``monai.engines.SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from amvlm_monai.engines.step import OptimStep, autocast, check_finite, scalars

__all__ = ["AMVLMPretrainer", "batch_names"]


def batch_names(batch: dict, key: str = "image", limit: int = 4) -> str:
    """The first few file names of a batch, for error messages."""
    img = batch.get(key)
    meta = getattr(img, "meta", None) or batch.get(f"{key}_meta_dict") or {}
    names = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    if names is None:
        names = batch.get(f"{key}_file")  # the path kept by the loading chain (meta is dropped with augmentation)
    if names is None:
        names = batch.get("id")
    if isinstance(names, str):
        names = [names]
    return ", ".join(map(str, list(names)[:limit])) if names is not None else "<unnamed batch>"


class AMVLMPretrainer(SupervisedTrainer):
    """Pretraining trainer: image-report pairs (and their ICL views) in, every loss term out.

    A batch is a dict with ``image`` (B, C, H, W), ``text`` (B reports) and, for ICL, ``image_aug`` and
    ``text_aug``. After each step the momentum copies move towards the online encoders. ``engine.state.output``
    holds ``loss`` and every term as floats, so ``StatsHandler`` and ``TensorBoardStatsHandler`` log them all.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers: as for ``SupervisedTrainer``.
        network: an :class:`~amvlm_monai.networks.amvlm.AMVLM`.
        optimizer: optimiser over the trainable parameters.
        loss_function: an :class:`~amvlm_monai.losses.amvlm.AMVLMLoss`.
        amp: mixed precision (float16 with a grad scaler on CUDA, bfloat16 on CPU).
        grad_clip: gradient-norm clipping (None or 0 disables it).
        kwargs: passed to ``SupervisedTrainer``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Iterable,
                 network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: torch.nn.Module,
                 epoch_length: int | None = None, train_handlers: Sequence | None = None, amp: bool = False,
                 grad_clip: float | None = 1.0, **kwargs: Any) -> None:
        device = torch.device(device)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader,
                         network=network, optimizer=optimizer, loss_function=loss_function,
                         epoch_length=epoch_length, train_handlers=train_handlers, amp=False, decollate=False,
                         **kwargs)
        self.use_amp = amp
        self.step = OptimStep(optimizer, network.parameters(), device, amp=amp, grad_clip=grad_clip)

    def _iteration(self, engine: "AMVLMPretrainer", batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device, model = engine.state.device, engine.network
        images = batchdata["image"].to(device, non_blocking=engine.non_blocking)
        tokens = model.tokenize(batchdata["text"], device)
        needs_view = engine.loss_function.weights["icl"] > 0
        images_aug = batchdata["image_aug"].to(device) if needs_view else None
        tokens_aug = model.tokenize(batchdata["text_aug"], device) if needs_view else None
        model.train()
        with autocast(device, engine.use_amp):
            terms = engine.loss_function(model, images, tokens, images_aug, tokens_aug)
        check_finite(terms, batch_names(batchdata))
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.step(terms["loss"])
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        model.update_momentum()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.state.output = scalars(terms)
        return engine.state.output
