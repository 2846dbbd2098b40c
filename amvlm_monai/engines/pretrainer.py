"""Stage-1 engine: one AMVLM pretraining step per batch on ``monai.engines.SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from amvlm_monai.engines.step import OptimStep, check_finite, check_steps, scalars
from amvlm_monai.utils.distributed import global_mean, is_distributed, sync_batchnorm
from amvlm_monai.utils.precision import autocast

__all__ = ["AMVLMPretrainer", "AMVLMObjective", "batch_names"]


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


class AMVLMObjective(nn.Module):
    """The AMVLM and its loss as one module whose ``forward`` returns every term: what DistributedDataParallel
    wraps (DDP synchronises gradients of what runs inside ``forward``; the loss calls several model methods)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images, tokens, images_aug=None, tokens_aug=None) -> dict[str, torch.Tensor]:
        return self.loss(self.model, images, tokens, images_aug, tokens_aug)


class AMVLMPretrainer(SupervisedTrainer):
    """Pretraining trainer: image-report pairs (and their ICL views) in, every loss term out.

    A batch is a dict with ``image`` (B, C, H, W), ``text`` (B reports) and, for ICL, ``image_aug`` and
    ``text_aug``. After each step the momentum copies move towards the online encoders. ``engine.state.output``
    holds ``loss`` and every term as floats, so ``StatsHandler`` and ``TensorBoardStatsHandler`` log them all.

    Under ``torchrun`` (an initialised process group of several processes) the trainer wraps the model and loss in
    DistributedDataParallel itself, with the heads' BatchNorm synchronised over ranks
    (:func:`~amvlm_monai.utils.distributed.sync_batchnorm`); the contrastive terms take their negatives from the global
    batch, and the logged terms are averaged over ranks. Give each rank its shard of the data
    (:func:`~amvlm_monai.data.datasets.rank_shard`, equal batch sizes: ``drop_last=True``).

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers: as for ``SupervisedTrainer``.
        network: an :class:`~amvlm_monai.networks.amvlm.AMVLM` (not wrapped in DDP).
        optimizer: optimiser over the trainable parameters.
        loss_function: an :class:`~amvlm_monai.losses.amvlm.AMVLMLoss`.
        amp: mixed precision (see :func:`~amvlm_monai.utils.precision.amp_dtype`: True = bfloat16 where the device
            computes it natively, float16 with a grad scaler on other GPUs, else float32).
        grad_clip: gradient-norm clipping (None or 0 disables it).
        kwargs: passed to ``SupervisedTrainer``.

    Raises:
        ValueError: a run that would train nothing (:func:`~amvlm_monai.engines.step.check_steps`): no data, or a batch
            larger than the data with ``drop_last``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Iterable,
                 network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: torch.nn.Module,
                 epoch_length: int | None = None, train_handlers: Sequence | None = None, amp: bool | str = False,
                 grad_clip: float | None = 1.0, **kwargs: Any) -> None:
        check_steps(train_data_loader, epoch_length, "pretraining")  # before any handler is attached
        device = torch.device(device)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader,
                         network=network, optimizer=optimizer, loss_function=loss_function,
                         epoch_length=epoch_length, train_handlers=train_handlers, amp=False, decollate=False,
                         **kwargs)
        self.use_amp = amp
        self.step = OptimStep(optimizer, network.parameters(), device, amp=amp, grad_clip=grad_clip)
        self.objective: nn.Module = AMVLMObjective(network, loss_function)
        if is_distributed():
            sync_batchnorm(network)
            weights = getattr(loss_function, "weights", {})
            unused = not all(w > 0 for w in weights.values()) or getattr(loss_function, "pdt_mode", "") == "none"
            self.objective = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=unused)

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
        with autocast(device, engine.step.dtype):
            terms = engine.objective(images, tokens, images_aug, tokens_aug)
        check_finite(terms, batch_names(batchdata))
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.step.backward(terms["loss"])
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.step.update()
        model.update_momentum()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        logged = {k: v for k, v in terms.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        if is_distributed():  # every rank logs the global batch's terms (one small all-reduce)
            names = sorted(logged)
            means = global_mean(torch.stack([logged[k].detach().double() for k in names]))
            logged = dict(zip(names, means))
        engine.state.output = scalars(logged)
        return engine.state.output
