"""Evaluation panels: a reproducible sample of the evaluator's images drawn as image | truth | prediction (| text
mask) pictures with their Dice (:class:`SavePanels`)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events

from amvlm_monai.evaluation.metrics import binarize
from amvlm_monai.handlers.metrics import _names

logger = logging.getLogger(__name__)


# ---- panels ----------------------------------------------------------------------------------------------------
def _split_output(engine: Engine) -> list[dict]:
    """The evaluator's last batch as one dict per image: image, label, pred (logits), text, id, case, path."""
    out, batch = engine.state.output, engine.state.batch
    if isinstance(out, list):  # decollated outputs
        rows = [dict(o) for o in out]
    elif isinstance(out, dict) and "pred" in out:
        n = out["pred"].shape[0]
        rows = [{k: out[k][i] for k in ("image", "label", "pred") if out.get(k) is not None} for i in range(n)]
    else:
        return []
    n = len(rows)
    extra = batch if isinstance(batch, dict) else {}
    names = _names(rows[0].get("image")) if isinstance(out, list) else _names(out.get("image"))
    for i, row in enumerate(rows):
        for key in ("text", "id", "case"):
            values = extra.get(key)
            if isinstance(values, (list, tuple)) and len(values) == n:
                row[key] = values[i]
        if isinstance(out, list):
            path = _names(row.get("image"))
            row["path"] = path[0] if path else None
        else:
            row["path"] = names[i] if names and len(names) == n else None
        row.setdefault("id", os.path.basename(str(row["path"])) if row["path"] else None)
    return rows


class PanelSampler:
    """A reproducible sample of an evaluator's images for panels, drawn while it runs (nothing is read twice).

    Plain 2D images: ``num_images`` images drawn uniformly (reservoir sampling, seeded). Slices of volumes (items with
    a ``case`` key): up to ``per_case`` slices with a labelled voxel from each of the first ``num_images`` cases.

    Args:
        num_images: images (or cases, for volumes) to keep.
        per_case: labelled slices kept per case.
        seed: the sample's seed (the same images every validation).
    """

    def __init__(self, num_images: int = 8, per_case: int = 3, seed: int = 0) -> None:
        if num_images < 1 or per_case < 1:
            raise ValueError(f"num_images and per_case must be >= 1, got {num_images} and {per_case}.")
        self.num_images, self.per_case, self.seed = int(num_images), int(per_case), seed
        self.reset()

    def reset(self, *_: Any) -> None:
        self._rng = random.Random(self.seed)
        self._seen: dict[str, int] = {}
        self._kept: dict[str, list[dict]] = {}
        self._count = 0

    def update(self, engine: Engine) -> None:
        for row in _split_output(engine):
            row["index"] = self._count
            self._count += 1
            case = row.get("case")
            if case is None:
                group, cap = "", self.num_images
            else:
                label = row.get("label")
                if label is None or not bool((label > 0).any()):
                    continue
                group, cap = str(case), self.per_case
                if group not in self._kept and len(self._kept) >= self.num_images:
                    continue
            keep = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
            seen = self._seen[group] = self._seen.get(group, 0) + 1
            kept = self._kept.setdefault(group, [])
            if len(kept) < cap:
                kept.append(keep)
            else:
                j = self._rng.randrange(seen)
                if j < cap:
                    kept[j] = keep

    def items(self) -> list[dict]:
        """The kept images in the evaluator's order."""
        return sorted((r for rows in self._kept.values() for r in rows), key=lambda r: r["index"])


