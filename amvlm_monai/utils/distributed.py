"""Several processes (``torchrun``): global negatives for the contrastive losses, synchronised BatchNorm on any
backend, metrics reduced across ranks, and "rank 0 writes".

Everything here is the identity (or a no-op) in a single process, so the losses and trainers call it unconditionally.

Global negatives follow open_clip's ``gather_features`` idea with the other option it offers: the features of every
rank are gathered **with gradient** (:func:`gather_with_grad`), each rank computes the loss of its own rows against all
columns, and the gradient that other ranks' losses send to this rank's features comes back through an all-reduce in
the backward pass. With DistributedDataParallel averaging the parameter gradients, one step on W ranks of B samples
is then the step of one process on the W * B samples (tested with two CPU processes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def unwrap(net: nn.Module, parallel_only: bool = False) -> nn.Module:
    """The plain network inside its wrappers (DistributedDataParallel, DataParallel, an EMA teacher, a momentum
    copy): each of them holds it as ``.module``. ``parallel_only`` unwraps only the data-parallel wrappers (what
    ignite's ``Checkpoint.load_objects`` unwraps, so that saved and loaded states match)."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(getattr(net, "module", None), nn.Module) and (not parallel_only or isinstance(net, parallel)):
        net = net.module
    return net


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def _check_equal_rows(x: torch.Tensor) -> None:
    rows = torch.tensor([x.shape[0]], device=x.device)
    every = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(every, rows)
    if len({int(r) for r in every}) != 1:
        raise ValueError(f"global negatives need the same batch size on every rank, got {[int(r) for r in every]}; "
                         "use drop_last=True and shards of equal size (rank_shard(even_divisible=True)).")


def gather_with_grad(x: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, int]:
    """``(B, ...)`` on each of W ranks -> ``(W * B, ...)`` in rank order, with gradient, and this rank's row offset.

    Single process: ``(x, 0)``. Every rank must pass the same shape (``check`` verifies the batch size).
    """
    if not is_distributed():
        return x, 0
    if check:
        _check_equal_rows(x)
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: a reduce-scatter, so each rank receives the sum over ranks of its own rows'
    gradient (``B`` rows, not the ``W * B`` of an all-reduce).

    Not ``torch.distributed.nn.functional.all_gather``: deprecated in torch 2.13, and on gloo its backward passes
    non-contiguous gradient slices to ``all_to_all``, which gave wrong gradients here (the 2-process equality test of
    ``tests/test_distributed.py`` failed at the second step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        chunks = list(grad.split(ctx.rows))  # gloo has no reduce-scatter: all-to-all, then the sum
        received = [torch.empty_like(c) for c in chunks]
        dist.all_to_all(received, chunks)
        return torch.stack(received).sum(0)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (e.g. momentum features); single process: ``x``."""
    if not is_distributed():
        return x
    _check_equal_rows(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a copy, float64 for integer input; ``x`` unchanged); single process: ``x``."""
    if not is_distributed():
        return x
    y = x.detach().clone() if x.is_floating_point() else x.detach().double()
    dist.all_reduce(y)
    return y / dist.get_world_size()


@torch.no_grad()
def mean_count(n: torch.Tensor) -> torch.Tensor:
    """The per-rank mean of a count (a denominator): ``sum over ranks / W``.

    A loss that is ``sum_r / mean_count(n_r)`` on every rank averages (as DDP averages gradients) to
    ``sum over ranks / sum of n``, the single-process normalisation, even when ranks hold different numbers of words.
    """
    return global_mean(n).float() if is_distributed() else n.float()


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 for tensors whose first dimension differs between ranks (e.g. per-image scores)."""
    if not is_distributed():
        return x
    if x.dtype == torch.bool:  # not every backend reduces bools
        return gather_rows(x.to(torch.uint8)).bool()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def gather_objects(items: list) -> list:
    """Concatenation over ranks (in rank order) of picklable lists; single process: ``items``."""
    if not is_distributed():
        return list(items)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, list(items))
    return [x for part in every for x in part]


class _SyncStats(torch.autograd.Function):
    """Sum a stats tensor over ranks, forward and backward (the gradient of a sum is the sum of gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, on any backend (gloo included).

    ``torch.nn.SyncBatchNorm`` synchronises on GPUs only; :func:`sync_batchnorm` uses it there and this module on
    the CPU. Input ``(N, C)``; mean and biased variance over all ranks' N rows (two all-reduces: sums, then squared
    deviations, as exact as the single-process two-pass statistics); running statistics updated with the unbiased
    global variance, as ``BatchNorm1d`` does. Outside training, or in a single process, it is ``BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"SyncBatchNorm expects (N, C), got {tuple(x.shape)}.")
        stats = torch.cat([x.sum(0), x.new_tensor([x.shape[0]])])
        stats = _SyncStats.apply(stats)
        n = stats[-1]
        mean = stats[:-1] / n
        var = _SyncStats.apply(((x - mean) ** 2).sum(0)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Global-batch statistics for every ``BatchNorm1d`` of ``module`` under ``torchrun`` (in place, returned).

    CUDA modules get ``torch.nn.SyncBatchNorm``; CPU modules (gloo) get :class:`SyncBatchNorm`. Parameters and
    buffers are kept (same tensors), so optimisers and momentum copies built before still point at them.
    """
    if not is_distributed():
        return module
    if any(p.device.type == "cuda" for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    _replace_batchnorm(module)
    return module


def _replace_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            _replace_batchnorm(child)


class AverageBuffers:
    """After every optimiser step, average the floating buffers (BatchNorm running statistics) of ``module`` over
    ranks, so that every rank's EMA teacher is the same network (DDP only averages gradients).

    Attach to a :class:`~amvlm_monai.engines.mean_teacher.MeanTeacherTrainer`: it runs on
    ``IterationEvents.BACKWARD_COMPLETED``, after the step and before the teacher's EMA update.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = getattr(module, "module", module)

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine=None) -> None:
        if not is_distributed():
            return
        for buf in self.module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(dist.get_world_size())
