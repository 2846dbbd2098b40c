"""Dataset constructors with the checks a bundle user needs before a long run starts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai.data import CacheDataset, Dataset

__all__ = ["nonempty_dataset", "rank_shard"]


def nonempty_dataset(data: Sequence[dict], transform: Callable | None = None, source: str = "the datalist",
                     cache_rate: float = 0.0, num_workers: int = 0) -> Dataset:
    """A MONAI ``Dataset`` (``CacheDataset`` when ``cache_rate > 0``) that refuses an empty item list.

    Args:
        data: datalist items.
        transform: the item transform.
        source: what the items came from (a folder pattern or a split file), named in the error.
        cache_rate: fraction cached by ``CacheDataset``.
        num_workers: workers used to fill the cache.
    """
    if not data:
        raise ValueError(f"no images found in {source}: nothing to process.")
    if cache_rate > 0:
        return CacheDataset(data=list(data), transform=transform, cache_rate=cache_rate, num_workers=num_workers)
    return Dataset(data=list(data), transform=transform)


def rank_shard(data: Sequence[dict], seed: int = 0, even_divisible: bool = True, shuffle: bool = True) -> list[dict]:
    """This process's shard of ``data`` under ``torch.distributed`` (all of it when not distributed).

    Each rank then caches only its shard (``monai.data.partition_dataset``). ``even_divisible`` pads or drops so that
    every rank runs the same number of steps (needed for DDP's collective calls during training).
    """
    import torch.distributed as dist
    from monai.data import partition_dataset

    if not (dist.is_available() and dist.is_initialized()):
        return list(data)
    if not data:
        raise ValueError("cannot shard an empty datalist across ranks.")
    parts = partition_dataset(list(data), num_partitions=dist.get_world_size(), shuffle=shuffle, seed=seed,
                              even_divisible=even_divisible)
    return parts[dist.get_rank()]
