"""Deterministic radiology-style sentences from segmentation masks (text for data sets that have none).

LViT's maintainers advise, for data sets without reports, to write the text from the masks: how many regions,
where, how large. `describe_mask` does that for a binary 2D mask; `describe_levels` lists the classes present in a
multi-class label map (spine levels). The same describer writes the reports of the synthetic demo data.

Left/right follow the **radiological convention**: images are viewed as if facing the patient, so the patient's
left is on the image's right. A region in the right half of the image (larger column index) is on the patient's
*left* ("upper left lung"); a region in the left half of the image is on the patient's right. Upper/lower are
image rows (row 0 = upper). Inputs must therefore be in the usual display orientation (patient's head up, patient's
left on the image's right), as chest X-rays and PNG exports are.

Nothing here is random: the same mask always gives the same sentence.

Example:
    >>> import numpy as np
    >>> m = np.zeros((64, 64), np.uint8)
    >>> m[8:14, 44:50] = 1      # image top right = patient's upper left; 36 px = 0.9% of the image
    >>> m[44:60, 6:20] = 1      # image bottom left = patient's lower right; 224 px = 5.5%
    >>> describe_mask(m)
    'Bilateral pulmonary infection, two infected areas, small upper left lung and large lower right lung.'
    >>> describe_mask(np.zeros((64, 64)))
    'No lesion is visible.'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "Vocabulary",
    "VOCABULARIES",
    "Region",
    "number_word",
    "find_regions",
    "describe_mask",
    "describe_levels",
    "LUNG_PARAPHRASES",
]

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def number_word(n: int) -> str:
    """``0..10`` as English words ("zero".."ten"), larger numbers as digits."""
    return _NUMBER_WORDS[n] if 0 <= n <= 10 else str(n)


@dataclass(frozen=True)
class Vocabulary:
    """The words of the sentences, so that other organs and findings reuse the describer.

    The sentence is ``"{headline}, {count} {region|regions}, {location}, {location} and {location}."`` with its first
    letter capitalised. ``headline`` and ``location`` are `str.format` templates.
    """

    organ: str = "lung"  # organ name, field {organ}
    adjective: str = "pulmonary"  # organ adjective, field {adjective}
    finding: str = "infection"  # what is segmented, field {finding}
    region: str = "infected area"  # one region ("one infected area")
    regions: str = "infected areas"  # several regions ("two infected areas")
    headline: str = "{laterality} {adjective} {finding}"  # fields: laterality, adjective, finding, organ
    location: str = "{size} {vertical} {side} {organ}"  # fields: size, vertical, side, organ
    empty: str = "No lesion is visible."  # the whole sentence for an empty mask
    laterality: tuple[str, str, str] = ("unilateral", "bilateral", "central")  # one side, both sides, midline only
    vertical: tuple[str, str, str] = ("upper", "middle", "lower")  # image rows, top to bottom
    all_vertical: str = "all"  # a region covering all three vertical thirds
    sides: tuple[str, str, str] = ("right", "central", "left")  # patient's right (image left), midline, patient's left
    sizes: tuple[str, str, str] = ("small", "medium", "large")


#: Presets by organ name; `describe_mask(organ=...)` starts from these (unknown organs get a generic vocabulary).
VOCABULARIES: dict[str, Vocabulary] = {
    "lung": Vocabulary(),
    "bone": Vocabulary(
        organ="bone",
        adjective="bone",
        finding="lesion",
        region="lesion",
        regions="lesions",
        headline="{adjective} {finding}",
        location="{size} {vertical} {side}",
    ),
}


def _generic_vocabulary(organ: str, finding: str) -> Vocabulary:
    return Vocabulary(
        organ=organ,
        adjective=organ,
        finding=finding,
        region=finding,
        regions=finding + "s",
        headline="{adjective} {finding}",
        location="{size} {vertical} {side}",
    )


@dataclass(frozen=True)
class Region:
    """One connected foreground region of a mask.

    ``centroid`` and ``bbox`` are in pixels, (row, col) and (row0, col0, row1, col1) with exclusive ends;
    ``vertical`` is a tuple of indices into (upper, middle, lower) that the region covers; ``side`` is 0 patient's
    right (image left), 1 midline, 2 patient's left (image right); ``size`` is 0 small, 1 medium, 2 large;
    ``fraction`` is the area relative to the reference (organ or image) area.
    """

    area: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    vertical: tuple[int, ...]
    side: int
    size: int
    fraction: float


def _as_2d_bool(mask, name: str = "mask") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim == 3:  # (C, H, W): union of the foreground channels
        arr = np.any(arr != 0, axis=0)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (C, H, W), got shape {np.shape(mask)}.")
    return arr != 0


def _min_pixels(min_area: float, n_pixels: int) -> int:
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}.")
    if min_area < 1:
        return int(np.ceil(min_area * n_pixels))
    return int(min_area)


def find_regions(
    mask,
    min_area: float = 0.0005,
    organ_mask=None,
    size_thresholds: tuple[float, float] | None = None,
    cover_fraction: float = 0.25,
    center_band: float = 0.0,
) -> list[Region]:
    """Connected regions of a binary mask with their position and size class (the facts behind `describe_mask`).

    Args:
        mask: (H, W) array, any nonzero value is foreground; (C, H, W) is reduced to the union of its channels
            (channels must all be foreground classes, no background channel).
        min_area: regions smaller than this are ignored as specks: a float < 1 is a fraction of the image area,
            a value >= 1 a number of pixels.
        organ_mask: optional (H, W) organ mask (e.g. both lungs). When given, thirds and halves are taken within the
            organ's bounding box and sizes relative to the organ's area; otherwise relative to the whole image.
        size_thresholds: (small/medium, medium/large) limits on the area fraction; default (0.01, 0.05) of the
            image, or (0.04, 0.2) of the organ when ``organ_mask`` is given.
        cover_fraction: a vertical third is named when at least this share of the region's pixels lies in it
            (the third holding most pixels always is); all three thirds give the word "all".
        center_band: width, as a fraction of the reference width, of a band around the vertical midline whose
            regions are "central" rather than left or right (0 = no such band, the lungs' case).

    Returns:
        Regions in reading order: patient's left first, then midline, then patient's right; top to bottom within
        a side, then by column.
    """
    fg = _as_2d_bool(mask)
    h, w = fg.shape
    if organ_mask is not None:
        organ = _as_2d_bool(organ_mask, "organ_mask")
        if organ.shape != fg.shape:
            raise ValueError(f"organ_mask shape {organ.shape} differs from mask shape {fg.shape}.")
        rows, cols = np.nonzero(organ)
        if rows.size == 0:
            raise ValueError("organ_mask is empty.")
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        ref_area = float(organ.sum())
        thresholds = size_thresholds or (0.04, 0.2)
    else:
        top, bottom, left, right = 0, h, 0, w
        ref_area = float(h * w)
        thresholds = size_thresholds or (0.01, 0.05)
    if not thresholds[0] <= thresholds[1]:
        raise ValueError(f"size_thresholds must be increasing, got {thresholds}.")
    min_px = _min_pixels(min_area, h * w)

    labels, n = ndimage.label(fg)  # 4-connectivity
    if n == 0:
        return []
    third_edges = top + (bottom - top) * np.array([1 / 3, 2 / 3])
    row_idx = np.arange(h)
    third_of_row = np.searchsorted(third_edges, row_idx + 0.5)  # 0, 1, 2 by pixel centre
    mid = (left + right) / 2.0
    half_band = center_band * (right - left) / 2.0
    regions = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        sub = labels[sl] == k
        area = int(sub.sum())
        if area < max(min_px, 1):
            continue
        rr, cc = np.nonzero(sub)
        rr = rr + sl[0].start
        cc = cc + sl[1].start
        cy, cx = float(rr.mean()), float(cc.mean())
        counts = np.bincount(third_of_row[rr], minlength=3)
        share = counts / area
        vertical = tuple(int(i) for i in range(3) if share[i] >= cover_fraction or i == int(np.argmax(counts)))
        x = cx + 0.5
        side = 1 if half_band > 0 and abs(x - mid) <= half_band else (2 if x > mid else 0)
        frac = area / ref_area
        size = int(np.searchsorted(np.asarray(thresholds), frac, side="right"))
        bbox = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        regions.append(Region(area, (cy, cx), bbox, vertical, side, size, frac))
    order = {2: 0, 1: 1, 0: 2}  # patient's left first
    regions.sort(key=lambda r: (order[r.side], r.centroid[0], r.centroid[1]))
    return regions


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _vertical_words(vertical: tuple[int, ...], vocab: Vocabulary) -> str:
    if len(vertical) == 3:
        return vocab.all_vertical
    return " ".join(vocab.vertical[i] for i in vertical)


def _location(region: Region, vocab: Vocabulary, with_size: bool) -> str:
    text = vocab.location.format(
        size=vocab.sizes[region.size] if with_size else "",
        vertical=_vertical_words(region.vertical, vocab),
        side=vocab.sides[region.side],
        organ=vocab.organ,
    )
    return " ".join(text.split())  # drop doubled spaces left by empty fields


#: Alternative wordings of the lung sentences (same facts: count, side, zone, size), for ``describe_mask(rng=...)``.
LUNG_PARAPHRASES: dict[str, tuple[str, ...]] = {
    # whole sentence; fields: headline, count, locations, be ("is"/"are")
    "sentence": (
        "{headline}, {count}, {locations}.",
        "{headline}: {count}, {locations}.",
        "There {be} {count} of {finding}, {locations}.",
        "{count} consistent with {finding}: {locations}.",
        "Chest X-ray shows {count}, {locations}; {headline}.",
    ),
    "finding": ("pulmonary infection", "pneumonia", "infection", "lung infection"),
    "one": ("infected area", "lesion", "opacity", "patchy opacity", "focus"),
    "many": ("infected areas", "lesions", "opacities", "patchy opacities", "foci"),
    # one region; fields: size, vertical, side
    "location": (
        "{size} {vertical} {side} lung",
        "{size} lesion in the {vertical} zone of the {side} lung",
        "{side} {vertical} zone ({size})",
        "{size} {side} {vertical} lung",
        "the {vertical} {side} lung ({size})",
    ),
    "small": ("small", "minor", "focal"),
    "medium": ("medium", "moderate", "mid-sized"),
    "large": ("large", "extensive", "sizeable"),
    "unilateral": ("unilateral", "one-sided"),
    "bilateral": ("bilateral", "both-sided"),
    "central": ("central", "midline"),
    "empty": ("No lesion is visible.", "The lungs are clear.", "No pulmonary infection is seen.",
              "No infected area.", "Clear lungs, no opacity."),
}


def _paraphrase(regions: Sequence[Region], vocab: Vocabulary, laterality: str, rng: np.random.Generator) -> str:
    """One wording, drawn with ``rng``, of the facts ``describe_mask`` states (lung vocabulary)."""
    words = LUNG_PARAPHRASES
    pick = lambda key: str(rng.choice(words[key]))  # noqa: E731
    if not regions:
        return pick("empty")
    finding = pick("finding")
    n = len(regions)
    count = f"{number_word(n)} {pick('one') if n == 1 else pick('many')}"
    template = pick("location")
    locations = []
    for r in regions:
        size = pick(vocab.sizes[r.size]) if vocab.sizes[r.size] in words else vocab.sizes[r.size]
        text = template.format(size=size, vertical=_vertical_words(r.vertical, vocab), side=vocab.sides[r.side])
        locations.append(" ".join(text.split()))
    headline = f"{pick(laterality) if laterality in words else laterality} {finding}"
    sentence = pick("sentence").format(headline=headline, count=count, locations=_join(locations), finding=finding,
                                       be="is" if n == 1 else "are")
    return sentence[0].upper() + sentence[1:]


def describe_mask(
    mask,
    organ: str = "lung",
    finding: str = "infection",
    *,
    vocab: Vocabulary | None = None,
    min_area: float = 0.0005,
    organ_mask=None,
    size_thresholds: tuple[float, float] | None = None,
    cover_fraction: float = 0.25,
    center_band: float = 0.0,
    include_size: bool = True,
    max_listed: int = 4,
    rng: np.random.Generator | None = None,
) -> str:
    """A radiologist-style sentence stating how many regions a binary mask has, where, and how large.

    Left/right use the radiological convention: the patient's left is on the image's right (see the module
    docstring). Deterministic: the same mask always gives the same sentence.

    Args:
        mask: (H, W) array (numpy or CPU tensor), any nonzero value is foreground; (C, H, W) is reduced to the
            union of its channels (foreground classes only, no background channel).
        organ: organ name; picks a preset from `VOCABULARIES` ("lung", "bone") or a generic vocabulary.
        finding: the finding's name; replaces the preset's finding when it differs from it.
        vocab: full control over the words; overrides ``organ`` and ``finding``.
        min_area, organ_mask, size_thresholds, cover_fraction, center_band: see `find_regions`.
        include_size: put a size word (small/medium/large) before each location.
        max_listed: with more regions than this, the sentence lists the distinct locations without sizes.
        rng: draw the wording from ``LUNG_PARAPHRASES`` (lung vocabulary only; the facts stay the same), as
            reports vary in real data sets; None gives the one fixed sentence.

    Returns:
        e.g. "Bilateral pulmonary infection, two infected areas, small upper left lung and large lower right lung.";
        ``vocab.empty`` ("No lesion is visible.") when no region passes ``min_area``.
    """
    if vocab is None:
        vocab = VOCABULARIES.get(organ) or _generic_vocabulary(organ, finding)
        if finding != vocab.finding:
            vocab = dataclasses.replace(vocab, finding=finding)
    regions = find_regions(
        mask,
        min_area=min_area,
        organ_mask=organ_mask,
        size_thresholds=size_thresholds,
        cover_fraction=cover_fraction,
        center_band=center_band,
    )
    paraphrase = rng is not None and vocab == VOCABULARIES["lung"]
    if not regions:
        return _paraphrase([], vocab, "", rng) if paraphrase else vocab.empty
    sides = {r.side for r in regions}
    if {0, 2} <= sides:
        laterality = vocab.laterality[1]
    elif sides == {1}:
        laterality = vocab.laterality[2]
    else:
        laterality = vocab.laterality[0]
    if paraphrase and len(regions) <= max_listed:
        return _paraphrase(regions, vocab, laterality, rng)
    headline = vocab.headline.format(
        laterality=laterality, adjective=vocab.adjective, finding=vocab.finding, organ=vocab.organ
    )
    n = len(regions)
    count = f"{number_word(n)} {vocab.region if n == 1 else vocab.regions}"
    if n <= max_listed:
        locations = [_location(r, vocab, include_size) for r in regions]
    else:
        locations = list(dict.fromkeys(_location(r, vocab, False) for r in regions))
    sentence = f"{' '.join(headline.split())}, {count}, {_join(locations)}."
    return sentence[0].upper() + sentence[1:]


def describe_levels(
    label_map,
    class_names: Sequence[str] | Mapping[int, str],
    *,
    prefix: str = "Visible levels",
    empty: str = "No labelled structure is visible.",
    min_area: int = 1,
    background: int = 0,
) -> str:
    """List the classes present in a multi-class label map, e.g. "Visible levels: S, L5, L4.".

    Args:
        label_map: integer array of any shape (e.g. (H, W) slice), values are class indices.
        class_names: ``class_names[v]`` names label value ``v``: a sequence indexed by label value (entry 0, the
            background, is never listed) or a mapping ``{value: name}``.
        prefix: text before the list.
        empty: the sentence when no class other than the background is present.
        min_area: a class is listed when it has at least this many voxels.
        background: the label value that is never listed.

    Returns:
        ``f"{prefix}: {name}, {name}."`` with classes in increasing label value (for MRSpineSeg: S, L5, L4, ...).

    Raises:
        ValueError: when the map holds a label value that ``class_names`` does not name.
    """
    values, counts = np.unique(np.asarray(label_map).astype(np.int64), return_counts=True)
    names = dict(class_names) if isinstance(class_names, Mapping) else dict(enumerate(class_names))
    present = []
    for v, c in zip(values.tolist(), counts.tolist()):
        if v == background or c < min_area:
            continue
        if v not in names:
            raise ValueError(f"label value {v} has no entry in class_names (known: {sorted(names)}).")
        present.append(names[v])
    if not present:
        return empty
    return f"{prefix}: {', '.join(present)}."
