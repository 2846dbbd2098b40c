"""MoNuSeg 2018 -> MONAI datalist JSON plus seeded split files.

Accepted layouts of ``--src`` (the folder itself, or a folder holding exactly one of them):

- original (as distributed by the challenge)::

      MoNuSeg 2018 Training Data/Tissue Images/<name>.tif     H&E, 1000x1000 RGB
      MoNuSeg 2018 Training Data/Annotations/<name>.xml       Aperio ImageScope XML, one <Region> per nucleus
      MoNuSegTestData/<name>.tif, <name>.xml                  any folder whose name contains "test", side by side

  The training folder is the one holding ``Tissue Images`` and ``Annotations``. Each XML's polygons
  (``Annotations/Annotation/Regions/Region/Vertices/Vertex X= Y=``) are rasterised (`rasterize`) into an instance
  map and a binary mask; the text is written from the instance map by
  `amvlm_monai.data.describe_nuclei.describe_nuclei` (count and density by quadrant). Validation: a seeded 20% of
  the training images (LViT's 6 of 30), ``--val-fraction``.

- LViT::

      MoNuSeg/Train_Folder/{img/<name>.png (or .tif), labelcol/<name>.png, Train_text.xlsx}
      MoNuSeg/Val_Folder/{img, labelcol, Val_text.xlsx}
      MoNuSeg/Test_Folder/{img, labelcol, Test_text.xlsx}
          labelcol: binary mask (0/1 or 0/255), same stem as its image;
          sheets: columns Image (the IMAGE file name, or its stem), Description

  Each split's sheet lies inside its split folder, as LViT's README and release have it; a sheet beside the split
  folders (``MoNuSeg/Train_text.xlsx``) is accepted too. LViT's ``datasets/`` folder (``Covid19/`` and ``MoNuSeg/``
  side by side) may be given as ``--src``: the sub-folder named like MoNuSeg is taken.

  Nothing but the datalist and split files is written; items point at the source files.

Rasterisation: vertex coordinates are pixel units with the image's top-left corner at (0, 0), pixel (row r,
column c) covering ``[c, c+1) x [r, r+1)``; a pixel belongs to a nucleus when its **centre** ``(c + 0.5, r + 0.5)``
is inside the polygon (even-odd rule, half-open edges), so a square with corners (2, 2) and (6, 6) covers exactly
rows 2-5 and columns 2-5. (The challenge's MATLAB ``poly2mask`` puts pixel centres at integer coordinates: masks can
differ from it by up to one pixel along borders.) Where nuclei overlap, the **later region wins**; touching nuclei
stay separate instances in the instance map and merge in the binary mask (no boundary is carved). Instance values
are the regions' 1-based order in the XML (a region hidden by later ones leaves its value unused). Vertices up to
``--margin`` pixels (default 2) outside the image are clipped to its border; farther ones are errors.

Outputs in ``--out`` (never inside ``--src``; the source is only read):

- original layout: ``images/<name>.png`` (RGB), ``labels/<name>.png`` (binary mask, 0/255; what trains),
  ``instances/<name>.png`` (16-bit instance map, same name as the label; not listed in the datalist);
- ``datalist.json``: ``{"training", "validation", "test"}``, items ``{"image", "label", "text", "id"}`` (``id`` = the
  image name without extension), paths relative to ``--out``;
- ``split_labeled25.json``, ``split_labeled50.json``, ``split_fewshot1.json``, ``split_fewshot10.json``
  (`amvlm_monai.data.splits.write_splits`).

Everything is checked before anything is written; all problems are raised together in one
`amvlm_monai.utils.errors.DataError` naming each file: an XML without regions, unparsable or with bad vertices
(missing or non-numeric X/Y, fewer than three in a region, outside the image), an XML or TIF without its partner,
an unreadable or corrupt TIF/PNG, a spreadsheet row without description or image, an empty split.

CLI::

    python -m data_prep.monuseg --src /data/MoNuSeg --out data/monuseg [--seed 0] [--val-fraction 0.2] [--margin 2]
"""

