"""Why does stage 1 not localise? Short stage-1 runs with chosen losses, in memory, scored as the pretrainer scores.

Loads a split's images, masks and reports once into memory (PNG data from ``data_prep.qata``), trains a fresh AMVLM
of the CPU preset (``small``, conv stem, frozen text tower as in ``configs/demo.json``) on a subset of the stage-1
losses for a few hundred steps, and every ``--eval-every`` steps prints the figures of
:func:`~amvlm_monai.evaluation.alignment.evaluate_alignment` on the validation split (retrieval, fact-level recall,
lesion-pixel AUC, initial text-mask Dice). Two diagnostic switches, not options of the model:

- ``--oracle``: the images are replaced by their own lesion masks (scaled to [-1, 1]). If the losses learn from
  these and not from the real images, what stops stage 1 is reading the images, not the losses or the text side.
- ``--local-layer K``: the local head reads the tokens after block K (0: the conv stem's, which see one patch and its
  neighbours) instead of the last block's; the CLS stays the last block's. It tests whether the ViT's token mixing
  is what keeps patch-report similarity from localising.

Usage (the runs of ``docs/evidence-runs.md``, "Stage-1 diagnosis")::

    python scripts/stage1_sweep.py --datalist runs/evidence/data/datalist.json --steps 500 [--oracle] \\
        [--lr 1e-3] [--head mlp|linear] [--ita 1] [--mil 1 --pool-temperature 0.2] [--local 0.1] [--local-layer 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from amvlm_monai.utils.args import Arg, arg_type


def load_split(datalist: str, key: str, limit: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (N, 1, H, W) scaled per image to [-1, 1] (as the bundle's chain), masks (N, 1, H, W) in {0, 1} and
    reports of the first ``limit`` items, in the orientation the bundle's PNG loader gives them ((W, H), i.e. transposed)."""
    from PIL import Image

    from amvlm_monai.data.datalist import load_datalist

    items = load_datalist(datalist, key=key)[:limit]
    if not items:
        raise ValueError(f"{datalist}: the '{key}' split is empty")
    images = np.stack([np.asarray(Image.open(i["image"]).convert("L"), dtype=np.float32) / 255 for i in items])
    masks = np.stack([np.asarray(Image.open(i["label"]).convert("L")) > 0 for i in items]).astype(np.float32)
    images, masks = torch.from_numpy(images).transpose(1, 2)[:, None], torch.from_numpy(masks).transpose(1, 2)[:, None]
    low = images.amin(dim=(1, 2, 3), keepdim=True)  # per-image min-max to [0, 1], as ScaleIntensityd
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-8)
    return images * 2 - 1, masks, [i["text"] for i in items]


def _local_tokens_from(encoder: torch.nn.Module, layer: int) -> None:
    """Make ``encoder`` (a ViTEncoder) return the tokens after block ``layer`` (0: the stem's) as its patch tokens."""
    from amvlm_monai.networks.outputs import TokenOutput

    def forward(x: torch.Tensor) -> TokenOutput:
        b = x.shape[0]
        t = torch.cat([encoder.cls_token.expand(b, -1, -1), encoder.patch_embed(x)], dim=1) + encoder.pos_embed
        local = t[:, 1:] if layer == 0 else None
        for i, blk in enumerate(encoder.blocks, 1):
            t, _ = blk(t)
            if i == layer:
                local = t[:, 1:]
        t = encoder.norm(t)
        mask = torch.ones(b, encoder.num_patches, dtype=torch.bool, device=x.device)
        return TokenOutput(cls=t[:, 0], tokens=t[:, 1:] if local is None else local, mask=mask, attn=None)

    encoder.forward = forward


