"""What both trainers share: autocast, a non-finite check, scaled backward, clipping and the optimiser step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["autocast", "check_finite", "OptimStep", "scalars", "trainable_parameters", "param_groups"]


def trainable_parameters(modules: Iterable[torch.nn.Module | None]) -> list[torch.nn.Parameter]:
    """The parameters that need gradients over several modules (None entries skipped), each once."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in (module.parameters() if module is not None else ()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (float16) and CPU (bfloat16); a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def check_finite(terms: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Raise FloatingPointError naming every non-finite term (and ``where``: e.g. the batch's files).

    Kept instead of ignite's ``TerminateOnNan``, which looks at the output after the optimiser step has already
    applied the non-finite gradients, names no term or file, and ends the run as if it had finished.
    """
    bad = {k: float(v.detach().float().mean()) for k, v in terms.items()
           if isinstance(v, torch.Tensor) and not torch.isfinite(v.detach()).all()}
    if bad:
        raise FloatingPointError(f"non-finite loss {bad}{' at ' + where if where else ''}; "
                                 "lower the learning rate, disable AMP, or check the inputs.")


def scalars(terms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Detached Python floats of scalar tensors (what the engines put in ``engine.state.output``)."""
    return {k: float(v.detach()) for k, v in terms.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


class OptimStep:
    """Backward with a CUDA grad scaler when AMP is on, optional gradient-norm clipping, then the optimiser step.

    Args:
        optimizer: the optimiser.
        params: the parameters to clip (all trainable ones of the step).
        device: where the step runs; the scaler is used on CUDA with AMP only.
        amp: mixed precision on.
        grad_clip: max gradient norm; None or <= 0 disables clipping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                 device: torch.device, amp: bool = False, grad_clip: float | None = 1.0) -> None:
        self.optimizer = optimizer
        self.params = [p for p in params if p.requires_grad]
        self.grad_clip = grad_clip if grad_clip and grad_clip > 0 and math.isfinite(grad_clip) else None
        self.scaler = torch.amp.GradScaler("cuda") if (amp and device.type == "cuda") else None

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


def param_groups(model: torch.nn.Module, lr: float, text_lr: float, text_prefix: str = "text_encoder.") -> list[dict]:
    """Optimiser groups for pretraining: the pretrained text encoder at ``text_lr``, everything else at ``lr``.

    A BERT-family encoder fine-tuned at the rate that suits a ViT trained from scratch collapses (every report then
    embeds alike); the paper uses 3e-5 for both. Only trainable parameters are listed, each once.
    """
    text, rest = [], []
    for name, p in model.named_parameters():
        if name.startswith(text_prefix) and text_lr == 0:
            p.requires_grad_(False)  # a frozen text tower: no gradients, no optimiser state, no wasted backward
        if p.requires_grad:
            (text if name.startswith(text_prefix) else rest).append(p)
    groups = [{"params": rest, "lr": lr}]
    if text:
        groups.append({"params": text, "lr": text_lr})
    return groups
