"""One benchmark measurement in a process of its own (so that peak memory is per measurement); run by bench/run.py.

The code measured is whatever ``amvlm_monai`` this process imports: the working tree, or a baseline commit put first
on ``PYTHONPATH`` by ``bench/run.py --base``. The trainers are built from that code's own bundle template
(``bundles/_template/configs``) with only the data, the sizes and the precision overridden, so both sides run what a
user of that commit gets. Only APIs present in every version are used here.

    python bench/worker.py JOB --out result.json [options]   # JOB: stage1 | demo1 | stage2 | infer | data | assets

Prints nothing but warnings; writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPORTS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, medium upper right lung.",
    "Unilateral pulmonary infection, one infected area, small lower left lung.",
    "No lesion is visible.",
]
# Stage-1 geometries at 224 px, patch 16, BERT-family text tower of 6 layers, D = 128, heads 2048 (the paper's).
STAGE1 = {
    "base": dict(vit_width=768, vit_depth=12, vit_heads=12, vit_mlp=3072, text="bert768x6"),  # ViT-B/16 + BERT 768x6
    "small": dict(vit_width=384, vit_depth=6, vit_heads=6, vit_mlp=1536, text="minilm"),  # ViT 384x6 + MiniLM 384x6
}


def peak_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def code_root() -> Path:
    import amvlm_monai

    return Path(amvlm_monai.__file__).resolve().parents[1]


def template(name: str):
    """The measured code's bundle template config ``name`` as a MONAI ConfigParser."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(code_root() / "bundles" / "_template" / "configs" / name))
    return parser


def step_timer(trainer, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds (all threads) of every iteration after the first ``warmup``, filled while
    the trainer runs. CPU time is the steadier measure on a shared machine (it does not count waiting for a core)."""
    from ignite.engine import Events

    wall: list[float] = []
    cpu: list[float] = []
    start = {}

    def begin(engine):
        start["wall"], start["cpu"] = time.perf_counter(), time.process_time()

    def done(engine):
        if engine.state.iteration > warmup:
            wall.append(time.perf_counter() - start["wall"])
            cpu.append(time.process_time() - start["cpu"])

    trainer.add_event_handler(Events.ITERATION_STARTED, begin)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, done)
    return wall, cpu


def text_model_path(kind: str, assets: Path) -> str | None:
    return None if kind == "minilm" else str(assets / "bert768x6")


# ---- assets: a random-init BERT 768x6 folder and a ViT-B/16 + BERT 768x6 stage-1 checkpoint ---------------------
def pretrainer_on(parser, batches: list[dict]):
    """The pretraining config's trainer over the given batches for one epoch, without handlers, seeded."""
    parser["bench_batches"] = batches
    parser["pretrain#dataloader"] = "@bench_batches"
    parser["pretrain#handlers"] = []
    parser["pretrain#trainer#max_epochs"] = 1
    parser.parse()
    torch.manual_seed(0)
    return parser.get_parsed_content("pretrain#trainer")


def make_assets(assets: Path) -> dict:
    """Build (once) what the measurements load: no pretrained weights exist offline, so the geometry is random."""
    from transformers import BertConfig, BertModel

    from amvlm_monai.networks.text import default_text_model_path

    bert = assets / "bert768x6"
    if not (bert / "config.json").is_file():
        bert.mkdir(parents=True, exist_ok=True)
        src = default_text_model_path()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(os.path.join(src, f), bert)
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(str(bert))
    ckpt = assets / "amvlm_base.pt"
    if not ckpt.is_file():
        from amvlm_monai.networks.amvlm import AMVLM

        torch.manual_seed(0)
        geo = {k: v for k, v in STAGE1["base"].items() if k != "text"}
        model = AMVLM(image_size=224, in_channels=1, patch_size=16, text_model=str(bert), text_layers=6,
                      max_words=20, embed_dim=128, head_hidden=2048, **geo)
        # what pretraining writes: model (momentum copies included), config and the Adam state
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-5)
        for p in opt.param_groups[0]["params"]:
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
        tmp = ckpt.with_suffix(".tmp")
        state = {"model": model.state_dict(), "config": model.config, "optimizer": opt.state_dict(), "epoch": 1}
        torch.save(state, tmp)
        os.replace(tmp, ckpt)
    return {"bert": str(bert), "checkpoint": str(ckpt), "checkpoint_gib": ckpt.stat().st_size / 2**30}


