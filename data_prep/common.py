"""Pieces shared by the converters: finding a layout, listing and checking files, LViT-layout collection, output.

Every converter works in two passes: `collect` checks the whole source and appends one line per problem (each naming
its file) to a ``problems`` list; only when the list is empty (`raise_if_problems`) is anything written. Nothing here
writes into a source folder: `check_out` refuses an output folder inside one.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from amvlm_monai.data.datalist import ROOTS_KEY, write_datalist
from amvlm_monai.data.splits import partition, write_splits
from amvlm_monai.io.clinical import binary_mask
from amvlm_monai.utils.errors import DataError
from amvlm_monai.utils.progress import progress

from ._xlsx import read_xlsx

__all__ = [
    "IMAGE_EXTS",
    "LOSSLESS_EXTS",
    "SECTIONS",
    "find_layout",
    "folder_key",
    "check_out",
    "check_fractions",
    "require_folder",
    "list_files",
    "file_kind",
    "read_image",
    "check_pair",
    "read_sheet",
    "check_binary_mask",
    "mask_array",
    "binary_mask_of",
    "LvitNames",
    "LVIT_SPLITS",
    "lvit_sheet",
    "collect_lvit",
    "stem",
    "check_sections",
    "holdout",
    "save_png",
    "write_outputs",
    "add_common_args",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # 2D image files the converters accept
LOSSLESS_EXTS = (".png", ".tif", ".tiff", ".bmp")
SECTIONS = ("training", "validation", "test")
_IGNORED = {"thumbs.db", "desktop.ini"}


def _ignored(p: Path) -> bool:
    return p.name.startswith(".") or p.name.lower() in _IGNORED


def folder_key(name: str) -> str:
    """A folder name folded for tolerant matching: lower case, ``_``/``-`` as spaces, no plural ``s``.

    ``"Bone_Masks"``, ``"bone mask"`` and ``"bone-mask"`` all give ``"bone mask"``.
    """
    words = re.sub(r"[_\-\s]+", " ", name.strip().lower()).split()
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words)


def find_layout(src: str | os.PathLike, kind: Callable[[Path], str | None], name: str, expected: str,
                prefer: Sequence[str] = ()) -> tuple[str, Path]:
    """Which layout ``src`` holds, in itself or in exactly one sub-folder.

    Args:
        src: the folder given on the command line.
        kind: ``kind(folder)`` names the layout ``folder`` holds, or None.
        name: the data set's name, for messages.
        expected: what was looked for, for the message when nothing is found.
        prefer: words of the data set's folder names (e.g. ``("qata", "covid")``): when several sub-folders hold a
            layout (LViT's ``datasets/`` holds ``Covid19/`` and ``MoNuSeg/`` with the same tree), the one whose
            name contains one of them is taken.

    Returns:
        (layout name, the layout's root folder).

    Raises:
        DataError: ``src`` is missing, holds no layout, or several sub-folders hold one.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: source folder does not exist or is not a folder.")
    found = kind(src)
    if found:
        return found, src
    children = [(kind(c), c) for c in sorted(src.iterdir()) if c.is_dir() and not _ignored(c)]
    children = [(k, c) for k, c in children if k]
    if len(children) == 1:
        return children[0]
    if len(children) > 1 and prefer:
        named = [(k, c) for k, c in children if any(w in c.name.lower() for w in prefer)]
        if len(named) == 1:
            return named[0]
    if len(children) > 1:
        raise DataError(f"{src} holds several {name} layouts: {[str(c) for _, c in children]}; pass one of them.")
    raise DataError(
        f"{src} holds no {name} layout: expected {expected}, in it or in one sub-folder; "
        f"found {sorted(os.listdir(src))}."
    )


def check_out(out: str | os.PathLike, *sources: str | os.PathLike, written: Sequence[str] = ()) -> None:
    """Refuse an output folder that would write into a source folder.

    Args:
        out: the output folder.
        sources: folders that are only read (the layout's root, the ``--src`` folder).
        written: sub-folders of ``out`` the converter writes files into; a source inside one of them is refused too.

    Raises:
        DataError: ``out`` is a source folder or inside one, or a source lies inside a written sub-folder.
    """
    out_abs = Path(out).resolve()
    for src in sources:
        src_abs = Path(src).resolve()
        if out_abs == src_abs or src_abs in out_abs.parents:
            raise DataError(f"{out}: output folder lies inside the source folder {src}; the source is never "
                            "written to.")
        for sub in written:
            target = out_abs / sub
            if src_abs == target or target in src_abs.parents:
                raise DataError(f"{src}: the source folder lies inside {target}, which the converter writes to.")


def check_fractions(**fractions: float | Sequence[float]) -> None:
    """Raise ValueError unless every given fraction (or sequence of fractions) is in (0, 1]."""
    for name, value in fractions.items():
        for f in value if isinstance(value, (list, tuple)) else (value,):
            if not (isinstance(f, (int, float)) and 0 < f <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {f!r}.")


def require_folder(path: Path, problems: list[str]) -> bool:
    """True when ``path`` is a folder; otherwise a "missing folder" problem is appended."""
    if not path.is_dir():
        problems.append(f"{path}: missing folder")
        return False
    return True


def list_files(folder: Path, problems: list[str], exts: Sequence[str] = (".png",), what: str = "PNG images"
               ) -> dict[str, Path]:
    """Files of ``folder`` with one of ``exts`` (case-insensitive), by name; other visible files are problems.

    Hidden files, ``Thumbs.db``/``desktop.ini`` and sub-folders are skipped.
    """
    files = {}
    for p in sorted(folder.iterdir()):
        if _ignored(p) or p.is_dir():
            continue
        if not p.name.lower().endswith(tuple(e.lower() for e in exts)):
            problems.append(f"{p}: unexpected file: only {what} are accepted here")
            continue
        files[p.name] = p
    return files


def file_kind(path: Path) -> str:
    """"PNG", "TIF", "JPEG", "BMP" from the file's extension, else "image" (for messages)."""
    ext = path.suffix.lower()
    return {".png": "PNG", ".tif": "TIF", ".tiff": "TIF", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}.get(
        ext, "image")


def read_image(path: Path, problems: list[str]) -> Image.Image | None:
    """The decoded image (PIL verify, then a full decode), or None after appending a problem naming ``path``.

    ``verify`` checks structure and checksums; ``load`` decodes, which catches truncated data that ``verify`` lets
    through (and is the only check TIFF gets).
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
        return im
    except Exception as e:  # PIL raises many types for broken files
        problems.append(f"{path}: unreadable or corrupt {file_kind(path)} ({e})")
        return None


def check_pair(image: Path, mask: Path, problems: list[str]) -> Image.Image | None:
    """Read both files and compare their sizes; returns the decoded mask when all is well."""
    im = read_image(image, problems)
    m = read_image(mask, problems)
    if im is None or m is None:
        return None
    if im.size != m.size:
        problems.append(f"{mask}: mask is {m.size[0]}x{m.size[1]} but its image {image} is {im.size[0]}x{im.size[1]}")
        return None
    return m if check_binary_mask(m, mask, problems) else None


def mask_array(mask: Image.Image) -> np.ndarray:
    """A decoded mask as MONAI's ``LoadImage`` gives it to training, channel-first ``(C, H, W)``: a palette image as
    its indices (never its colours), grey 8/16/32-bit and float as they are, LA/RGB/RGBA by channel (the mask rule
    then drops alpha); other colour modes (CMYK, YCbCr) as RGB."""
    if mask.mode not in ("1", "L", "P", "PA", "LA", "RGB", "RGBA", "I", "F") and not mask.mode.startswith("I;"):
        mask = mask.convert("RGB")
    arr = np.asarray(mask)
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def binary_mask_of(mask: Image.Image, path: Path) -> np.ndarray:
    """The decoded ``mask`` as a ``(H, W)`` bool array by the project's one mask rule
    (`amvlm_monai.io.clinical.binary_mask`, the rule training reads it by).

    Raises:
        ValueError: naming ``path`` and the values found when the mask is not binary.
    """
    return binary_mask(mask_array(mask), path)[0] > 0


def check_binary_mask(mask: Image.Image, path: Path, problems: list[str]) -> bool:
    """True when the decoded ``mask`` is binary by the project's one mask rule (`binary_mask_of`: 0/1, 0/255 or
    0/65535 in grey or palette indices, an RGB mask with equal channels, or black and one colour); otherwise a problem
    naming ``path`` and the values found is appended (a mask with 0/1/7/128 would otherwise count 7 and 128 as
    lesion)."""
    try:
        binary_mask_of(mask, path)
        return True
    except ValueError as e:
        problems.append(str(e))
        return False


def read_sheet(path: Path, problems: list[str], required: Sequence[str] = ("Image", "Description")
               ) -> list[dict] | None:
    """Rows of a spreadsheet (`data_prep._xlsx.read_xlsx`), or None after appending its problems."""
    try:
        return read_xlsx(path, required=required)
    except DataError as e:
        problems.extend(e.problems)
        return None


def _cell(value) -> str:
    return str(value).strip() if value is not None else ""


@dataclass(frozen=True)
class LvitNames:
    """How a data set in LViT's layout names its masks and what its spreadsheets' ``Image`` column holds.

    ``row(cell, images)`` -> (image file name, mask file name) for a spreadsheet cell; ``image_of(mask, images)`` ->
    the image file name a mask belongs to (None when the mask's name does not follow ``pattern``). ``images`` is the
    split's ``{file name: path}`` of images, so that a cell or mask may name an image by its stem.
    """

    row: Callable[[str, dict], tuple[str, str]]
    image_of: Callable[[str, dict], str | None]
    pattern: str = "mask_<image>.png"  # the mask naming rule, for messages
    image_exts: tuple[str, ...] = (".png",)  # accepted image files
    image_what: str = "PNG images"  # the same, for messages


#: (datalist section, folder, spreadsheet) of LViT's layout.
LVIT_SPLITS = (
    ("training", "Train_Folder", "Train_text.xlsx"),
    ("validation", "Val_Folder", "Val_text.xlsx"),
    ("test", "Test_Folder", "Test_text.xlsx"),
)


def _file_named(folder: Path, name: str) -> Path | None:
    """The file of ``folder`` named ``name``, compared case-insensitively (archives unpacked on another system)."""
    if not folder.is_dir():
        return None
    exact = folder / name
    if exact.is_file():
        return exact
    return next((p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower() == name.lower()), None)


def lvit_sheet(root: Path, folder: str, sheet: str, problems: list[str]) -> Path | None:
    """A split's spreadsheet: inside its split folder (``Train_Folder/Train_text.xlsx``, LViT's README and release)
    or beside the split folders (``Train_text.xlsx``, an older placement); None after a problem when there is none,
    or when both exist and differ."""
    inside, beside = _file_named(root / folder, sheet), _file_named(root, sheet)
    if inside is not None and beside is not None and inside.read_bytes() != beside.read_bytes():
        problems.append(f"{inside}: a second, different {sheet} is at {beside}; keep one of them")
        return None
    if inside is None and beside is None:
        problems.append(f"{root / folder / sheet}: missing spreadsheet (also looked for {root / sheet})")
        return None
    return inside or beside


def collect_lvit(root: Path, names: LvitNames, problems: list[str]) -> dict[str, list[dict]]:
    """Check a data set in LViT's layout and build its datalist (absolute paths); reads only.

    Layout: ``root/{Train_Folder,Val_Folder,Test_Folder}/{img,labelcol}`` and each split's spreadsheet
    ``{Train,Val,Test}_text.xlsx`` with columns ``Image`` and ``Description``, inside its split folder (as LViT
    distributes it) or in ``root`` (`lvit_sheet`). Problems (each naming its file) are appended to ``problems``:
    missing folders or spreadsheets, a row without an image, a mask or a description, an image or mask not listed, an
    image listed twice, unreadable images, a mask whose size differs from its image's, a mask that is not binary
    (`check_binary_mask`), an empty spreadsheet.

    Returns:
        ``{section: [{"image", "label", "text", "id"}]}``, ``id`` = the image file name without its extension.
    """
    datalist = {}
    for section, folder, sheet in LVIT_SPLITS:
        items: list[dict] = []
        datalist[section] = items
        img_dir, mask_dir = root / folder / "img", root / folder / "labelcol"
        ok = require_folder(img_dir, problems) & require_folder(mask_dir, problems)
        sheet_path = lvit_sheet(root, folder, sheet, problems)
        if not ok or sheet_path is None:
            continue
        images = list_files(img_dir, problems, names.image_exts, names.image_what)
        masks = list_files(mask_dir, problems)
        rows = read_sheet(sheet_path, problems)
        if rows == []:
            problems.append(f"{sheet_path}: empty split: the spreadsheet has no rows")
        listed_images, listed_masks = set(), set()
        for row in progress(rows or [], f"checking {sheet_path.name}"):
            where = f"{sheet_path} row {row['_row']}"
            name = _cell(row["Image"])
            if not name:
                problems.append(f"{where}: empty Image cell")
                continue
            image_name, mask_name = names.row(name, images)
            text = _cell(row["Description"])
            if image_name in listed_images:
                problems.append(f"{where}: {image_name} is listed twice")
                continue
            listed_images.add(image_name)
            listed_masks.add(mask_name)
            bad = False
            if not text:
                problems.append(f"{where}: no Description for {name}")
                bad = True
            if image_name not in images:
                problems.append(f"{where}: missing image {img_dir / image_name} for {mask_name}")
                bad = True
            if mask_name not in masks:
                problems.append(f"{where}: missing mask {mask_dir / mask_name}")
                bad = True
            if bad or check_pair(images[image_name], masks[mask_name], problems) is None:
                continue
            items.append({"image": str(images[image_name]), "label": str(masks[mask_name]), "text": text,
                          "id": stem(image_name)})
        for mask_name, path in masks.items():
            if mask_name in listed_masks:
                continue  # its row's problems are reported above
            image_name = names.image_of(mask_name, images)
            if image_name is None:
                problems.append(f"{path}: mask is not named {names.pattern}")
            elif image_name not in images:
                problems.append(f"{path}: mask without an image (expected {img_dir / image_name})")
            elif rows is not None:
                problems.append(f"{path}: mask is not listed in {sheet_path}")
        if rows is not None:
            for image_name, path in images.items():
                if image_name not in listed_images:
                    problems.append(f"{path}: image is not listed in {sheet_path}")
    return datalist


def stem(name: str) -> str:
    """A file name without its extension (``a.nii.gz`` -> ``a``)."""
    for ext in (".nii.gz",):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def check_sections(datalist: dict[str, list[dict]], problems: list[str], where: str) -> None:
    """Append a problem for an id in two places and, when nothing else is wrong, for each empty section."""
    seen: dict[str, str] = {}
    for section, items in datalist.items():
        for it in items:
            if it["id"] in seen:
                problems.append(f"{it['image']}: image id {it['id']!r} is in both {seen[it['id']]} and {section}")
            seen.setdefault(it["id"], section)
    if not problems:
        for section in SECTIONS:
            if not datalist.get(section):
                problems.append(f"{where}: empty split: no {section} images")


def holdout(items: Sequence[dict], fraction: float, seed: int, salt: str, group_key: str | None = None
            ) -> tuple[list[dict], list[dict]]:
    """(held out, rest): a seeded ``fraction`` of ``items`` (whole groups with ``group_key``); see `partition`.

    With fewer than two items (or groups) nothing is held out.
    """
    groups = {str(it[group_key or "id"]) for it in items}
    if len(groups) < 2:
        return [], list(items)
    return partition(items, fraction, seed, group_key=group_key, salt=salt)


def save_png(array: np.ndarray, path: Path) -> Path:
    """Write ``array`` as PNG (uint8 gray or RGB, or uint16 gray as a 16-bit PNG); parent folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


def write_outputs(datalist: dict, out: str | os.PathLike, seed: int, fractions: Iterable[float],
                  few_shot: Iterable[float], group_key: str | None = None,
                  roots: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``out/datalist.json`` (sections in `SECTIONS` order) and the split files; returns the datalist path.

    ``roots``: source folders the items' files stay in (recorded as ``"data_roots"``, so that
    `amvlm_monai.data.datalist.load_datalist` accepts paths into them).
    """
    datalist = {s: datalist[s] for s in SECTIONS}
    if roots:
        datalist[ROOTS_KEY] = [str(Path(r).resolve()) for r in roots]
    path = write_datalist(datalist, Path(out) / "datalist.json")
    write_splits(datalist, out, seed=seed, fractions=tuple(fractions), few_shot=tuple(few_shot), group_key=group_key)
    return path


def add_common_args(p: argparse.ArgumentParser, src_help: str) -> argparse.ArgumentParser:
    """Add ``--src --out --seed --fractions --few-shot`` to a converter's parser."""
    p.add_argument("--src", required=True, help=src_help)
    p.add_argument("--out", required=True, help="output folder (not inside --src)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5], help="labelled fractions")
    p.add_argument("--few-shot", type=float, nargs="*", default=[0.01, 0.1], help="few-shot fractions")
    return p
