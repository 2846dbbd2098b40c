"""Pictures of what the models do: segmentation panels and alignment heat-maps, as RGB arrays and PNG files.

- :func:`segmentation_panel`: image | ground truth | prediction | text mask side by side, the report printed under
  them (evaluation writes these for a sample of test images; TensorBoard shows the same at validation).
- :func:`alignment_figure`: for one image and K reports, the patch-report cosine similarity and the PDT's predicted
  variance over the image (:func:`amvlm_monai.evaluation.alignment.alignment_maps` computes them).
- :func:`readme_figures` / ``python -m amvlm_monai.evaluation.figures figures --run runs/demo --out docs/images``: one panel
  and one heat-map from a finished demo run, for the README.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed). Images come in
as the pipelines give them, ``(C, H, W)`` with C = 1 (grey) or 3 (colour), any intensity range (shown min-max).
MONAI's readers put the x axis first (a PNG of width W and height H loads as ``(C, W, H)``), so with ``xy=True`` (the
default) every array is transposed to rows and columns and the picture looks like the file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

_GT = (0.1, 0.85, 0.2)  # ground truth: green


_PRED = (0.95, 0.2, 0.6)  # prediction: magenta


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def to_display(image) -> np.ndarray:
    """``(C, H, W)`` or ``(H, W)`` image -> ``(H, W, 3)`` float RGB in [0, 1] (min-max scaled; grey repeated)."""
    a = _numpy(image).astype(np.float64)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    if a.ndim not in (2, 3):
        raise ValueError(f"image must be (C, H, W) or (H, W), got shape {a.shape}.")
    lo, hi = np.nanmin(a), np.nanmax(a)
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def _rows(a, xy: bool):
    """MONAI's (..., x, y) -> (..., rows, columns) when ``xy``; None stays None."""
    if a is None or not xy:
        return a
    return np.swapaxes(_numpy(a), -1, -2)


def _mask2d(mask) -> np.ndarray:
    m = _numpy(mask)
    while m.ndim > 2:
        if m.shape[0] != 1:
            break
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"a mask must be (H, W) or (1, H, W), got shape {m.shape}.")
    return m


def _overlay(rgb: np.ndarray, mask: np.ndarray, multiclass: bool, color=_GT, alpha: float = 0.45) -> np.ndarray:
    """Masks over the image: one colour for a binary mask, the ``tab20`` colours for class indices."""
    out = rgb.copy()
    if multiclass:
        from matplotlib import colormaps

        cmap = colormaps["tab20"]
        for c in np.unique(mask):
            if c <= 0:
                continue
            sel = mask == c
            out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(cmap(int(c - 1) % 20)[:3])
        return out
    sel = mask > 0.5
    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(color)
    return out


def _figure(ncols: int, nrows: int, text_lines: int, cell: float = 2.4):
    from matplotlib.figure import Figure

    text_h = 0.17 * text_lines
    fig = Figure(figsize=(cell * ncols, cell * nrows + 0.35 * nrows + text_h), dpi=100)
    return fig, text_h / (cell * nrows + 0.35 * nrows + text_h)


def _to_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _wrap(text: str, width: int, max_lines: int = 8) -> list[str]:
    lines = textwrap.wrap(" ".join(str(text).split()), width=max(width, 20))
    return lines[: max_lines - 1] + [" ".join(lines[max_lines - 1:])[: width - 3] + "..."] if len(lines) > max_lines \
        else lines


