"""MRSpineSeg (sagittal T2 MR volumes) -> 2D sagittal NIfTI slices, MONAI datalist JSON and case-level split files.

Accepted layout of ``--src`` (the folder holding ``train/``, or ``train/`` itself, or a folder holding exactly one
such folder)::

    train/MR/Case<N>.nii.gz            T2 volume (.nii also accepted; names matched case-insensitively)
    train/Mask/mask_case<N>.nii.gz     labels: 0 background, 1 S, 2-10 L5..T9, 11-19 L5/S..T9/T10

Class names and prompts: `amvlm_monai.data.spine` (``SPINE_CLASSES``, ``SPINE_PROMPTS``).

Slicing: image and mask are reoriented to the closest canonical orientation, RAS+ (nibabel ``io_orientation`` /
``apply_orientation``: axis 0 runs to the patient's right, 1 to anterior, 2 to superior; only flips and axis
permutations, no resampling). The sagittal axis is the one ``aff2axcodes`` then names R (axis 0): slice ``i`` is
``volume[i, :, :]``, an (anterior, superior) plane, written as a 2D NIfTI whose affine maps its voxel (j, k) to the
same world point as the canonical volume's voxel (i, j, k) (the slice's position and spacing are kept). A volume
whose header is wrong can be sliced along a stored voxel axis with ``--axis``. Slice index ``i`` in the file names
counts along the canonical R axis. Only slices with any labelled voxel are kept (``--keep-empty``: all).

Text per slice: `amvlm_monai.data.spine.describe_spine`, e.g. "Visible levels: S, L5, L4, L5/S, L4/L5."
(vertebrae, then discs, bottom-up).

Splits, all seeded and case-level (the slices of one case are never on two sides): test = ``--test-fraction``
(default 0.2) of the cases, validation = ``--val-fraction`` (default 0.1) of the remaining cases; the split files'
labelled and few-shot sets are drawn by case too (``group_key`` "case").

Outputs in ``--out`` (never inside ``--src``): ``images/Case<N>_s<iii>.nii.gz`` (float32), ``labels/...`` (uint8),
``datalist.json`` (items ``{"image", "label", "text", "id", "case", "slice"}``), ``split_labeled25.json``,
``split_labeled50.json``, ``split_fewshot1.json``, ``split_fewshot10.json``.

Everything is checked before anything is written; all problems are raised together in one
`amvlm_monai.utils.errors.DataError` naming each file: a case without a mask or a mask without a case, an unreadable,
corrupt or truncated NIfTI, a volume that is not 3D, a mask whose shape or affine differs from its image's, label
values that are not integers in 0..19, NaN or infinite voxels in an image, a mask without any label (unless
``--keep-empty``), an unexpected file name, fewer than three cases, an empty split.

CLI::

    python -m data_prep.mrspineseg --src /data/MRSpineSeg --out data/mrspineseg [--seed 0] [--keep-empty]
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

from amvlm_monai.data.spine import NUM_SPINE_CLASSES, describe_spine
from amvlm_monai.utils.errors import cli_errors, raise_if_problems
from amvlm_monai.utils.progress import progress

from .common import (
    add_common_args,
    check_fractions,
    check_out,
    check_sections,
    find_layout,
    holdout,
    list_files,
    write_outputs,
)

__all__ = ["TEST_FRACTION", "VAL_FRACTION", "Case", "canonical", "slice_affine", "detect_layout", "collect",
           "convert_case", "convert_mrspineseg", "main"]

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
MIN_CASES = 3  # one each for training, validation and test
_IMAGE = re.compile(r"^case(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_MASK = re.compile(r"^mask_case(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_ATOL = 1e-3  # mm: tolerance on the image/mask affines


@dataclass
class Case:
    """One checked case (`collect`): its files, the canonical slicing axis and the slices to write."""

    id: str  # "Case<N>", from the image's file name
    image: Path
    mask: Path
    axis: int  # the sagittal axis of the canonical (RAS+) arrays
    slices: list[int]  # slice indices along ``axis`` to write


def _child(folder: Path, name: str) -> Path | None:
    """The sub-folder of ``folder`` named ``name`` (case-insensitively), or None."""
    if not folder.is_dir():
        return None
    found = [c for c in sorted(folder.iterdir()) if c.is_dir() and c.name.lower() == name.lower()]
    return found[0] if found else None


def _train_dir(folder: Path) -> Path | None:
    train = _child(folder, "train")
    if train is not None and _child(train, "MR") is not None:
        return train
    if _child(folder, "MR") is not None and _child(folder, "Mask") is not None:
        return folder
    return None


def detect_layout(src: str | os.PathLike) -> Path:
    """The folder holding ``MR/`` and ``Mask/`` (``train/`` as distributed) in ``src``.

    Raises:
        DataError: ``src`` is missing or holds no MRSpineSeg layout.
    """
    root = find_layout(src, lambda f: "mrspineseg" if _train_dir(f) else None, "MRSpineSeg",
                       "train/MR/Case<N>.nii.gz and train/Mask/mask_case<N>.nii.gz")[1]
    return _train_dir(root)


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient a 3D array to the closest canonical orientation, RAS+ (flips and axis permutations only).

    Returns:
        (data, affine, ornt): the reoriented array (a view where possible), its affine, and nibabel's orientation
        ``ornt`` (``ornt[a, 0]`` is the canonical axis the stored axis ``a`` went to).
    """
    ornt = io_orientation(affine)
    out = apply_orientation(data, ornt)
    return out, affine @ inv_ornt_aff(ornt, data.shape), ornt


