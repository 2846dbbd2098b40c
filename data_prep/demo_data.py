"""Synthetic chest X-ray-like data set in LViT's QaTa-COV19 layout, for demos and tests.

Layout written (the same as LViT's QaTa-COV19, so `data_prep.qata` converts it)::

    root/Train_Folder/img/train_0000.png          8-bit grayscale image
    root/Train_Folder/labelcol/mask_train_0000.png  binary mask, 0 / 255
    root/Val_Folder/...   root/Test_Folder/...
    root/Train_text.xlsx  root/Val_text.xlsx  root/Test_text.xlsx   columns Image (the MASK file name), Description

Each image: a bright body with ribs, a spine/mediastinum band and a heart shadow; two darker lung fields with
smooth vessel-like texture and low-frequency noise. Inside the lungs:

- 0-3 **lesions** (in the mask): irregular blobs with a rough border, patchy ground-glass texture and a soft edge;
- 0-2 **distractors** (not in the mask): round smooth "nodules" or elongated "vessels", of the same brightness range
  and overlapping size range as the lesions.

The report is `amvlm_monai.data.describe.describe_mask` of the true mask (how many lesions, patient side, upper/
middle/lower, size) in one of several wordings drawn per image (as real reports vary), e.g. "Bilateral pulmonary
infection, two infected areas, small upper left lung and medium lower right lung." or "There are two opacities of
pneumonia, left upper zone (small) and right lower zone (moderate).".

What makes it hard: lesions and distractors differ only in shape and texture (irregular/patchy vs. round-smooth or
elongated), not in brightness, and both sit on ribs, vessels and noise; lesions are small at 64-96 px and are clipped
by the lung borders and the heart shadow. With few labelled images a network easily learns "bright spot in the lung"
and segments the distractors too; the report says how many lesions there are and where, which is exactly what
separates them. The generator was written once from this description and **not tuned** to favour any method
(no parameter was chosen by looking at a model's results); how much the text helps on it is an empirical question.
It is a smoke-test and demo set, not evidence about real chest X-rays.

Deterministic: each image is drawn from its own generator seeded by (seed, split, index), PNG and the .xlsx files
are written without time stamps, so the same arguments give byte-identical files.

CLI::

    python -m data_prep.demo_data --out demo_data/qata_demo --n-train 200 --n-val 50 --n-test 100 --size 80 --seed 0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from amvlm_monai.data.describe import describe_mask

from ._xlsx import write_xlsx

__all__ = ["SPLITS", "make_case", "make_demo_dataset", "main"]

#: (file prefix, folder, spreadsheet) per split, in the LViT layout.
SPLITS = (("train", "Train_Folder", "Train_text.xlsx"), ("val", "Val_Folder", "Val_text.xlsx"),
          ("test", "Test_Folder", "Test_text.xlsx"))

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


def make_case(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray, dict]:
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


def make_demo_dataset(
    root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 64, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the synthetic data set in the LViT QaTa-COV19 layout (see the module docstring).

    Args:
        root: output folder (created).
        n_train, n_val, n_test: number of images per split (each >= 1).
        size: image side in pixels (>= 32).
        seed: the seed; the same arguments give byte-identical files.
        overwrite: replace the split folders and spreadsheets if they exist (only those are removed).

    Returns:
        ``root`` as a `Path`.

    Raises:
        FileExistsError: when a split folder or spreadsheet exists and ``overwrite`` is False.
    """
    root = Path(root)
    counts = (n_train, n_val, n_test)
    if min(counts) < 1:
        raise ValueError(f"n_train, n_val and n_test must be >= 1, got {counts}.")
    targets = [root / f for _, f, _ in SPLITS] + [root / x for _, _, x in SPLITS]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} exist; pass overwrite=True (--overwrite) to replace them.")
    for p in targets:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for split_idx, ((prefix, folder, sheet), n) in enumerate(zip(SPLITS, counts)):
        (root / folder / "img").mkdir(parents=True)
        (root / folder / "labelcol").mkdir(parents=True)
        rows = []
        for i in range(n):
            rng = np.random.default_rng([seed, split_idx, i])
            image, mask, _ = make_case(rng, size)
            name = f"{prefix}_{i:04d}.png"
            Image.fromarray(image).save(root / folder / "img" / name)
            Image.fromarray(mask).save(root / folder / "labelcol" / f"mask_{name}")
            rows.append((f"mask_{name}", describe_mask(mask, rng=rng)))  # varied wording, same facts
        write_xlsx(root / sheet, ("Image", "Description"), rows)
    return root


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Write a synthetic chest X-ray-like data set in LViT's QaTa layout.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (>= 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing split folders and spreadsheets")
    a = p.parse_args(argv)
    root = make_demo_dataset(a.out, a.n_train, a.n_val, a.n_test, a.size, a.seed, a.overwrite)
    print(f"wrote {a.n_train}/{a.n_val}/{a.n_test} images ({a.size} px, seed {a.seed}) to {root}")
    return root


if __name__ == "__main__":
    main()
