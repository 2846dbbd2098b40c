"""How good are the text masks? Compare a stage-1 model's patch-report similarity maps with the ground truth.

For each labelled image of a split: sim(h, w) = <patch embedding, report embedding> on the patch grid (the text mask
generator's input before its decoder), then: mean similarity inside vs outside the lesion, the ROC AUC of the
similarity as a lesion-pixel score, and the Dice of the initial text mask sigmoid(10 (sim - 0.25)) > 0.5 and of the
best global threshold. AUC near 0.5 means the pretrained model does not localise what the report says.

Usage: python scripts/diagnose_text_masks.py --checkpoint models/amvlm_pretrained.pt --datalist DATA/datalist.json
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties averaged)."""
    from scipy.stats import rankdata

    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--datalist", required=True)
    parser.add_argument("--key", default="validation")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()

    from amvlm_monai.data.datalist import load_datalist
    from amvlm_monai.networks.amvlm import load_amvlm
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    model = load_amvlm(args.checkpoint).eval()
    size = model.config["image_size"]
    chain = segmentation_transforms(size, labeled=True)
    items = load_datalist(args.datalist, args.key)[: args.limit]
    grid = tuple(model.image_encoder.grid_size)
    inside, outside, sims, labs, dice0 = [], [], [], [], []
    for item in items:
        d = chain(item)
        img, lab = torch.as_tensor(d["image"])[None].float(), torch.as_tensor(d["label"])[None].float()
        patches = model.patch_embeddings(img)  # (1, P, D)
        text = model.text_embeddings([item["text"]])  # (1, D)
        sim = (patches @ text.T)[0, :, 0].reshape(grid)
        lab_grid = F.adaptive_avg_pool2d(lab, grid)[0, 0] > 0.5
        if lab_grid.any():
            inside.append(float(sim[lab_grid].mean()))
            outside.append(float(sim[~lab_grid].mean()))
        sims.append(sim.flatten().numpy())
        labs.append(lab_grid.flatten().numpy())
        mask = torch.sigmoid(10 * (sim - 0.25)) > 0.5
        denom = mask.sum() + lab_grid.sum()
        dice0.append(float(2 * (mask & lab_grid).sum() / denom) if denom > 0 else 1.0)
    s, y = np.concatenate(sims), np.concatenate(labs)
    best = max((2 * ((s > t) & y).sum() / max((s > t).sum() + y.sum(), 1), t) for t in np.quantile(s, np.linspace(0.5, 0.995, 60)))
    print(f"{len(items)} images of '{args.key}', patch grid {grid}")
    print(f"similarity: lesion patches {np.mean(inside):.3f}, other patches {np.mean(outside):.3f}, "
          f"all patches range {s.min():.3f}..{s.max():.3f}")
    print(f"AUC of similarity as a lesion score: {auc(s, y):.3f}")
    print(f"Dice of the initial text mask (w=10, b=0.25): {np.mean(dice0):.3f}; "
          f"best global threshold {best[1]:.3f}: Dice {best[0]:.3f} (pooled)")


if __name__ == "__main__":
    main()
