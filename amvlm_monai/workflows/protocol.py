"""The paper's protocol in one command: methods x label ratios x seeds, on any bundle's converted data.

For every seed the stage-1 checkpoints the methods need are pretrained once (and reused when they exist); then every
method is trained at every label ratio and evaluated on the test split. Results are written as the slides' tables:
per-run scores (``runs.csv``), Dice and mIoU as mean ± standard deviation over seeds (``results.csv``,
``results.md``) and paired t-tests over per-image scores (``ttests.csv``): each image's score is first averaged
over the seeds, then the two methods are paired image by image.

Every step is the bundle's own workflow (``training``, ``evaluating``, ``pretraining``), run in this process with
the same configs and overrides a user would give ``python -m monai.bundle run``; each step's log is written to
``WORK/logs/``.

Example (what ``make demo`` runs on the synthetic data)::

    python -m amvlm_monai.workflows.protocol --bundle bundles/qata_covid19_cxr_segmentation --data runs/demo/data \\
        --work runs/demo --config configs/demo.json --methods supervised mean_teacher amvlm --labeled 25 --seeds 0

A lab with GPUs reproduces the slides' QaTa table with the bundle's own settings::

    python -m amvlm_monai.workflows.protocol --bundle bundles/qata_covid19_cxr_segmentation --data /data/qata_converted \\
        --work runs/qata --methods supervised mean_teacher mt_css mt_icl mt_css_icl amvlm --labeled 25 50 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from amvlm_monai.utils.args import BUNDLE_ARGS, Arg, ArgError, arg_type, parse_arg, parse_key_values
from amvlm_monai.utils.errors import error_lines, is_user_error, root_cause

#: method -> (stage-2 variant overlay under configs/variants, stage-1 checkpoint it needs or None, table label)
METHODS: dict[str, tuple[str, Optional[str], str]] = {
    "supervised": ("supervised.json", None, "supervised U-Net"),
    "mean_teacher": ("mean_teacher.json", None, "Mean-Teacher"),
    "mt_css": ("mt_css.json", "css", "MT + CSS"),
    "mt_icl": ("mt_icl.json", "icl", "MT + ICL"),
    "mt_css_icl": ("mt_css_icl.json", "full", "MT + CSS + ICL"),
    "amvlm": ("full.json", "full", "MT + CSS + ICL + L_tg (AMVLM)"),
    "amvlm_mil": ("full.json", "mil", "AMVLM + L_mil (not in the paper)"),
}


#: stage-1 kind -> (pretraining overlay under configs/variants or None, checkpoint file name)
PRETRAIN: dict[str, tuple[Optional[str], str]] = {
    "full": (None, "amvlm_pretrained.pt"),
    "css": ("pretrain_css.json", "amvlm_css.pt"),
    "icl": ("pretrain_icl.json", "amvlm_icl.pt"),
    "mil": ("pretrain_mil.json", "amvlm_mil.pt"),
}


#: the comparisons of the paper's claim, then of L_mil: (A, B) tested as A against B
COMPARISONS = (("amvlm", "mean_teacher"), ("mean_teacher", "supervised"), ("amvlm", "supervised"),
               ("amvlm_mil", "mean_teacher"), ("amvlm_mil", "amvlm"))


logger = logging.getLogger(__name__)


#: argparse type of a label ratio in % (an integer, as the split files the converters write are named)
LABELED = arg_type(Arg("int", "", 1, 100))


def check_overrides(values: Mapping[str, Any], option: str = "--set") -> None:
    """Check override values against the bundle arguments' schema before any run starts (a bad value would
    otherwise stop the protocol only when the step that uses it comes, maybe hours in).

    Raises:
        ValueError: ``<option>: --key: <what is wrong>; allowed: ...``.
    """
    for key, value in values.items():
        try:
            parse_arg(key, value)
        except ArgError as e:
            raise ValueError(f"{option} {e}") from None


class Protocol:
    """Runs the protocol's steps and collects their scores.

    Args:
        bundle: the bundle folder (its ``configs/`` holds train, evaluate, pretrain and the variants).
        data: the converted data folder (``datalist.json`` and ``split_labeled<N>.json``).
        work: output folder: ``seed<S>/models`` (stage-1 checkpoints), ``seed<S>/labeled<N>/<method>`` (models and
            test scores), ``logs/``, and the result tables.
        configs: extra config overlays (relative to the bundle or absolute) applied to every step, e.g.
            ``configs/demo.json``.
        overrides: ``key -> value`` for every stage-2 step; ``pretrain_overrides`` for every stage-1 step;
            ``method_overrides``: method -> its own overrides (tuned on the validation split).
    """

    def __init__(self, bundle: str | os.PathLike, data: str | os.PathLike, work: str | os.PathLike,
                 configs: Sequence[str] = (), overrides: Optional[Mapping[str, Any]] = None,
                 pretrain_overrides: Optional[Mapping[str, Any]] = None,
                 method_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None, stage1_seed: Optional[int] = None,
                 resume: bool = False) -> None:
        self.bundle = Path(bundle).resolve()
        self.data = Path(data).resolve()
        self.work = Path(work).resolve()
        for path, what in ((self.bundle / "configs" / "train.json", "bundle config"),
                           (self.data / "datalist.json", "converted data")):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {what} not found")
        self.configs = [str(self._config(c)) for c in configs]
        self.overrides = dict(overrides or {})
        self.pretrain_overrides = dict(pretrain_overrides or {})
        self.method_overrides = {k: dict(v) for k, v in (method_overrides or {}).items()}
        self.stage1_seed = stage1_seed
        self.resume = bool(resume)
        unknown = set(self.method_overrides) - set(METHODS)
        if unknown:
            raise ValueError(f"method overrides for unknown methods {sorted(unknown)}; known: {sorted(METHODS)}")

    def _config(self, name: str) -> Path:
        path = Path(name) if os.path.isabs(name) else self.bundle / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config overlay not found")
        return path

    def _run(self, run_id: str, configs: Sequence[str], overrides: Mapping[str, Any], log: Path) -> float:
        """One bundle workflow in this process, everything it prints into ``log``; returns the seconds it took."""
        from monai.bundle import run

        files = [str(self._config(c)) for c in configs] + self.configs
        start = time.time()
        with _output_to(log):
            try:
                run(run_id=run_id, config_file=files, meta_file=str(self.bundle / "configs" / "metadata.json"),
                    bundle_root=str(self.bundle), **overrides)
            except BaseException as e:
                logger.exception("%s failed", run_id)
                failed: Optional[BaseException] = e
            else:
                failed = None
        if failed is not None:
            if is_user_error(failed):  # bad data or a wrong value: its own line says what (the log has the rest)
                line = error_lines(root_cause(failed))[0].removeprefix("error: ")
                raise ValueError(f"{line} ({run_id}; its log: {log})") from None
            tail = log.read_text(errors="replace").splitlines()[-40:]
            raise RuntimeError(f"{run_id} failed; the end of its log {log}:\n" + "\n".join(tail))
        return time.time() - start

    def pretrain(self, seed: int, kind: str) -> Path:
        """The stage-1 checkpoint of ``kind`` for ``seed``, pretrained unless it exists."""
        overlay, name = PRETRAIN[kind]
        if self.stage1_seed is not None:
            seed = self.stage1_seed
            models = self.work / "stage1" / "models"
        else:
            models = self.work / f"seed{seed}" / "models"
        ckpt = models / name
        done = models / f"{Path(name).stem}.done"  # the run finished (the best checkpoint is kept while it runs)
        if ckpt.is_file() and (done.is_file() or not self.resume):
            print(f"  seed {seed}: stage 1 ({kind}) reused: {ckpt}", flush=True)
            return ckpt
        configs = ["configs/pretrain.json"] + ([f"configs/variants/{overlay}"] if overlay else [])
        overrides = dict(self.pretrain_overrides, dataset_dir=str(self.data), output_dir=str(models),
                         pretrained_path=str(ckpt), seed=seed, **({"resume": True} if self.resume else {}))
        secs = self._run("pretraining", configs, overrides, self.work / "logs" / f"seed{seed}_pretrain_{kind}.log")
        done.write_text(json.dumps({"seconds": round(secs, 1)}))
        print(f"  seed {seed}: stage 1 ({kind}) {secs:6.1f} s -> {ckpt}", flush=True)
        return ckpt

    def train_and_test(self, seed: int, labeled: int, method: str) -> dict[str, Any]:
        """Train ``method`` at ``labeled`` % labels and score it on the test split; returns its row."""
        overlay, kind, _ = METHODS[method]
        out = self.work / f"seed{seed}" / f"labeled{labeled}" / method
        if self.resume and (out / "row.json").is_file():
            row = json.loads((out / "row.json").read_text())
            print(f"  seed {seed}, {labeled:3d} % labels, {method:<13} Dice {100 * row['dice']:6.2f}  "
                  f"mIoU {100 * row['iou']:6.2f}  (done earlier: {out / 'row.json'})", flush=True)
            return row
        models = self.work / f"seed{seed}" / "models"
        common = dict(self.overrides, **self.method_overrides.get(method, {}), dataset_dir=str(self.data),
                      labeled_percent=labeled, seed=seed)
        if kind is not None:  # named for training and evaluation alike (evaluation draws the text masks in its panels)
            common["pretrained_path"] = str(self.pretrain(seed, kind))
        diagnostic = dict(pseudo_label_diagnostic=method != "supervised")
        train_cfg = ["configs/train.json", f"configs/variants/{overlay}"]
        tag = f"seed{seed}_labeled{labeled}_{method}"
        trained = out / "trained.json"
        secs = 0.0
        if not (self.resume and trained.is_file()):
            secs = self._run("training", train_cfg, dict(common, **diagnostic, output_dir=str(models), ckpt_dir=str(out),
                                                         **({"resume": True} if self.resume else {})),
                             self.work / "logs" / f"{tag}_train.log")
            trained.write_text(json.dumps({"seconds": round(secs, 1)}))
        secs += self._run("evaluating", train_cfg + ["configs/evaluate.json"],
                          dict(common, output_dir=str(out), eval_dir=str(out)), self.work / "logs" / f"{tag}_eval.log")
        from amvlm_monai.evaluation.metrics import read_scores_csv

        scores = read_scores_csv(out / "scores_test.csv")
        selected = {}
        if (out / "model.json").is_file():
            selected = json.loads((out / "model.json").read_text())
        row = {"method": method, "labeled": labeled, "seed": seed, "dice": float(np.mean(scores["dice"])),
               "iou": float(np.mean(scores["iou"])), "selected": selected.get("network", ""),
               "epoch": selected.get("epoch", ""), "val_" + str(selected.get("metric", "metric")):
               selected.get("value", ""), **_pseudo_label_scores(out / "pseudo_labels.csv", selected.get("epoch")),
               "seconds": round(secs, 1), "scores": str(out / "scores_test.csv")}
        (out / "row.json").write_text(json.dumps(row, indent=1))
        print(f"  seed {seed}, {labeled:3d} % labels, {method:<13} Dice {100 * row['dice']:6.2f}  "
              f"mIoU {100 * row['iou']:6.2f}  ({row['selected'] or 'model'} of epoch {row['epoch']}, {secs:.0f} s)",
              flush=True)
        return row

    def run(self, methods: Sequence[str], labeled: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
        """Every (seed, ratio, method); the tables are written to ``work`` and returned rows are per run."""
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
        for ratio in labeled:
            split = self.data / f"split_labeled{ratio}.json"
            if not split.is_file():
                raise FileNotFoundError(f"{split}: no split for {ratio} % labels (the converters write 25 and 50)")
        rows = []
        for seed in seeds:
            for ratio in labeled:
                for method in methods:
                    rows.append(self.train_and_test(seed, ratio, method))
                    _write_csv(self.work / "runs.csv", rows)
        return rows


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout, stderr and INFO logging into ``log`` (file descriptors 1 and 2 included, so
    stream handlers and progress bars that libraries set up land there too)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    level = root.level
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _pseudo_label_scores(path: Path, epoch: Any) -> dict[str, float]:
    """The pseudo-label diagnostic (:class:`~amvlm_monai.handlers.metrics.PseudoLabelQuality`) at the kept model's epoch."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next((r for r in rows if str(r["epoch"]) == str(epoch)), rows[-1] if rows else None)
    return {k: float(v) for k, v in row.items() if k.startswith("pseudo_")} if row else {}


