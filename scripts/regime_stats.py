"""Statistics and a picture of the synthetic demo data's lesions (``data_prep.demo_data``), without any model.

    python scripts/regime_stats.py [--regime qata] [--n 200] [--size 64] [--seed 0] [--param KEY=VALUE ...]
        [--png sheet.png]

Prints per image: mean foreground fraction, lesion (region) counts, bilateral share, zones, and per region: area,
the share spanning >= 2 ViT patches (bounding box >= 2 patches of 8 px at 64 px, in its longer direction) and the
number of patches touched. ``--png`` writes a contact sheet (image | image with the mask outline) of the first 16.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from amvlm_monai.data.describe import find_regions
from data_prep.demo_data import DEFAULT_REGIME, REGIMES, QataParams, make_case


def region_stats(masks: list[np.ndarray], patch: int) -> dict:
    """Lesion statistics of binary masks (H, W); ``patch`` is the ViT patch side in pixels."""
    fg = [float((m > 0).mean()) for m in masks]
    counts, bilateral, spans, touched, areas, zones = [], [], [], [], [], Counter()
    for m in masks:
        regions = find_regions(m > 0)
        counts.append(len(regions))
        bilateral.append(len({r.side for r in regions}) == 2)
        for r in regions:
            r0, c0, r1, c1 = r.bbox
            spans.append(max(r1 - r0, c1 - c0) >= 2 * patch)
            sub = np.zeros_like(m, bool)
            sub[r0:r1, c0:c1] = True
            lab = (m > 0) & sub
            h, w = m.shape
            grid = lab[: h - h % patch, : w - w % patch].reshape(h // patch, patch, w // patch, patch)
            touched.append(int(grid.any(axis=(1, 3)).sum()))
            areas.append(r.fraction)
            zones.update("all" if len(r.vertical) == 3 else "+".join("uml"[i] for i in r.vertical) for _ in [0])
    n = len(masks)
    with_lesion = [c > 0 for c in counts]
    return {
        "images": n,
        "fg_mean": float(np.mean(fg)), "fg_median": float(np.median(fg)), "fg_p10": float(np.percentile(fg, 10)),
        "fg_p90": float(np.percentile(fg, 90)),
        "count_share": {k: v / n for k, v in sorted(Counter(counts).items())},
        "empty_share": 1 - float(np.mean(with_lesion)),
        "bilateral_share": float(np.mean(bilateral)),
        "bilateral_share_of_lesion_images": float(np.sum(bilateral) / max(1, np.sum(with_lesion))),
        "regions": len(spans),
        "region_area_mean": float(np.mean(areas)) if areas else 0.0,
        "span_ge_2_patches": float(np.mean(spans)) if spans else 0.0,
        "patches_touched_median": float(np.median(touched)) if touched else 0.0,
        "zones": {k: v / max(1, len(spans)) for k, v in sorted(zones.items())},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=REGIMES, default=DEFAULT_REGIME)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    params = None
    if a.regime == "qata":
        params = QataParams().replace(**{k: json.loads(v) for k, v in (x.split("=", 1) for x in a.param)})
    t0 = time.time()
    cases = [make_case(np.random.default_rng([a.seed, 0, i]), a.size, a.regime, params) for i in range(a.n)]
    secs = time.time() - t0
    stats = region_stats([m for _, m, _ in cases], patch=max(1, round(8 * a.size / 64)))
    stats["distractors_mean"] = float(np.mean([info["distractors"] for _, _, info in cases]))
    stats["ms_per_image"] = 1000 * secs / a.n
    print(json.dumps(stats, indent=1))
    if a.png:
        from PIL import Image
        from scipy import ndimage

        tiles = []
        for img, m, _ in cases[:16]:
            edge = (m > 0) & ~ndimage.binary_erosion(m > 0)
            rgb = np.stack([img] * 3, -1)
            over = rgb.copy()
            over[edge] = (255, 40, 40)
            tiles.append(np.concatenate([rgb, over], 1))
        rows = [np.concatenate(tiles[i:i + 4], 1) for i in range(0, len(tiles), 4)]
        sheet = np.concatenate(rows, 0)
        Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(a.png)
    return stats


if __name__ == "__main__":
    main()