def slice_affine(affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 4x4 affine of slice ``index`` along ``axis`` of a 3D volume with ``affine``, as a 2D image.

    The 2D image's voxel (j, k) maps to the world point of the volume's voxel with ``index`` at ``axis`` and (j, k)
    at the other two axes (in increasing order); its third voxel axis is the slicing direction.
    """
    others = [a for a in range(3) if a != axis]
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2] = affine[:3, others[0]], affine[:3, others[1]], affine[:3, axis]
    out[:3, 3] = affine[:3, 3] + index * affine[:3, axis]
    return out


def _read(path: Path, problems: list[str], mask: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(data, affine) of a NIfTI file (float32 image, raw mask values), or None after a problem naming ``path``."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj) if mask else img.get_fdata(dtype=np.float32)
    except Exception as e:  # nibabel, gzip and zlib raise many types for broken files
        problems.append(f"{path}: unreadable, corrupt or truncated NIfTI ({type(e).__name__}: {e})")
        return None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        problems.append(f"{path}: NIfTI of shape {data.shape}: a 3D volume is expected")
        return None
    return data, np.asarray(img.affine, np.float64)


def _sagittal(affine: np.ndarray, ornt: np.ndarray, axis: int | None) -> int:
    if axis is not None:
        return int(ornt[axis, 0])
    return [c in "LR" for c in aff2axcodes(affine)].index(True)


def _check_case(cid: str, image: Path, mask: Path, axis: int | None, keep_empty: bool, problems: list[str]
                ) -> Case | None:
    img = _read(image, problems, mask=False)
    msk = _read(mask, problems, mask=True)
    if img is None or msk is None:
        return None
    (data, affine), (labels, m_affine) = img, msk
    bad = False
    finite = np.isfinite(data)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        problems.append(f"{image}: {n_nan} NaN and {n_inf} infinite voxels of {data.size}; a network cannot learn from "
                        "them (repair or replace the volume)")
        bad = True
    if labels.shape != data.shape:
        problems.append(f"{mask}: mask of shape {labels.shape} but its image {image} has {data.shape}")
        bad = True
    elif not np.allclose(m_affine, affine, rtol=0, atol=_ATOL):
        problems.append(f"{mask}: mask has another affine than its image {image}:\n{m_affine.round(4)}\nvs\n"
                        f"{affine.round(4)}")
        bad = True
    values = np.unique(labels)
    wrong = values[~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= NUM_SPINE_CLASSES)]
    if wrong.size:
        problems.append(f"{mask}: mask has label values {wrong[:5].tolist()}{' ...' if wrong.size > 5 else ''}; "
                        f"expected integers 0..{NUM_SPINE_CLASSES - 1}")
        bad = True
    if bad:
        return None
    labels, c_affine, ornt = canonical(labels, affine)
    s = _sagittal(c_affine, ornt, axis)
    if keep_empty:
        slices = list(range(labels.shape[s]))
    else:
        slices = np.nonzero(np.moveaxis(labels, s, 0).reshape(labels.shape[s], -1).any(axis=1))[0].tolist()
        if not slices:
            problems.append(f"{mask}: mask has no labelled voxel (pass --keep-empty to keep its slices)")
            return None
    return Case(cid, image, mask, s, slices)


def collect(src: str | os.PathLike, seed: int = 0, test_fraction: float = TEST_FRACTION,
            val_fraction: float = VAL_FRACTION, keep_empty: bool = False, axis: int | None = None
            ) -> dict[str, list[Case]]:
    """Check an MRSpineSeg folder and plan its slices and case-level sections; reads only.

    Args:
        src: a folder holding the layout (see the module docstring).
        seed: seed of the test and validation draws.
        test_fraction, val_fraction: shares of the cases for test, and for validation out of the rest.
        keep_empty: keep slices without any label.
        axis: slice along this stored voxel axis (0, 1, 2) instead of the one the affine calls left-right.

    Returns:
        ``{"training", "validation", "test"}``: lists of `Case` (what `convert_case` writes).

    Raises:
        DataError: listing every problem found, each naming its file.
    """
    if axis not in (None, 0, 1, 2):
        raise ValueError(f"axis must be None, 0, 1 or 2, got {axis!r}.")
    train = detect_layout(src)
    problems: list[str] = []
    found = {}
    for role, name, pattern in (("image", "MR", _IMAGE), ("mask", "Mask", _MASK)):
        folder = _child(train, name)
        found[role] = {}
        if folder is None:
            problems.append(f"{train / name}: missing folder")
            continue
        for fname, path in list_files(folder, problems, (".nii.gz", ".nii"), "NIfTI volumes").items():
            m = pattern.match(fname)
            if m is None:
                expected = "Case<N>.nii.gz" if role == "image" else "mask_case<N>.nii.gz"
                problems.append(f"{path}: unexpected file name: expected {expected}")
            elif int(m.group(1)) in found[role]:
                first = found[role][int(m.group(1))]
                problems.append(f"{path}: a second file for case {int(m.group(1))} (the first: {first})")
            else:
                found[role][int(m.group(1))] = path
    images, masks = found["image"], found["mask"]
    for n in sorted(set(masks) - set(images)):
        problems.append(f"{masks[n]}: mask without a case (expected {train / 'MR' / f'Case{n}.nii.gz'})")
    for n in sorted(set(images) - set(masks)):
        problems.append(f"{images[n]}: case without a mask (expected {train / 'Mask' / f'mask_case{n}.nii.gz'})")
    cases = []
    for n in progress(sorted(set(images) & set(masks)), "checking cases"):
        cid = images[n].name.split(".")[0]
        case = _check_case(cid, images[n], masks[n], axis, keep_empty, problems)
        if case is not None:
            cases.append(case)
    if not images and not problems:
        problems.append(f"{train / 'MR'}: empty split: no Case<N>.nii.gz")
    if cases and len(cases) < MIN_CASES and not problems:
        problems.append(f"{train}: {len(cases)} usable case(s): at least {MIN_CASES} are needed for case-level "
                        "training, validation and test sets")
        cases = []
    by_id = {c.id: c for c in cases}
    test, rest = holdout([{"id": c.id} for c in cases], test_fraction, seed, "test")
    val, tr = holdout(rest, val_fraction, seed, "validation")
    plan = {s: [by_id[it["id"]] for it in part] for s, part in (("training", tr), ("validation", val), ("test", test))}
    check_sections({s: [{"id": c.id, "image": str(c.image)} for c in v] for s, v in plan.items()}, problems,
                   str(train))
    raise_if_problems(problems, f"MRSpineSeg source {train}")
    return plan


def convert_case(case: Case, out: str | os.PathLike) -> list[dict]:
    """Write a case's slices to ``out/images/`` and ``out/labels/`` (2D NIfTI); returns their datalist items."""
    out = Path(out).resolve()
    img = nib.load(str(case.image))
    data = img.get_fdata(dtype=np.float32)
    labels = np.asanyarray(nib.load(str(case.mask)).dataobj)
    data, labels = data.reshape(data.shape[:3]), labels.reshape(labels.shape[:3])
    affine = np.asarray(img.affine, np.float64)
    data, c_affine, _ = canonical(data, affine)
    labels = canonical(np.rint(labels).astype(np.uint8), affine)[0]
    items = []
    for i in case.slices:
        sid = f"{case.id}_s{i:03d}"
        aff = slice_affine(c_affine, case.axis, i)
        lab = np.ascontiguousarray(np.take(labels, i, axis=case.axis))
        paths = []
        for folder, arr in (("images", np.take(data, i, axis=case.axis).astype(np.float32)), ("labels", lab)):
            nii = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
            nii.set_sform(aff, code=1)
            nii.set_qform(aff, code=1)
            nii.header.set_xyzt_units("mm")
            path = out / folder / f"{sid}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nii, str(path))
            paths.append(path)
        items.append({"image": str(paths[0]), "label": str(paths[1]), "text": describe_spine(lab), "id": sid,
                      "case": case.id, "slice": i})
    return items


def convert_mrspineseg(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    fractions: tuple[float, ...] = (0.25, 0.5),
    few_shot: tuple[float, ...] = (0.01, 0.1),
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
    keep_empty: bool = False,
    axis: int | None = None,
) -> Path:
    """Convert an MRSpineSeg folder to 2D sagittal slices, ``out/datalist.json`` and case-level split files.

    Args:
        src: source folder; only read.
        out: output folder; must not be inside ``src`` (nor ``src`` inside ``out/images`` or ``out/labels``).
        seed: seed of the test/validation draws and of the splits.
        fractions, few_shot: labelled and few-shot fractions of the split files (drawn by case).
        test_fraction, val_fraction, keep_empty, axis: see `collect`.

    Returns:
        the path of ``datalist.json``.

    Raises:
        DataError: any problem with the source (all listed at once); nothing is written then.
    """
    check_fractions(fractions=fractions, few_shot=few_shot, test_fraction=test_fraction, val_fraction=val_fraction)
    train = detect_layout(src)
    check_out(out, src, train, written=("images", "labels"))
    plan = collect(train, seed, test_fraction, val_fraction, keep_empty, axis)
    datalist = {s: [it for case in cases for it in convert_case(case, out)] for s, cases in plan.items()}
    return write_outputs(datalist, out, seed, fractions, few_shot, group_key="case")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="MRSpineSeg (train/MR, train/Mask) -> 2D sagittal NIfTI slices, "
                                            "MONAI datalist + case-level splits.")
    add_common_args(p, "MRSpineSeg folder holding train/MR and train/Mask")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION, help="test share of the cases")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="validation share of the other cases")
    p.add_argument("--keep-empty", action="store_true", help="keep slices without any label")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=None,
                   help="slice along this stored voxel axis (default: the affine's left-right axis)")
    a = p.parse_args(argv)
    with cli_errors():  # bad data: one `error: <file>: <problem>` line each, exit status 2
        path = convert_mrspineseg(a.src, a.out, a.seed, tuple(a.fractions), tuple(a.few_shot), a.test_fraction,
                                  a.val_fraction, a.keep_empty, a.axis)
    print(f"wrote {path} and split files to {path.parent}")
    return path


if __name__ == "__main__":
    main()
