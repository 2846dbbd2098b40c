"""The inputs of 2D inference: a file, or the files of a folder matching some patterns."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["INPUT_PATTERNS", "input_items"]

#: what 2D inference reads by default: image files and single DICOM files
INPUT_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.dcm")


def input_items(input: str | os.PathLike, patterns: str | Sequence[str] = INPUT_PATTERNS) -> list[dict]:
    """``[{"image": path}, ...]``: ``input`` itself when it is a file, else the files of the folder ``input`` whose
    names match one of ``patterns`` (shell patterns, case-insensitive: ``*.png`` also takes ``A.PNG``), sorted.

    Raises:
        FileNotFoundError: ``input`` does not exist (the message names it).
    """
    path = Path(input)
    if path.is_file():
        return [{"image": str(path)}]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder (the input of inference).")
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    pats = [p.lower() for p in pats]
    files = [f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")
             and any(fnmatch.fnmatchcase(f.name.lower(), p) for p in pats)]
    return [{"image": str(f)} for f in files]
