"""Calibrate the synthetic data (``data_prep.demo_data``) on the baselines alone: supervised U-Net and Mean-Teacher.

Generates the data with the given regime parameters, converts it with the QaTa converter (split files for 25 % and
100 % labels), trains and tests each (method, label ratio) with the bundle's CPU preset (``configs/demo.json``)
through :class:`amvlm_monai.workflows.protocol.Protocol`, and appends one JSON line per run to ``WORK/calibration.jsonl``
(parameters, command, commit, Dice, mIoU, seconds). Text-guided methods are refused: the data set's parameters must
never be chosen by looking at them.

    python scripts/calibrate_baselines.py --work runs/calib/c1 --n-train 4000 --n-val 500 --n-test 1000 \\
        --epochs 6 --runs supervised:100 supervised:25 mean_teacher:25 [--param amplitude=[0.1,0.2]] \\
        [--set rampup_epochs=2] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "qata_covid19_cxr_segmentation"
BASELINES = ("supervised", "mean_teacher")


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "data_prep", "scripts"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--regime", default="qata")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="QataParams override (JSON)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, required=True, help="stage-2 max_epochs")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more stage-2 overrides (JSON values)")
    p.add_argument("--runs", nargs="+", default=["supervised:100", "supervised:25", "mean_teacher:25"],
                   metavar="METHOD:PERCENT")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    runs = []
    for r in a.runs:
        method, _, pct = r.partition(":")
        if method not in BASELINES:
            p.error(f"{method}: only {BASELINES} may be run while calibrating the data")
        runs.append((method, int(pct)))
    work = Path(a.work).resolve()
    raw, data = work / "raw", work / "data"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    gen_secs = None
    if not (data / "datalist.json").is_file():
        gen = [sys.executable, "-m", "data_prep.demo_data", "--out", str(raw), "--n-train", str(a.n_train),
               "--n-val", str(a.n_val), "--n-test", str(a.n_test), "--size", str(a.size), "--seed", str(a.data_seed),
               "--regime", a.regime, "--workers", str(a.workers), "--overwrite"]
        for kv in a.param:
            gen += ["--param", kv]
        t0 = time.time()
        subprocess.run(gen, check=True, env=env, cwd=ROOT)
        gen_secs = time.time() - t0
        fractions = sorted({pct / 100 for _, pct in runs})
        subprocess.run([sys.executable, "-m", "data_prep.qata", "--src", str(raw), "--out", str(data), "--seed",
                        str(a.data_seed), "--fractions", *map(str, fractions), "--few-shot"], check=True, env=env,
                       cwd=ROOT)
        print(f"data generated in {gen_secs:.1f} s", flush=True)
    from amvlm_monai.workflows.protocol import Protocol

    overrides = {"max_epochs": a.epochs, "image_size": a.size}
    for kv in a.set:
        key, _, value = kv.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    protocol = Protocol(BUNDLE, data, work / "runs", ["configs/demo.json"], overrides)
    command = " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv])
    commit = _commit()
    out = work / "calibration.jsonl"
    for seed in a.seeds:
        for method, pct in runs:
            t0 = time.time()
            row = protocol.train_and_test(seed, pct, method)
            record = {"method": method, "labeled": pct, "seed": seed, "dice": row["dice"], "iou": row["iou"],
                      "selected": row.get("selected"), "epoch": row.get("epoch"), "seconds": row["seconds"],
                      "wall_seconds": round(time.time() - t0, 1), "params": a.param, "overrides": overrides,
                      "n": [a.n_train, a.n_val, a.n_test], "size": a.size, "data_seed": a.data_seed,
                      "regime": a.regime, "gen_seconds": gen_secs, "commit": commit, "command": command,
                      "load": os.getloadavg()[0], "note": a.note}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
    print(summary(work))
    return 0


def summary(work: Path) -> str:
    """The tables of every run recorded in ``work/calibration.jsonl`` (the last record of each method, ratio and seed):
    :func:`amvlm_monai.workflows.protocol.summarise` (mean ± sd over seeds, paired t-tests), written to ``work/runs``."""
    from amvlm_monai.workflows.protocol import summarise

    rows = {}
    for line in (work / "calibration.jsonl").read_text().splitlines():
        r = json.loads(line)
        scores = work / "runs" / f"seed{r['seed']}" / f"labeled{r['labeled']}" / r["method"] / "scores_test.csv"
        rows[(r["method"], r["labeled"], r["seed"])] = dict(r, scores=str(scores))
    return summarise(list(rows.values()), work / "runs")


if __name__ == "__main__":
    sys.exit(main())