# ---- stage 1 ---------------------------------------------------------------------------------------------------------
def stage1(config: str, batch: int, steps: int, warmup: int, precision: str, assets: Path) -> dict:
    geo = dict(STAGE1[config])
    text = geo.pop("text")
    parser = template("pretrain.json")
    parser["device"] = "$torch.device('cpu')"
    parser["image_size"] = 224
    parser["in_channels"] = 1
    parser["text_model"] = text_model_path(text, assets)
    parser["batch_size"] = batch
    for k, v in geo.items():
        parser[f"network_def#{k}"] = v
    if precision == "fp32":
        parser["amp"] = False
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(batch, 1, 224, 224, generator=g),
                "image_aug": torch.randn(batch, 1, 224, 224, generator=g),
                "text": [REPORTS[(i + j) % 4] for j in range(batch)],
                "text_aug": [REPORTS[(i + j + 1) % 4] for j in range(batch)]} for i in range(warmup + steps)]
    trainer = pretrainer_on(parser, batches)
    times, cpu = step_timer(trainer, warmup)
    outputs = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output["loss"]))
    trainer.run()
    dtype = getattr(getattr(trainer, "step", None), "dtype", None)
    return {"times": times, "cpu_times": cpu, "peak_gib": peak_gib(), "batch": batch, "losses": outputs,
            "autocast": str(dtype).replace("torch.", "") if dtype is not None else "float32"}


# ---- stage 1 of the demo preset (frozen text tower): the text cache ------------------------------------------------
def demo_reports(n: int, size: int = 64) -> list[str]:
    """The reports of the demo's first ``n`` training images (``data_prep.demo_data``: same seed, same wording)."""
    import numpy as np

    from amvlm_monai.data.describe import describe_mask
    from data_prep.demo_data import make_case

    out = []
    for i in range(n):
        rng = np.random.default_rng([0, 0, i])
        _, mask, _ = make_case(rng, size)
        out.append(describe_mask(mask, rng=rng))
    return out


def demo1(n_reports: int, epochs: int, text_cache: str) -> dict:
    """Stage 1 as ``make demo`` runs it (``pretrain.json`` + ``demo.json``: small preset, 64 px, batch 16, frozen text
    tower, every loss term) on the demo's reports: shuffled every epoch, each with a fresh augmented view (the bundle's
    ``TextView``); images are random (their content does not change the time). ``text_cache``: ``on``/``off`` set
    ``network_def#text_cache_size`` (50000 / 0) where the code has it; ``default`` leaves the config alone."""
    import inspect

    import numpy as np

    from amvlm_monai.networks.amvlm import AMVLM
    from amvlm_monai.transforms.views import TextView

    parser = template("pretrain.json")
    with open(code_root() / "bundles" / "_template" / "configs" / "demo.json") as f:
        demo = json.load(f)
    for k, v in demo.items():
        parser[k] = v
    parser["device"] = "$torch.device('cpu')"
    parser["text_model"] = None
    has_cache = "text_cache_size" in inspect.signature(AMVLM.__init__).parameters
    if text_cache != "default" and has_cache:
        parser["network_def#text_cache_size"] = 50_000 if text_cache == "on" else 0
    batch, size = int(demo["batch_size"]), int(demo["image_size"])
    reports = demo_reports(n_reports, size)
    view = TextView(drop_prob=float(parser["text_drop_prob"]))
    view.set_random_state(0)
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    batches = []
    per_epoch = n_reports // batch
    for _ in range(epochs):
        order = rng.permutation(n_reports)
        for s in range(per_epoch):
            texts = [reports[i] for i in order[s * batch:(s + 1) * batch]]
            batches.append({"image": torch.randn(batch, 1, size, size, generator=g),
                            "image_aug": torch.randn(batch, 1, size, size, generator=g),
                            "text": texts, "text_aug": [view(t) for t in texts]})
    trainer = pretrainer_on(parser, batches)
    times, cpu = step_timer(trainer, warmup=0)
    outputs = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output["loss"]))
    trainer.run()
    enc = trainer.network.text_encoder
    info = enc.cache_info() if hasattr(enc, "cache_info") else None
    return {"times": times, "cpu_times": cpu, "peak_gib": peak_gib(), "batch": batch, "steps_per_epoch": per_epoch,
            "losses": outputs, "cache": info, "has_cache": has_cache,
            "frozen": not any(p.requires_grad for p in enc.parameters())}


