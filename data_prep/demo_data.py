"""Synthetic chest X-ray-like data set in LViT's QaTa-COV19 layout, for demos, tests and the evidence runs.

Layout written (the same as LViT's QaTa-COV19, so `data_prep.qata` converts it)::

    root/Train_Folder/img/train_0000.png          8-bit grayscale image
    root/Train_Folder/labelcol/mask_train_0000.png  binary mask, 0 / 255
    root/Val_Folder/...   root/Test_Folder/...
    root/Train_text.xlsx  root/Val_text.xlsx  root/Test_text.xlsx   columns Image (the MASK file name), Description

Each image: a bright body with ribs, a spine/mediastinum band and a heart shadow; two darker lung fields with
smooth vessel-like texture and low-frequency noise. What lies inside the lungs depends on the **regime**
(``--regime``):

- ``qata`` (the default): lesions with the extent, counts, sides and zones of QaTa-COV19's infection masks as LViT's
  reports and figures show them: 1-4 large irregular ground-glass regions (about 10 % of the image in all, 5-6 %
  each, several 8-px ViT patches across at 64 px, up to a whole lung), bilateral in two thirds of the images, more
  often in the middle and lower zones and towards the periphery, clipped by the lung borders; a patchy texture and a
  soft edge; the mask outline follows the opacity's half-maximum up to a smooth disagreement of 1-3 px (as a
  reader's outline does). Not in the mask: 0-3 **distractors** of the lesions' brightness: round smooth nodules,
  elongated vessels and large smooth soft-tissue shadows over the lower lungs (homogeneous, crossing the lung
  border). Exposure, blur and noise vary per image. Parameters: `QataParams` (calibrated on the supervised U-Net and
  Mean-Teacher only, see ``docs/calibration.md``; `lesion_stats` measures a set of masks).
- ``v1`` (the original demo set, byte-identical to the files this module wrote before the ``qata`` regime):
  0-3 **small lesions** (about 2 % of the image in all, one 8-px patch each at 64 px): irregular blobs with a rough
  border, patchy texture and a soft edge; 0-2 distractors (round smooth nodules, elongated vessels) of the same
  brightness range and an overlapping size range.

The report is `amvlm_monai.data.describe.describe_mask` of the true mask (how many lesions, patient side, upper/
middle/lower, size) in one of several wordings drawn per image (as real reports vary), e.g. "Bilateral pulmonary
infection, two infected areas, large middle left lung and large lower right lung." or "There are two opacities of
pneumonia, left upper zone (small) and right lower zone (moderate).".

What makes it hard: lesions and distractors differ in shape and texture (irregular/patchy vs. round-smooth,
elongated or homogeneous), not in brightness, and all sit on ribs, vessels and noise; lesion edges are soft and
clipped by the lung borders and the heart shadow. With few labelled images a network easily learns "bright area in
the lung" and segments the distractors too; the report says how many lesions there are and where. The ``qata``
regime's parameters were chosen by running only the supervised U-Net and Mean-Teacher (``docs/calibration.md``),
never a text-guided method; how much the text helps on it is an empirical question. It is a smoke-test, demo and
protocol-check set, not evidence about real chest X-rays.

Deterministic: each image is drawn from its own generator seeded by (seed, split, index), PNG and the .xlsx files
are written without time stamps, so the same arguments give byte-identical files (also with ``--workers`` > 1:
every image depends only on its own seed, and the files are written in order).

CLI::

    python -m data_prep.demo_data --out demo_data/qata_demo --n-train 200 --n-val 50 --n-test 100 --size 64 --seed 0
    python -m data_prep.demo_data --out demo_data/v1 --regime v1 ...        # the original small-lesion set
    python -m data_prep.demo_data --out W/raw --param amplitude=[0.1,0.2]  # override a QataParams field (JSON value)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from amvlm_monai.data.describe import describe_mask

from ._xlsx import write_xlsx

__all__ = ["SPLITS", "REGIMES", "DEFAULT_REGIME", "QataParams", "make_case", "make_demo_dataset", "lesion_stats",
           "main"]

#: (file prefix, folder, spreadsheet) per split, in the LViT layout.
SPLITS = (("train", "Train_Folder", "Train_text.xlsx"), ("val", "Val_Folder", "Val_text.xlsx"),
          ("test", "Test_Folder", "Test_text.xlsx"))
#: the generator regimes; the first is the default.
REGIMES = ("qata", "v1")
DEFAULT_REGIME = REGIMES[0]

# ---------------------------------------------------------------------------------------------------------------
# Regime v1: the original demo set. Nothing in this section may change: its output is pinned by a hash in the tests.
# ---------------------------------------------------------------------------------------------------------------

_LESION_COUNTS = (0.15, 0.35, 0.35, 0.15)  # P(0..3 lesions)
_DISTRACTOR_COUNTS = (0.35, 0.40, 0.25)  # P(0..2 distractors)
_AMPLITUDE = (0.16, 0.26)  # added brightness, shared by lesions and distractors


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed with ``sigma`` pixels, (size, size) float."""
    g = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="reflect")
    return g / (g.std() + 1e-8)