def run(args: argparse.Namespace) -> list[dict]:
    """Train as ``args`` says; returns the evaluation rows (step, seconds, mean loss and the alignment figures)."""
    from amvlm_monai.evaluation.alignment import (
        evaluate_alignment,
        refresh_bn_statistics,
    )
    from amvlm_monai.losses.contrastive import (
        ImageTextContrastiveLoss,
        LocalGlobalLoss,
        PooledPatchTextLoss,
    )
    from amvlm_monai.networks.amvlm import build_amvlm

    torch.manual_seed(args.seed)
    x_tr, y_tr, t_tr = load_split(args.datalist, "training", args.n_train)
    x_va, y_va, t_va = load_split(args.datalist, "validation", args.n_val)
    if args.oracle:
        x_tr, x_va = y_tr * 2 - 1, y_va * 2 - 1
    size = x_tr.shape[-1]
    model = build_amvlm("small", image_size=size, patch_embed="conv", head=args.head, with_momentum=False,
                        **({"patch_size": args.patch_size} if args.patch_size else {}))
    if args.local_layer is not None:
        if args.local_layer > len(model.image_encoder.blocks):
            raise ValueError(f"--local-layer {args.local_layer}: the ViT has {len(model.image_encoder.blocks)} blocks")
        _local_tokens_from(model.image_encoder, args.local_layer)
    for p in model.text_encoder.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    ita = ImageTextContrastiveLoss(args.temperature)
    mil = PooledPatchTextLoss(args.temperature, args.pool_temperature)
    local = LocalGlobalLoss(args.temperature)
    draw = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    rows: list[dict] = []
    start = time.time()

    def evaluate(step: int) -> None:
        n = len(x_va)
        batches = [{"image": x_va[i:i + 50], "label": y_va[i:i + 50], "text": t_va[i:i + 50]} for i in range(0, n, 50)]
        if args.head == "mlp":  # as the pretrainer: BatchNorm statistics that fit the weights before evaluating
            refresh_bn_statistics(model, [{"image": x_tr[i:i + args.batch_size], "text": t_tr[i:i + args.batch_size]}
                                          for i in range(0, min(256, len(x_tr)), args.batch_size)])
        r = evaluate_alignment(model, batches)
        row = dict(step=step, seconds=round(time.time() - start, 1), loss=float(np.mean(losses[-50:])), **r)
        rows.append(row)
        print(f"step {step} ({row['seconds']:.0f} s) loss {row['loss']:.3f} | i2t@5 {r['i2t_r5']:.3f} "
              f"t2i@5 {r['t2i_r5']:.3f} (chance {r['i2t_r5_chance']:.3f}) | facts t2i@1 {r['t2i_fact_r1']:.3f} "
              f"(chance {r['t2i_fact_r1_chance']:.3f}), with zones {r['t2i_fact_zone_r1']:.3f} "
              f"(chance {r['t2i_fact_zone_r1_chance']:.3f}) | AUC {r['loc_auc']:.3f} | initial mask Dice "
              f"{r['initial_mask_dice']:.3f} (all-ones {r['ones_dice']:.3f})", flush=True)
        model.train()

    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_tr), (args.batch_size,), generator=draw)
        img = model.encode_image(x_tr[idx])
        txt = model.encode_text(model.tokenize([t_tr[i] for i in idx]))
        loss = args.ita * ita(img.cls, txt.cls)
        if args.mil:
            loss = loss + args.mil * mil(img.tokens, txt.cls)
        if args.local:
            loss = loss + args.local * local(img.tokens, img.cls, txt.tokens, txt.mask, txt.cls)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count = arg_type(Arg("int", "", 1))
    parser.add_argument("--datalist", required=True, help="a converted data set's datalist.json (PNG images)")
    parser.add_argument("--n-train", type=count, default=4000)
    parser.add_argument("--n-val", type=count, default=500)
    parser.add_argument("--steps", type=count, default=500)
    parser.add_argument("--eval-every", type=count, default=250)
    parser.add_argument("--batch-size", type=arg_type(Arg("int", "", 2)), default=16)
    parser.add_argument("--lr", type=arg_type(Arg("float", "", 0.0, above=True)), default=1e-3)
    parser.add_argument("--head", choices=["mlp", "linear"], default="mlp")
    parser.add_argument("--temperature", type=arg_type(Arg("float", "", 0.0, above=True)), default=0.07)
    parser.add_argument("--ita", type=arg_type(Arg("float", "", 0.0)), default=1.0, help="weight of L_ita")
    parser.add_argument("--mil", type=arg_type(Arg("float", "", 0.0)), default=0.0, help="weight of L_mil")
    parser.add_argument("--pool-temperature", type=arg_type(Arg("float", "", 0.0, above=True)), default=0.2)
    parser.add_argument("--local", type=arg_type(Arg("float", "", 0.0)), default=0.0, help="weight of L_local")
    parser.add_argument("--local-layer", type=arg_type(Arg("int", "", 0)), default=None)
    parser.add_argument("--patch-size", type=count, default=None, help="default: the preset's (8)")
    parser.add_argument("--oracle", action="store_true", help="train and evaluate on the masks instead of the images")
    parser.add_argument("--seed", type=arg_type(Arg("int", "", 0)), default=0)
    args = parser.parse_args(argv)
    if not (args.ita or args.mil or args.local):
        parser.error("every loss weight is 0: nothing to train")
    from amvlm_monai.utils.errors import cli_errors

    with cli_errors():
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
