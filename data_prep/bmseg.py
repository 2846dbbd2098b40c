"""BM-Seg (bone metastasis CT slices) -> MONAI datalist JSON plus seeded, patient-level split files.

Accepted layout of ``--src`` (the folder itself, or a folder holding exactly one such folder)::

    image/<name>.png           2D CT slice (PNG, JPEG, TIF or BMP)
    bone mask/<name>.png       the bone's mask, same name (the extension may differ)
    lesion mask/<name>.png     the lesion's mask, same name: the segmentation target

Folder names are matched loosely (case, ``_``/``-`` for spaces, a plural ``s``: ``Images``, ``bone_masks``).
Files are paired by name without extension.

Patient id: taken from each file name with ``--patient-regex`` (searched in the name without extension; the group
named ``patient``, else group 1). The default ``^([^_-]+)[_-]`` takes the leading token before the first ``_`` or
``-``: ``P07_slice012.png`` and ``P07-12.png`` are patient ``P07``. A name the pattern does not match is an error
(no silent one-image "patients").

Splits, all seeded and patient-level (the slices of one patient are never on two sides): test = about
``--test-fraction`` (default 0.2) of the images in whole patients; validation = about ``--val-fraction``
(default 0.1) of the rest; the split files' labelled and few-shot sets are drawn by patient too (``group_key``
"patient"), so the smallest few-shot set is one patient.

Text (the data set has none): `amvlm_monai.data.describe.describe_mask` of the lesion mask with the bone vocabulary
(``organ="bone", finding="lesion"``), e.g. "Bone lesion, one lesion, small upper right."; positions and sizes
relative to the bone mask's bounding box and area (``--no-bone-relative``: the image's), or to the image when the
bone mask is empty. Left/right follow the radiological convention (patient's left on the image's right).

Masks are binarised (lossless files: any nonzero value; JPEG: >= 128 of 255, against compression noise) and the
lesion mask is written as ``labels/<name>.png`` (0/255) in ``--out``, so that every label is a clean binary PNG
whatever the source format; images stay where they are.

Outputs in ``--out`` (never inside ``--src``): ``labels/``, ``datalist.json`` (items ``{"image", "label", "text",
"id", "patient"}``, ``id`` = the name without extension), ``split_labeled25.json``, ``split_labeled50.json``,
``split_fewshot1.json``, ``split_fewshot10.json``.

Everything is checked before anything is written; all problems are raised together in one
`amvlm_monai.utils.errors.DataError` naming each file: a missing lesion or bone mask for an image, a mask without an
image, a mask whose size differs from its image's, an unreadable or corrupt file, two files with one name in a
folder, an unexpected file, a name without a patient id, fewer than three patients, an empty split.

CLI::

    python -m data_prep.bmseg --src /data/BM-Seg --out data/bmseg [--seed 0] [--test-fraction 0.2]
        [--patient-regex '^([^_-]+)[_-]']
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from amvlm_monai.data.describe import describe_mask
from amvlm_monai.utils.errors import cli_errors, raise_if_problems
from amvlm_monai.utils.progress import progress

from .common import (
    IMAGE_EXTS,
    LOSSLESS_EXTS,
    add_common_args,
    check_fractions,
    check_out,
    check_sections,
    find_layout,
    folder_key,
    holdout,
    list_files,
    read_image,
    save_png,
    stem,
    write_outputs,
)

__all__ = ["FOLDERS", "PATIENT_REGEX", "TEST_FRACTION", "VAL_FRACTION", "binarize", "patient_of", "detect_layout",
           "collect", "convert_bmseg", "main"]

#: role -> folder name as distributed (matched through `data_prep.common.folder_key`).
FOLDERS = {"image": "image", "bone": "bone mask", "lesion": "lesion mask"}
PATIENT_REGEX = r"^([^_-]+)[_-]"  # leading token before the first "_" or "-"
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
MIN_PATIENTS = 3  # one each for training, validation and test


def _folders(root: Path) -> dict[str, Path]:
    keys = {folder_key(v): k for k, v in FOLDERS.items()}
    found = {}
    for c in sorted(root.iterdir()):
        if c.is_dir() and folder_key(c.name) in keys:
            found.setdefault(keys[folder_key(c.name)], c)
    return found


def _kind(folder: Path) -> str | None:
    found = _folders(folder)
    return "bmseg" if "image" in found and ("lesion" in found or "bone" in found) else None


def detect_layout(src: str | os.PathLike) -> Path:
    """The BM-Seg root folder in ``src`` (itself or its one sub-folder holding ``image/`` and the mask folders).

    Raises:
        DataError: ``src`` is missing or holds no BM-Seg layout.
    """
    return find_layout(src, _kind, "BM-Seg", f"folders {list(FOLDERS.values())}")[1]


def binarize(im: Image.Image, path: Path) -> np.ndarray:
    """A mask image as a bool array: nonzero in any colour channel (``>= 128`` for JPEG files)."""
    if im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;"):
        arr = np.asarray(im)
    else:  # palette, RGB(A), LA: the colour channels, without alpha
        arr = np.asarray(im.convert("RGB")).max(axis=-1)
    return arr >= 128 if path.suffix.lower() not in LOSSLESS_EXTS else arr != 0


def patient_of(name: str, regex: str | re.Pattern = PATIENT_REGEX) -> str | None:
    """The patient id in a file name without extension (group ``patient`` or group 1 of ``regex``), or None."""
    pattern = re.compile(regex)
    m = pattern.search(name)
    if m is None:
        return None
    value = m.group("patient") if "patient" in pattern.groupindex else m.group(1)
    return value or None


def _by_stem(folder: Path, problems: list[str]) -> dict[str, Path]:
    files = list_files(folder, problems, IMAGE_EXTS, "image files (PNG, JPEG, TIF, BMP)")
    out: dict[str, Path] = {}
    for name, path in files.items():
        s = stem(name)
        if s in out:
            problems.append(f"{folder / name}: two files named {s} in {folder} (the other: {out[s].name})")
        out.setdefault(s, path)
    return out


def _read_mask(path: Path, size: tuple[int, int] | None, image: Path, problems: list[str]) -> np.ndarray | None:
    im = read_image(path, problems)
    if im is None:
        return None
    if size is not None and im.size != size:
        problems.append(f"{path}: mask is {im.size[0]}x{im.size[1]} but its image {image} is {size[0]}x{size[1]}")
        return None
    return binarize(im, path)


def collect(src: str | os.PathLike, seed: int = 0, test_fraction: float = TEST_FRACTION,
            val_fraction: float = VAL_FRACTION, patient_regex: str = PATIENT_REGEX, bone_relative: bool = True
            ) -> dict[str, list[dict]]:
    """Check a BM-Seg folder and build its datalist in memory; reads only.

    Args:
        src: a folder holding the layout (see the module docstring).
        seed: seed of the patient-level test and validation draws.
        test_fraction, val_fraction: shares of the images (whole patients) for test, and for validation out of the
            rest.
        patient_regex: how to read the patient id from a file name.
        bone_relative: describe lesion positions and sizes relative to the bone mask.

    Returns:
        ``{"training", "validation", "test"}``, items ``{"image", "label", "text", "id", "patient"}``; ``label`` is
        the source lesion mask (`convert_bmseg` replaces it with the binarised copy it writes).

    Raises:
        DataError: listing every problem found, each naming its file.
    """
    root = detect_layout(src)
    regex = re.compile(patient_regex)
    if regex.groups < 1:
        raise ValueError(f"patient_regex {patient_regex!r} needs a group (named 'patient', or the first one).")
    problems: list[str] = []
    folders = _folders(root)
    for role, name in FOLDERS.items():
        if role not in folders:
            problems.append(f"{root / name}: missing folder")
    files = {role: _by_stem(folder, problems) for role, folder in folders.items()}
    images, bones, lesions = files.get("image", {}), files.get("bone"), files.get("lesion")
    for role, masks in (("bone", bones), ("lesion", lesions)):
        for s in sorted(set(masks or ()) - set(images)):
            problems.append(f"{masks[s]}: {FOLDERS[role]} without an image (expected {folders['image'] / s}.*)")
    if not images and "image" in folders:
        problems.append(f"{folders['image']}: empty split: no images")
    items = []
    for s, path in progress(list(images.items()), "checking images"):
        patient = patient_of(s, regex)
        if patient is None:
            problems.append(f"{path}: no patient id in the file name (pattern {patient_regex!r}; see --patient-regex)")
        im = read_image(path, problems)
        size = im.size if im is not None else None
        masks = {}
        for role, found in (("lesion", lesions), ("bone", bones)):
            if found is None:
                continue
            if s not in found:
                problems.append(f"{path}: missing {FOLDERS[role]} (expected {folders[role] / s}.*)")
                continue
            masks[role] = _read_mask(found[s], size, path, problems)
        if patient is None or size is None or len(masks) < 2 or any(m is None for m in masks.values()):
            continue
        bone = masks["bone"] if bone_relative and masks["bone"].any() else None
        text = describe_mask(masks["lesion"], organ="bone", finding="lesion", organ_mask=bone)
        items.append({"image": str(path), "label": str(lesions[s]), "text": text, "id": s, "patient": patient})
    n_patients = len({it["patient"] for it in items})
    if items and n_patients < MIN_PATIENTS and not problems:
        problems.append(f"{root}: {n_patients} patient(s) {sorted({it['patient'] for it in items})}: at least "
                        f"{MIN_PATIENTS} are needed for patient-level training, validation and test sets")
        items = []
    test, rest = holdout(items, test_fraction, seed, "test", group_key="patient")
    val, train = holdout(rest, val_fraction, seed, "validation", group_key="patient")
    datalist = {"training": train, "validation": val, "test": test}
    check_sections(datalist, problems, str(root))
    raise_if_problems(problems, f"BM-Seg source {root}")
    return datalist


def convert_bmseg(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    fractions: tuple[float, ...] = (0.25, 0.5),
    few_shot: tuple[float, ...] = (0.01, 0.1),
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
    patient_regex: str = PATIENT_REGEX,
    bone_relative: bool = True,
) -> Path:
    """Convert a BM-Seg folder to ``out/labels/*.png``, ``out/datalist.json`` and the patient-level split files.

    Args:
        src: source folder; only read.
        out: output folder; must not be inside ``src`` (nor ``src`` inside ``out/labels``).
        seed: seed of the test/validation draws and of the splits.
        fractions, few_shot: labelled and few-shot fractions of the split files (drawn by patient).
        test_fraction, val_fraction, patient_regex, bone_relative: see `collect`.

    Returns:
        the path of ``datalist.json``.

    Raises:
        DataError: any problem with the source (all listed at once); nothing is written then.
    """
    check_fractions(fractions=fractions, few_shot=few_shot, test_fraction=test_fraction, val_fraction=val_fraction)
    root = detect_layout(src)
    check_out(out, src, root, written=("labels",))
    datalist = collect(root, seed, test_fraction, val_fraction, patient_regex, bone_relative)
    for items in datalist.values():
        for it in items:
            source = Path(it["label"])
            with Image.open(source) as im:
                mask = binarize(im, source)
            it["label"] = str(save_png(np.where(mask, 255, 0).astype(np.uint8),
                                       Path(out).resolve() / "labels" / f"{it['id']}.png"))
    return write_outputs(datalist, out, seed, fractions, few_shot, group_key="patient", roots=[root])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="BM-Seg (image/, bone mask/, lesion mask/) -> MONAI datalist + splits.")
    add_common_args(p, "BM-Seg folder holding image/, bone mask/, lesion mask/")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION, help="test share (whole patients)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="validation share of the rest")
    p.add_argument("--patient-regex", default=PATIENT_REGEX, help="patient id: group 'patient' or group 1")
    p.add_argument("--no-bone-relative", action="store_true", help="describe lesions relative to the image")
    a = p.parse_args(argv)
    with cli_errors():  # bad data: one `error: <file>: <problem>` line each, exit status 2
        path = convert_bmseg(a.src, a.out, a.seed, tuple(a.fractions), tuple(a.few_shot), a.test_fraction,
                             a.val_fraction, a.patient_regex, not a.no_bone_relative)
    print(f"wrote {path} and split files to {path.parent}")
    return path


if __name__ == "__main__":
    main()
