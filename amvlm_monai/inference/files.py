"""The inputs of 2D inference: a file, or the files of a folder matching some patterns."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["INPUT_PATTERNS", "input_items", "SaveNiftid"]

#: what 2D inference reads by default: image files and single DICOM files
INPUT_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.dcm")


def input_items(input: str | os.PathLike, patterns: str | Sequence[str] = INPUT_PATTERNS) -> list[dict]:
    """``[{"image": path}, ...]``: ``input`` itself when it is a file, else the files of the folder ``input`` whose
    names match one of ``patterns`` (shell patterns, case-insensitive: ``*.png`` also takes ``A.PNG``), sorted.

    Every file is checked before any is read (`amvlm_monai.transforms.clinical.detect_format`: an empty file, a
    ``.dcm`` that is not DICOM, an unsupported type), so a bad one stops the run before any work, naming it.

    Raises:
        FileNotFoundError: ``input`` does not exist (the message names it).
        DataError: listing each bad file.
    """
    from amvlm_monai.data.errors import raise_if_problems
    from amvlm_monai.transforms.clinical import detect_format

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


class SaveNiftid:
    """Write ``data[key]`` (``(1, *spatial)`` labels, already at the input's size) as
    ``<output_dir>/<input stem>_<postfix>.nii.gz`` (uint8) with the input's original affine, unchanged.

    MONAI's ``SaveImaged`` reduces a 2D image's 4x4 affine to 3x3 before writing, which is singular for 2D slices cut
    from a volume along another axis than the last (a sagittal slice has no in-plane z); nibabel keeps the 4x4
    affine, so each mask overlays its slice in world space.
    """

    def __init__(self, keys: str, output_dir: str | os.PathLike, output_ext: str = ".nii.gz",
                 postfix: str = "mask") -> None:
        self.key = keys
        self.output_dir = Path(output_dir)
        self.output_ext = output_ext
        self.postfix = postfix

    def __call__(self, data: dict) -> dict:
        import nibabel as nib
        import numpy as np

        pred = data[self.key]
        meta = getattr(pred, "meta", {})
        source = str(meta.get("filename_or_obj", "image"))
        name = Path(source).name
        for ext in (".nii.gz", ".nii"):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
        else:
            name = Path(name).stem
        affine = np.asarray(meta.get("original_affine", getattr(pred, "affine", np.eye(4))), np.float64)
        arr = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)[0].astype(np.uint8)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), str(self.output_dir / f"{name}_{self.postfix}{self.output_ext}"))
        return data