def segmentation_panel(image, label=None, pred=None, text_mask=None, report: Optional[str] = None,
                       title: Optional[str] = None, multiclass: bool = False, xy: bool = True) -> np.ndarray:
    """One test image as a row of pictures, as an ``(H, W, 3)`` uint8 RGB array.

    Args:
        image: ``(C, H, W)`` (C = 1 or 3) or ``(H, W)``.
        label: ground truth ``(1, H, W)`` or ``(H, W)``: {0, 1} or class indices (``multiclass``); None skips it.
        pred: prediction, same form as ``label`` (already binarised / arg-maxed); None skips it.
        text_mask: ``(K, H, W)`` or ``(H, W)`` soft text masks in [0, 1] (the maximum over K is shown); None skips it.
        report: printed under the pictures.
        title: over the first picture (e.g. the image id and its Dice).
        multiclass: label and pred are class indices (coloured per class).
        xy: the arrays are in MONAI's spatial order, x first (see the module's notes); False: rows first.
    """
    image, label, pred, text_mask = (_rows(a, xy) for a in (image, label, pred, text_mask))
    rgb = to_display(image)
    columns: list[tuple[str, np.ndarray, Optional[np.ndarray]]] = [(title or "image", rgb, None)]
    if label is not None:
        columns.append(("ground truth", _overlay(rgb, _mask2d(label), multiclass, _GT), None))
    if pred is not None:
        columns.append(("prediction", _overlay(rgb, _mask2d(pred), multiclass, _PRED), None))
    if text_mask is not None:
        tm = _numpy(text_mask)
        tm = tm.max(axis=0) if tm.ndim == 3 else tm
        columns.append(("text mask", rgb, tm))
    lines = _wrap(report, 30 * len(columns)) if report else []
    fig, text_frac = _figure(len(columns), 1, len(lines))
    bottom = text_frac + 0.02
    for i, (name, picture, heat) in enumerate(columns):
        ax = fig.add_axes((i / len(columns) + 0.005, bottom, 1 / len(columns) - 0.01, 0.86 - bottom))
        ax.imshow(picture, interpolation="nearest")
        if heat is not None:
            ax.imshow(heat, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.55, interpolation="bilinear")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if lines:
        fig.text(0.01, text_frac * 0.9, "\n".join(lines), fontsize=8, va="top", ha="left", family="monospace")
    return _to_array(fig)


def alignment_figure(image, reports: Sequence[str], similarity, variance_image, variance_attended=None,
                     xy: bool = True) -> np.ndarray:
    """Alignment heat-maps of one image, as an ``(H, W, 3)`` uint8 RGB array.

    Top row: the image and the PDT's predicted variance of its patch embeddings (report-free). One row per report:
    the cosine similarity of every patch with the report's embedding, and the PDT variance of the report's words as
    attended by every patch (how unsure the model is about that patch's match). Heat-maps are upsampled from the
    patch grid to the image (bilinear display).

    Args:
        image: ``(C, H, W)`` or ``(H, W)``.
        reports: K reports.
        similarity: ``(K, h, w)`` patch-report cosine similarity.
        variance_image: ``(h, w)`` mean over D of the PDT's sigma^2 of the image patches.
        variance_attended: ``(K, h, w)`` the same for the attended words of each report, or None.
        xy: the arrays are in MONAI's spatial order, x first (see the module's notes); False: rows first.
    """
    from matplotlib.figure import Figure

    image, similarity, variance_image, variance_attended = (
        _rows(a, xy) for a in (image, similarity, variance_image, variance_attended))
    rgb = to_display(image)
    sim, var_img = _numpy(similarity), _numpy(variance_image)
    var_att = _numpy(variance_attended) if variance_attended is not None else None
    k = len(reports)
    if sim.ndim != 3 or sim.shape[0] != k:
        raise ValueError(f"similarity must be (K={k}, h, w), got shape {sim.shape}.")
    fig = Figure(figsize=(6.4, 3.0 * (k + 1)), dpi=100, layout="constrained")
    axes = fig.subplots(k + 1, 2, squeeze=False)
    h, w = rgb.shape[:2]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)

    def show(ax, title, heat=None, cmap="viridis", vmin=None, vmax=None, text=None):
        ax.imshow(rgb, extent=extent, interpolation="nearest")
        if heat is not None:
            im = ax.imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.6, extent=extent, interpolation="bilinear")
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if text:
            ax.set_xlabel(text, fontsize=7)

    show(axes[0, 0], "image")
    show(axes[0, 1], "PDT variance, image patches", var_img, cmap="magma")
    lo, hi = float(sim.min()), float(sim.max())  # one scale for all reports, so that they compare
    for j in range(k):
        show(axes[j + 1, 0], f"report {j + 1}: patch-report similarity", sim[j], vmin=lo, vmax=hi,
             text="\n".join(_wrap(reports[j], 42, max_lines=3)))
        if var_att is not None:
            show(axes[j + 1, 1], f"report {j + 1}: PDT variance, attended words", var_att[j], cmap="magma",
                 vmin=float(var_att.min()), vmax=float(var_att.max()))
        else:
            axes[j + 1, 1].set_axis_off()
    return _to_array(fig)


