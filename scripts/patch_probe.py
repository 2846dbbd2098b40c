"""Do a stage-1 image tower's patch tokens know where the lesions are? A linear probe, independent of the text.

For each checkpoint (or ``random``: a fresh tower of the demo preset, the baseline), patch tokens of the training
images are labelled "lesion" when at least ``--cover`` of the patch is lesion; a logistic regression on the
standardised tokens (class-balanced) is fitted on the training split and scored on the validation split by ROC AUC,
for the tower's tokens and for the local head's embeddings (what the text mask generator decodes). A high AUC with a
low stage-1 localisation AUC means the lesions are visible in the patches, and what is missing is the alignment of
the report embeddings with them.

Usage::

    python scripts/patch_probe.py --datalist runs/demo/data/datalist.json random runs/demo/seed0/models/amvlm_pretrained.pt
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from amvlm_monai.utils.args import Arg, arg_type


def _batch(datalist: str, key: str, size: int) -> dict:
    from monai.data import DataLoader, Dataset

    from amvlm_monai.data.datalist import load_datalist
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    items = load_datalist(datalist, key)
    if not items:
        raise ValueError(f"{datalist}: split '{key}' is empty")
    return next(iter(DataLoader(Dataset(items, segmentation_transforms(size)), batch_size=len(items))))


@torch.no_grad()
def patch_features(model: torch.nn.Module, batch: dict, cover: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tower tokens (N*P, d), local-head embeddings (N*P, D) and patch labels (N*P,) of a batch."""
    out = model.image_encoder(batch["image"])
    local = model.image_local(out.tokens, out.mask)
    h, w = model.image_encoder.grid_size
    labels = F.adaptive_avg_pool2d((batch["label"] > 0).float(), (h, w)).flatten(1) >= cover
    return out.tokens.flatten(0, 1), local.flatten(0, 1), labels.flatten()


def probe_auc(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              steps: int = 300) -> float:
    """ROC AUC on (x_val, y_val) of a class-balanced logistic regression fitted on standardised x_train."""
    from amvlm_monai.evaluation.alignment import roc_auc

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], 1)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    pos = y_train.float().mean().clamp(1e-3, 1 - 1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(linear(x_train)[:, 0], y_train.float(), pos_weight=(1 - pos) / pos)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return roc_auc(linear(x_val)[:, 0], y_val)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", required=True, help="converted data set's datalist.json (binary masks)")
    parser.add_argument("--size", type=arg_type(Arg("int", "", 1)), default=64,
                        help="image side the checkpoints were trained at")
    parser.add_argument("--cover", type=arg_type(Arg("float", "", 0, 1, above=True)), default=0.25,
                        help="lesion share that makes a patch a lesion patch")
    parser.add_argument("checkpoints", nargs="+", help="stage-1 checkpoints, or 'random' for an untrained tower")
    args = parser.parse_args(argv)
    from amvlm_monai.networks.amvlm import build_amvlm, load_amvlm

    torch.manual_seed(0)
    train, val = _batch(args.datalist, "training", args.size), _batch(args.datalist, "validation", args.size)
    for name in args.checkpoints:
        model = (build_amvlm("small", image_size=args.size, patch_embed="conv", with_momentum=False)
                 if name == "random" else load_amvlm(name)).eval()
        a, b = patch_features(model, train, args.cover), patch_features(model, val, args.cover)
        print(f"{name}: lesion patches {100 * a[2].float().mean():.1f} % (train) / {100 * b[2].float().mean():.1f} % "
              f"(val); probe AUC on val: tower tokens {probe_auc(a[0], a[2], b[0], b[2]):.3f}, "
              f"local-head embeddings {probe_auc(a[1], a[2], b[1], b[2]):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