def stage1_alignment(work: str | os.PathLike) -> list[dict[str, Any]]:
    """The kept stage-1 checkpoints' validation figures (``seed<S>/models/*.json``, or ``stage1/models/*.json`` for
    a stage 1 shared by the seeds, written by :class:`~amvlm_monai.handlers.alignment.AlignmentValidation`)."""
    rows = []
    work = Path(work)
    for path in sorted(work.glob("seed*/models/amvlm_*.json")) + sorted(work.glob("stage1/models/amvlm_*.json")):
        info = json.loads(path.read_text())
        seed = path.parts[-3][4:] if path.parts[-3].startswith("seed") else "shared"
        rows.append({"seed": seed, "checkpoint": path.stem, "epoch": info.get("epoch"), **info.get("metrics", {})})
    return rows


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _seed_mean_scores(paths: Sequence[str], out: Path) -> Path:
    """Average per-image scores over seeds (the same test images in every file) into one CSV."""
    from amvlm_monai.evaluation.metrics import read_scores_csv, write_scores_csv

    tables = [read_scores_csv(p) for p in paths]
    ids = tables[0]["ids"]
    for p, t in zip(paths, tables):
        if sorted(t["ids"]) != sorted(ids):
            raise ValueError(f"{p}: scores other test images than {paths[0]}")
    dice = np.mean([t["dice_per_class"][[t["ids"].index(i) for i in ids]] for t in tables], axis=0)
    iou = np.mean([t["iou_per_class"][[t["ids"].index(i) for i in ids]] for t in tables], axis=0)
    write_scores_csv(out, ids, dice, iou, tables[0]["class_names"])
    return out


