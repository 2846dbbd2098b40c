"""Read and write MONAI datalist JSON files.

Format (docs/design.md, "Datalist format")::

    {"training": [{"image": "img/a.png", "label": "labelcol/mask_a.png", "text": "...", "id": "a"}, ...],
     "validation": [...], "test": [...]}

Split files (`amvlm_monai.data.splits`) add ``"labeled": bool`` to the training items; an unlabelled item carries
its mask path under ``"label_hidden"`` instead of ``"label"``, so a loader that reads ``item["label"]`` cannot
train on it by accident. Extra top-level keys (e.g. ``"split"``, describing how a split was drawn) are allowed.

Paths: on disk, paths are relative to the folder of the datalist file unless absolute (`write_datalist` writes
them relative whenever possible, so that a data folder can be moved together with its datalist); in memory, after
`load_datalist` / `read_datalist`, they are absolute. Relative paths in an in-memory datalist handed to
`write_datalist` are taken relative to the current working directory.

Where files may lie: `load_datalist` accepts only paths inside the datalist's folder or inside one of the folders
the file lists under ``"data_roots"`` (the converters that leave the source files where they are record the source
folder there). A path that leaves them (``../``, an absolute path elsewhere) is an error naming the file unless
``allow_outside=True`` (bundles: ``--allow_outside_paths true``): a datalist copied from elsewhere, or edited by
hand, cannot make a run read files nobody meant it to.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

from amvlm_monai.utils.errors import DataError, raise_if_problems

__all__ = ["PATH_KEYS", "SECTIONS", "REQUIRED_KEYS", "ROOTS_KEY", "read_datalist", "load_datalist", "write_datalist"]

PATH_KEYS = ("image", "label", "label_hidden")  # item keys holding file paths
ROOTS_KEY = "data_roots"  # top-level list of folders (besides the datalist's own) the items' files may lie in
SECTIONS = ("training", "validation", "test")  # the sections a converter writes
REQUIRED_KEYS = ("image", "label", "text", "id")  # keys every item needs (see `load_datalist` for "label")


def _resolve(value: str, base: Path) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _inside(path: str, root: str) -> bool:
    """``path`` lies in ``root`` (both absolute and normalised; symbolic links are not followed)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # another drive on Windows
        return False


def _relative(value: str, base: Path) -> str:
    path = os.path.abspath(value)
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive on Windows: keep it absolute
        return path


