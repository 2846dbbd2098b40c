"""The one size normaliser: an int or a sequence of ints -> a tuple of positive ints (MONAI's ``ensure_tuple_rep``)."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from monai.utils import ensure_tuple_rep


def spatial_size(value: int | Sequence[int], name: str = "image_size", dims: int = 2) -> tuple[int, ...]:
    """``value`` as ``dims`` positive ints: ``64 -> (64, 64)``, ``[64, 48] -> (64, 48)``.

    Raises:
        ValueError: naming ``name``, for a wrong count, a non-integer or a value below 1.
    """
    try:
        size = ensure_tuple_rep(value, dims)
    except (ValueError, TypeError):
        size = ()
    if len(size) != dims or not all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ValueError(f"{name} must be a positive int or {dims} positive ints, got {value!r}.")
    return tuple(int(s) for s in size)
