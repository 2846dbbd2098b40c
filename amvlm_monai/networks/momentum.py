"""Momentum (EMA) copies of encoders and heads, as used for the ICL view in stage 1."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["MomentumCopy", "momentum_copy", "momentum_update"]


class MomentumCopy(nn.Module):
    """A frozen deep copy of a module: dropout always off; BatchNorm on the batch's statistics while training.

    ``train()`` on the copy or on any parent leaves its dropout off; in training mode its BatchNorm layers normalise
    with the statistics of the batch they see (as the momentum encoders of MoCo and ALBEF, which run in training mode)
    and never update their running buffers; in eval mode they use the running buffers, as the online module does.
    Running statistics would be wrong while training: :func:`momentum_update` averages the online
    module's running statistics with m = 0.995, so they lag hundreds of steps behind, and a head whose input varies
    little across a batch (a sentence encoder's [CLS] does) then maps every sample to nearly the same vector
    (measured: every report's momentum embedding identical to 3 decimals, the text ICL term stuck at ln(B)).
    The forward pass runs without autograd. Attribute access falls through to the wrapped module (e.g.
    ``copy.hidden_size``, ``copy.tokenize``). In a ``state_dict`` the copy's entries sit under ``module.``.

    Args:
        module: the online module to copy (it is not modified).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        if isinstance(module, MomentumCopy):
            module = module.module
        self.module = copy.deepcopy(module)
        for p in self.module.parameters():
            p.requires_grad_(False)
        for bn in self._batch_norms():
            bn.momentum = 0.0  # batch statistics in a training-mode pass leave the running buffers as they are
        self.train(True)

    def _batch_norms(self) -> list[nn.Module]:
        return [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "MomentumCopy":
        """Dropout off whatever ``mode``; BatchNorm on batch statistics when ``mode`` is True."""
        super().train(False)
        for bn in self._batch_norms():
            bn.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(super().__getattr__("module"), name)


def momentum_copy(module: nn.Module) -> MomentumCopy:
    """A :class:`MomentumCopy` of ``module``: deep copy, ``requires_grad=False``, eval mode for good."""
    return MomentumCopy(module)


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, MomentumCopy) else m


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, m: float = 0.995, buffers: bool = True) -> None:
    """EMA step ``target = m * target + (1 - m) * source`` over parameters **and** floating buffers.

    Integer and bool buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied from ``source``.
    Either side may be a :class:`MomentumCopy` (its inner module is used).
    With ``buffers=False`` only the parameters move: the target keeps its own buffers (a Mean-Teacher teacher whose
    BatchNorm statistics come from its own forward passes).

    Args:
        target: the momentum copy, updated in place.
        source: the online module.
        m: momentum in [0, 1]; 1 keeps the target, 0 copies the source.
        buffers: also average (floating) and copy (integer) the buffers.

    Raises:
        ValueError: ``m`` outside [0, 1], or the two modules' parameter/buffer names or shapes differ.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"m must be in [0, 1], got {m}.")
    target, source = _unwrap(target), _unwrap(source)
    pairs = [("parameter", dict(target.named_parameters()), dict(source.named_parameters()))]
    if buffers:
        pairs.append(("buffer", dict(target.named_buffers()), dict(source.named_buffers())))
    floats: dict[tuple, tuple[list, list]] = {}  # (device, dtype) -> target and source tensors, for one foreach call
    for kind, tgt, src in pairs:
        if tgt.keys() != src.keys():
            diff = sorted(set(tgt) ^ set(src))
            raise ValueError(f"target and source differ in {kind} names: {diff}.")
        bad = [k for k in tgt if tgt[k].shape != src[k].shape]
        if bad:
            raise ValueError(f"target and source differ in {kind} shapes: {bad}.")
        for k, t in tgt.items():
            s = src[k].detach().to(device=t.device, dtype=t.dtype)
            if t.is_floating_point() or t.is_complex():
                group = floats.setdefault((t.device, t.dtype), ([], []))
                group[0].append(t)
                group[1].append(s)
            else:
                t.copy_(s)
    # m * t + (1 - m) * s as t + (1 - m) (s - t): one pass over the memory instead of two (mul_ then add_)
    for tgts, srcs in floats.values():
        torch._foreach_lerp_(tgts, srcs, 1.0 - m)
