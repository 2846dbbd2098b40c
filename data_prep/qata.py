"""QaTa-COV19 -> MONAI datalist JSON plus seeded split files.

Accepted layouts of ``--src`` (the folder itself, or a folder holding exactly one of them):

- LViT (with LViT's reports)::

      QaTa-COV19/{Train_Folder,Val_Folder,Test_Folder}/img/<name>.png
      QaTa-COV19/{Train_Folder,Val_Folder,Test_Folder}/labelcol/mask_<name>.png
      QaTa-COV19/{Train_text,Val_text,Test_text}.xlsx    columns Image (the mask file name), Description

  A row's ``Image`` may also be the image name; the mask is then ``mask_<Image>``.

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
mask of the same size, no empty split, no image listed twice. All problems are raised together in one
`amvlm_monai.data.errors.DataError` naming each file; nothing is written then.

CLI::

    python -m data_prep.qata --src /data/QaTa-COV19 --out data/qata [--seed 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from amvlm_monai.data.datalist import write_datalist
from amvlm_monai.data.describe import describe_mask
from amvlm_monai.data.errors import DataError, raise_if_problems
from amvlm_monai.data.splits import partition, write_splits

from ._xlsx import read_xlsx

__all__ = ["LVIT_SPLITS", "KAGGLE_SPLITS", "VAL_FRACTION", "detect_layout", "collect", "convert_qata", "main"]

#: (datalist section, folder, spreadsheet) of LViT's layout.
LVIT_SPLITS = (
    ("training", "Train_Folder", "Train_text.xlsx"),
    ("validation", "Val_Folder", "Val_text.xlsx"),
    ("test", "Test_Folder", "Test_text.xlsx"),
)
#: (datalist section, folder) of the Kaggle layout.
KAGGLE_SPLITS = (("training", "Train Set"), ("test", "Test Set"))
VAL_FRACTION = 1429 / 7145  # LViT's validation share of QaTa's training set (= 0.2)
_IGNORED = {"thumbs.db", "desktop.ini"}
_MASK_PREFIX = "mask_"


def detect_layout(src: str | os.PathLike) -> tuple[str, Path]:
    """Find which layout ``src`` holds: ("lvit" | "kaggle", the layout's root folder).

    Raises:
        DataError: ``src`` is missing or holds neither layout (the message lists what was looked for).
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist or is not a folder.")

    def kind(folder: Path) -> str | None:
        if any((folder / f).is_dir() for _, f, _ in LVIT_SPLITS):
            return "lvit"
        if any((folder / f).is_dir() for _, f in KAGGLE_SPLITS):
            return "kaggle"
        return None

    found = kind(src)
    if found:
        return found, src
    children = [(kind(c), c) for c in sorted(src.iterdir()) if c.is_dir()]
    children = [(k, c) for k, c in children if k]
    if len(children) == 1:
        return children[0]
    if len(children) > 1:
        raise DataError(f"{src} holds several QaTa layouts: {[str(c) for _, c in children]}; pass one of them.")
    raise DataError(
        f"{src} holds no QaTa-COV19 layout: expected folders {[f for _, f, _ in LVIT_SPLITS]} (LViT) or "
        f"{[f for _, f in KAGGLE_SPLITS]} (Kaggle), in it or in one sub-folder; found {sorted(os.listdir(src))}."
    )


def _list_files(folder: Path, problems: list[str]) -> dict[str, Path]:
    """PNG files of ``folder`` by name; other visible files are reported as problems."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in _IGNORED or p.is_dir():
            continue
        if p.suffix.lower() != ".png":
            problems.append(f"unexpected file {p}: only PNG images are accepted")
            continue
        files[p.name] = p
    return files


def _read_png(path: Path, problems: list[str]) -> Image.Image | None:
    """The decoded image, or None after appending a problem naming ``path``."""
    try:
        with Image.open(path) as im:
            im.verify()  # checksums and structure
        with Image.open(path) as im:
            im.load()  # decodes: catches truncated data that verify() lets through
        return im
    except Exception as e:  # PIL raises many types for broken files
        problems.append(f"unreadable or corrupt PNG {path}: {e}")
        return None


def _check_pair(image: Path, mask: Path, problems: list[str]) -> Image.Image | None:
    """Check both PNGs and their sizes; returns the decoded mask when all is well."""
    im = _read_png(image, problems)
    m = _read_png(mask, problems)
    if im is None or m is None:
        return None
    if im.size != m.size:
        problems.append(f"mask {mask} is {m.size[0]}x{m.size[1]} but its image {image} is {im.size[0]}x{im.size[1]}")
        return None
    return m


def _folder(path: Path, problems: list[str]) -> bool:
    if not path.is_dir():
        problems.append(f"missing folder {path}")
        return False
    return True


def _collect_lvit(root: Path, problems: list[str]) -> dict[str, list[dict]]:
    datalist = {}
    for section, folder, sheet in LVIT_SPLITS:
        items: list[dict] = []
        datalist[section] = items
        img_dir, mask_dir, sheet_path = root / folder / "img", root / folder / "labelcol", root / sheet
        ok = _folder(img_dir, problems) & _folder(mask_dir, problems)
        if not sheet_path.is_file():
            problems.append(f"missing spreadsheet {sheet_path}")
            ok = False
        if not ok:
            continue
        images, masks = _list_files(img_dir, problems), _list_files(mask_dir, problems)
        try:
            rows = read_xlsx(sheet_path, required=("Image", "Description"))
        except DataError as e:
            problems.extend(e.problems)
            rows = None  # the file checks below still run
        if rows == []:
            problems.append(f"empty split: spreadsheet {sheet_path} has no rows")
        listed_images, listed_masks = set(), set()
        for row in rows or []:
            where = f"{sheet_path} row {row['_row']}"
            name = str(row["Image"]).strip() if row["Image"] is not None else ""
            if not name:
                problems.append(f"{where}: empty Image cell")
                continue
            if name.startswith(_MASK_PREFIX):
                mask_name, image_name = name, name[len(_MASK_PREFIX):]
            else:  # tolerated: the row names the image
                mask_name, image_name = _MASK_PREFIX + name, name
            text = str(row["Description"]).strip() if row["Description"] is not None else ""
            if image_name in listed_images:
                problems.append(f"{where}: {image_name} is listed twice")
                continue
            listed_images.add(image_name)
            listed_masks.add(mask_name)
            bad = False
            if not text:
                problems.append(f"{where}: no Description for {mask_name}")
                bad = True
            if image_name not in images:
                problems.append(f"{where}: missing image {img_dir / image_name} for {mask_name}")
                bad = True
            if mask_name not in masks:
                problems.append(f"{where}: missing mask {mask_dir / mask_name}")
                bad = True
            if bad or _check_pair(images[image_name], masks[mask_name], problems) is None:
                continue
            items.append({"image": str(images[image_name]), "label": str(masks[mask_name]), "text": text,
                          "id": Path(image_name).stem})
        for mask_name, path in masks.items():
            if mask_name in listed_masks:
                continue  # its row's problems are reported above
            image_name = mask_name[len(_MASK_PREFIX):] if mask_name.startswith(_MASK_PREFIX) else None
            if image_name not in images:
                problems.append(f"mask without an image: {path} (expected {img_dir / str(image_name)})"
                                if image_name else f"mask {path} is not named mask_<image>.png")
            elif rows is not None:
                problems.append(f"mask {path} is not listed in {sheet_path}")
        if rows is not None:
            for image_name, path in images.items():
                if image_name not in listed_images:
                    problems.append(f"image {path} is not listed in {sheet_path}")
    return datalist


def _collect_kaggle(root: Path, seed: int, problems: list[str]) -> dict[str, list[dict]]:
    datalist = {}
    for section, folder in KAGGLE_SPLITS:
        items: list[dict] = []
        datalist[section] = items
        img_dir, mask_dir = root / folder / "Images", root / folder / "Ground-truths"
        if not (_folder(img_dir, problems) & _folder(mask_dir, problems)):
            continue
        images, masks = _list_files(img_dir, problems), _list_files(mask_dir, problems)
        if not images and not masks:
            problems.append(f"empty split: no PNG images in {img_dir}")
            continue
        for mask_name, path in masks.items():
            if not mask_name.startswith(_MASK_PREFIX):
                problems.append(f"mask {path} is not named mask_<image>.png")
            elif mask_name[len(_MASK_PREFIX):] not in images:
                problems.append(f"mask without an image: {path} (expected {img_dir / mask_name[len(_MASK_PREFIX):]})")
        for image_name, path in images.items():
            mask_name = _MASK_PREFIX + image_name
            if mask_name not in masks:
                problems.append(f"missing mask {mask_dir / mask_name} for image {path}")
                continue
            mask = _check_pair(path, masks[mask_name], problems)
            if mask is None:
                continue
            text = describe_mask(np.asarray(mask.convert("L")))
            items.append({"image": str(path), "label": str(masks[mask_name]), "text": text,
                          "id": Path(image_name).stem})
    train = datalist.get("training", [])
    if len(train) == 1:
        problems.append(f"{root / 'Train Set'} has a single image: cannot carve a validation set from it")
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
        datalist = _collect_lvit(root, problems)
    else:
        datalist = _collect_kaggle(root, seed, problems)
    seen: dict[str, str] = {}
    for section, items in datalist.items():
        for it in items:
            if it["id"] in seen:
                problems.append(f"image id {it['id']!r} is in both {seen[it['id']]} and {section}: {it['image']}")
            seen.setdefault(it["id"], section)
    if not problems:
        for section, items in datalist.items():
            if not items:
                problems.append(f"empty split: {section} of {root}")
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
    _, root = detect_layout(src)
    root_abs, out_abs = root.resolve(), Path(out).resolve()
    if out_abs == root_abs or root_abs in out_abs.parents:
        raise DataError(f"output folder {out} lies inside the source folder {root}; the source is never written to.")
    datalist = collect(root, seed)
    path = write_datalist(datalist, Path(out) / "datalist.json")
    write_splits(datalist, out, seed=seed, fractions=fractions, few_shot=few_shot)
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="QaTa-COV19 (LViT or Kaggle layout) -> MONAI datalist + split files.")
    p.add_argument("--src", required=True, help="QaTa-COV19 folder (LViT or Kaggle layout)")
    p.add_argument("--out", required=True, help="output folder (not inside --src)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5], help="labelled fractions")
    p.add_argument("--few-shot", type=float, nargs="*", default=[0.01, 0.1], help="few-shot fractions")
    a = p.parse_args(argv)
    path = convert_qata(a.src, a.out, a.seed, tuple(a.fractions), tuple(a.few_shot))
    print(f"wrote {path} and split files to {path.parent}")
    return path


if __name__ == "__main__":
    main()