from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from amvlm_monai.data.describe_nuclei import describe_nuclei
from amvlm_monai.utils.errors import cli_errors, raise_if_problems
from amvlm_monai.utils.progress import progress

from .common import (
    LVIT_SPLITS,
    LvitNames,
    add_common_args,
    check_fractions,
    check_out,
    check_sections,
    collect_lvit,
    find_layout,
    holdout,
    list_files,
    read_image,
    require_folder,
    save_png,
    stem,
    write_outputs,
)

__all__ = [
    "TRAIN_FOLDERS",
    "VAL_FRACTION",
    "MARGIN",
    "NAMES",
    "Slide",
    "fill_polygon",
    "rasterize",
    "read_regions",
    "detect_layout",
    "collect",
    "convert_slide",
    "convert_monuseg",
    "main",
]

TRAIN_FOLDERS = ("Tissue Images", "Annotations")  # sub-folders of the original training folder
VAL_FRACTION = 0.2  # LViT: 6 of the 30 training images
MARGIN = 2.0  # pixels: vertices this far outside the image are clipped, farther ones are errors
OUTPUT_FOLDERS = ("images", "labels", "instances")
_TIF = (".tif", ".tiff")
_MAX_LISTED = 3  # bad vertices quoted per file


def _row(name: str, images: dict) -> tuple[str, str]:
    """A spreadsheet cell (the image name, or its stem) -> (image, mask ``<stem>.png``)."""
    if name not in images:
        name = next((n for n in images if stem(n) in (name, stem(name))), name)
    return name, stem(name) + ".png"


def _image_of(mask_name: str, images: dict) -> str | None:
    return next((n for n in images if stem(n) == stem(mask_name)), mask_name)


#: MoNuSeg's naming in LViT's layout: masks share their image's stem; ``Image`` names the image.
NAMES = LvitNames(row=_row, image_of=_image_of, pattern="<image stem>.png", image_exts=(".png",) + _TIF,
                  image_what="PNG or TIF images")


@dataclass
class Slide:
    """One annotated tissue image of the original layout, checked and parsed (`collect`)."""

    id: str  # the file stem
    tif: Path
    xml: Path
    size: tuple[int, int]  # (height, width)
    polygons: list[np.ndarray]  # per region, (n, 2) float (x, y), clipped to the image


def fill_polygon(vertices: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels whose centres lie inside a polygon (see the module docstring).

    Args:
        vertices: (n, 2) array of (x, y), n >= 3; the polygon is closed implicitly.
        shape: (height, width) of the image; pixels outside it are dropped.

    Returns:
        (rows, cols) integer arrays, row-major order.
    """
    h, w = shape
    v = np.asarray(vertices, np.float64)
    x0, y0 = v[:, 0], v[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r_lo = max(0, int(np.ceil(y0.min() - 0.5)))
    r_hi = min(h - 1, int(np.floor(y0.max() - 0.5)))
    if r_hi < r_lo:
        return np.zeros(0, int), np.zeros(0, int)
    py = np.arange(r_lo, r_hi + 1)[:, None] + 0.5  # scan lines through the pixel centres
    crosses = (y0 > py) != (y1 > py)  # half-open: a vertex on the line counts once
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, x0 + (py - y0) * (x1 - x0) / (y1 - y0), np.inf)
    xs.sort(axis=1)
    n = int(crosses.sum(axis=1).max())  # even for a closed polygon
    starts = np.ceil(xs[:, 0:n:2] - 0.5)  # first column whose centre is >= the entering crossing
    stops = np.ceil(xs[:, 1:n:2] - 0.5)  # first column whose centre is >= the leaving crossing
    valid = np.isfinite(stops)
    starts = np.clip(np.where(valid, starts, 0), 0, w).astype(int)
    stops = np.clip(np.where(valid, stops, 0), 0, w).astype(int)
    diff = np.zeros((py.shape[0], w + 1), np.int32)  # +1 where a span starts, -1 where it stops
    rows = np.broadcast_to(np.arange(py.shape[0])[:, None], starts.shape)
    np.add.at(diff, (rows, starts), 1)
    np.add.at(diff, (rows, stops), -1)
    rr, cc = np.nonzero(np.cumsum(diff[:, :w], axis=1) > 0)
    return rr + r_lo, cc


def rasterize(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map (uint16, value i + 1 for ``polygons[i]``; later polygons overwrite earlier ones).

    Raises:
        ValueError: more than 65535 polygons (they would not fit a 16-bit map).
    """
    if len(polygons) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(polygons)} regions do not fit a 16-bit instance map.")
    inst = np.zeros(shape, np.uint16)
    for i, poly in enumerate(polygons, start=1):
        rr, cc = fill_polygon(poly, shape)
        inst[rr, cc] = i
    return inst


