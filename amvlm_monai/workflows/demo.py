"""``make demo``: synthetic QaTa-style data -> AMVLM pretraining -> supervised, Mean-Teacher, AMVLM and AMVLM with the
pooled patch-report contrast L_mil (not in the paper) at 25 % labels -> test scores, printed as the slides' table.

It is :mod:`amvlm_monai.workflows.protocol` on the demo data with the bundle's CPU preset (``configs/demo.json``); it runs
from a source checkout (it needs ``bundles/`` and ``data_prep/``).

Usage::

    python -m amvlm_monai.workflows.demo                       # the demo (about 9 minutes on 2 cores)
    python -m amvlm_monai.workflows.demo --quick               # a smoke run of every step (tiny sizes)
    python -m amvlm_monai.workflows.demo --ablation --seeds 0 1 2   # the slides' ablation rows over 3 seeds
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from amvlm_monai.utils.args import BUNDLE_ARGS, Arg, arg_type
from amvlm_monai.utils.errors import cli_errors
from amvlm_monai.workflows.protocol import LABELED, METHODS, Protocol, summarise

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "qata_covid19_cxr_segmentation"
#: sizes of the demo: images per split, image side, stage-1 and stage-2 epochs (docs/calibration.md, "A smaller
#: budget for make demo"; the README's v1 tables: --regime v1 --n-train 240 --n-val 60 --n-test 120 --pre-epochs 10
#: --epochs 20)
FULL = dict(n_train=800, n_val=100, n_test=200, size=64, pre_epochs=3, epochs=6)
QUICK = dict(n_train=24, n_val=8, n_test=8, size=64, pre_epochs=1, epochs=1)


def make_data(work: Path, sizes: dict, seed: int = 0, regime: str = "qata") -> Path:
    """Generate the synthetic data set (``regime``: ``qata``, the paper's regime, or ``v1``, the earlier small-lesion
    set) and convert it with the QaTa converter (skipped when it exists)."""
    raw, data = work / "raw", work / "data"
    if (data / "datalist.json").is_file():
        return data
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for cmd in (["data_prep.demo_data", "--out", str(raw), "--n-train", str(sizes["n_train"]), "--n-val",
                 str(sizes["n_val"]), "--n-test", str(sizes["n_test"]), "--size", str(sizes["size"]), "--seed",
                 str(seed), "--regime", regime, "--workers", "2", "--overwrite"],
                ["data_prep.qata", "--src", str(raw), "--out", str(data), "--seed", str(seed)]):
        subprocess.run([sys.executable, "-m", *cmd], check=True, env=env, cwd=ROOT)
    return data


def add_size_options(parser: argparse.ArgumentParser, full: dict) -> None:
    """``--n-train``, ``--size``, ``--epochs``... for every key of ``full``, each an integer in its range."""
    for key in full:
        low = 16 if key == "size" else 1
        parser.add_argument("--" + key.replace("_", "-"), type=arg_type(Arg("int", "", low)), default=None,
                            help=f"an integer >= {low} (default {full[key]})")


def run_synthetic(work: Path, sizes: dict, methods: Sequence[str], labeled: Sequence[int], seeds: Sequence[int],
                  regime: str = "qata", stage2: Optional[dict] = None, **protocol: object) -> str:
    """Generate the data (unless there), run the protocol with the CPU preset, print and return its tables.

    Raises:
        FileNotFoundError: not a source checkout (``bundles/`` and ``data_prep/`` are needed).
    """
    if not (BUNDLE / "configs" / "train.json").is_file() or not (ROOT / "data_prep").is_dir():
        raise FileNotFoundError(f"{ROOT}: this runs from a source checkout (bundles/ and data_prep/ not found)")
    data = make_data(work, sizes, regime=regime)
    overrides = {"max_epochs": sizes["epochs"], "image_size": sizes["size"], **(stage2 or {})}
    pre = {"max_epochs": sizes["pre_epochs"], "image_size": sizes["size"]}
    rows = Protocol(BUNDLE, data, work, ["configs/demo.json"], overrides, pre, **protocol).run(methods, labeled, seeds)
    print()
    text = summarise(rows, work)
    print(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.workflows.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "demo"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every step")
    parser.add_argument("--ablation", action="store_true", help="all the slides' ablation rows, and amvlm_mil")
    parser.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher", "amvlm", "amvlm_mil"],
                        choices=list(METHODS))
    parser.add_argument("--seeds", type=arg_type(BUNDLE_ARGS["seed"]), nargs="+", default=[0])
    parser.add_argument("--labeled", type=LABELED, nargs="+", default=[25], help="label ratios in %%")
    parser.add_argument("--regime", default="qata", choices=["qata", "v1"],
                        help="qata: the paper's regime (large lesions, default); v1: the earlier small-lesion set")
    add_size_options(parser, FULL)
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    work = Path(args.work).resolve()
    print(f"demo in {work}: {sizes}, regime {args.regime}", flush=True)
    with cli_errors():  # a wrong value or bad data in a step: its `error:` line (with the step's log), exit status 2
        run_synthetic(work, sizes, list(METHODS) if args.ablation else args.methods, args.labeled, args.seeds,
                      regime=args.regime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
