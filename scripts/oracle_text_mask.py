"""How much could a perfect text mask add? Mean-Teacher whose text mask is each unlabelled image's hidden label.

Stage 2 as the bundle trains AMVLM, with one change: in place of the text mask generator, the "text mask" ``T`` of an
unlabelled batch is that batch's own hidden label, augmented with its image. The bundle's fusion
(``sigmoid(teacher_logits + lambda logit(T))``, ``T`` clamped to [1e-6, 1 - 1e-6]) then turns the pseudo labels into
the true masks, so the consistency term trains the student on the unlabelled images' ground truth at weight
``consistency_weight``. The result bounds what text-refined pseudo labels can add in a stage-2 setting: the
evidence run's AMVLM cannot beat Mean-Teacher by more than this oracle does. A diagnostic, not a method.

Runs :class:`~amvlm_monai.workflows.protocol.Protocol` (the ``mean_teacher`` steps, with this script's overlay,
``oracle.json`` in ``--work``), prints the test Dice per seed and, with ``--compare``, paired t-tests against that
protocol folder's runs of the same seeds (per-image scores averaged over the seeds first, as the protocol does).

Usage (``docs/evidence-runs.md``, "An oracle text mask")::

    python scripts/oracle_text_mask.py --data runs/evidence/data --work runs/oracle_c0.1 --seeds 0 1 2 \\
        --set max_epochs=6 image_size=64 restart_epochs=6 rampup_epochs=2 consistency_weight=0.1 \\
        --compare runs/evidence
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from amvlm_monai.engines.mean_teacher import MeanTeacherTrainer
from amvlm_monai.losses.semi import fuse_pseudo_labels

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "qata_covid19_cxr_segmentation"


class OracleGuidance(torch.nn.Module):
    """Stands in for :class:`~amvlm_monai.engines.guidance.TextGuidance` in the trainer: the text mask of the
    current unlabelled batch is its hidden label, set in ``label`` by :class:`OracleTrainer`. Binary only."""

    def __init__(self, fusion_lambda: float = 1.0, fusion_mode: str = "logit") -> None:
        super().__init__()
        self.fusion_lambda = float(fusion_lambda)
        self.fusion_mode = fusion_mode
        self.tg_weight = 0.0
        self.label: Optional[torch.Tensor] = None

    def forward(self, images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, None]:
        """The hidden label (B, 1, H, W) in {0, 1} of ``images`` (B, C, H, W), and no L_tg."""
        if self.label is None or self.label.shape[0] != images.shape[0] or self.label.shape[-2:] != images.shape[-2:]:
            shape = None if self.label is None else tuple(self.label.shape)
            raise RuntimeError(f"no hidden label for this unlabelled batch {tuple(images.shape)} (have {shape})")
        return self.label.to(images.device, torch.float32), None

    def fuse(self, teacher_logits: torch.Tensor, masks: torch.Tensor, multiclass: bool) -> torch.Tensor:
        """The bundle's fusion of teacher logits (B, 1, H, W) and masks (B, 1, H, W) into pseudo labels."""
        if multiclass:
            raise ValueError("the oracle text mask is for binary segmentation")
        return fuse_pseudo_labels(teacher_logits, masks, lam=self.fusion_lambda, mode=self.fusion_mode)


class OracleTrainer(MeanTeacherTrainer):
    """:class:`~amvlm_monai.engines.mean_teacher.MeanTeacherTrainer` that hands each unlabelled batch's hidden label
    to its :class:`OracleGuidance` before the step uses the batch."""

    def _next_unlabeled(self) -> dict:
        batch = super()._next_unlabeled()
        self.guidance.label = (batch["label"] > 0.5).float()
        return batch


def overlay(bundle: Path = BUNDLE) -> dict:
    """The config overlay: oracle guidance and trainer, unlabelled items with their hidden labels (augmented with
    their images), and no handler that would ask the oracle for the text mask of another batch."""
    handlers = json.loads((bundle / "configs" / "train.json").read_text())["train"]["handlers"]
    readers = [i for i, h in enumerate(handlers) if "guidance" in h]  # diagnostics and panels: text masks of any batch
    if not any(handlers[i].get("_target_", "").endswith("PseudoLabelQuality") for i in readers):
        raise ValueError(f"{bundle}/configs/train.json: no PseudoLabelQuality handler with a guidance argument")
    return {
        "guidance": {"_target_": f"{Path(__file__).stem}.OracleGuidance", "fusion_lambda": "@fusion_lambda",
                     "fusion_mode": "@fusion_mode"},
        "train#trainer#_target_": f"{Path(__file__).stem}.OracleTrainer",
        "train#unlabeled_items": {"_target_": "amvlm_monai.data.splits.hidden_label_items", "items": "@train#items"},
        "train#unlabeled_preprocessing#labeled": True,
        "text_mask_interval": 0,
        **{f"train#handlers#{i}#guidance": None for i in readers},  # the teacher's pseudo labels are still scored
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    from amvlm_monai.evaluation.metrics import paired_ttest
    from amvlm_monai.utils.args import parse_key_values
    from amvlm_monai.workflows.protocol import Protocol, _seed_mean_scores, check_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="converted data folder (datalist.json, split_labeled25.json)")
    parser.add_argument("--work", required=True, help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labeled", type=int, default=25, help="label ratio in %%")
    parser.add_argument("--config", nargs="*", default=["configs/demo.json"], help="bundle config overlays")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="stage-2 overrides")
    parser.add_argument("--compare", help="a protocol folder with supervised and mean_teacher runs of these seeds")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the overlay's targets are this file's classes
    overrides = parse_key_values(args.set, "--set")
    check_overrides(overrides)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "oracle.json").write_text(json.dumps(overlay(), indent=1))
    protocol = Protocol(BUNDLE, args.data, work, [*args.config, str(work / "oracle.json")], overrides, resume=True)
    rows = protocol.run(["mean_teacher"], [args.labeled], args.seeds)
    dice = [100 * r["dice"] for r in rows]
    spread = f" ± {statistics.stdev(dice):.2f}" if len(dice) > 1 else ""
    print(f"\noracle text mask, {args.labeled} % labels, {overrides}: test Dice "
          f"{', '.join(f'{d:.2f}' for d in dice)}; mean {statistics.fmean(dice):.2f}{spread}")
    if args.compare:
        mine = _seed_mean_scores([r["scores"] for r in rows], work / "oracle_seedmean.csv")
        for method in ("mean_teacher", "supervised", "amvlm"):
            paths = [Path(args.compare) / f"seed{s}" / f"labeled{args.labeled}" / method / "scores_test.csv"
                     for s in args.seeds]
            if all(p.is_file() for p in paths):
                other = _seed_mean_scores([str(p) for p in paths], work / f"{method}_seedmean.csv")
                t = paired_ttest(mine, other)
                print(f"  oracle vs {method}: {100 * t['mean_diff']:+.2f} Dice, t = {t['t']:.2f}, p = {t['p']:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