def read_datalist(path: str | os.PathLike, path_keys: Sequence[str] = PATH_KEYS) -> dict:
    """Read a whole datalist file, every section's paths made absolute (resolved against the file's folder).

    Args:
        path: the JSON file.
        path_keys: item keys that hold paths.

    Returns:
        The JSON object; each list-of-dicts section has its items' path values made absolute. Other top-level
        values are returned as they are.

    Raises:
        DataError: naming the file when it is missing, not JSON, or not a JSON object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read datalist {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"datalist {path} must hold a JSON object with sections {SECTIONS}, got {type(data).__name__}.")
    base = Path(os.path.abspath(path)).parent
    roots = data.get(ROOTS_KEY)
    if roots is not None:
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise DataError(f"{path}: {ROOTS_KEY!r} must be a list of folder paths, got {roots!r}.")
        data[ROOTS_KEY] = [_resolve(r, base) for r in roots]
    for value in data.values():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    for k in path_keys:
                        if isinstance(item.get(k), str):
                            item[k] = _resolve(item[k], base)
    return data


def load_datalist(
    path: str | os.PathLike,
    key: str = "training",
    required: Sequence[str] = REQUIRED_KEYS,
    path_keys: Sequence[str] = PATH_KEYS,
    allow_empty: bool = False,
    allow_outside: bool = False,
) -> list[dict]:
    """One section of a datalist file, validated, with absolute paths.

    Args:
        path: the JSON file.
        key: the section ("training", "validation", "test").
        required: keys every item must have. An unlabelled item (``"labeled": false``) satisfies "label" with
            "label_hidden" and must not carry "label".
        path_keys: item keys that hold paths, resolved against the file's folder.
        allow_empty: accept an empty section.
        allow_outside: accept paths outside the datalist's folder and its ``"data_roots"``.

    Returns:
        list of item dicts (copies), e.g. ``[{"image": "/abs/img/a.png", "label": "/abs/labelcol/mask_a.png",
        "text": "...", "id": "a"}]``.

    Raises:
        DataError: naming the file, for a missing section (listing those found), an empty section, items
            lacking required keys, or paths leaving the data folders (all offending items listed, by index).
    """
    data = read_datalist(path, path_keys)
    base = os.path.normpath(os.path.abspath(os.path.dirname(os.path.abspath(path))))
    roots = [base] + [os.path.normpath(r) for r in data.get(ROOTS_KEY) or []]
    if key not in data:
        found = [k for k, v in data.items() if isinstance(v, list)]
        raise DataError(f"datalist {path} has no section {key!r}; sections found: {found}.")
    items = data[key]
    if not isinstance(items, list):
        raise DataError(f"datalist {path}: section {key!r} must be a list, got {type(items).__name__}.")
    if not items and not allow_empty:
        raise DataError(f"datalist {path}: section {key!r} is empty.")
    problems, outside = [], []
    for i, item in enumerate(items):
        where = f"{path}: {key}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where} is not an object")
            continue
        labeled = item.get("labeled", True)
        if not isinstance(labeled, bool):
            problems.append(f"{where}: 'labeled' must be true or false, got {labeled!r}")
            continue
        missing = []
        for k in required:
            if k == "label" and not labeled:
                if "label_hidden" not in item:
                    missing.append("label_hidden")
            elif k not in item:
                missing.append(k)
        if missing:
            problems.append(f"{where} (id {item.get('id', '?')!r}) lacks {missing}; keys found: {sorted(item)}")
        if not labeled and "label" in item:
            problems.append(f"{where} is unlabelled but exposes 'label' (use 'label_hidden')")
        for k in path_keys:
            if k in item and not isinstance(item[k], str):
                problems.append(f"{where}: {k!r} must be a path string, got {type(item[k]).__name__}")
            elif k in item and not allow_outside and not any(_inside(item[k], r) for r in roots):
                outside.append(f"{item[k]}: {k} of {key}[{i}]")
    if outside:
        folders = f"{base}" + (f" or its data_roots {roots[1:]}" if len(roots) > 1 else "")
        more = f" (and {len(outside) - 1} more path(s) of {path})" if len(outside) > 1 else ""
        problems.append(f"{outside[0]} in {path} lies outside the data folder {folders}{more}; allow paths outside "
                        "explicitly with allow_outside=True (bundles: --allow_outside_paths true)")
    raise_if_problems(problems, f"datalist {path}")
    return copy.deepcopy(items)


def write_datalist(datalist: dict, path: str | os.PathLike, path_keys: Sequence[str] = PATH_KEYS) -> Path:
    """Write a datalist as JSON with paths relative to the file's folder (absolute when no relative path exists).

    Args:
        datalist: ``{"training": [...], ...}``; item paths absolute or relative to the working directory.
            Not modified.
        path: the JSON file to write (parent folders are created).
        path_keys: item keys that hold paths.

    Returns:
        ``path`` as a `Path`.
    """
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    out = {}
    for name, value in datalist.items():
        if name == ROOTS_KEY and isinstance(value, list):
            out[name] = [_relative(str(r), base) for r in value]
        elif isinstance(value, list):
            items = []
            for item in value:
                if isinstance(item, dict):
                    item = dict(item)
                    for k in path_keys:
                        if isinstance(item.get(k), str):
                            item[k] = _relative(item[k], base)
                items.append(item)
            out[name] = items
        else:
            out[name] = copy.deepcopy(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
