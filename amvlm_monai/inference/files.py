"""The inputs of inference and their outputs: files of folders (sub-folders included), each mapped to its own output.

2D inference (the bundles' ``inferring``, :func:`input_items`) reads image and single DICOM files; volume inference
(:func:`volume_inputs`) reads NIfTI files and DICOM series folders. A folder given as input is searched with its
sub-folders, and outputs keep each input's path relative to it (`amvlm_monai.io.outputs`: ``in/p01/scan.png`` ->
``out/p01/scan_mask.png``), so same-named inputs of different folders never share an output.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["INPUT_PATTERNS", "input_items", "volume_inputs"]

#: what 2D inference reads by default: image files and single DICOM files
INPUT_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.dcm")


def _walk(folder: Path, skip: Path | None = None):
    """``(folder, sub-folders, files)`` below ``folder``, sorted, hidden entries and ``skip`` (an output folder inside
    the input folder) left out; the caller may prune ``sub-folders`` in place."""
    skip_abs = os.path.abspath(skip) if skip is not None else None
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.abspath(os.path.join(here, d)) != skip_abs)
        yield Path(here), dirs, sorted(f for f in files if not f.startswith("."))


def input_items(input: str | os.PathLike | Sequence[str | os.PathLike],
                patterns: str | Sequence[str] = INPUT_PATTERNS, output_dir: str | os.PathLike | None = None,
                output_ext: str = ".png", postfix: str = "mask", overwrite: bool | str = False,
                recursive: bool | str = True) -> list[dict]:
    """``[{"image": path, "output": path}, ...]``: the images of 2D inference, each with its own output file.

    ``input`` is a file, a folder, or a list of them. A folder gives its files whose names match one of ``patterns``
    (shell patterns, case-insensitive: ``*.png`` also takes ``A.PNG``), sorted, those of its sub-folders too unless
    ``recursive`` is False (hidden files and folders, and ``output_dir`` when it lies inside, are skipped).
    ``overwrite`` and ``recursive`` take bools or, from a command line, ``"true"``/``"false"``.

    With ``output_dir`` each item gets ``"output"``: ``<output_dir>/<relative folder>/<stem>_<postfix><output_ext>``,
    the input's path relative to the input folder (several inputs: their common folder); inputs of one folder
    differing only in extension keep it (``scan.tif``, ``scan.jpg`` -> ``scan_tif_mask.png``, ``scan_jpg_mask.png``;
    `amvlm_monai.io.outputs`).

    Every file is checked before any is read (`amvlm_monai.io.clinical.detect_format`: an empty file, a ``.dcm``
    that is not DICOM, an unsupported type), and every output before any is written, so a bad input or an output in
    the way stops the run before any work, naming it.

    Raises:
        FileNotFoundError: an input does not exist (the message names it).
        DataError: listing each bad file.
        ValueError: two inputs whose outputs would be one file (naming both).
        FileExistsError: an output exists already and ``overwrite`` is False (naming it; ``--overwrite true``).
    """
    from amvlm_monai.io.clinical import detect_format
    from amvlm_monai.io.outputs import output_paths, refuse_existing
    from amvlm_monai.utils.args import as_bool
    from amvlm_monai.utils.errors import raise_if_problems

    overwrite, recursive = as_bool(overwrite, "overwrite"), as_bool(recursive, "recursive")
    given = [input] if isinstance(input, (str, os.PathLike)) else list(input)
    pats = [p.lower() for p in ([patterns] if isinstance(patterns, str) else list(patterns))]
    skip = Path(output_dir) if output_dir is not None else None
    files: list[Path] = []
    anchors: list[Path] = []
    for item in given:
        path = Path(item)
        if path.is_file():
            files.append(path)
            anchors.append(path.parent)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such file or folder (the input of inference).")
        for here, dirs, names in _walk(path, skip):
            if not recursive:
                dirs[:] = []
            found = [here / n for n in names if any(fnmatch.fnmatchcase(n.lower(), p) for p in pats)]
            files += [f for f in found if f.is_file()]
            anchors += [path] * (len(files) - len(anchors))
    seen, unique = set(), []
    for f, a in zip(files, anchors):  # an input given twice (a folder and a file in it) is read once
        if os.path.abspath(f) not in seen:
            seen.add(os.path.abspath(f))
            unique.append((f, a))
    problems = []
    for f, _ in unique:  # what can be told without decoding: empty files, .dcm files that are not DICOM, unknown types
        try:
            detect_format(f)
        except (ValueError, OSError) as e:
            problems.append(str(e))
    raise_if_problems(problems, f"the inputs in {', '.join(str(g) for g in given)}")
    items = [{"image": str(f)} for f, _ in unique]
    if output_dir is not None and unique:
        outputs = output_paths([f for f, _ in unique], output_dir, f"_{postfix}{output_ext}", [a for _, a in unique])
        if not overwrite:
            refuse_existing(outputs, "--overwrite true")
        for it, out in zip(items, outputs):
            it["output"] = str(out)
    return items


def volume_inputs(inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None
                  ) -> tuple[list[Path], list[Path], list[Path]]:
    """The inputs of volume inference: ``(inputs, anchors, skipped)``.

    A file (NIfTI, DICOM, image) or a DICOM series folder (one holding DICOM files) is itself an input, anchored at its
    folder. Any other folder gives the NIfTI files and the DICOM series folders found in it and its sub-folders
    (sorted; hidden ones and ``output_dir`` skipped; a series folder is not searched further), anchored at it, so
    that outputs keep their paths relative to it; ``skipped`` lists the other files met there (e.g. JSON sidecars).

    Raises:
        DataError: listing every input that does not exist, cannot be read as what it claims (an empty file, a
            ``.dcm`` that is not DICOM, an unsupported type), or is a folder with nothing to segment.
    """
    from amvlm_monai.io.clinical import NIFTI_SUFFIXES, detect_format, holds_dicom
    from amvlm_monai.utils.errors import raise_if_problems

    found: list[tuple[Path, Path]] = []
    skipped: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and not holds_dicom(path):
            units = []
            for here, dirs, names in _walk(path, Path(output_dir) if output_dir is not None else None):
                for d in list(dirs):
                    if holds_dicom(here / d):
                        units.append(here / d)
                        dirs.remove(d)
                for n in names:
                    (units if n.lower().endswith(NIFTI_SUFFIXES) else skipped).append(here / n)
            if not units:
                problems.append(f"{path}: holds no NIfTI files and no DICOM series folders (its sub-folders "
                                "searched too).")
            for u in sorted(units):
                if u.is_file() and u.stat().st_size == 0:
                    problems.append(f"{u}: empty file (0 bytes); nothing to read (an interrupted copy?).")
                found.append((u, path))
            continue
        try:
            detect_format(path)
        except (ValueError, OSError) as e:
            problems.append(str(e))
            continue
        found.append((path, path.parent))
    raise_if_problems(problems, "the inputs")
    seen, units, anchors = set(), [], []
    for u, a in found:
        if os.path.abspath(u) not in seen:
            seen.add(os.path.abspath(u))
            units.append(u)
            anchors.append(a)
    return units, anchors, skipped