def _chest(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Background anatomy: (image float (S, S) in about [0, 1], lung mask bool (S, S))."""
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size  # v rows (down), u columns (right)
    cx = 0.5 + rng.uniform(-0.02, 0.02)
    body = ((u - cx) / rng.uniform(0.44, 0.48)) ** 2 + ((v - 0.58) / 0.62) ** 2 < 1
    soft = lambda m, s=1.0: ndimage.gaussian_filter(m.astype(float), s)  # noqa: E731
    img = 0.10 + 0.45 * soft(body, 1.5)
    img += 0.12 * np.exp(-(((u - cx) / 0.07) ** 2)) * soft(body, 1.5)  # spine and mediastinum
    hx, hy = cx + rng.uniform(0.04, 0.08), rng.uniform(0.66, 0.72)
    heart = ((u - hx) / rng.uniform(0.12, 0.15)) ** 2 + ((v - hy) / rng.uniform(0.10, 0.13)) ** 2 < 1
    lungs = np.zeros((size, size), bool)
    for s in (-1, 1):
        lx, ly = cx + s * rng.uniform(0.19, 0.23), rng.uniform(0.46, 0.52)
        hw, hh = rng.uniform(0.13, 0.16), rng.uniform(0.28, 0.34)
        t = np.clip((v - (ly - hh)) / (2 * hh), 0, 1)  # 0 at the apex, 1 at the base
        width = hw * (0.55 + 0.45 * np.sqrt(t))  # narrower apex
        lungs |= ((u - lx) / width) ** 2 + ((v - ly) / hh) ** 2 < 1
    lungs &= ~heart
    img -= 0.28 * soft(lungs)
    img += 0.10 * soft(heart, 1.5)
    phase = (v + 0.35 * (u - cx) ** 2) * rng.uniform(8, 10) + rng.uniform(0, 1)
    ribs = np.clip((np.cos(2 * np.pi * phase) - 0.55) / 0.45, 0, 1)
    img += 0.08 * ribs * soft(body, 1.5)
    img += 0.04 * _smooth_noise(rng, size, 1.0) * soft(lungs)  # vessel-like lung texture
    img += 0.03 * _smooth_noise(rng, size, size / 8)
    return img, lungs


def _lesion(rng, size, lungs, centre) -> tuple[np.ndarray, np.ndarray]:
    """An irregular, patchy blob: (mask bool (S, S) within the lungs, brightness float (S, S))."""
    rr, cc = (np.mgrid[0:size, 0:size] + 0.5) / size
    dy, dx = rr - centre[0], cc - centre[1]
    theta = np.arctan2(dy, dx)
    radius = rng.uniform(0.045, 0.10) * np.ones_like(theta)
    for k in (2, 3, 4):
        radius *= 1 + rng.uniform(0, 0.25) / k * 2 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rough = _smooth_noise(rng, size, 1.2)
    blob = np.hypot(dy, dx) / radius + 0.22 * rough < 1
    blob &= lungs
    labels, n = ndimage.label(blob)
    if n > 1:  # keep one connected piece: the mask holds no specks the report would not mention
        blob = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    blob = ndimage.binary_fill_holes(blob)
    texture = np.clip(0.65 + 0.35 * _smooth_noise(rng, size, 0.7), 0.3, 1.3)
    bright = rng.uniform(*_AMPLITUDE) * ndimage.gaussian_filter(blob.astype(float), 1.0) * texture
    return blob, bright


def _distractor(rng, size, centre, hilum_x) -> tuple[np.ndarray, np.ndarray]:
    """A round smooth nodule or an elongated vessel: (footprint bool (S, S), brightness float (S, S))."""
    rr, cc = (np.mgrid[0:size, 0:size] + 0.5) / size
    dy, dx = rr - centre[0], cc - centre[1]
    amp = rng.uniform(*_AMPLITUDE)
    if rng.uniform() < 0.5:  # nodule: a smooth dome
        r = rng.uniform(0.03, 0.06)
        prof = np.sqrt(np.clip(1 - (np.hypot(dy, dx) / r) ** 2, 0, 1))
    else:  # vessel: a Gaussian ridge pointing roughly at the hilum
        angle = np.arctan2(0.0, hilum_x - centre[1]) + rng.uniform(-0.6, 0.6)
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        half_len, width = rng.uniform(0.04, 0.08), rng.uniform(0.012, 0.025)
        prof = np.exp(-((across / width) ** 2)) * np.clip(1 - (along / half_len) ** 2, 0, 1)
    return prof > 0.3, amp * prof


def _make_case_v1(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic chest image and its lesion mask.

    Args:
        rng: the generator (consumed).
        size: image side in pixels (>= 32).

    Returns:
        (image uint8 (S, S), mask uint8 (S, S) with values 0/255, info ``{"lesions": int, "distractors": int}``).
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}.")
    img, lungs = _chest(rng, size)
    inner = ndimage.binary_erosion(lungs, iterations=max(1, size // 32))
    candidates = np.argwhere(inner)
    mask = np.zeros((size, size), bool)
    taken = np.zeros((size, size), bool)  # footprints of placed objects, dilated
    min_px = max(8, int(0.003 * size * size))
    n_les = int(rng.choice(4, p=_LESION_COUNTS))
    n_dis = int(rng.choice(3, p=_DISTRACTOR_COUNTS))
    placed = {"lesions": 0, "distractors": 0}
    cx = 0.5  # hilum direction: towards the image centre
    for kind, n in (("lesions", n_les), ("distractors", n_dis)):
        for _ in range(n):
            for _attempt in range(20):
                centre = (candidates[rng.integers(len(candidates))] + 0.5) / size
                if kind == "lesions":
                    foot, bright = _lesion(rng, size, lungs, centre)
                    if foot.sum() < min_px:
                        continue
                else:
                    foot, bright = _distractor(rng, size, centre, cx)
                if (foot & taken).any():
                    continue
                img += bright
                taken |= ndimage.binary_dilation(foot, iterations=2)
                if kind == "lesions":
                    mask |= foot
                placed[kind] += 1
                break
    img = ndimage.gaussian_filter(img, 0.6)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15)
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04)
    img += 0.015 * rng.standard_normal(img.shape)
    image = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255, placed


# ---------------------------------------------------------------------------------------------------------------
# Regime qata: QaTa-COV19-like extent, counts, sides and zones.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QataParams:
    """Parameters of the ``qata`` regime. Lengths are fractions of the image side, brightness on the [0, 1] scale
    of the image before its final contrast jitter; ``(lo, hi)`` pairs are uniform ranges drawn per object.

    The defaults are the calibrated values (``docs/calibration.md``); ``--param KEY=VALUE`` overrides one.
    """

    lesion_counts: tuple[float, ...] = (0.03, 0.30, 0.45, 0.15, 0.07)  #: P(0, 1, 2, 3, 4 lesions)
    bilateral: float = 0.85  #: P(the second lesion lies in the other lung)
    whole_lung: float = 0.2  #: P(a lesion fills a whole lung)
    half_height: tuple[float, float] = (0.12, 0.24)  #: lesion half-extent, vertical (a lung's is about 0.31)
    half_width: tuple[float, float] = (0.09, 0.15)  #: lesion half-extent, horizontal (a lung's is about 0.15)
    zone_beta: tuple[float, float] = (2.0, 1.2)  #: Beta law of the lesion centre from apex (0) to base (1)
    lobes: float = 0.5  #: irregularity of the outline (harmonics 2-5)
    rough: float = 0.25  #: roughness of the border (smooth noise added to the shape field)
    min_area: float = 0.012  #: smallest lesion kept, fraction of the image
    amplitude: tuple[float, float] = (0.07, 0.22)  #: added brightness of a lesion
    edge: float = 0.3  #: soft edge: the opacity ramps from 0 to its full value over +-edge of the shape field
    outline_noise: float = 0.3  #: disagreement of the mask's outline with the opacity's (shape-field units)
    texture: float = 0.35  #: patchiness of a lesion (relative brightness variation, about 1 px grain)
    distractor_counts: tuple[float, ...] = (0.25, 0.40, 0.25, 0.10)  #: P(0..3 distractors)
    distractor_kinds: tuple[float, float, float] = (0.35, 0.35, 0.30)  #: P(nodule, vessel, soft-tissue shadow)
    distractor_amplitude: tuple[float, float] = (0.10, 0.22)  #: added brightness of a distractor
    blur: tuple[float, float] = (0.4, 1.0)  #: Gaussian blur of the whole image, pixels at 64 px
    gamma: tuple[float, float] = (0.7, 1.4)  #: exposure: gamma, gain and offset of the whole image
    gain: tuple[float, float] = (0.8, 1.2)
    offset: tuple[float, float] = (-0.08, 0.08)
    noise: tuple[float, float] = (0.01, 0.04)  #: standard deviation of the white noise added last

    def replace(self, **changes) -> QataParams:
        """A copy with ``changes`` (lists become tuples); unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown QataParams fields {sorted(unknown)}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(v rows, u columns) pixel-centre coordinates in [0, 1], cached per size (read-only)."""
    if size not in _GRIDS:
        v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
        v.flags.writeable = u.flags.writeable = False
        _GRIDS[size] = (v, u)
    return _GRIDS[size]


def _soft(m: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(m.astype(float), sigma)


def _chest_qata(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Background anatomy: (image float (S, S) in about [0, 1], lung mask bool (S, S), lung geometry by side).

    The geometry maps side -1 (image left: the patient's right lung) and +1 to (centre x, centre y, half-width,
    half-height). Sigmas are in pixels at 64 px and scale with the size.
    """
    v, u = _grid(size)
    k = size / 64
    cx = 0.5 + rng.uniform(-0.02, 0.02)
    body_m = ((u - cx) / rng.uniform(0.44, 0.48)) ** 2 + ((v - 0.58) / 0.62) ** 2 < 1
    body = _soft(body_m, 1.5 * k)
    img = 0.10 + 0.45 * body
    img += 0.12 * np.exp(-(((u - cx) / 0.07) ** 2)) * body  # spine and mediastinum
    hx, hy = cx + rng.uniform(0.04, 0.08), rng.uniform(0.66, 0.72)
    heart = ((u - hx) / rng.uniform(0.12, 0.15)) ** 2 + ((v - hy) / rng.uniform(0.10, 0.13)) ** 2 < 1
    lungs = np.zeros((size, size), bool)
    geometry = {}
    for s in (-1, 1):
        lx, ly = cx + s * rng.uniform(0.20, 0.23), rng.uniform(0.46, 0.52)
        hw, hh = rng.uniform(0.14, 0.17), rng.uniform(0.29, 0.34)
        t = np.clip((v - (ly - hh)) / (2 * hh), 0, 1)  # 0 at the apex, 1 at the base
        width = hw * (0.55 + 0.45 * np.sqrt(t))  # narrower apex
        lungs |= ((u - lx) / width) ** 2 + ((v - ly) / hh) ** 2 < 1
        geometry[s] = (lx, ly, hw, hh)
    lungs &= ~heart
    soft_lungs = _soft(lungs, 1.0 * k)
    img -= 0.28 * soft_lungs
    img += 0.10 * _soft(heart, 1.5 * k)
    phase = (v + 0.35 * (u - cx) ** 2) * rng.uniform(8, 10) + rng.uniform(0, 1)
    ribs = np.clip((np.cos(2 * np.pi * phase) - 0.55) / 0.45, 0, 1)
    img += 0.08 * ribs * body
    img += 0.04 * _smooth_noise(rng, size, 1.0 * k) * soft_lungs  # vessel-like lung texture
    img += 0.03 * _smooth_noise(rng, size, size / 8)
    return img, lungs, geometry


def _lesion_qata(rng, size, lungs, lung, side, p: QataParams) -> tuple[np.ndarray, np.ndarray]:
    """A large irregular ground-glass region in one lung: (mask bool (S, S), brightness float (S, S))."""
    v, u = _grid(size)
    k = size / 64
    lx, ly, hw, hh = lung
    if rng.uniform() < p.whole_lung:
        cy, cx = ly + rng.uniform(-0.03, 0.03), lx
        ry, rx = hh * rng.uniform(0.95, 1.15), hw * rng.uniform(1.1, 1.4)
    else:
        cy = ly - hh + 2 * hh * rng.beta(*p.zone_beta)
        cx = lx + side * hw * rng.uniform(-0.2, 0.6)  # towards the periphery
        ry, rx = rng.uniform(*p.half_height), rng.uniform(*p.half_width)
    dy, dx = (v - cy) / ry, (u - cx) / rx
    theta = np.arctan2(dy, dx)
    outline = np.ones((size, size))
    for h in (2, 3, 4, 5):
        outline += rng.uniform(0, p.lobes) / h * np.cos(h * theta + rng.uniform(0, 2 * np.pi))
    field = 1 - np.hypot(dy, dx) / np.maximum(outline, 0.2) + p.rough * _smooth_noise(rng, size, 1.5 * k)
    # the annotated outline follows the visible opacity up to a smooth disagreement (as a reader's outline does)
    blob = (field + p.outline_noise * _smooth_noise(rng, size, 2.0 * k) > 0) & lungs
    labels, n = ndimage.label(blob)
    if n > 1:  # keep one connected piece: the mask holds no specks the report would not mention
        blob = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    blob = ndimage.binary_fill_holes(blob)
    ramp = np.clip(0.5 + field / (2 * p.edge), 0, 1)  # half of the full opacity on the mask's border
    near = _soft(ndimage.binary_dilation(blob, iterations=max(1, round(2 * k))), 1.0 * k)  # no light from specks
    texture = np.clip(1 + p.texture * _smooth_noise(rng, size, 0.8 * k), 0.2, 1.8)
    bright = rng.uniform(*p.amplitude) * ramp * near * texture * _soft(lungs, 0.7 * k)
    return blob, bright


def _distractor_qata(rng, size, lungs, geometry, centre, p: QataParams) -> tuple[np.ndarray, np.ndarray, bool]:
    """A distractor (not in the mask): (footprint bool, brightness float, may it overlap a lesion)."""
    v, u = _grid(size)
    amp = rng.uniform(*p.distractor_amplitude)
    kind = int(rng.choice(3, p=p.distractor_kinds))
    if kind == 2:  # soft-tissue shadow over the lower lateral lung: large, smooth, homogeneous, crosses the border
        side = 1 if rng.uniform() < 0.5 else -1
        lx, ly, hw, hh = geometry[side]
        cy, cx = ly + hh * rng.uniform(0.2, 0.8), lx + side * hw * rng.uniform(0.3, 1.0)
        ry, rx = rng.uniform(0.08, 0.14), rng.uniform(0.10, 0.16)
        prof = np.clip(1 - ((v - cy) / ry) ** 2 - ((u - cx) / rx) ** 2, 0, 1) ** 0.7
        prof = _soft(prof, size / 40)
        return prof > 0.3, amp * prof, True
    dy, dx = v - centre[0], u - centre[1]
    if kind == 0:  # nodule: a smooth dome
        r = rng.uniform(0.03, 0.06)
        prof = np.sqrt(np.clip(1 - (np.hypot(dy, dx) / r) ** 2, 0, 1))
    else:  # vessel: a Gaussian ridge pointing roughly at the hilum
        angle = np.arctan2(0.0, 0.5 - centre[1]) + rng.uniform(-0.6, 0.6)
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        half_len, width = rng.uniform(0.04, 0.09), rng.uniform(0.012, 0.025)
        prof = np.exp(-((across / width) ** 2)) * np.clip(1 - (along / half_len) ** 2, 0, 1)
    return prof > 0.3, amp * prof, False


def _make_case_qata(rng: np.random.Generator, size: int, p: QataParams) -> tuple[np.ndarray, np.ndarray, dict]:
    img, lungs, geometry = _chest_qata(rng, size)
    inner = ndimage.binary_erosion(lungs, iterations=max(1, size // 32))
    candidates = np.argwhere(inner)
    mask = np.zeros((size, size), bool)
    taken = np.zeros((size, size), bool)  # placed lesions, dilated: lesions stay separate regions
    min_px = max(8, int(p.min_area * size * size))
    n_les = int(rng.choice(len(p.lesion_counts), p=p.lesion_counts))
    n_dis = int(rng.choice(len(p.distractor_counts), p=p.distractor_counts))
    placed = {"lesions": 0, "distractors": 0}
    first = 1 if rng.uniform() < 0.5 else -1
    for i in range(n_les):
        if i == 0:
            side = first
        elif i == 1 and rng.uniform() < p.bilateral:
            side = -first
        else:
            side = 1 if rng.uniform() < 0.5 else -1
        for _attempt in range(10):
            foot, bright = _lesion_qata(rng, size, lungs, geometry[side], side, p)
            if foot.sum() < min_px or (foot & taken).any():
                continue
            img += bright
            mask |= foot
            taken |= ndimage.binary_dilation(foot, iterations=max(1, size // 32))
            placed["lesions"] += 1
            break
    for _ in range(n_dis):
        for _attempt in range(10):
            centre = (candidates[rng.integers(len(candidates))] + 0.5) / size
            foot, bright, may_overlap = _distractor_qata(rng, size, lungs, geometry, centre, p)
            if not may_overlap and (foot & taken).any():
                continue
            img += bright
            placed["distractors"] += 1
            break
    img = ndimage.gaussian_filter(img, rng.uniform(*p.blur) * size / 64)
    img = np.clip(img, 0, 1) ** rng.uniform(*p.gamma)
    img = img * rng.uniform(*p.gain) + rng.uniform(*p.offset)
    img += rng.uniform(*p.noise) * rng.standard_normal(img.shape)
    image = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255, placed


# ---------------------------------------------------------------------------------------------------------------


def make_case(rng: np.random.Generator, size: int = 64, regime: str = DEFAULT_REGIME,
              params: QataParams | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic chest image and its lesion mask.

    Args:
        rng: the generator (consumed).
        size: image side in pixels (>= 32).
        regime: ``"qata"`` (default) or ``"v1"`` (see the module docstring).
        params: the ``qata`` regime's parameters (default `QataParams()`); must be None for ``v1``.

    Returns:
        (image uint8 (S, S), mask uint8 (S, S) with values 0/255, info ``{"lesions": int, "distractors": int}``:
        the objects placed; lesions never touch each other, so ``lesions`` is the mask's number of regions).
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}.")
    if regime == "v1":
        if params is not None:
            raise ValueError("the v1 regime takes no params.")
        return _make_case_v1(rng, size)
    if regime != "qata":
        raise ValueError(f"unknown regime {regime!r}; known: {REGIMES}")
    return _make_case_qata(rng, size, params or QataParams())


def lesion_stats(masks, patch: int = 8) -> dict:
    """Lesion statistics of binary masks, as the ``qata`` regime is checked and documented.

    Args:
        masks: (H, W) arrays, nonzero = lesion.
        patch: the ViT patch side in pixels (8 at 64 px).

    Returns:
        ``fg_mean`` (mean foreground fraction per image), ``empty_share`` (images without a lesion),
        ``count_share`` (region count -> share of images), ``bilateral_share`` (share of the images with a lesion
        that have one in each lung), ``regions``, ``span2_share`` (share of regions whose bounding box spans >= 2
        patches in its longer direction), ``patches_median`` (median number of patches a region touches),
        ``zone_share`` (share of regions reaching the upper / middle / lower third of the image).
    """
    from amvlm_monai.data.describe import find_regions

    fg, counts, bilateral, spans, touched, zones = [], [], [], [], [], np.zeros(3)
    for m in masks:
        m = np.asarray(m) != 0
        fg.append(float(m.mean()))
        regions = find_regions(m)
        counts.append(len(regions))
        if regions:
            bilateral.append(len({r.side for r in regions} - {1}) == 2)
        labels = ndimage.label(m)[0]  # the same 4-connected regions as find_regions
        label_of = {(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop): k
                    for k, sl in enumerate(ndimage.find_objects(labels), start=1)}
        for r in regions:
            r0, c0, r1, c1 = r.bbox
            spans.append(max(r1 - r0, c1 - c0) >= 2 * patch)
            rows, cols = np.nonzero(labels[r0:r1, c0:c1] == label_of[r.bbox])
            touched.append(len(set(zip(((rows + r0) // patch).tolist(), ((cols + c0) // patch).tolist()))))
            zones[list(r.vertical)] += 1
    n_reg = max(1, len(spans))
    values, freq = np.unique(counts, return_counts=True)
    return {
        "images": len(fg),
        "fg_mean": float(np.mean(fg)),
        "empty_share": float(np.mean(np.asarray(counts) == 0)),
        "count_share": {int(v): float(f / len(counts)) for v, f in zip(values, freq)},
        "bilateral_share": float(np.mean(bilateral)) if bilateral else 0.0,
        "regions": len(spans),
        "span2_share": float(np.mean(spans)) if spans else 0.0,
        "patches_median": float(np.median(touched)) if touched else 0.0,
        "zone_share": dict(zip(("upper", "middle", "lower"), (zones / n_reg).tolist())),
    }


def _case_files(job: tuple) -> tuple[bytes, bytes, str]:
    """One image of a split: (image PNG bytes, mask PNG bytes, report); depends only on ``job``."""
    seed, split_idx, i, size, regime, params = job
    rng = np.random.default_rng([seed, split_idx, i])
    image, mask, _ = make_case(rng, size, regime, params)
    report = describe_mask(mask, rng=rng)  # varied wording, same facts
    return _png(image), _png(mask), report


def _png(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def make_demo_dataset(
    root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 64, seed: int = 0, overwrite: bool = False,
    regime: str = DEFAULT_REGIME, params: QataParams | None = None, workers: int = 1,
) -> Path:
    """Write the synthetic data set in the LViT QaTa-COV19 layout (see the module docstring).

    Args:
        root: output folder (created).
        n_train, n_val, n_test: number of images per split (each >= 1).
        size: image side in pixels (>= 32).
        seed: the seed; the same arguments give byte-identical files.
        overwrite: replace the split folders and spreadsheets if they exist (only those are removed).
        regime: ``"qata"`` (default) or ``"v1"``.
        params: the ``qata`` regime's parameters (default `QataParams()`).
        workers: processes drawing the images (the files are the same for any number).

    Returns:
        ``root`` as a `Path`.

    Raises:
        FileExistsError: when a split folder or spreadsheet exists and ``overwrite`` is False.
    """
    root = Path(root)
    counts = (n_train, n_val, n_test)
    if min(counts) < 1:
        raise ValueError(f"n_train, n_val and n_test must be >= 1, got {counts}.")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}.")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; known: {REGIMES}")
    if regime == "v1" and params is not None:
        raise ValueError("the v1 regime takes no params.")
    targets = [root / f for _, f, _ in SPLITS] + [root / x for _, _, x in SPLITS]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} exist; pass overwrite=True (--overwrite) to replace them.")
    for p in targets:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split_idx, ((prefix, folder, sheet), n) in enumerate(zip(SPLITS, counts)):
            (root / folder / "img").mkdir(parents=True)
            (root / folder / "labelcol").mkdir(parents=True)
            jobs = [(seed, split_idx, i, size, regime, params) for i in range(n)]
            results = pool.map(_case_files, jobs, chunksize=64) if pool else map(_case_files, jobs)
            rows = []
            for i, (image_png, mask_png, report) in enumerate(results):
                name = f"{prefix}_{i:04d}.png"
                (root / folder / "img" / name).write_bytes(image_png)
                (root / folder / "labelcol" / f"mask_{name}").write_bytes(mask_png)
                rows.append((f"mask_{name}", report))
            write_xlsx(root / sheet, ("Image", "Description"), rows)
    finally:
        if pool:
            pool.shutdown()
    return root


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text}: the value is not JSON ({e})") from None


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Write a synthetic chest X-ray-like data set in LViT's QaTa layout.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (>= 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", choices=REGIMES, default=DEFAULT_REGIME,
                   help="qata: QaTa-COV19-like large lesions (default); v1: the original small-lesion set")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="override a QataParams field (JSON value, e.g. amplitude=[0.1,0.2]); qata regime only")
    p.add_argument("--workers", type=int, default=1, help="processes drawing the images (same files for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace existing split folders and spreadsheets")
    a = p.parse_args(argv)
    if a.param and a.regime != "qata":
        p.error("--param applies to the qata regime only")
    params = QataParams().replace(**dict(a.param)) if a.param else None
    root = make_demo_dataset(a.out, a.n_train, a.n_val, a.n_test, a.size, a.seed, a.overwrite, a.regime, params,
                             a.workers)
    print(f"wrote {a.n_train}/{a.n_val}/{a.n_test} images ({a.size} px, seed {a.seed}, regime {a.regime}) to {root}")
    return root


if __name__ == "__main__":
    main()
