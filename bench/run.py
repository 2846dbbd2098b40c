"""Benchmarks: each reported as a ratio against a baseline measured in the same run, on this machine.

1. Stage-2 step with the frozen text tower's features cached per distinct report (ours) vs encoding the reports
   every step (what a straightforward implementation, and the authors' code, does).
2. Pairwise 2-Wasserstein matrix by the ||a||^2 + ||b||^2 - 2ab expansion (ours) vs broadcasting (B, N, M, D)
   differences: time and peak memory of the intermediate.
3. ViT attention through the fused `scaled_dot_product_attention` (ours, every block) vs the explicit softmax path.

Usage: python bench/run.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPORTS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, medium upper right lung.",
    "Unilateral pulmonary infection, one infected area, small lower left lung.",
    "No lesion is visible.",
]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_text_cache(repeats: int) -> dict:
    from amvlm_monai.networks.guidance import PatchEncoder, TextGuidance
    from amvlm_monai.losses.text_guided import TextGuidedLoss
    from amvlm_monai.networks.amvlm import AMVLM
    from amvlm_monai.networks.mask_generator import TextMaskGenerator

    torch.manual_seed(0)
    amvlm = AMVLM.from_preset("small", with_momentum=False, text_layers=6)
    gen = TextMaskGenerator(PatchEncoder(amvlm), tuple(amvlm.image_encoder.grid_size), amvlm.config["embed_dim"])
    guidance = TextGuidance(amvlm, gen, TextGuidedLoss())
    images = torch.randn(16, 1, 64, 64)
    texts = [REPORTS[i % len(REPORTS)] for i in range(16)]

    def cached():
        _, tg = guidance(images, texts)
        tg.backward()

    def uncached():
        guidance._cache.clear()
        _, tg = guidance(images, texts)
        tg.backward()

    t_cached, t_uncached = timed(cached, repeats), timed(uncached, repeats)
    return {"name": "stage-2 guidance step, text features cached vs encoded every step (6-layer MiniLM, 16 x 64 px)",
            "ours_s": t_cached, "baseline_s": t_uncached, "speedup": t_uncached / t_cached}


def bench_w2(repeats: int) -> dict:
    from amvlm_monai.losses.css import w2_pairwise

    torch.manual_seed(0)
    b, n, m, d = 32, 196, 20, 128
    mu_a, sig_a, mu_b, sig_b = (torch.randn(b, k, d) for k in (n, n, m, m))

    def broadcast():
        return ((mu_a[:, :, None] - mu_b[:, None]) ** 2).sum(-1) + ((sig_a[:, :, None] - sig_b[:, None]) ** 2).sum(-1)

    assert torch.allclose(w2_pairwise(mu_a, sig_a, mu_b, sig_b), broadcast(), rtol=1e-4, atol=1e-3)
    t_ours = timed(lambda: w2_pairwise(mu_a, sig_a, mu_b, sig_b), repeats)
    t_base = timed(broadcast, repeats)
    bytes_base = b * n * m * d * 4  # the (B, N, M, D) difference tensor the broadcast builds
    bytes_ours = b * n * m * 4 * 3  # (B, N, M) products and the result
    return {"name": f"pairwise W2 ({b} x {n} patches x {m} words x {d}), expansion vs broadcast",
            "ours_s": t_ours, "baseline_s": t_base, "speedup": t_base / t_ours,
            "memory_ratio": bytes_base / bytes_ours}


def bench_attention(repeats: int) -> dict:
    from amvlm_monai.networks.vit import Attention, ViTEncoder

    torch.manual_seed(0)
    vit = ViTEncoder(img_size=224, patch_size=16, in_channels=1, hidden_size=384, num_layers=6, num_heads=6,
                     mlp_dim=1536).eval()
    x = torch.randn(8, 1, 224, 224)

    def run(fused: bool):
        Attention.fused_attn = fused
        with torch.no_grad():
            return vit(x)

    try:
        out_f, out_e = run(True), run(False)
        assert torch.allclose(out_f.tokens, out_e.tokens, atol=1e-4)
        t_fused = timed(lambda: run(True), repeats)
        t_explicit = timed(lambda: run(False), repeats)
    finally:
        Attention.fused_attn = True
    return {"name": "ViT-S/16 forward at 224 px, batch 8: fused SDPA vs explicit attention",
            "ours_s": t_fused, "baseline_s": t_explicit, "speedup": t_explicit / t_fused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    results = [bench_text_cache(args.repeats), bench_w2(args.repeats), bench_attention(args.repeats)]
    print(f"{'benchmark':<100} {'ours':>9} {'baseline':>9} {'ratio':>7}")
    for r in results:
        extra = f"  memory x{r['memory_ratio']:.0f}" if "memory_ratio" in r else ""
        print(f"{r['name']:<100} {r['ours_s']:8.4f}s {r['baseline_s']:8.4f}s {r['speedup']:6.2f}x{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
