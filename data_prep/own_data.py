"""Your own data -> MONAI datalist JSON plus seeded split files, in one command.

From a folder::

    my_folder/images/<name>.png        2D images: PNG, JPEG, TIF or BMP (folder names matched loosely:
    my_folder/masks/<name>.png         images/img/image; masks/mask/labels/labelcol/ground-truths)
    my_folder/reports.csv              optional: columns image (file name or stem) and text; or
    my_folder/reports/<name>.txt       optional: one report per image

A mask belongs to the image with the same stem (``a.png`` / ``a.png``, ``a.jpg`` / ``a.png``), or is named
``mask_<stem>`` or ``<stem>_mask``. Masks are binary, as they are usually saved: grey 0/1, 0/255 or 0/65535 (8 or
16 bit), palette PNGs (their indices 0/1, whatever the colours), RGB with equal channels, or black and one colour
(`amvlm_monai.io.clinical.binary_mask`, the rule training reads them by). An image without a report gets one written
from its mask by `amvlm_monai.data.describe.describe_mask` (``--organ``, ``--finding``), e.g. "Unilateral pulmonary
infection, one infected area, small upper left lung."

From a datalist (``--datalist list.json``): a JSON list of items, or an object with a ``training`` section (and
optionally ``validation`` and ``test``); items ``{"image", "label"}`` and optionally ``"text"``, ``"id"``,
``"patient"``; relative paths are relative to the file.

Sections: kept when the datalist has them; otherwise drawn, seeded: test = ``--test-fraction`` (0.2), validation =
``--val-fraction`` (0.1) of the rest. With patient grouping (``--patient-regex`` on the file name without extension,
group ``patient`` or group 1, or a ``"patient"`` field in the datalist) the images of one patient stay on one side,
and the split files' labelled and few-shot sets are drawn by patient too.

Outputs in ``--out`` (never inside the source; the source is only read): ``datalist.json`` and
``split_labeled<pct>.json`` (``--fractions``, default 0.25 0.5) and ``split_fewshot<pct>.json`` (``--few-shot``,
default 0.01 0.1), as the converters write them; the items point at your files where they are (their folder is
recorded under ``data_roots``). Every file is checked before anything is written; each problem is one line
``error: <file>: <what is wrong>`` and the exit status is 2.

CLI::

    python -m data_prep.own_data --src my_folder --out my_data [--organ lung --finding infection]
        [--fractions 0.25 0.5] [--few-shot 0.01 0.1] [--seed 0] [--patient-regex '^([^_-]+)[_-]']
    python -m data_prep.own_data --datalist my_list.json --out my_data
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from pathlib import Path

from amvlm_monai.data.describe import describe_mask
from amvlm_monai.utils.errors import DataError, cli_errors, raise_if_problems

from .common import (
    IMAGE_EXTS,
    SECTIONS,
    binary_mask_of,
    check_fractions,
    check_out,
    check_pair,
    check_sections,
    folder_key,
    holdout,
    list_files,
    stem,
    write_outputs,
)

__all__ = ["IMAGE_FOLDERS", "MASK_FOLDERS", "TEST_FRACTION", "VAL_FRACTION", "collect_folder", "collect_datalist",
           "prepare", "main"]

IMAGE_FOLDERS = ("images", "image", "img", "imgs")  # folder names (compared by `folder_key`)
MASK_FOLDERS = ("masks", "mask", "labels", "label", "labelcol", "ground truths", "ground-truths", "gt")
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
MIN_GROUPS = 3  # one each for training, validation and test


def _folder(src: Path, names: tuple[str, ...]) -> list[Path]:
    keys = {folder_key(n) for n in names}
    return [c for c in sorted(src.iterdir()) if c.is_dir() and folder_key(c.name) in keys]


def _mask_stem(name: str) -> str:
    s = stem(name)
    if s.lower().startswith("mask_"):
        return s[5:]
    if s.lower().endswith("_mask"):
        return s[:-5]
    return s


def _reports(src: Path, problems: list[str]) -> dict[str, str]:
    """Reports by image stem: ``reports.csv`` (columns image, text) and/or ``reports/<stem>.txt``."""
    out: dict[str, str] = {}
    table = src / "reports.csv"
    if table.is_file():
        try:
            with open(table, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                cols = [c.strip().lower() for c in reader.fieldnames or []]
                if "image" not in cols or "text" not in cols:
                    problems.append(f"{table}: needs columns 'image' and 'text'; columns found: {reader.fieldnames}")
                else:
                    for n, row in enumerate(reader, start=2):
                        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                        if row["image"]:
                            out[stem(row["image"])] = row["text"]
                        elif any(row.values()):
                            problems.append(f"{table}: row {n} has no image name")
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            problems.append(f"{table}: unreadable CSV ({e})")
    folder = src / "reports"
    if folder.is_dir():
        for path in sorted(folder.glob("*.txt")):
            try:
                out.setdefault(stem(path.name), path.read_text(encoding="utf-8").strip())
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"{path}: unreadable report ({e})")
    return out


def _item(image: Path, mask: Path, text: str | None, problems: list[str], organ: str, finding: str) -> dict | None:
    m = check_pair(image, mask, problems)  # readable, same size, binary values
    if m is None:
        return None
    if text is None:
        text = describe_mask(binary_mask_of(m, mask), organ=organ, finding=finding)
    elif not text.strip():
        problems.append(f"{image}: empty report")
        return None
    return {"image": str(image.resolve()), "label": str(mask.resolve()), "text": text, "id": stem(image.name)}


def collect_folder(src: str | os.PathLike, organ: str = "lung", finding: str = "infection") -> list[dict]:
    """Check a folder of images, masks and optional reports; its items (absolute paths). Reads only.

    Raises:
        DataError: listing every problem, each naming its file.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: source folder does not exist or is not a folder.")
    problems: list[str] = []
    found = {}
    for role, names in (("images", IMAGE_FOLDERS), ("masks", MASK_FOLDERS)):
        folders = _folder(src, names)
        if len(folders) != 1:
            what = "no" if not folders else f"{len(folders)} ({[f.name for f in folders]})"
            problems.append(f"{src}: {what} {role} folder; expected one named like {list(names)[:4]}")
        else:
            found[role] = folders[0]
    if problems:
        raise_if_problems(problems, f"folder {src}")
    images: dict[str, Path] = {}
    for name, path in list_files(found["images"], problems, IMAGE_EXTS, "image files (PNG, JPEG, TIF, BMP)").items():
        s = stem(name)
        if s in images:
            problems.append(f"{path}: two images named {s} (the other: {images[s]})")
        images.setdefault(s, path)
    masks: dict[str, Path] = {}
    for name, path in list_files(found["masks"], problems, IMAGE_EXTS, "mask files (PNG, TIF, BMP, JPEG)").items():
        s = _mask_stem(name)
        if s in masks:
            problems.append(f"{path}: two masks for {s} (the other: {masks[s]})")
        masks.setdefault(s, path)
    reports = _reports(src, problems)
    for s in sorted(set(masks) - set(images)):
        problems.append(f"{masks[s]}: mask without an image (expected {found['images'] / s}.*)")
    for s in sorted(set(reports) - set(images)):
        problems.append(f"{src}: a report for {s!r}, which has no image in {found['images']}")
    items = []
    for s, path in images.items():
        if s not in masks:
            problems.append(f"{path}: image without a mask (expected {found['masks'] / s}.png)")
            continue
        it = _item(path, masks[s], reports.get(s), problems, organ, finding)
        if it is not None:
            items.append(it)
    if not images and not problems:
        problems.append(f"{found['images']}: no images")
    raise_if_problems(problems, f"folder {src}")
    return items


