"""Deterministic sentences about nuclei in histology masks: how many, and how dense by image quadrant.

The histology counterpart of `amvlm_monai.data.describe.describe_mask` (which it leaves unchanged), for MoNuSeg-like
data without text: "There are 38 nuclei. The nuclei density is high in the upper left and upper right, medium in
the lower left and low in the lower right."

- **count**: distinct nonzero values of an instance map (``instances=True``), or 8-connected components of a binary
  mask (touching nuclei then count as one);
- **density** of a quadrant: the share of its pixels covered by nuclei, named with `NucleiVocabulary.levels` by
  ``thresholds`` (default: low below 10%, medium below 25%, high from 25%; chosen by hand, not calibrated on MoNuSeg).
  Coverage does not depend on magnification, unlike nuclei per pixel;
- **quadrants** are the image's (tissue sections have no patient left/right): rows ``< ceil(H/2)`` are upper,
  columns ``< ceil(W/2)`` left.

Nothing is random: the same mask always gives the same sentence.

Example:
    >>> import numpy as np
    >>> inst = np.zeros((8, 8), np.uint16)
    >>> inst[0:2, 0:2], inst[0:2, 5:7], inst[5:8, 5:8] = 1, 2, 3
    >>> print(describe_nuclei(inst, instances=True))  # doctest: +NORMALIZE_WHITESPACE
    There are three nuclei. The nuclei density is high in the upper left, upper right and lower right and low in
    the lower left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .describe import number_word

__all__ = ["NucleiVocabulary", "NucleiStats", "nuclei_stats", "describe_nuclei"]


@dataclass(frozen=True)
class NucleiVocabulary:
    """The words of `describe_nuclei`'s sentences (``str.format`` templates)."""

    one: str = "nucleus"  # one object
    many: str = "nuclei"  # several objects
    count_one: str = "There is one {one}."  # a single object; field {one}
    count_many: str = "There are {count} {many}."  # fields {count} (a number word), {many}
    density: str = "The {many} density is {parts}."  # {parts}: "high in the upper left, low in the ..."
    uniform: str = "The {many} density is {level} in all four quadrants."  # every quadrant at one level
    empty: str = "No nuclei are visible."  # the whole text for an empty mask
    quadrants: tuple[str, str, str, str] = ("upper left", "upper right", "lower left", "lower right")
    levels: tuple[str, str, str] = ("low", "medium", "high")


@dataclass(frozen=True)
class NucleiStats:
    """The facts behind the sentence: ``count`` nuclei; per quadrant (upper left, upper right, lower left, lower
    right) the covered share ``coverage`` and its level index ``level`` (0 low, 1 medium, 2 high)."""

    count: int
    coverage: tuple[float, float, float, float]
    level: tuple[int, int, int, int]


def nuclei_stats(mask, instances: bool = False, thresholds: tuple[float, float] = (0.1, 0.25)) -> NucleiStats:
    """Count nuclei and measure each quadrant's coverage.

    Args:
        mask: (H, W) array; an instance map (one value per nucleus, 0 background) or a binary mask (any nonzero).
        instances: count distinct nonzero values (instance map) instead of 8-connected components.
        thresholds: coverage limits (low/medium, medium/high), increasing, in [0, 1].

    Returns:
        `NucleiStats`.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"mask must be a non-empty (H, W) array, got shape {arr.shape}.")
    lo, hi = thresholds
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"thresholds must be increasing and in [0, 1], got {thresholds}.")
    fg = arr != 0
    if instances:
        count = int(np.unique(arr[fg]).size)
    else:
        count = int(ndimage.label(fg, structure=np.ones((3, 3), bool))[1])
    h, w = fg.shape
    r, c = (h + 1) // 2, (w + 1) // 2
    coverage, level = [], []
    for rows, cols in ((slice(0, r), slice(0, c)), (slice(0, r), slice(c, w)),
                       (slice(r, h), slice(0, c)), (slice(r, h), slice(c, w))):
        q = fg[rows, cols]
        cov = float(q.mean()) if q.size else 0.0
        coverage.append(cov)
        level.append(0 if cov < lo else (1 if cov < hi else 2))
    return NucleiStats(count, tuple(coverage), tuple(level))


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_nuclei(
    mask,
    instances: bool = False,
    thresholds: tuple[float, float] = (0.1, 0.25),
    vocab: NucleiVocabulary | None = None,
) -> str:
    """Two sentences: how many nuclei, and the nuclei density (low/medium/high) of each image quadrant.

    Quadrants with the same level are grouped, in the order upper left, upper right, lower left, lower right of
    their first member: "The nuclei density is high in the upper left and lower right and medium in the upper right
    and lower left." Counts up to ten are words, larger counts digits ("There are 412 nuclei.").

    Args:
        mask, instances, thresholds: see `nuclei_stats`.
        vocab: the words; default `NucleiVocabulary()`.

    Returns:
        the text; ``vocab.empty`` for a mask without nuclei.
    """
    vocab = vocab or NucleiVocabulary()
    st = nuclei_stats(mask, instances, thresholds)
    if st.count == 0:
        return vocab.empty
    count = (vocab.count_one.format(one=vocab.one) if st.count == 1
             else vocab.count_many.format(count=number_word(st.count), many=vocab.many))
    if len(set(st.level)) == 1:
        density = vocab.uniform.format(many=vocab.many, level=vocab.levels[st.level[0]])
    else:
        groups: dict[int, list[str]] = {}
        for quadrant, lev in zip(vocab.quadrants, st.level):
            groups.setdefault(lev, []).append(quadrant)
        parts = [f"{vocab.levels[lev]} in the {_join(qs)}" for lev, qs in groups.items()]
        density = vocab.density.format(many=vocab.many, parts=_join(parts))
    return f"{count} {density}"
