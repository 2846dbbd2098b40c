"""Seeded, reproducible data splits: labelled/unlabelled (semi-supervised), few-shot, and patient-level.

How items are drawn: every group (an item's ``group_key`` value, e.g. a patient id, or else its ``id``) gets the
rank ``sha256(f"{salt}:{seed}:{group}")``; groups are taken in rank order until the wanted number of items is
reached as closely as possible. Consequences:

- reproducible on any machine and Python/NumPy version, and independent of the items' order in the datalist;
- nested: with one seed, the 1% few-shot set lies inside the 10% set, 25% labelled inside 50%;
- patient-level with ``group_key``: the items of one group are always on the same side;
- at least one item is selected, and with a fraction below 1 at least one group stays unselected (when there are
  two groups or more).

Hidden labels: in a semi-supervised split an unlabelled item keeps its mask path (so the split is auditable) but
under ``"label_hidden"`` instead of ``"label"``, with ``"labeled": False``. Training code takes
`labeled_items` for the supervised loss and `unlabeled_items` (which never carry ``"label"``) for the
consistency loss, so unlabelled masks cannot reach training by mistake. A few-shot split file has the same form:
the few-shot items are labelled, the others unlabelled; few-shot training uses `labeled_items` only.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

from amvlm_monai.utils.errors import DataError

from .datalist import ROOTS_KEY, read_datalist, write_datalist

__all__ = [
    "partition",
    "semi_supervised_split",
    "few_shot_subset",
    "labeled_items",
    "unlabeled_items",
    "split_name",
    "write_splits",
]


def _check_fraction(fraction: float, name: str = "fraction") -> None:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}.")


def _group_of(item: dict, index: int, group_key: str | None) -> str:
    key = group_key or "id"
    if not isinstance(item, dict) or key not in item:
        what = f"group key {group_key!r}" if group_key else "'id'"
        raise DataError(f"item {index} has no {what} to split by: {item!r}")
    return str(item[key])


def _count(fraction: float, n: int) -> int:
    """round-half-up(fraction * n), at least 1 (1% of QaTa's 7145 training images = 71)."""
    return max(1, math.floor(fraction * n + 0.5 + 1e-9))


def partition(
    items: Sequence[dict], fraction: float, seed: int = 0, group_key: str | None = None, salt: str = "split"
) -> tuple[list[dict], list[dict]]:
    """Split items into a seeded selected part of about ``fraction`` of the items and the rest.

    Args:
        items: datalist items; each needs ``id`` (or the ``group_key`` field).
        fraction: wanted share of the items in the selected part, in (0, 1].
        seed: the seed.
        group_key: item field whose equal values must stay together (e.g. "patient"); None = item by item.
        salt: makes independent draws for different purposes with the same seed (e.g. "validation").

    Returns:
        (selected, rest): copies of the items, each part in the input order.

    Raises:
        DataError: empty ``items`` or an item without its ``id``/group field.
    """
    _check_fraction(fraction)
    if len(items) == 0:
        raise DataError("cannot split an empty list of items (empty split).")
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(_group_of(item, i, group_key), []).append(i)
    ranked = sorted(groups, key=lambda g: (hashlib.sha256(f"{salt}:{seed}:{g}".encode()).hexdigest(), g))
    target = _count(fraction, len(items))
    max_groups = len(ranked) if fraction >= 1 or len(ranked) < 2 else len(ranked) - 1
    best, best_err, total = 1, math.inf, 0
    for g in range(1, max_groups + 1):
        total += len(groups[ranked[g - 1]])
        err = abs(total - target)
        if err < best_err:
            best, best_err = g, err
        if total >= target:
            break
    chosen = {i for g in ranked[:best] for i in groups[g]}
    selected = [copy.deepcopy(it) for i, it in enumerate(items) if i in chosen]
    rest = [copy.deepcopy(it) for i, it in enumerate(items) if i not in chosen]
    return selected, rest


def _mark(item: dict, labeled: bool) -> dict:
    item = dict(item)
    if "label" not in item and "label_hidden" in item:  # re-splitting a split: restore the label first
        item["label"] = item.pop("label_hidden")
    if "label" not in item:
        raise DataError(f"item {item.get('id', '?')!r} has no 'label' to split on: {item!r}")
    if not labeled:
        item["label_hidden"] = item.pop("label")
    item["labeled"] = labeled
    return item


def semi_supervised_split(
    items: Sequence[dict], labeled_fraction: float, seed: int = 0, group_key: str | None = None
) -> list[dict]:
    """Mark a seeded ``labeled_fraction`` of the items labelled, the rest unlabelled (mask path hidden).

    Args:
        items: training items with ``label`` (and ``id`` or the ``group_key`` field).
        labeled_fraction: share of labelled items, in (0, 1]; at least one item is labelled.
        seed: the seed.
        group_key: item field for group-level splits (items of one group share their flag).

    Returns:
        Copies of all items in input order with ``"labeled": bool``; unlabelled items have their ``label`` moved
        to ``label_hidden``.
    """
    _check_fraction(labeled_fraction, "labeled_fraction")
    selected, _ = partition(items, labeled_fraction, seed, group_key, salt="labeled")
    chosen = {_group_of(it, i, group_key) for i, it in enumerate(selected)}
    return [_mark(it, _group_of(it, i, group_key) in chosen) for i, it in enumerate(items)]


def few_shot_subset(
    items: Sequence[dict], fraction: float, seed: int = 0, group_key: str | None = None
) -> list[dict]:
    """The seeded few-shot training subset: the labelled items of ``semi_supervised_split(items, fraction, seed)``.

    Args:
        items: training items.
        fraction: share of items kept, in (0, 1]; at least one (QaTa 1%: 71 of 7145).
        seed: the seed.
        group_key: item field for group-level subsets.

    Returns:
        Copies of the chosen items in input order, with ``"labeled": True``.
    """
    _check_fraction(fraction)
    return labeled_items(semi_supervised_split(items, fraction, seed, group_key))


def labeled_items(items: Sequence[dict]) -> list[dict]:
    """Items usable for supervised training: those not marked ``"labeled": False`` (copies)."""
    return [copy.deepcopy(it) for it in items if it.get("labeled", True)]


def unlabeled_items(items: Sequence[dict], source: str | os.PathLike | None = None) -> list[dict]:
    """Items marked ``"labeled": False`` (copies), guaranteed without ``label`` (the hidden mask stays hidden).

    Args:
        items: training items.
        source: the split file the items come from; when given, finding no unlabelled item is an error naming it
            (semi-supervised training needs them; a plain datalist has none).
    """
    out = []
    for it in items:
        if not it.get("labeled", True):
            it = copy.deepcopy(it)
            if "label" in it:
                it["label_hidden"] = it.pop("label")
            out.append(it)
    if source is not None and not out:
        raise DataError(f"{source}: no unlabelled training items (\"labeled\": false), which semi-supervised "
                        "training needs; write split files with python -m data_prep.own_data --datalist <this file> "
                        "--out <folder> (or train on labelled items only: configs/variants/supervised.json).")
    return out


def hidden_label_items(items: Sequence[dict]) -> list[dict]:
    """The unlabelled items with their hidden mask back under ``label`` (copies), for diagnostics only: how good the
    pseudo labels are (:class:`~amvlm_monai.handlers.metrics.PseudoLabelQuality`). Never train on these."""
    out = []
    for it in unlabeled_items(items):
        if "label_hidden" in it:
            it["label"] = it.pop("label_hidden")
            out.append(it)
    return out


def split_name(kind: str, fraction: float) -> str:
    """File name of a split: ``split_labeled25.json``, ``split_fewshot1.json`` (0.5% -> ``0p5``)."""
    if kind not in ("labeled", "fewshot"):
        raise ValueError(f"kind must be 'labeled' or 'fewshot', got {kind!r}.")
    pct = f"{round(fraction * 100, 6):g}".replace(".", "p")
    return f"split_{kind}{pct}.json"


def write_splits(
    datalist: dict | str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    fractions: Sequence[float] = (0.25, 0.5),
    few_shot: Sequence[float] = (0.01, 0.1),
    group_key: str | None = None,
) -> dict[str, Path]:
    """Write one full datalist per split, training items marked ``labeled``.

    Args:
        datalist: a datalist dict (paths absolute or relative to the working directory) or the path of a datalist
            file (its relative paths are resolved against its folder).
        out_dir: folder for the split files; their paths are written relative to it.
        seed: the seed.
        fractions: labelled fractions of the semi-supervised splits -> ``split_labeled<pct>.json``.
        few_shot: few-shot fractions -> ``split_fewshot<pct>.json``.
        group_key: item field for patient-level splits.

    Returns:
        ``{file stem: path}``, e.g. ``{"split_labeled25": Path(".../split_labeled25.json"), ...}``. Every file is
        the input datalist (all sections) with its ``training`` items marked, plus a ``"split"`` object recording
        kind, fraction, seed, group key and counts.

    Raises:
        DataError: the datalist has no or an empty ``training`` section. Nothing is written then.
    """
    data = read_datalist(datalist) if isinstance(datalist, (str, os.PathLike)) else datalist
    if isinstance(datalist, (str, os.PathLike)) and isinstance(data, dict):  # split files elsewhere: keep its folder
        folder = os.path.dirname(os.path.abspath(datalist))
        if os.path.abspath(out_dir) != folder:
            data[ROOTS_KEY] = list(dict.fromkeys([folder] + list(data.get(ROOTS_KEY) or [])))
    training = data.get("training") if isinstance(data, dict) else None
    if not training:
        where = "" if isinstance(datalist, dict) else f" {datalist}"
        raise DataError(f"datalist{where} has an empty or no 'training' section: nothing to split (empty split).")
    outputs = {}
    for kind, fracs in (("labeled", fractions), ("fewshot", few_shot)):
        for f in fracs:
            marked = semi_supervised_split(training, f, seed, group_key)
            n_lab = sum(it["labeled"] for it in marked)
            meta = {
                "kind": "semi_supervised" if kind == "labeled" else "few_shot",
                "fraction": f,
                "seed": seed,
                "group_key": group_key,
                "n_labeled": n_lab,
                "n_unlabeled": len(marked) - n_lab,
            }
            content = {k: v for k, v in data.items() if k not in ("training", "split")}
            content = {"training": marked, **content, "split": meta}
            outputs[split_name(kind, f)] = content
    out_dir = Path(out_dir)
    paths = {}
    for name, content in outputs.items():
        paths[name[: -len(".json")]] = write_datalist(content, out_dir / name)
    return paths