def summarise(rows: Sequence[Mapping[str, Any]], work: str | os.PathLike, alpha: float = 0.05) -> str:
    """Write ``results.csv``, ``ttests.csv`` and ``results.md`` from the per-run rows; returns the Markdown."""
    from amvlm_monai.evaluation.metrics import paired_ttest

    work = Path(work)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    ratios = sorted({int(r["labeled"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})

    def spread(xs: Sequence[float]) -> str:
        mean = 100 * statistics.fmean(xs)
        return f"{mean:.2f} ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{mean:.2f}"

    table, lines = [], [f"Test split; Dice and mIoU in % (mean ± standard deviation over seeds {seeds})", ""]
    lines += ["| labels | method | Dice | mIoU |", "|---|---|---|---|"]
    merged: dict[tuple[int, str], Path] = {}
    for ratio in ratios:
        for m in methods:
            runs = [r for r in rows if r["method"] == m and int(r["labeled"]) == ratio]
            if not runs:
                continue
            dice, iou = [r["dice"] for r in runs], [r["iou"] for r in runs]
            table.append({"labeled": ratio, "method": m, "seeds": len(runs), "dice_mean": statistics.fmean(dice),
                          "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                          "iou_mean": statistics.fmean(iou), "iou_sd": statistics.stdev(iou) if len(iou) > 1 else 0.0})
            lines.append(f"| {ratio} % | {METHODS[m][2]} | {spread(dice)} | {spread(iou)} |")
            merged[(ratio, m)] = _seed_mean_scores([r["scores"] for r in runs],
                                                  work / "scores" / f"labeled{ratio}_{m}_seedmean.csv")
    _write_csv(work / "results.csv", table)
    tests = []
    for ratio in ratios:
        for a, b in COMPARISONS:
            if (ratio, a) in merged and (ratio, b) in merged:
                for metric in ("dice", "iou"):
                    t = paired_ttest(merged[(ratio, a)], merged[(ratio, b)], metric=metric, alpha=alpha)
                    tests.append({"labeled": ratio, "a": a, "b": b, **t})
    _write_csv(work / "ttests.csv", tests)
    if tests:
        lines += ["", "Paired t-tests over per-image scores (each image's score averaged over the seeds first):", "",
                  "| labels | A vs B | metric | mean A - B (points) | t | p |", "|---|---|---|---|---|---|"]
        for t in tests:
            p = f"{t['p']:.2g}" if math.isfinite(t["p"]) else "n/a"
            lines.append(f"| {t['labeled']} % | {METHODS[t['a']][2]} vs {METHODS[t['b']][2]} | {t['metric']} | "
                         f"{100 * t['mean_diff']:+.2f} | {t['t']:.2f} | {p} |")
    diag = [r for r in rows if "pseudo_teacher_dice" in r]
    if diag:
        lines += ["", "Pseudo labels on the unlabelled training images against their hidden labels (Dice over images "
                  "with a lesion, %, mean over seeds; the teacher alone, the text mask alone, and their fusion):", "",
                  "| labels | method | teacher | text mask | fused | predicted / true foreground (%) |",
                  "|---|---|---|---|---|---|"]
        for ratio in ratios:
            for m in methods:
                runs = [r for r in diag if r["method"] == m and int(r["labeled"]) == ratio]
                if not runs:
                    continue
                mean = lambda k: 100 * statistics.fmean(r[k] for r in runs) if k in runs[0] else float("nan")  # noqa
                src = "pseudo_fused_fg" if "pseudo_fused_fg" in runs[0] else "pseudo_teacher_fg"
                cell = lambda k: f"{mean(k):.2f}" if math.isfinite(mean(k)) else "-"  # noqa: E731
                lines.append(f"| {ratio} % | {METHODS[m][2]} | {cell('pseudo_teacher_dice')} | "
                             f"{cell('pseudo_text_dice')} | {cell('pseudo_fused_dice')} | "
                             f"{mean(src):.2f} / {mean('pseudo_label_fg'):.2f} |")
    align = stage1_alignment(work)
    if align:
        _write_csv(work / "stage1.csv", align)
        lines += ["", "Stage 1, the kept checkpoint on the validation split (recall in %, chance in brackets; "
                  "first-ranked report (image) with the same lesion count and sides; localisation AUC; Dice of the "
                  "initial text mask against that of an all-ones mask):", "",
                  "| seed | checkpoint | epoch | image-to-report R@1 | R@5 | report-to-image R@1 | R@5 | "
                  "same count+sides i2t@1 | t2i@1 | AUC | text mask / all-ones Dice |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in align:
            def r(k: str) -> str:
                v, c = a.get(k, float("nan")), a.get(k + "_chance", float("nan"))
                return f"{100 * v:.1f} ({100 * c:.1f})" if math.isfinite(v) else "-"

            lines.append(f"| {a['seed']} | {a['checkpoint']} | {a['epoch']} | {r('i2t_r1')} | {r('i2t_r5')} | "
                         f"{r('t2i_r1')} | {r('t2i_r5')} | {r('i2t_fact_r1')} | {r('t2i_fact_r1')} | "
                         f"{a['loc_auc']:.3f} | "
                         f"{a['initial_mask_dice']:.3f} / {a['ones_dice']:.3f} |")
    text = "\n".join(lines) + "\n"
    (work / "results.md").write_text(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.workflows.protocol", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle folder")
    parser.add_argument("--data", required=True, help="converted data folder (datalist.json, split files)")
    parser.add_argument("--work", required=True, help="output folder")
    parser.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher", "amvlm"],
                        choices=list(METHODS))
    parser.add_argument("--labeled", nargs="+", type=LABELED, default=[25], help="label ratios in %%")
    parser.add_argument("--seeds", nargs="+", type=arg_type(BUNDLE_ARGS["seed"]), default=[0])
    parser.add_argument("--config", nargs="*", default=[], help="extra overlays for every step (bundle-relative)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="stage-2 overrides")
    parser.add_argument("--pretrain-set", nargs="*", default=[], metavar="KEY=VALUE", help="stage-1 overrides")
    parser.add_argument("--method-set", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                        help="overrides of one method (tuned on the validation split)")
    parser.add_argument("--alpha", type=arg_type(Arg("float", "", 0, 1, above=True, below=True)), default=0.05,
                        help="significance level of the paired t-tests")
    args = parser.parse_args(argv)
    per_method: dict[str, dict[str, Any]] = {}
    try:
        for item in args.method_set:
            method, sep, pair = item.partition(":")
            if not sep:
                raise ValueError(f"--method-set: '{item}' is not METHOD:KEY=VALUE")
            per_method.setdefault(method, {}).update(parse_key_values([pair], "--method-set"))
        overrides = parse_key_values(args.set, "--set")
        pretrain_overrides = parse_key_values(args.pretrain_set, "--pretrain-set")
        for option, values in [("--set", overrides), ("--pretrain-set", pretrain_overrides)] + [
                (f"--method-set {m}:", v) for m, v in per_method.items()]:
            check_overrides(values, option)
        protocol = Protocol(args.bundle, args.data, args.work, args.config, overrides, pretrain_overrides, per_method)
        rows = protocol.run(args.methods, args.labeled, args.seeds)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(summarise(rows, args.work, args.alpha))
    return 0


if __name__ == "__main__":
    sys.exit(main())