# ---- stage 2 ---------------------------------------------------------------------------------------------------------
def _light_unet_name() -> str | None:
    """The measured code's name of the small CPU U-Net (16..256 channels): ``"light"``, or None in older code."""
    from amvlm_monai.networks import segmentation

    return "light" if "light" in getattr(segmentation, "_SIZES", ()) else None


def _time_calls(obj, names: tuple[str, ...], spent: list[float]) -> None:
    """Add the seconds spent in ``obj.<name>(...)`` calls to ``spent[-1]`` (the current step)."""
    for name in names:
        fn = getattr(obj, name, None)
        if fn is None:
            continue

        def timed(*args, _fn=fn, **kwargs):
            t = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[-1] += time.perf_counter() - t

        setattr(obj, name, timed)


def stage2(variant: str, n_lab: int, n_unl: int, size: int, steps: int, warmup: int, precision: str,
           assets: Path, checkpoint: str | None, unet: str = "default") -> dict:
    parser = template("train.json")
    if unet == "light":
        parser["unet_size"] = _light_unet_name()
    parser["device"] = "$torch.device('cpu')"
    parser["image_size"] = size
    parser["batch_size"] = n_lab
    parser["unlabeled_batch_size"] = n_unl
    parser["use_unlabeled"] = variant != "supervised"
    parser["use_text"] = variant == "text"
    if checkpoint:
        parser["pretrained_path"] = checkpoint
    if "reports" in parser["guidance"]:  # the training reports, known up front (no datalist file here)
        parser["guidance#reports"] = REPORTS
    if precision == "fp32":
        parser["amp"] = False
    g = torch.Generator().manual_seed(0)
    n = warmup + steps
    lab = [{"image": torch.randn(n_lab, 1, size, size, generator=g),
            "label": (torch.rand(n_lab, 1, size, size, generator=g) > 0.7).float(),
            "text": [REPORTS[(i + j) % 4] for j in range(n_lab)]} for i in range(n)]
    unl = [{"image": torch.randn(n_unl, 1, size, size, generator=g),
            "text": [REPORTS[(i + j + 2) % 4] for j in range(n_unl)]} for i in range(n)]
    parser["bench_labeled"] = lab
    parser["bench_unlabeled"] = unl
    parser["train#dataloader"] = "@bench_labeled"
    parser["train#unlabeled_dataloader"] = "$@bench_unlabeled if @use_unlabeled else None"
    parser["train#handlers"] = []
    parser["train#trainer#max_epochs"] = 1
    parser["epoch_length"] = n
    parser.parse()
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    times, cpu = step_timer(trainer, warmup)
    guidance: list[float] = []  # seconds per step inside the text guidance's forward calls (masks, L_tg)
    if getattr(trainer, "guidance", None) is not None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: guidance.append(0.0))
        _time_calls(trainer.guidance, ("forward", "text_masks"), guidance)
    trainer.run()
    images = n_lab + (n_unl if variant != "supervised" else 0)
    return {"times": times, "cpu_times": cpu, "peak_gib": peak_gib(), "images": images,
            "guidance_times": guidance[warmup:]}