def save_png(array: np.ndarray, path) -> Path:
    """Write an ``(H, W, 3)`` uint8 array as PNG (parent folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


# ---- README figures from a finished demo run -------------------------------------------------------------------
def _pick_panel(run: Path, prefer: str) -> tuple[Path, dict]:
    indexes = sorted(run.rglob("panels/index.json"))
    if not indexes:
        raise FileNotFoundError(f"no evaluation panels (panels/index.json) under {run}: run the evaluation first.")
    preferred = [p for p in indexes if prefer in str(p.relative_to(run))] or indexes
    index_path = preferred[0]
    entries = json.loads(index_path.read_text())
    if not entries:
        raise ValueError(f"{index_path} lists no panel.")
    # the most telling picture: the largest labelled region, then the best Dice
    best = max(entries, key=lambda e: (e.get("foreground", 0.0), e.get("dice", 0.0), e["file"]))
    return index_path.parent / best["file"], dict(best, entries=entries)


def readme_figures(run_dir, out_dir, prefer: str = "amvlm", checkpoint=None, reports: Optional[Sequence[str]] = None
                   ) -> dict[str, Path]:
    """Write ``panel.png`` and ``alignment.png`` for the README from a finished demo run.

    The panel is copied from the evaluation panels of the run (the variant whose path contains ``prefer``; the
    image with the largest labelled region); the heat-map shows that image against its own report and against the
    report of another panel image (or ``reports``), under the stage-1 checkpoint of the run (``**/amvlm_pretrained.pt``
    unless ``checkpoint`` is given).

    Returns:
        ``{"panel": path, "alignment": path}``.
    """
    from amvlm_monai.evaluation.alignment import alignment_maps
    from amvlm_monai.networks.amvlm import load_amvlm

    run, out = Path(run_dir), Path(out_dir)
    panel_file, info = _pick_panel(run, prefer)
    out.mkdir(parents=True, exist_ok=True)
    panel = out / "panel.png"
    shutil.copyfile(panel_file, panel)
    if checkpoint is None:
        found = sorted(run.rglob("amvlm_pretrained.pt"))
        if not found:
            raise FileNotFoundError(f"no stage-1 checkpoint (amvlm_pretrained.pt) under {run}; pass checkpoint=.")
        checkpoint = found[0]
    if not info.get("image") or not Path(info["image"]).is_file():
        raise FileNotFoundError(f"{panel_file}: its source image {info.get('image')!r} is not readable.")
    if reports is None:
        own = info.get("report") or ""
        other = next((e["report"] for e in info["entries"] if e.get("report") and e.get("report") != own), None)
        reports = [r for r in (own, other) if r]
    if not reports:
        raise ValueError("no report to compare the image with: pass reports=.")
    maps = alignment_maps(load_amvlm(checkpoint), info["image"], list(reports))
    alignment = save_png(alignment_figure(maps["image"], maps["reports"], maps["similarity"], maps["variance_image"],
                                          maps["variance_attended"]), out / "alignment.png")
    return {"panel": panel, "alignment": alignment}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.evaluation.figures", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="README figures (panel.png, alignment.png) from a finished demo run")
    fig.add_argument("--run", required=True, help="the demo's run folder (holds eval panels and amvlm_pretrained.pt)")
    fig.add_argument("--out", required=True, help="output folder, e.g. docs/images")
    fig.add_argument("--prefer", default="amvlm", help="take the panels of the variant whose path contains this")
    fig.add_argument("--checkpoint", default=None, help="stage-1 checkpoint (default: found under --run)")
    args = parser.parse_args(argv)
    from amvlm_monai.utils.errors import cli_errors

    with cli_errors():  # a missing run folder or checkpoint: `error: <file>: <what is wrong>`, exit status 2
        written = readme_figures(args.run, args.out, prefer=args.prefer, checkpoint=args.checkpoint)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
