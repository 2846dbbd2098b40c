"""The one BatchNorm refresh: running statistics re-estimated as a plain average over batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def refresh_batchnorm(module: nn.Module, forward: Callable[[Any], int], batches: Iterable[Any],
                      max_images: int | None = None, skip: Callable[[str], bool] | None = None) -> int:
    """Re-estimate the running statistics of ``module``'s BatchNorm layers as the plain (cumulative) average over
    ``batches``: ``torch.optim.swa_utils.update_bn`` for any batch type and forward pass.

    The weights are not changed and the module's train/eval mode is restored. With no batch (or no layer), the
    statistics are left exactly as they were, which ``update_bn`` does not guarantee.

    Args:
        module: the network whose layers are refreshed (it runs in train mode meanwhile).
        forward: runs one batch through the network and returns its number of images.
        batches: the batches, e.g. a training loader.
        max_images: stop after the batch that reaches this many images (None: all batches).
        skip: layer name -> True to leave that layer's statistics as they were (e.g. momentum copies).

    Returns:
        The number of images seen (0: nothing was changed).
    """
    norms = [(name, m) for name, m in module.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    layers = [m for name, m in norms if not (skip and skip(name))]
    if not layers or (max_images is not None and max_images < 1):
        return 0
    kept = [(m, [b.clone() for b in m.buffers()]) for name, m in norms if skip and skip(name)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = module.training
    module.train()
    seen = 0
    try:
        for batch in batches:
            seen += int(forward(batch))
            if max_images is not None and seen >= max_images:
                break
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved):
            m.momentum = momentum
            if seen == 0:
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
        for m, buffers in kept:  # a skipped layer that the forward ran through in train mode: as it was
            for b, old in zip(m.buffers(), buffers):
                b.copy_(old)
        module.train(was_training)
    return seen
