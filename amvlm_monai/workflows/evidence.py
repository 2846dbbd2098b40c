"""``make evidence``: the paper's claim tested in the paper's regime, on synthetic data, on a CPU.

Synthetic chest images in the QaTa-like regime of ``data_prep.demo_data`` (large irregular lesions, often bilateral,
several ViT patches across; the generator's parameters were calibrated on the supervised U-Net and Mean-Teacher
alone: ``docs/calibration.md``), then:

1. stage 1 on every training image-report pair (thousands), pretrained **once** and shared by the seeds: stage 1
   sees no label, and the seeds draw the labelled split and stage 2's initialisation; the paper's losses
   (``amvlm``) and, as this implementation's option, with L_mil (``amvlm_mil``, not in the paper);
2. supervised, Mean-Teacher, AMVLM and AMVLM + L_mil at 25 % labels, each over the seeds, with equal step budgets
   and model selection on the validation split only;
3. the slides' table (Dice, mIoU, mean ± sd), the stage-1 figures (retrieval with chance, fact-level recall,
   lesion-pixel AUC, initial text-mask Dice against an all-ones mask, on the validation split) and paired t-tests,
   printed and written to ``runs/evidence/results.md``.

A killed run continues where it stopped when started again (finished steps are read back, interrupted ones resume
from their last saved epoch); ``--fresh`` starts over.

Usage::

    python -m amvlm_monai.workflows.evidence              # the evidence run (budget: 75 minutes on 2 cores)
    python -m amvlm_monai.workflows.evidence --quick      # a smoke run of every step (tiny sizes)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from amvlm_monai.utils.args import BUNDLE_ARGS, arg_type
from amvlm_monai.utils.errors import cli_errors
from amvlm_monai.workflows.demo import ROOT, add_size_options, run_synthetic

#: images per split, image side, stage-1 and stage-2 epochs: the budget the data were calibrated at
#: (docs/calibration.md); stage 2 also restarts its cosine schedule and ends the consistency ramp-up as there
FULL = dict(n_train=4000, n_val=500, n_test=1000, size=64, pre_epochs=6, epochs=6)
QUICK = dict(n_train=24, n_val=8, n_test=8, size=64, pre_epochs=1, epochs=1)
METHODS = ("supervised", "mean_teacher", "amvlm", "amvlm_mil")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.workflows.evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "evidence"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every step")
    parser.add_argument("--fresh", action="store_true", help="start over instead of continuing a killed run")
    parser.add_argument("--seeds", type=arg_type(BUNDLE_ARGS["seed"]), nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_size_options(parser, FULL)
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    work = Path(args.work).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    start = time.time()
    print(f"evidence in {work}: {sizes}, seeds {args.seeds}", flush=True)
    with cli_errors():
        run_synthetic(work, sizes, args.methods, [25], args.seeds, stage1_seed=0, resume=True,
                      stage2={"restart_epochs": sizes["epochs"], "rampup_epochs": min(2, sizes["epochs"])})
    minutes = (time.time() - start) / 60
    with open(work / "results.md", "a") as f:
        f.write(f"\nSizes {sizes}, seeds {args.seeds}; this invocation took {minutes:.1f} min.\n")
    print(f"\nwritten to {work / 'results.md'} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
