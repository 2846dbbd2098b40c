"""Output files: one for every input, never two inputs on one file, never an existing file replaced unless asked.

Inference names each output after its input's path relative to the inputs' common folder, so inputs with the same
name in different folders keep apart: ``p01/t2.nii.gz`` and ``p02/t2.nii.gz`` give ``out/p01/t2_seg.nii.gz`` and
``out/p02/t2_seg.nii.gz``; inputs of one folder keep their bare names (``out/t2_seg.nii.gz``). Two inputs of one
folder whose names differ only in the extension keep it in the stem: ``scan.tif`` and ``scan.jpg`` give
``scan_tif_mask.png`` and ``scan_jpg_mask.png`` (an input alone keeps the plain ``scan_mask.png``). A collision left
after that (names that differ only in case, ``a_tif.png`` beside ``a.tif`` and ``a.png``) is refused naming both
inputs, before anything is written (:func:`output_paths`). An output that exists already is refused unless
overwriting was asked for (:func:`refuse_existing`).

Example:
    >>> [str(p) for p in output_paths(["p01/t2.nii.gz", "p02/t2.nii.gz"], "out", "_seg.nii.gz")]
    ['out/p01/t2_seg.nii.gz', 'out/p02/t2_seg.nii.gz']
"""

from __future__ import annotations

import errno
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

__all__ = ["stem", "relative_names", "output_paths", "refuse_existing"]

PathLike = str | os.PathLike

_DOUBLE = (".nii.gz",)  # extensions of two suffixes


def stem(path: PathLike) -> str:
    """The name without its extension (``.nii.gz`` or the last suffix); an existing folder keeps its whole name
    (DICOM series folders are often named by dotted UIDs)."""
    p = Path(path)
    name = p.name or Path(os.path.abspath(p)).name
    if p.is_dir():
        return name
    lower = name.lower()
    ext = next((e for e in _DOUBLE if lower.endswith(e)), p.suffix)
    return name[: len(name) - len(ext)] if ext and len(ext) < len(name) else name


def relative_names(paths: Sequence[PathLike], anchors: Sequence[PathLike] | None = None) -> list[PurePosixPath]:
    """Each path relative to the common folder of ``anchors`` (default: each path's own folder), ``/``-separated.

    Args:
        paths: files or folders (absolute or relative to the working folder; they need not exist).
        anchors: per path, the folder its name is taken relative to (the folder given on a command line, whose
            files were found below it); the common folder of all anchors is the root.

    Example:
        >>> [str(n) for n in relative_names(["/d/a/x.png", "/d/b/x.png"])]
        ['a/x.png', 'b/x.png']
    """
    full = [os.path.abspath(os.fspath(p)) for p in paths]
    if not full:
        return []
    folders = [os.path.abspath(os.fspath(a)) for a in anchors] if anchors is not None else \
        [os.path.dirname(p) for p in full]
    if len(folders) != len(full):
        raise ValueError(f"anchors ({len(folders)}) must match paths ({len(full)}) one to one.")
    try:
        root = os.path.commonpath(folders)
    except ValueError:  # different drives: keep the whole path below its drive
        root = ""
    return [PurePosixPath(*Path(os.path.relpath(p, root) if root else os.path.splitdrive(p)[1]).parts[
        (0 if root else 1):]) for p in full]


def output_paths(inputs: Sequence[PathLike], output_dir: PathLike, suffix: str,
                 anchors: Sequence[PathLike] | None = None) -> list[Path]:
    """One output path per input: ``<output_dir>/<relative folder>/<stem><suffix>`` (rules in the module docstring).

    Args:
        inputs: the input files or folders (DICOM series), each once.
        output_dir: the output folder.
        suffix: appended to the stem, e.g. ``"_seg.nii.gz"`` or ``"_mask.png"``.
        anchors: see :func:`relative_names`.

    Raises:
        ValueError: two inputs that would share an output (compared ignoring case, as macOS and Windows file systems
            do), naming both.
    """
    rel = relative_names(inputs, anchors)
    stems = [stem(p) for p in inputs]
    exts: dict[tuple[str, str], set[str]] = defaultdict(set)  # (folder, stem) -> the extensions it has there
    for r, s in zip(rel, stems):
        exts[(r.parent.as_posix().casefold(), s.casefold())].add(r.name[len(s):].casefold())
    names = []
    for r, s in zip(rel, stems):
        ext = r.name[len(s):]
        if len(exts[(r.parent.as_posix().casefold(), s.casefold())]) > 1 and ext:
            s = f"{s}_{ext.lstrip('.').replace('.', '_')}"
        names.append(r.parent / f"{s}{suffix}")
    seen: dict[str, PathLike] = {}
    for path, name in zip(inputs, names):
        key = name.as_posix().casefold()
        if key in seen:
            raise ValueError(f"{path}: its output {Path(output_dir, name)} would also be the output of {seen[key]}; "
                             "rename one of them.")
        seen[key] = path
    return [Path(output_dir, name) for name in names]


def refuse_existing(paths: Sequence[PathLike], flag: str = "--overwrite") -> None:
    """Refuse to replace outputs that exist already.

    Raises:
        FileExistsError: naming the first existing output (and how many more exist), and ``flag``, the way to ask
            for replacing them.
    """
    found = [p for p in paths if os.path.lexists(p)]
    if found:
        more = f" (and {len(found) - 1} more of this run's outputs)" if len(found) > 1 else ""
        it = "them" if len(found) > 1 else "it"
        raise FileExistsError(errno.EEXIST, f"exists already{more}; pass {flag} to replace {it}", str(found[0]))
