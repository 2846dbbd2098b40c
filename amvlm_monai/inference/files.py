"""The inputs of 2D inference: a file, or the files of a folder matching some patterns."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

#: what 2D inference reads by default: image files and single DICOM files


INPUT_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.dcm")


def input_items(input: str | os.PathLike, patterns: str | Sequence[str] = INPUT_PATTERNS) -> list[dict]:
    """``[{"image": path}, ...]``: ``input`` itself when it is a file, else the files of the folder ``input`` whose
    names match one of ``patterns`` (shell patterns, case-insensitive: ``*.png`` also takes ``A.PNG``), sorted.

    Every file is checked before any is read (`amvlm_monai.io.clinical.detect_format`: an empty file, a
    ``.dcm`` that is not DICOM, an unsupported type), so a bad one stops the run before any work, naming it.

    Raises:
        FileNotFoundError: ``input`` does not exist (the message names it).
        DataError: listing each bad file.
    """
    from amvlm_monai.io.clinical import detect_format
    from amvlm_monai.utils.errors import raise_if_problems

    path = Path(input)
    if path.is_file():
        files = [path]
    elif not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder (the input of inference).")
    else:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        pats = [p.lower() for p in pats]
        files = [f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")
                 and any(fnmatch.fnmatchcase(f.name.lower(), p) for p in pats)]
    problems = []
    for f in files:  # what can be told without decoding: empty files, .dcm files that are not DICOM, unknown types
        try:
            detect_format(f)
        except (ValueError, OSError) as e:
            problems.append(str(e))
    raise_if_problems(problems, f"the inputs in {path}")
    return [{"image": str(f)} for f in files]