def collect_datalist(path: str | os.PathLike, organ: str = "lung", finding: str = "infection"
                     ) -> dict[str, list[dict]]:
    """Check a datalist (a list of items or ``{"training": [...], ...}``); ``{section: items}`` with absolute paths.

    Raises:
        DataError: listing every problem, each naming its file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable datalist ({e})") from None
    sections = {"training": data} if isinstance(data, list) else data
    if not isinstance(sections, dict) or not isinstance(sections.get("training"), list):
        raise DataError(f"{path}: expected a list of items or an object with a 'training' list.")
    base = path.resolve().parent
    problems: list[str] = []
    out = {}
    for section in SECTIONS:
        items = []
        for i, raw in enumerate(sections.get(section) or []):
            where = f"{path}: {section}[{i}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("image"), str) or not isinstance(
                    raw.get("label"), str):
                problems.append(f"{where} needs string 'image' and 'label' paths, got {raw!r}")
                continue
            image, mask = (base / os.path.expanduser(raw[k]) for k in ("image", "label"))
            missing = [str(p) for p in (image, mask) if not p.is_file()]
            if missing:
                problems.extend(f"{m}: no such file ({where})" for m in missing)
                continue
            text = raw.get("text")
            it = _item(image, mask, text if isinstance(text, str) else None, problems, organ, finding)
            if it is not None:
                it.update({k: v for k, v in raw.items() if k not in ("image", "label", "text")})
                it["id"] = str(raw.get("id", it["id"]))
                items.append(it)
        out[section] = items
    raise_if_problems(problems, f"datalist {path}")
    return out


def _patients(items: list[dict], regex: str | None, problems: list[str]) -> str | None:
    """Set ``"patient"`` from ``regex``; the group key to split by (None: image by image)."""
    if regex is None:
        return "patient" if items and all("patient" in it for it in items) else None
    pattern = re.compile(regex)
    if pattern.groups < 1:
        raise ValueError(f"--patient-regex {regex!r} needs a group (named 'patient', or the first one).")
    for it in items:
        m = pattern.search(stem(Path(it["image"]).name))
        value = (m.group("patient") if "patient" in pattern.groupindex else m.group(1)) if m else None
        if not value:
            problems.append(f"{it['image']}: no patient id in the file name (pattern {regex!r})")
        else:
            it["patient"] = value
    return "patient"


def prepare(out: str | os.PathLike, src: str | os.PathLike | None = None, datalist: str | os.PathLike | None = None,
            seed: int = 0, fractions: tuple[float, ...] = (0.25, 0.5), few_shot: tuple[float, ...] = (0.01, 0.1),
            test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION,
            patient_regex: str | None = None, organ: str = "lung", finding: str = "infection") -> Path:
    """Check ``src`` (a folder) or ``datalist`` and write ``out/datalist.json`` plus the split files.

    Returns:
        the path of ``datalist.json``.

    Raises:
        DataError: any problem with the source (all listed at once); nothing is written then.
    """
    if (src is None) == (datalist is None):
        raise ValueError("give a source folder or a datalist (one of them).")
    check_fractions(fractions=fractions, few_shot=few_shot, test_fraction=test_fraction, val_fraction=val_fraction)
    source = Path(src) if src is not None else Path(datalist).resolve().parent
    if src is not None:
        check_out(out, src)
        sections = {"training": collect_folder(src, organ, finding)}
    else:
        sections = collect_datalist(datalist, organ, finding)
    problems: list[str] = []
    everything = [it for items in sections.values() for it in items]
    group_key = _patients(everything, patient_regex, problems)
    raise_if_problems(problems, str(source))
    if not sections.get("test") or not sections.get("validation"):
        pool = sections["training"]
        groups = {str(it.get(group_key or "id")) for it in pool}
        if len(groups) < MIN_GROUPS:
            what = "patients" if group_key else "images"
            raise DataError(f"{source}: {len(groups)} {what}: at least {MIN_GROUPS} are needed to draw training, "
                            "validation and test sets")
        if not sections.get("test"):
            sections["test"], pool = holdout(pool, test_fraction, seed, "test", group_key=group_key)
        if not sections.get("validation"):
            sections["validation"], pool = holdout(pool, val_fraction, seed, "validation", group_key=group_key)
        sections["training"] = pool
    check_sections(sections, problems, str(source))
    raise_if_problems(problems, str(source))
    if src is not None:
        roots = [Path(src)]
    else:
        given, out_dir = Path(datalist).resolve(), Path(out).resolve()
        if given.parent == out_dir and (given.name == "datalist.json" or given.name.startswith("split_")):
            raise DataError(f"{datalist}: would be overwritten by the output; choose another --out.")
        roots = _folders({os.path.dirname(it[k]) for it in everything for k in ("image", "label")})
    return write_outputs(sections, out, seed, fractions, few_shot, group_key=group_key, roots=roots)


def _folders(folders: set[str]) -> list[str]:
    """The folders of a set that are not inside another one of the set."""
    ordered = sorted(folders, key=len)
    kept: list[str] = []
    for f in ordered:
        if not any(os.path.commonpath([f, k]) == k for k in kept):
            kept.append(f)
    return sorted(kept)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m data_prep.own_data",
                                description="Your folder (images, masks, optional reports) or datalist -> MONAI "
                                            "datalist + seeded split files.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="folder holding images/ and masks/ (and optionally reports.csv or reports/)")
    src.add_argument("--datalist", help="a JSON list of {image, label[, text, id, patient]} or a datalist")
    p.add_argument("--out", required=True, help="output folder (not inside the source)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5], help="labelled fractions")
    p.add_argument("--few-shot", type=float, nargs="*", default=[0.01, 0.1], help="few-shot fractions")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION, help="test share (when not given)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="validation share of the rest")
    p.add_argument("--patient-regex", default=None,
                   help="patient id in the file name (group 'patient' or group 1), e.g. '^([^_-]+)[_-]'")
    p.add_argument("--organ", default="lung", help="organ named in reports written from masks (lung, bone, ...)")
    p.add_argument("--finding", default="infection", help="finding named in reports written from masks")
    a = p.parse_args(argv)
    with cli_errors():  # bad data: one `error: <file>: <problem>` line each, exit status 2
        path = prepare(a.out, a.src, a.datalist, a.seed, tuple(a.fractions), tuple(a.few_shot), a.test_fraction,
                       a.val_fraction, a.patient_regex, a.organ, a.finding)
    print(f"wrote {path} and split files to {path.parent}")
    return path


if __name__ == "__main__":
    main()
