"""QaTa-COV19 -> MONAI datalist JSON plus seeded split files.

Accepted layouts of ``--src`` (the folder itself, or a folder holding exactly one of them):

- LViT (with LViT's reports)::

      QaTa-COV19/Train_Folder/{img/<name>.png, labelcol/mask_<name>.png, Train_text.xlsx}
      QaTa-COV19/Val_Folder/{img, labelcol, Val_text.xlsx}
      QaTa-COV19/Test_Folder/{img, labelcol, Test_text.xlsx}    sheets: columns Image (the mask file name), Description

  Each split's sheet lies inside its split folder, as LViT's README and release have it; a sheet beside the split
  folders (``QaTa-COV19/Train_text.xlsx``) is accepted too. A row's ``Image`` may also be the image name; the mask is
  then ``mask_<Image>``. LViT's ``datasets/`` folder, holding ``Covid19/`` and ``MoNuSeg/`` side by side, may be
  given as ``--src``: the sub-folder named like QaTa or Covid is taken.

- Kaggle original (no reports, no validation split)::

      QaTa-COV19-v2/{Train Set,Test Set}/Images/<name>.png
      QaTa-COV19-v2/{Train Set,Test Set}/Ground-truths/mask_<name>.png

  The text is written from each mask by `amvlm_monai.data.describe.describe_mask`; a validation set of 20% of the
  training images (LViT's ratio, 1429 of 7145) is drawn with ``--seed`` (`amvlm_monai.data.splits.partition`).

Outputs in ``--out`` (never inside ``--src``; the source folder is only read):

- ``datalist.json``: ``{"training", "validation", "test"}``, items ``{"image", "label", "text", "id"}``, ``id`` = the
  image file name without ``.png``; paths relative to ``--out`` (absolute only where no relative path exists, e.g.
  another drive on Windows). `amvlm_monai.data.datalist.load_datalist` resolves them to absolute paths.
- ``split_labeled25.json``, ``split_labeled50.json``, ``split_fewshot1.json``, ``split_fewshot10.json``
  (`amvlm_monai.data.splits.write_splits`).

Every source file is checked before anything is written: readable PNGs (PIL verify + decode), an image for every
mask and spreadsheet row, a mask for every image, a description for every row, the spreadsheet columns, image and
mask of the same size, mask values 0/1 or 0/255 only, no empty split, no image listed twice. All problems are raised
together in one
`amvlm_monai.utils.errors.DataError` naming each file; nothing is written then.

CLI::

    python -m data_prep.qata --src /data/QaTa-COV19 --out data/qata [--seed 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from amvlm_monai.data.describe import describe_mask
from amvlm_monai.data.splits import partition
from amvlm_monai.utils.errors import cli_errors, raise_if_problems
from amvlm_monai.utils.progress import progress

from .common import (
    LVIT_SPLITS,
    LvitNames,
    add_common_args,
    check_fractions,
    check_out,
    check_pair,
    check_sections,
    collect_lvit,
    find_layout,
    list_files,
    require_folder,
    write_outputs,
)

__all__ = ["LVIT_SPLITS", "KAGGLE_SPLITS", "VAL_FRACTION", "NAMES", "detect_layout", "collect", "convert_qata", "main"]

#: (datalist section, folder) of the Kaggle layout.
KAGGLE_SPLITS = (("training", "Train Set"), ("test", "Test Set"))
VAL_FRACTION = 1429 / 7145  # LViT's validation share of QaTa's training set (= 0.2)
_MASK_PREFIX = "mask_"


def _row(name: str, images: dict) -> tuple[str, str]:
    """A spreadsheet cell -> (image, mask): the cell names the mask (``mask_<image>``) or, tolerated, the image."""
    if name.startswith(_MASK_PREFIX):
        return name[len(_MASK_PREFIX):], name
    return name, _MASK_PREFIX + name


def _image_of(mask_name: str, images: dict) -> str | None:
    return mask_name[len(_MASK_PREFIX):] if mask_name.startswith(_MASK_PREFIX) else None


#: QaTa's mask naming in LViT's layout (`data_prep.common.collect_lvit`).
NAMES = LvitNames(row=_row, image_of=_image_of, pattern="mask_<image>.png")


def _kind(folder: Path) -> str | None:
    if any((folder / f).is_dir() for _, f, _ in LVIT_SPLITS):
        return "lvit"
    if any((folder / f).is_dir() for _, f in KAGGLE_SPLITS):
        return "kaggle"
    return None


def detect_layout(src: str | os.PathLike) -> tuple[str, Path]:
    """Find which layout ``src`` holds: ("lvit" | "kaggle", the layout's root folder).

    Raises:
        DataError: ``src`` is missing or holds neither layout (the message lists what was looked for).
    """
    expected = (f"folders {[f for _, f, _ in LVIT_SPLITS]} (LViT) or {[f for _, f in KAGGLE_SPLITS]} (Kaggle)")
    return find_layout(src, _kind, "QaTa-COV19", expected, prefer=("qata", "covid"))


def _collect_kaggle(root: Path, seed: int, problems: list[str]) -> dict[str, list[dict]]:
    datalist = {}
    for section, folder in KAGGLE_SPLITS:
        items: list[dict] = []
        datalist[section] = items
        img_dir, mask_dir = root / folder / "Images", root / folder / "Ground-truths"
        if not (require_folder(img_dir, problems) & require_folder(mask_dir, problems)):
            continue
        images, masks = list_files(img_dir, problems), list_files(mask_dir, problems)
        if not images and not masks:
            problems.append(f"{img_dir}: empty split: no PNG images")
            continue
        for mask_name, path in masks.items():
            if not mask_name.startswith(_MASK_PREFIX):
                problems.append(f"{path}: mask is not named mask_<image>.png")
            elif mask_name[len(_MASK_PREFIX):] not in images:
                problems.append(f"{path}: mask without an image (expected {img_dir / mask_name[len(_MASK_PREFIX):]})")
        for image_name, path in progress(list(images.items()), f"checking {img_dir}"):
            mask_name = _MASK_PREFIX + image_name
            if mask_name not in masks:
                problems.append(f"{path}: missing mask {mask_dir / mask_name}")
                continue
            mask = check_pair(path, masks[mask_name], problems)
            if mask is None:
                continue
            text = describe_mask(np.asarray(mask.convert("L")))
            items.append({"image": str(path), "label": str(masks[mask_name]), "text": text,
                          "id": Path(image_name).stem})
    train = datalist.get("training", [])
    if len(train) == 1:
        problems.append(f"{root / 'Train Set'}: a single image: cannot carve a validation set from it")
    if len(train) >= 2:
        datalist["validation"], datalist["training"] = partition(train, VAL_FRACTION, seed, salt="validation")
    else:
        datalist["validation"] = []
    return {s: datalist[s] for s in ("training", "validation", "test")}


def collect(src: str | os.PathLike, seed: int = 0) -> dict[str, list[dict]]:
    """Check a QaTa folder and build its datalist in memory (absolute paths); reads only.

    Args:
        src: a folder holding either layout (see the module docstring).
        seed: seed of the validation draw (Kaggle layout).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, items ``{"image", "label", "text", "id"}``.

    Raises:
        DataError: listing every problem found, each naming its file.
    """
    layout, root = detect_layout(src)
    problems: list[str] = []
    if layout == "lvit":
        datalist = collect_lvit(root, NAMES, problems)
    else:
        datalist = _collect_kaggle(root, seed, problems)
    check_sections(datalist, problems, str(root))
    raise_if_problems(problems, f"QaTa source {root} ({layout} layout)")
    return datalist


def convert_qata(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    fractions: tuple[float, ...] = (0.25, 0.5),
    few_shot: tuple[float, ...] = (0.01, 0.1),
) -> Path:
    """Convert a QaTa-COV19 folder to ``out/datalist.json`` plus the split files.

    Args:
        src: source folder (LViT or Kaggle layout); only read.
        out: output folder; must not be the layout's folder or inside it.
        seed: seed of the validation draw (Kaggle) and of the splits.
        fractions, few_shot: labelled and few-shot fractions of the split files.

    Returns:
        the path of ``datalist.json``.

    Raises:
        DataError: any problem with the source (all listed at once); nothing is written then.
    """
    check_fractions(fractions=fractions, few_shot=few_shot)
    _, root = detect_layout(src)
    check_out(out, root)
    datalist = collect(root, seed)
    return write_outputs(datalist, out, seed, fractions, few_shot, roots=[root])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="QaTa-COV19 (LViT or Kaggle layout) -> MONAI datalist + split files.")
    add_common_args(p, "QaTa-COV19 folder (LViT or Kaggle layout)")
    a = p.parse_args(argv)
    with cli_errors():  # bad data: one `error: <file>: <problem>` line each, exit status 2
        path = convert_qata(a.src, a.out, a.seed, tuple(a.fractions), tuple(a.few_shot))
    print(f"wrote {path} and split files to {path.parent}")
    return path


if __name__ == "__main__":
    main()
