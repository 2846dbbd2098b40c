"""Benchmarks of amvlm-monai on this machine, each measurement in a fresh process (bench/worker.py).

    python bench/run.py                        # the working tree: everything below (a few minutes on 2 cores)
    python bench/run.py --quick                # small configurations only, fewer steps (a few minutes)
    python bench/run.py --threads 1            # on a busy machine: two threads there mostly measure waiting
    python bench/run.py --base ../amvlm-base   # also a baseline checkout, alternated run by run, with ratios
    make bench BASE=../amvlm-base              # the same through make

Prints:
1. stage 1 (pretraining step of the bundle's trainer, optimiser and loss): pairs/s and peak memory per
   configuration (ViT-B/16 + BERT 768x6 at batch 4 and 8, ViT 384x6 + MiniLM 384x6 at batch 8, all at 224 px),
   in float32 and in the precision the bundle uses by default (bfloat16 autocast where the CPU or GPU computes it
   natively);
2. stage 2 (training step, 2 labelled + 2 unlabelled images at 224 px, a ViT-B/16 stage-1 checkpoint; the bundle's
   U-Net and the light CPU U-Net, which is also the same network in older code): images/s of supervised,
   Mean-Teacher and text-guided Mean-Teacher, as ratios, the seconds spent in the text guidance, and peak memory;
3. inference: images/s of the U-Net and seconds per volume (256 x 256 x 24 NIfTI, slice by slice);
4. data loading: images/s of the stage-2 transform chain (PNG files) against the images/s training consumes;
5. the frozen text tower's cache: stage 1 of the demo preset (``demo.json``: small preset, 64 px, batch 16, text
   tower frozen) on the demo's 240 reports with their augmented views, 3 epochs, with the cache on and off (and the
   baseline), s/step in the first epoch (nothing cached yet) and after it, and the ratio;
6. the machine (CPU, cores, threads, load average before and after).

With ``--base`` every measurement is repeated for the baseline code (put first on PYTHONPATH), rounds alternate which
side runs first, and the tables give medians and ratios. Timings on a shared machine are noisy: compare ratios of the
same run, and read the load average printed with them. No random init, no weights are downloaded: the stage-1
geometry is built from its configuration with random weights (kept in ``--assets``, 3 GB for the ViT-B checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "worker.py"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class Runner:
    """Runs worker jobs for the working tree ("ours") and, optionally, a baseline checkout ("base")."""

    def __init__(self, base: str | None, assets: Path, threads: int, verbose: bool) -> None:
        self.roots = {"ours": ROOT}
        if base:
            self.roots["base"] = Path(base).resolve()
        self.assets = assets
        self.threads = threads
        self.verbose = verbose
        self.log: list[dict] = []

    def run(self, side: str, job: str, *args: str) -> dict:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.roots[side]), os.environ.get("PYTHONPATH", "")]))
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, str(WORKER), job, "--out", out, "--assets", str(self.assets),
               "--threads", str(self.threads), *args]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=str(self.roots[side]), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} {job} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            res = json.load(f)
        os.unlink(out)
        expected = str(self.roots[side])
        if res.get("code") != expected:
            raise RuntimeError(f"{side}: the worker imported amvlm_monai from {res.get('code')}, not {expected}.")
        res.update(side=side, job=job, args=list(args), load=load())
        self.log.append(res)
        if self.verbose and "times" in res:
            times = " ".join(f"{x:.2f}" for x in res.get("times", []))
            cpu = " ".join(f"{x:.2f}" for x in res.get("cpu_times", []))
            print(f"  [{side:4}] {job} {' '.join(args)}: {times} s/step (CPU {cpu}), "
                  f"peak {res.get('peak_gib', 0):.2f} GiB, {time.perf_counter() - t:.0f} s, load {res['load']}",
                  flush=True)
        return res

    def alternate(self, rounds: int, job: str, *args: str) -> dict[str, list[dict]]:
        """``rounds`` runs per side, the side that goes first alternating (ours, base / base, ours / ...)."""
        sides = list(self.roots)
        out: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                out[side].append(self.run(side, job, *args))
        return out


def median_step(runs: list[dict], key: str = "times") -> float:
    """Median seconds per step over every timed step of ``runs`` (``key="cpu_times"``: process CPU seconds)."""
    return statistics.median(t for r in runs for t in r[key])


def peak(runs: list[dict]) -> float:
    return statistics.median(r["peak_gib"] for r in runs)


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def bench_stage1(r: Runner, configs: list[tuple[str, int]], rounds: int, steps: int) -> tuple[str, dict]:
    """Rows per configuration and precision; with a baseline: its pairs/s and peak, and the ratios (wall-clock, and
    process CPU time, which a busy machine disturbs less)."""
    rows, data = [], {}
    for config, batch in configs:
        common = ("--config", config, "--batch", str(batch), "--steps", str(steps))
        default = r.alternate(rounds, "stage1", *common, "--precision", "default")
        autocast = default["ours"][0]["autocast"]
        measured = [("float32", default)] if autocast == "float32" else [
            ("float32", r.alternate(rounds, "stage1", *common, "--precision", "fp32")),
            (f"default ({autocast})", default)]  # the baseline is float32 on a CPU either way
        for precision, runs in measured:
            ours, ours_cpu, ours_peak = median_step(runs["ours"]), median_step(runs["ours"], "cpu_times"), peak(
                runs["ours"])
            name = precision if autocast != "float32" else "float32 (the default here)"
            row = [f"{config} b{batch}", name, f"{batch / ours:.2f}", f"{ours_peak:.2f}"]
            key = f"{config}_b{batch}_{precision.split()[0]}"
            data[key] = {"ours_s": ours, "ours_cpu_s": ours_cpu, "ours_peak_gib": ours_peak}
            if "base" in runs:
                base, base_cpu, base_peak = median_step(runs["base"]), median_step(runs["base"], "cpu_times"), peak(
                    runs["base"])
                row += [f"{batch / base:.2f}", f"{base_peak:.2f}", ratio(base, ours), ratio(base_cpu, ours_cpu),
                        ratio(ours_peak, base_peak)]
                data[key].update(base_s=base, base_cpu_s=base_cpu, base_peak_gib=base_peak)
            rows.append(row)
    head = ["stage 1 (224 px)", "precision", "pairs/s", "peak GiB"]
    if "base" in r.roots:
        head += ["base pairs/s", "base peak GiB", "speed (wall)", "speed (CPU time)", "memory"]
    return table(rows, head), data


def bench_stage2(r: Runner, rounds: int, steps: int, checkpoint: str, unet: str = "default") -> tuple[str, dict]:
    """Supervised, Mean-Teacher and text-guided steps on the same U-Net and batch; the text branch's cost over the
    plain Mean-Teacher step (time and peak memory) for each code."""
    variants = (("supervised", "supervised (2 labelled)"), ("mt", "Mean-Teacher (2 + 2)"),
                ("text", "text-guided Mean-Teacher (2 + 2)"))
    runs = {v: r.alternate(rounds, "stage2", "--variant", v, "--steps", str(steps), "--checkpoint", checkpoint,
                           "--unet", unet) for v, _ in variants}
    rows, data = [], {}
    for side in r.roots:
        mt, mt_cpu, mt_peak = (median_step(runs["mt"][side]), median_step(runs["mt"][side], "cpu_times"),
                               peak(runs["mt"][side]))
        for v, name in variants:
            s, c, p = median_step(runs[v][side]), median_step(runs[v][side], "cpu_times"), peak(runs[v][side])
            n = runs[v][side][0]["images"]
            g = [t for run in runs[v][side] for t in run.get("guidance_times", [])]
            guided = f"{statistics.median(g):.2f}" if g else ""
            rows.append([side, name, f"{s:.2f}", f"{n / s:.2f}", f"{s / mt:.2f}x", f"{c / mt_cpu:.2f}x",
                         f"{s - mt:+.2f}", guided, f"{p:.2f}", f"{p - mt_peak:+.2f}"])
            data[f"{side}_{v}"] = {"s": s, "cpu_s": c, "images_per_s": n / s, "peak_gib": p,
                                   "guidance_s": statistics.median(g) if g else None}
    head = ["code", f"stage 2 step (224 px, {unet} U-Net, ViT-B/16 text tower)", "s/step", "images/s",
            "vs MT (wall)", "vs MT (CPU)", "s over MT", "in guidance (s)", "peak GiB", "GiB over MT"]
    text = table(rows, head)
    if "base" in r.roots:
        o, b = data["ours_text"], data["base_text"]
        text += (f"\ntext-guided step, ours vs base: {ratio(b['s'], o['s'])} faster (wall), "
                 f"{ratio(b['cpu_s'], o['cpu_s'])} (CPU time); peak memory {ratio(o['peak_gib'], b['peak_gib'])}")
    return text, data


def bench_text_cache(r: Runner, rounds: int, epochs: int) -> tuple[str, dict]:
    """Demo-preset stage 1 with the frozen text tower's cache on and off (and the baseline code as it is), the three
    alternating within each round; medians over the first epoch's steps and over the later epochs' steps."""
    variants = [("ours", "on"), ("ours", "off")] + ([("base", "default")] if "base" in r.roots else [])
    runs: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
    for k in range(rounds):
        for side, cache in variants[k % len(variants):] + variants[:k % len(variants)]:
            runs[(side, cache)].append(r.run(side, "demo1", "--epochs", str(epochs), "--text-cache", cache))

    def split(rs: list[dict], key: str) -> tuple[float, float]:
        n = rs[0]["steps_per_epoch"]
        first = [t for x in rs for t in x[key][1:n]]  # the very first step (start-up) left out
        later = [t for x in rs for t in x[key][n:]]
        return statistics.median(first), statistics.median(later) if later else float("nan")

    data, rows = {}, []
    for side, cache in variants:
        rs = runs[(side, cache)]
        (w1, w2), (c1, c2) = split(rs, "times"), split(rs, "cpu_times")
        info = rs[-1].get("cache") or {}
        hit = info["hits"] / max(1, info["hits"] + info["misses"]) if info.get("hits") is not None else None
        data[f"{side}_{cache}"] = {"first_s": w1, "later_s": w2, "first_cpu_s": c1, "later_cpu_s": c2,
                                   "peak_gib": peak(rs), "hit_rate": hit, "frozen": rs[0].get("frozen")}
    off = data["ours_off"]
    for side, cache in variants:
        d = data[f"{side}_{cache}"]
        name = f"{'this code' if side == 'ours' else 'baseline'}, cache {cache}"
        rows.append([name, f"{d['first_s']:.3f}", f"{d['later_s']:.3f}", f"{d['later_cpu_s']:.3f}",
                     f"{ratio(d['later_s'], off['later_s'])} / {ratio(d['later_cpu_s'], off['later_cpu_s'])}",
                     f"{d['peak_gib']:.2f}", "" if d["hit_rate"] is None else f"{100 * d['hit_rate']:.0f} %"])
    head = ["demo stage 1 (64 px, batch 16, frozen text)", "s/step epoch 1", f"s/step epochs 2-{epochs}",
            "CPU s/step epochs 2+", "time vs cache off (wall / CPU)", "peak GiB", "rows from cache"]
    text = table(rows, head)
    on = data["ours_on"]
    text += (f"\ncache on: {ratio(off['later_s'], on['later_s'])} faster after the first epoch (wall), "
             f"{ratio(off['later_cpu_s'], on['later_cpu_s'])} (CPU time); first epoch "
             f"{ratio(off['first_s'], on['first_s'])} (wall)")
    if "base_default" in data:
        b = data["base_default"]
        text += (f"; against the baseline after the first epoch: {ratio(b['later_s'], on['later_s'])} (wall), "
                 f"{ratio(b['later_cpu_s'], on['later_cpu_s'])} (CPU time)")
    return text, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=os.environ.get("BASE") or None,
                    help="a checkout of the baseline commit (e.g. a git worktree); env BASE works too")
    ap.add_argument("--quick", action="store_true", help="small stage-1 configuration only, fewer steps")
    ap.add_argument("--rounds", type=int, default=None, help="runs per side and measurement (default 1, quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run after one warm-up step")
    ap.add_argument("--sections", default="stage1,stage2,infer,data,text_cache",
                    help="comma-separated subset of stage1,stage2,infer,data,text_cache")
    ap.add_argument("--assets", default=os.path.join(tempfile.gettempdir(), "amvlm_bench_assets"),
                    help="where the random-init BERT 768x6 and the ViT-B/16 stage-1 checkpoint are kept")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--unet", nargs="+", choices=["default", "light"], default=None,
                    help="stage-2 U-Nets: the bundle's default and/or the light CPU one (16..256 channels, the same "
                         "network in older code); default both, --quick light only")
    ap.add_argument("--json", default=None, help="write every measurement to this file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-run lines")
    a = ap.parse_args()
    threads = a.threads or os.cpu_count() or 1
    rounds = a.rounds or 1
    steps = a.steps or (2 if a.quick else 3)
    sections = set(a.sections.split(","))
    a.unet = a.unet or (["light"] if a.quick else ["default", "light"])
    assets = Path(a.assets)
    assets.mkdir(parents=True, exist_ok=True)
    r = Runner(a.base, assets, threads, verbose=not a.quiet)
    t0 = time.perf_counter()
    start_load = load()
    out: list[str] = []
    results: dict = {}
    print(f"amvlm-monai benchmarks: {cpu_name()}, {os.cpu_count()} cores, {threads} torch threads, "
          f"Python {platform.python_version()}, load average {start_load}", flush=True)
    if a.base:
        print(f"baseline: {r.roots['base']} (alternated with the working tree {ROOT}, {rounds} round(s))", flush=True)
    need_ckpt = "stage2" in sections
    if need_ckpt or ("stage1" in sections and not a.quick):
        print("preparing assets (random-init BERT 768x6, ViT-B/16 stage-1 checkpoint; once per --assets)...",
              flush=True)
        info = r.run("ours", "assets")
        results["assets"] = info
    if "stage1" in sections:
        configs = [("small", 8)] if a.quick else [("base", 4), ("base", 8), ("small", 8)]
        text, results["stage1"] = bench_stage1(r, configs, rounds, steps)
        out.append("Stage 1, pretraining step (Adam, clipping, momentum update included):\n" + text)
        print(out[-1], flush=True)
    if "stage2" in sections:
        for unet in a.unet:
            text, results[f"stage2_{unet}"] = bench_stage2(r, rounds, steps, results["assets"]["checkpoint"], unet)
            out.append(f"Stage 2, training step ({unet} U-Net, the bundle's default precision; 'in guidance': "
                       "seconds per step inside the text guidance's forward calls):\n" + text)
            print(out[-1], flush=True)
    if "infer" in sections:
        res = r.run("ours", "infer", "--batch", "8", "--steps", "2" if a.quick else "3",
                    "--volumes", "1" if a.quick else "2")
        results["infer"] = res
        line = f"Inference: {res['images_per_s']:.1f} images/s (U-Net, 224 px, batch 8)"
        if "s_per_volume" in res:
            line += f"; {res['s_per_volume']:.2f} s per 256 x 256 x 24 volume (slice by slice, NIfTI in and out)"
        out.append(line)
        print(line, flush=True)
    if "data" in sections:
        res = r.run("ours", "data", "--batch", "4" if a.quick else "8", "--workers", "0")
        results["data"] = res
        line = f"Data loading: {res['images_per_s']:.1f} images/s (stage-2 transforms, 512 px PNG -> 224 px, 1 process)"
        train = results.get("stage2_default", results.get("stage2_light", {})).get("ours_text")
        if train:
            line += (f"; training consumes {train['images_per_s']:.2f} images/s (text-guided step): loading is "
                     f"{res['images_per_s'] / train['images_per_s']:.0f}x faster than needed")
        out.append(line)
        print(line, flush=True)
    if "text_cache" in sections:
        text, results["text_cache"] = bench_text_cache(r, a.rounds or (2 if a.quick else 3), 2 if a.quick else 3)
        out.append("Frozen text tower's cache (stage 1 of the demo preset, 240 demo reports + augmented views; "
                   "Adam, momentum update included):\n" + text)
        print(out[-1], flush=True)
    end_load = load()
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, {threads} torch threads; load average at start "
          f"{start_load}, at end {end_load}; {time.perf_counter() - t0:.0f} s in all.", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "runs": r.log, "cpu": cpu_name(), "cores": os.cpu_count(),
                       "threads": threads, "load_start": start_load, "load_end": end_load}, f, indent=1)


if __name__ == "__main__":
    main()
