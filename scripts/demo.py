"""`make demo`: synthetic QaTa-layout data -> AMVLM pretraining -> supervised, Mean-Teacher and AMVLM training
at 25 % labels -> evaluation on the test split, printed as a table.

Every step is the bundle's own command (`python -m monai.bundle run ...`), so the demo exercises what a user runs.
With ``--ablation`` it also runs the slides' ablation rows (MT, MT+CSS, MT+ICL, MT+CSS+ICL, full) over several
seeds and prints mean and spread.

Usage:
    python scripts/demo.py [--work runs/demo] [--quick] [--ablation --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "qata_covid19_cxr_segmentation"
CONFIGS = BUNDLE / "configs"

# variant name -> (train overlay, stage-1 checkpoint it needs: None, "full", "css" or "icl")
VARIANTS = {
    "supervised": ("supervised.json", None),
    "mean_teacher": ("mean_teacher.json", None),
    "mt_css": ("mt_css.json", "css"),
    "mt_icl": ("mt_icl.json", "icl"),
    "mt_css_icl": ("mt_css_icl.json", "full"),
    "amvlm": ("full.json", "full"),
}
PRETRAIN_OVERLAYS = {"full": None, "css": "pretrain_css.json", "icl": "pretrain_icl.json"}


def run(cmd: list[str], log: Path) -> None:
    """Run one command, its output to ``log``; on failure print the log's tail and stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=BUNDLE, env=_env())
    print(f"  [{time.time() - start:6.1f} s] {' '.join(cmd[3:6])} ... -> {log}", flush=True)
    if proc.returncode:
        print(log.read_text()[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    return env


def bundle(run_id: str, configs: list[str], overrides: dict) -> list[str]:
    files = [str(CONFIGS / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(files).replace('"', "'"),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return cmd


def mean_of(csv_path: Path) -> tuple[float, float]:
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    dice = [float(r["dice"]) for r in rows]
    iou = [float(r["iou"]) for r in rows]
    return 100 * statistics.fmean(dice), 100 * statistics.fmean(iou)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "demo"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of every step)")
    parser.add_argument("--ablation", action="store_true", help="run the ablation rows over --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["supervised", "mean_teacher", "amvlm"])
    parser.add_argument("--labeled-percent", type=int, default=25)
    parser.add_argument("--n-train", type=int, default=None, help="training images to generate")
    parser.add_argument("--pre-epochs", type=int, default=None, help="stage-1 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="stage-2 epochs")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    sizes = dict(n_train=24, n_val=8, n_test=8, pre_epochs=1, epochs=2) if args.quick else \
        dict(n_train=240, n_val=60, n_test=120, pre_epochs=10, epochs=20)
    for key in ("n_train", "pre_epochs", "epochs"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    variants = list(VARIANTS) if args.ablation else args.variants
    raw, data = work / "raw", work / "data"

    print(f"demo in {work}")
    if not (data / "datalist.json").exists():
        run([sys.executable, "-m", "data_prep.demo_data", "--out", str(raw), "--n-train", str(sizes["n_train"]),
             "--n-val", str(sizes["n_val"]), "--n-test", str(sizes["n_test"]), "--size", "64", "--seed", "0", "--overwrite"],
            work / "logs" / "generate.log")
        run([sys.executable, "-m", "data_prep.qata", "--src", str(raw), "--out", str(data), "--seed", "0"],
            work / "logs" / "convert.log")

    common = {"dataset_dir": str(data), "max_epochs": sizes["epochs"], "labeled_percent": args.labeled_percent}
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for seed in args.seeds:
        models = work / f"seed{seed}" / "models"
        needed = {VARIANTS[v][1] for v in variants} - {None}
        for kind in sorted(needed):
            overlay = PRETRAIN_OVERLAYS[kind]
            configs = ["pretrain.json", "demo.json"] + ([f"variants/{overlay}"] if overlay else [])
            ckpt = models / ("amvlm_pretrained.pt" if kind == "full" else f"amvlm_{kind}.pt")
            if not ckpt.exists():
                run(bundle("pretraining", configs, {"dataset_dir": str(data), "output_dir": str(models),
                                                    "max_epochs": sizes["pre_epochs"], "seed": seed}),
                    work / "logs" / f"seed{seed}_pretrain_{kind}.log")
        for variant in variants:
            overlay, _ = VARIANTS[variant]
            out = work / f"seed{seed}" / variant
            overrides = dict(common, output_dir=str(models), ckpt_dir=str(out), seed=seed)
            run(bundle("training", ["train.json", "demo.json", f"variants/{overlay}"], overrides),
                work / "logs" / f"seed{seed}_{variant}_train.log")
            scores = out / "scores_test.csv"
            run(bundle("evaluating", ["train.json", "demo.json", f"variants/{overlay}", "evaluate.json"],
                       dict(common, output_dir=str(out), eval_dir=str(out), seed=seed)),
                work / "logs" / f"seed{seed}_{variant}_eval.log")
            results[variant].append(mean_of(scores))

    print(f"\nTest split, {args.labeled_percent} % labelled, seeds {args.seeds} (Dice and mIoU in %):")
    print(f"{'method':<14} {'Dice':>14} {'mIoU':>14}")
    for variant, vals in results.items():
        dice, iou = [d for d, _ in vals], [i for _, i in vals]
        spread = (lambda xs: f" ± {statistics.stdev(xs):4.2f}" if len(xs) > 1 else "")
        print(f"{variant:<14} {statistics.fmean(dice):7.2f}{spread(dice):>7} {statistics.fmean(iou):7.2f}{spread(iou):>7}")
    with open(work / "results.json", "w") as f:
        json.dump({"seeds": args.seeds, "labeled_percent": args.labeled_percent, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