# ---- inference -------------------------------------------------------------------------------------------------------
def infer(size: int, batch: int, steps: int, volumes: int, depth: int) -> dict:
    import nibabel as nib
    import numpy as np

    parser = template("train.json")
    parser["image_size"] = size
    parser.parse()
    net = parser.get_parsed_content("network_def").eval()
    x = torch.randn(batch, 1, size, size)
    with torch.no_grad():
        net(x)
        t = time.perf_counter()
        for _ in range(steps):
            net(x)
        per_batch = (time.perf_counter() - t) / steps
    out = {"images_per_s": batch / per_batch, "batch": batch}
    try:
        from amvlm_monai.inference.volume import segment_volume
    except ImportError:
        return out
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vol = np.random.default_rng(0).normal(100, 30, (256, 256, depth)).astype(np.float32)
        path = os.path.join(tmp, "case.nii.gz")
        nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1.0])), path)
        # a fresh folder per call: an existing output is refused (not replaced) by the current code
        segment_volume(net, path, os.path.join(tmp, "warm"), image_size=size, axis=2, modality="MR")  # warm-up
        t = time.perf_counter()
        for k in range(volumes):
            segment_volume(net, path, os.path.join(tmp, f"out{k}"), image_size=size, axis=2, modality="MR")
        out.update(s_per_volume=(time.perf_counter() - t) / volumes, volume_shape=[256, 256, depth])
    return out


# ---- data loading ----------------------------------------------------------------------------------------------------
def data(size: int, n_images: int, workers: int, src_size: int) -> dict:
    import tempfile

    import numpy as np
    from monai.data import DataLoader, Dataset
    from PIL import Image

    from amvlm_monai.transforms.pipelines import segmentation_transforms

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(n_images):
            img, lab = os.path.join(tmp, f"img{i}.png"), os.path.join(tmp, f"lab{i}.png")
            Image.fromarray(rng.integers(0, 255, (src_size, src_size), dtype=np.uint8)).save(img)
            Image.fromarray((rng.random((src_size, src_size)) > 0.8).astype(np.uint8) * 255).save(lab)
            items.append({"image": img, "label": lab, "text": REPORTS[i % 4]})
        transform = segmentation_transforms(image_size=size, labeled=True, augment=True)
        loader = DataLoader(Dataset(items, transform), batch_size=4, num_workers=workers, shuffle=False)
        next(iter(loader))  # worker start-up and imports out of the timing
        t = time.perf_counter()
        count = sum(b["image"].shape[0] for b in loader)
        dt = time.perf_counter() - t
    return {"images_per_s": count / dt, "workers": workers, "source_px": src_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=["assets", "stage1", "demo1", "stage2", "infer", "data"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--assets", required=True)
    ap.add_argument("--config", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "default"], default="default")
    ap.add_argument("--variant", choices=["supervised", "mt", "text"], default="mt")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--labeled", type=int, default=2)
    ap.add_argument("--unlabeled", type=int, default=2)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--unet", choices=["default", "light"], default="default")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--volumes", type=int, default=2)
    ap.add_argument("--reports", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--text-cache", choices=["on", "off", "default"], default="default")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    assets = Path(a.assets)
    t0 = time.perf_counter()
    if a.job == "assets":
        res = make_assets(assets)
    elif a.job == "stage1":
        res = stage1(a.config, a.batch, a.steps, a.warmup, a.precision, assets)
    elif a.job == "demo1":
        res = demo1(a.reports, a.epochs, a.text_cache)
    elif a.job == "stage2":
        res = stage2(a.variant, a.labeled, a.unlabeled, a.size, a.steps, a.warmup, a.precision, assets, a.checkpoint,
                     a.unet)
    elif a.job == "infer":
        res = infer(a.size, a.batch, a.steps, a.volumes, depth=24)
    else:
        res = data(a.size, n_images=8 * max(a.batch, 1), workers=a.workers, src_size=512)
    res.update(code=str(code_root()), wall_s=time.perf_counter() - t0, threads=torch.get_num_threads())
    with open(a.out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
