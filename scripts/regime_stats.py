"""Lesion statistics and a picture of the synthetic demo data (``data_prep.demo_data``), without any model.

    python scripts/regime_stats.py [--regime qata] [--n 1000] [--size 64] [--seed 7] [--split 2] \\
        [--param KEY=VALUE ...] [--png sheet.png]

Draws images as `make_demo_dataset` does (image i of split s from the generator seeded by (seed, s, i)) and prints
`data_prep.demo_data.lesion_stats` of their masks (foreground fraction, region counts, bilateral share, share of
regions spanning >= 2 ViT patches, patches touched, zones), the mean number of distractors and the time per image.
``--png`` writes a contact sheet (image | image with the mask outline) of the first 16.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from data_prep.demo_data import DEFAULT_REGIME, REGIMES, QataParams, lesion_stats, make_case


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=REGIMES, default=DEFAULT_REGIME)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--split", type=int, default=2, help="0 train, 1 validation, 2 test")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="QataParams override (JSON)")
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    params = None
    if a.param:
        params = QataParams().replace(**{k: json.loads(v) for k, v in (x.split("=", 1) for x in a.param)})
    t0 = time.time()
    cases = [make_case(np.random.default_rng([a.seed, a.split, i]), a.size, a.regime, params) for i in range(a.n)]
    secs = time.time() - t0
    stats = lesion_stats([m for _, m, _ in cases], patch=max(1, round(8 * a.size / 64)))
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
        tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 4)
        rows = [np.concatenate(tiles[i:i + 4], 1) for i in range(0, len(tiles), 4)]
        sheet = np.concatenate(rows, 0)
        Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(a.png)
    return stats


if __name__ == "__main__":
    main()
