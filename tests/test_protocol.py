"""The protocol's tables and t-tests, and `make demo`'s entry point end to end (quick mode)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from amvlm_monai.evaluation.metrics import write_scores_csv
from amvlm_monai.workflows.protocol import summarise

ROOT = Path(__file__).resolve().parents[1]


def _rows(tmp_path):
    """Two methods x 2 seeds over 5 test images, per-image Dice chosen by hand."""
    ids = [f"img{i}" for i in range(5)]
    dice = {("supervised", 0): [0.1, 0.2, 0.3, 0.4, 0.5], ("supervised", 1): [0.3, 0.2, 0.1, 0.4, 0.5],
            ("mean_teacher", 0): [0.4, 0.5, 0.3, 0.6, 0.9], ("mean_teacher", 1): [0.2, 0.6, 0.5, 0.5, 0.7]}
    rows = []
    for (method, seed), d in dice.items():
        path = tmp_path / f"{method}{seed}.csv"
        order = list(range(5)) if seed == 0 else [4, 3, 2, 1, 0]  # ids in another order: matched by id
        write_scores_csv(path, [ids[i] for i in order], np.array(d)[order], np.array(d)[order] / 2)
        rows.append({"method": method, "labeled": 25, "seed": seed, "dice": float(np.mean(d)),
                     "iou": float(np.mean(d)) / 2, "scores": str(path)})
    return rows, dice


def test_summary_means_spread_and_seed_averaged_paired_ttest(tmp_path):
    rows, dice = _rows(tmp_path)
    text = summarise(rows, tmp_path)
    with open(tmp_path / "results.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    sup = [np.mean(dice[("supervised", s)]) for s in (0, 1)]
    assert float(table["supervised"]["dice_mean"]) == pytest.approx(np.mean(sup))
    assert float(table["supervised"]["dice_sd"]) == pytest.approx(np.std(sup, ddof=1))
    with open(tmp_path / "ttests.csv") as f:
        test = next(r for r in csv.DictReader(f) if r["a"] == "mean_teacher" and r["metric"] == "dice")
    a = np.mean([dice[("mean_teacher", s)] for s in (0, 1)], axis=0)  # each image averaged over the seeds
    b = np.mean([dice[("supervised", s)] for s in (0, 1)], axis=0)
    ref = stats.ttest_rel(a, b)
    assert float(test["p"]) == pytest.approx(ref.pvalue) and float(test["t"]) == pytest.approx(ref.statistic)
    assert float(test["mean_diff"]) == pytest.approx(np.mean(a - b))
    assert "| 25 % | Mean-Teacher | 52.00 ± 2.83 |" in text and "Mean-Teacher vs supervised U-Net" in text


def test_unknown_method_and_missing_data_are_named(tmp_path):
    from amvlm_monai.workflows.protocol import Protocol, main

    with pytest.raises(FileNotFoundError, match="converted data"):
        Protocol(ROOT / "bundles" / "qata_covid19_cxr_segmentation", tmp_path, tmp_path)
    assert main(["--bundle", str(tmp_path), "--data", str(tmp_path), "--work", str(tmp_path)]) == 2


@pytest.mark.slow
def test_make_demo_quick_runs_every_step_and_prints_the_table(tmp_path):
    """`make demo` runs `python -m amvlm_monai.workflows.demo`; its quick mode goes through every step of the real one."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "amvlm_monai.workflows.demo", "--quick", "--work", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in ("supervised U-Net", "Mean-Teacher", "MT + CSS + ICL + L_tg (AMVLM)", "AMVLM + L_mil", "Paired t-tests",
                "Pseudo labels on the unlabelled", "Stage 1, the kept checkpoint", "same count+sides i2t@1"):
        assert row in out, row
    assert (tmp_path / "results.md").read_text() in out
    for method in ("supervised", "mean_teacher", "amvlm", "amvlm_mil"):
        assert (tmp_path / "seed0" / "labeled25" / method / "model.pt").is_file()
    for name in ("amvlm_pretrained", "amvlm_mil"):  # the two stage-1 checkpoints, each with its validation figures
        assert (tmp_path / "seed0" / "models" / f"{name}.json").is_file()
    from PIL import Image

    def width(method):  # evaluation panels: image | truth | prediction (| text mask, with a stage-1 checkpoint)
        panel = sorted((tmp_path / "seed0" / "labeled25" / method / "panels").glob("*.png"))[0]
        return Image.open(panel).size[0]

    assert width("amvlm") > 1.2 * width("supervised")


def test_make_evidence_quick_shares_stage1_and_continues_a_killed_run(tmp_path):
    """`make evidence` in quick mode: one stage 1 shared by the seeds, the table and t-tests; a second start reads
    the finished runs back instead of training again, and a run whose row is gone is trained and scored again."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "amvlm_monai.workflows.evidence", "--quick", "--work", str(tmp_path), "--seeds", "0",
           "1", "--methods", "mean_teacher", "amvlm"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("stage 1 (full)") == 2 and "stage 1 (full) reused" in proc.stdout  # once, for both seeds
    assert not list(tmp_path.glob("seed*/models/amvlm_pretrained.pt"))
    assert (tmp_path / "stage1" / "models" / "amvlm_pretrained.json").is_file()
    for row in ("Mean-Teacher", "MT + CSS + ICL + L_tg (AMVLM)", "Paired t-tests", "| shared | amvlm_pretrained"):
        assert row in proc.stdout, row
    assert "Sizes" in (tmp_path / "results.md").read_text()
    (tmp_path / "seed1" / "labeled25" / "amvlm" / "row.json").unlink()  # as if killed during its evaluation
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done earlier") == 3 and "stage 1 (full) reused" in again.stdout
    assert (tmp_path / "seed1" / "labeled25" / "amvlm" / "row.json").is_file()