def read_regions(xml: Path, shape: tuple[int, int] | None, problems: list[str], margin: float = MARGIN
                 ) -> list[np.ndarray] | None:
    """The nuclei polygons of an Aperio ImageScope XML, or None after appending problems naming ``xml``.

    Args:
        xml: the annotation file.
        shape: (height, width) of its image; vertices farther than ``margin`` outside are problems, nearer ones are
            clipped. None skips the check.
        problems: list the problems are appended to.
        margin: tolerance in pixels.

    Returns:
        one (n, 2) float array of (x, y) per ``<Region>``, in file order.
    """
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
        problems.append(f"{xml}: unreadable or corrupt XML ({e})")
        return None
    regions = list(root.iter("Region"))
    if not regions:
        problems.append(f"{xml}: XML has no <Region> (expected Annotations/Annotation/Regions/Region, one per nucleus)")
        return None
    polygons, bad = [], []
    outside: list[str] = []
    n_outside = 0
    for k, region in enumerate(regions, start=1):
        try:
            pts = np.array([(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")], np.float64)
        except (KeyError, ValueError) as e:
            bad.append(f"region {k}: a <Vertex> without a numeric X and Y ({e})")
            continue
        if len(pts) < 3 or not np.isfinite(pts).all():
            bad.append(f"region {region.get('Id', k)} has {len(pts)} finite vertices (at least 3 needed)")
            continue
        if shape is not None:
            h, w = shape
            out = ((pts[:, 0] < -margin) | (pts[:, 0] > w + margin) | (pts[:, 1] < -margin)
                   | (pts[:, 1] > h + margin))
            if out.any():
                n_outside += int(out.sum())
                for x, y in pts[out][: max(0, _MAX_LISTED - len(outside))]:
                    outside.append(f"region {region.get('Id', k)} ({x:g}, {y:g})")
                continue
            pts = np.stack([np.clip(pts[:, 0], 0, w), np.clip(pts[:, 1], 0, h)], axis=1)
        polygons.append(pts)
    for b in bad:
        problems.append(f"{xml}: {b}")
    if n_outside:
        problems.append(f"{xml}: {n_outside} vertices outside the {shape[1]}x{shape[0]} image of {xml.stem} "
                        f"(more than {margin:g} px), e.g. {', '.join(outside)}")
    return None if bad or n_outside else polygons


def _kind(folder: Path) -> str | None:
    if any((folder / f).is_dir() for _, f, _ in LVIT_SPLITS):
        return "lvit"
    if any(_is_train(c) for c in folder.iterdir() if c.is_dir()):
        return "original"
    return None


def _is_train(folder: Path) -> bool:
    return any((folder / f).is_dir() for f in TRAIN_FOLDERS)


def detect_layout(src: str | os.PathLike) -> tuple[str, Path]:
    """Find which layout ``src`` holds: ("original" | "lvit", the layout's root folder).

    Raises:
        DataError: ``src`` is missing or holds neither layout.
    """
    expected = (f"a training folder with {list(TRAIN_FOLDERS)} and a folder named *Test* (original) or folders "
                f"{[f for _, f, _ in LVIT_SPLITS]} (LViT)")
    return find_layout(src, _kind, "MoNuSeg", expected, prefer=("monuseg",))


def _tif_size(path: Path, problems: list[str]) -> tuple[int, int] | None:
    im = read_image(path, problems)
    if im is None:
        return None
    if im.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "LA"):
        problems.append(f"{path}: TIF has pixel mode {im.mode}: expected an 8-bit RGB H&E image")
        return None
    return im.size[1], im.size[0]


def _pairs(tif_dir: Path, xml_dir: Path, problems: list[str]) -> list[tuple[str, Path, Path]]:
    """(stem, tif, xml) of the files of the two folders (possibly the same); partner-less files are problems."""
    if tif_dir == xml_dir:
        files = list_files(tif_dir, problems, _TIF + (".xml",), "TIF images and XML annotations")
        tifs = {stem(n): p for n, p in files.items() if p.suffix.lower() in _TIF}
        xmls = {stem(n): p for n, p in files.items() if p.suffix.lower() == ".xml"}
    else:
        tifs = {stem(n): p for n, p in list_files(tif_dir, problems, _TIF, "TIF images").items()}
        xmls = {stem(n): p for n, p in list_files(xml_dir, problems, (".xml",), "XML annotations").items()}
    for s in sorted(set(xmls) - set(tifs)):
        problems.append(f"{xmls[s]}: annotation without an image (expected {tif_dir / (s + '.tif')})")
    for s in sorted(set(tifs) - set(xmls)):
        problems.append(f"{tifs[s]}: image without an annotation (expected {xml_dir / (s + '.xml')})")
    if not tifs and not xmls:
        problems.append(f"{tif_dir}: empty split: no TIF images")
    return [(s, tifs[s], xmls[s]) for s in sorted(set(tifs) & set(xmls))]


def _collect_original(root: Path, seed: int, val_fraction: float, margin: float, problems: list[str]
                      ) -> dict[str, list[Slide]]:
    dirs = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    train = [c for c in dirs if _is_train(c)]
    test = [c for c in dirs if "test" in c.name.lower() and c not in train]
    if len(train) > 1:
        problems.append(f"{root}: several training folders with {list(TRAIN_FOLDERS)}: {[str(c) for c in train]}")
    if len(test) != 1:
        problems.append(f"{root}: must hold one test folder (a name containing 'Test', TIF and XML side by side); "
                        f"found {[str(c) for c in test] or 'none'}")
    slides: dict[str, list[Slide]] = {"training": [], "test": []}
    folders = [("training", train[0] / TRAIN_FOLDERS[0], train[0] / TRAIN_FOLDERS[1])] if len(train) == 1 else []
    folders += [("test", test[0], test[0])] if len(test) == 1 else []
    for section, tif_dir, xml_dir in folders:
        if not all([require_folder(d, problems) for d in dict.fromkeys((tif_dir, xml_dir))]):
            continue
        for s, tif, xml in _pairs(tif_dir, xml_dir, problems):
            shape = _tif_size(tif, problems)
            polygons = read_regions(xml, shape, problems, margin)
            if shape is not None and polygons is not None:
                slides[section].append(Slide(s, tif, xml, shape, polygons))
    train_items = slides["training"]
    if len(train_items) == 1:
        problems.append(f"{train[0]}: a single image: cannot carve a validation set from it")
    held, _ = holdout([{"id": sl.id} for sl in train_items], val_fraction, seed, salt="validation")
    val_ids = {it["id"] for it in held}
    slides["validation"] = [sl for sl in train_items if sl.id in val_ids]
    slides["training"] = [sl for sl in train_items if sl.id not in val_ids]
    return {s: slides[s] for s in ("training", "validation", "test")}


def collect(src: str | os.PathLike, seed: int = 0, val_fraction: float = VAL_FRACTION, margin: float = MARGIN
            ) -> tuple[str, dict[str, list]]:
    """Check a MoNuSeg folder and plan its datalist; reads only.

    Args:
        src: a folder holding either layout (see the module docstring).
        seed: seed of the validation draw (original layout).
        val_fraction: share of the training images held out for validation (original layout).
        margin: vertices up to this many pixels outside the image are clipped (original layout).

    Returns:
        ("lvit", datalist with absolute paths) or ("original", ``{section: [Slide, ...]}``: what
        `convert_slide` turns into images, masks and items).

    Raises:
        DataError: listing every problem found, each naming its file.
    """
    layout, root = detect_layout(src)
    problems: list[str] = []
    if layout == "lvit":
        plan = collect_lvit(root, NAMES, problems)
        check_sections(plan, problems, str(root))
    else:
        plan = _collect_original(root, seed, val_fraction, margin, problems)
        check_sections({k: [{"id": s.id, "image": str(s.tif)} for s in v] for k, v in plan.items()}, problems,
                       str(root))
    raise_if_problems(problems, f"MoNuSeg source {root} ({layout} layout)")
    return layout, plan


def convert_slide(slide: Slide, out: str | os.PathLike) -> dict:
    """Write one slide's ``images/``, ``labels/`` and ``instances/`` PNGs into ``out``; returns its datalist item."""
    out = Path(out)
    with Image.open(slide.tif) as im:
        rgb = np.asarray(im.convert("RGB"))
    inst = rasterize(slide.polygons, slide.size)
    name = slide.id + ".png"
    image = save_png(rgb, out / "images" / name)
    label = save_png(np.where(inst > 0, 255, 0).astype(np.uint8), out / "labels" / name)
    save_png(inst, out / "instances" / name)
    return {"image": str(image.resolve()), "label": str(label.resolve()), "text": describe_nuclei(inst, True),
            "id": slide.id}


def convert_monuseg(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    fractions: tuple[float, ...] = (0.25, 0.5),
    few_shot: tuple[float, ...] = (0.01, 0.1),
    val_fraction: float = VAL_FRACTION,
    margin: float = MARGIN,
) -> Path:
    """Convert a MoNuSeg folder to ``out/datalist.json`` plus the split files (and, for the original layout, PNGs).

    Args:
        src: source folder (original or LViT layout); only read.
        out: output folder; must not be inside ``src`` (nor ``src`` inside one of its output sub-folders).
        seed: seed of the validation draw and of the splits.
        fractions, few_shot: labelled and few-shot fractions of the split files.
        val_fraction: validation share of the training images (original layout).
        margin: vertex tolerance in pixels (original layout).

    Returns:
        the path of ``datalist.json``.

    Raises:
        DataError: any problem with the source (all listed at once); nothing is written then.
    """
    check_fractions(fractions=fractions, few_shot=few_shot, val_fraction=val_fraction)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    _, root = detect_layout(src)
    check_out(out, src, root, written=OUTPUT_FOLDERS)
    layout, plan = collect(root, seed, val_fraction, margin)
    if layout == "original":
        plan = {section: [convert_slide(s, out) for s in progress(slides, f"converting {section}")]
                for section, slides in plan.items()}
    return write_outputs(plan, out, seed, fractions, few_shot, roots=[root] if layout == "lvit" else [])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="MoNuSeg 2018 (original or LViT layout) -> MONAI datalist + split files.")
    add_common_args(p, "MoNuSeg folder (original TIF + XML layout, or LViT layout)")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="validation share (original layout)")
    p.add_argument("--margin", type=float, default=MARGIN, help="vertices up to this many px outside are clipped")
    a = p.parse_args(argv)
    with cli_errors():  # bad data: one `error: <file>: <problem>` line each, exit status 2
        path = convert_monuseg(a.src, a.out, a.seed, tuple(a.fractions), tuple(a.few_shot), a.val_fraction, a.margin)
    print(f"wrote {path} and split files to {path.parent}")
    return path


if __name__ == "__main__":
    main()