@torch.no_grad()
def text_masks(guidance: torch.nn.Module, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Soft text masks (B, K, H, W) of a :class:`~amvlm_monai.engines.guidance.TextGuidance` for images (B, C, H, W)
    and their reports (K = 1) or the guidance's class prompts (K = C - 1)."""
    gen = guidance.generator
    device = gen.w.device
    images = images.to(device).float()
    masks = gen.masks(gen.dense(images), guidance.prompts(texts, device))
    return gen.upsample(masks, images.shape[-2:]).cpu()


def render_panels(items: list[dict], multiclass: bool = False, guidance: Optional[torch.nn.Module] = None
                  ) -> list[tuple[dict, Any]]:
    """Panels (:func:`~amvlm_monai.evaluation.figures.segmentation_panel`) of sampled items, each with its Dice in the title.

    Returns:
        ``[(info, rgb array)]`` with info ``id``, ``image`` (its file), ``report``, ``dice`` and ``foreground`` (the
        labelled fraction of the image).
    """
    from amvlm_monai.evaluation.figures import segmentation_panel
    from amvlm_monai.evaluation.metrics import segmentation_scores

    if not items:
        return []
    masks = None
    texts = [r.get("text") for r in items]
    if guidance is not None and all(isinstance(t, str) and t for t in texts):
        masks = text_masks(guidance, torch.stack([r["image"] for r in items]), texts)
    out = []
    for k, r in enumerate(items):
        logits, label = r["pred"].float()[None], r.get("label")
        pred = binarize(logits, multiclass=multiclass)
        info = {"id": str(r.get("id")), "image": r.get("path"), "report": r.get("text"), "dice": None,
                "foreground": None}
        title = info["id"]
        if label is not None:
            target = label[None].float() if multiclass else (label[None] > 0.5).float()
            dice, _ = segmentation_scores(pred, target, include_background=not multiclass)
            info["dice"] = float(dice.mean())
            info["foreground"] = float((label > 0).float().mean())
            title = f"{title}  Dice {info['dice']:.2f}"
        shown = pred[0].argmax(0) if multiclass else pred[0, 0]
        picture = segmentation_panel(r["image"], label, shown, masks[k] if masks is not None else None,
                                     report=r.get("text"), title=title, multiclass=multiclass)
        out.append((info, picture))
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"


def panel_files(infos: list[dict]) -> list[str]:
    """One PNG file name per panel, never two alike (compared ignoring case): the panel's ``id`` made safe for a file
    name; where ids collide (same-named images of two folders), the image's path relative to the sampled images'
    common folder (``p01/scan.png`` -> ``p01_scan.png``); a number where even those collide."""
    from collections import Counter

    from amvlm_monai.io.outputs import relative_names

    names = [_safe(str(i.get("id"))) for i in infos]
    count = Counter(n.casefold() for n in names)
    paths = [i.get("image") for i in infos]
    if any(count[n.casefold()] > 1 for n in names) and all(isinstance(p, str) and p for p in paths):
        rel = relative_names(paths)
        names = [_safe(str(r.with_suffix("")).replace("/", "_")) if count[n.casefold()] > 1 else n
                 for n, r in zip(names, rel)]
    out, used = [], set()
    for n in names:
        name, k = n, 1
        while name.casefold() in used:
            k += 1
            name = f"{n}_{k}"
        used.add(name.casefold())
        out.append(f"{name}.png")
    return out


class SavePanels:
    """Evaluation panels as PNG files: image, ground truth, prediction, text mask and report for a sample of images
    (:class:`PanelSampler`), plus ``index.json`` (id, source image, report, Dice, labelled fraction per panel). Each
    panel has its own file (:func:`panel_files`), also for same-named images of different folders.

    The text mask needs a stage-1 model: ``guidance`` (a live
    :class:`~amvlm_monai.engines.guidance.TextGuidance`), or ``checkpoint`` (a stage-1 checkpoint; its mask generator
    then has the initial, untrained decoder, i.e. the stage-1 patch-report similarity through
    ``sigmoid(w (sim - b))``). Without either, or when the file is missing, panels have no text mask.

    Args:
        output_dir: folder of the PNG files.
        num_images, per_case, seed: see :class:`PanelSampler`.
        multiclass: class-index labels and arg-max predictions.
        checkpoint: stage-1 checkpoint for the text masks (optional).
        class_prompts: multi-class data: one prompt per foreground class (as the training config's).
        text_model: override the text model folder recorded in the checkpoint.
        guidance: a TextGuidance to use instead of ``checkpoint``.
    """

    def __init__(self, output_dir: str, num_images: int = 8, per_case: int = 3, multiclass: bool = False,
                 checkpoint: Optional[str] = None, class_prompts: Optional[list[str]] = None,
                 text_model: Optional[str] = None, guidance: Optional[torch.nn.Module] = None, seed: int = 0) -> None:
        self.output_dir = os.fspath(output_dir)
        self.sampler = PanelSampler(num_images, per_case, seed)
        self.multiclass = multiclass
        self.checkpoint = checkpoint
        self.class_prompts = class_prompts
        self.text_model = text_model
        self.guidance = guidance

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self, Events.COMPLETED):
            return
        engine.add_event_handler(Events.STARTED, self.sampler.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.sampler.update)
        engine.add_event_handler(Events.COMPLETED, self)

    def _guidance(self, device) -> Optional[torch.nn.Module]:
        if self.guidance is not None or not self.checkpoint:
            return self.guidance
        if not os.path.isfile(self.checkpoint):
            logger.info(f"no stage-1 checkpoint at {self.checkpoint}: panels without text masks.")
            return None
        from amvlm_monai.engines.guidance import build_text_guidance

        return build_text_guidance(self.checkpoint, use_tg=False, class_prompts=self.class_prompts,
                                   text_model=self.text_model, device=device).eval()

    def __call__(self, engine: Engine) -> None:
        from amvlm_monai.evaluation.figures import save_png

        panels = render_panels(self.sampler.items(), self.multiclass, self._guidance(engine.state.device))
        index = []
        for (info, picture), name in zip(panels, panel_files([info for info, _ in panels])):
            save_png(picture, os.path.join(self.output_dir, name))
            index.append(dict(info, file=name))
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "index.json"), "w") as f:
            json.dump(index, f, indent=1)
        logger.info(f"{len(index)} panels written to {self.output_dir}")
