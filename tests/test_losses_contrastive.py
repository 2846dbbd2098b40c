"""Tests of amvlm_monai.losses.contrastive: info_nce, L_ita, L_local."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.losses import (
    ImageTextContrastiveLoss,
    LocalGlobalLoss,
    NonFiniteLossError,
    PooledPatchTextLoss,
    info_nce,
)
from amvlm_monai.losses.contrastive import variance_weights

TAU = 0.07


def unit(*deg):
    """Unit vectors (len(deg), 2) at the given angles in degrees."""
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in deg], dtype=torch.float64)


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def ce(sims, target, tau=TAU):
    """-log softmax(sims / tau)[target], written out."""
    return math.log(sum(math.exp(s / tau) for s in sims)) - sims[target] / tau


# ---------------------------------------------------------------- info_nce
def test_info_nce_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    want = [math.log(math.exp(2) + 1) - 2, math.log(math.e + math.exp(3)) - 3]
    assert torch.allclose(info_nce(logits), torch.tensor(want), atol=1e-6)
    got = info_nce(logits, torch.tensor([1, 0]))
    assert torch.allclose(got, torch.tensor([math.log(math.exp(2) + 1), math.log(math.e + math.exp(3)) - 1]))


def test_info_nce_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        info_nce(torch.zeros(3))
    with pytest.raises(ValueError, match="targets"):
        info_nce(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="N <= M"):
        info_nce(torch.zeros(3, 2))


# ---------------------------------------------------------------- L_ita
def test_ita_by_hand():
    img, txt = unit(0, 90), unit(30, 100)
    # S_ij = cos(angle(img_i) - angle(txt_j))
    c = lambda a: math.cos(math.radians(a))  # noqa: E731
    s = [[c(0 - 30), c(0 - 100)], [c(90 - 30), c(90 - 100)]]
    i2t = [ce(s[0], 0), ce(s[1], 1)]
    t2i = [ce([s[0][0], s[1][0]], 0), ce([s[0][1], s[1][1]], 1)]
    want = (sum(i2t) / 2 + sum(t2i) / 2) / 2
    assert ImageTextContrastiveLoss()(img, txt).item() == pytest.approx(want, rel=1e-10)
    none = ImageTextContrastiveLoss(reduction="none")(img, txt)
    assert none.shape == (2,)
    assert none[1].item() == pytest.approx((i2t[1] + t2i[1]) / 2, rel=1e-10)
    assert ImageTextContrastiveLoss(reduction="sum")(img, txt).item() == pytest.approx(2 * want, rel=1e-10)
    assert ImageTextContrastiveLoss(temperature=0.5)(img, txt).item() != pytest.approx(want)


def test_ita_alignment_and_gradients():
    x = torch.eye(4, 8, dtype=torch.float64)
    loss = ImageTextContrastiveLoss()
    assert loss(x, x) < loss(x, rnd(4, 8))
    img, txt = rnd(4, 8, seed=1).requires_grad_(), rnd(4, 8, seed=2).requires_grad_()
    loss(img, txt).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


def test_ita_errors():
    for kw in ({"temperature": 0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"reduction": "max"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            ImageTextContrastiveLoss(**kw)
    with pytest.raises(ValueError, match="txt"):
        ImageTextContrastiveLoss()(rnd(2, 4), rnd(3, 4))
    with pytest.raises(ValueError, match="img"):
        ImageTextContrastiveLoss()(rnd(2, 4, 1), rnd(2, 4))
    bad = rnd(2, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="ImageTextContrastiveLoss"):
        ImageTextContrastiveLoss()(bad, rnd(2, 4))
    bad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        ImageTextContrastiveLoss()(bad, rnd(2, 4))


def test_ita_autocast_float32():
    img, txt = rnd(4, 8).float(), rnd(4, 8, seed=3).float()
    ref = ImageTextContrastiveLoss()(img, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ImageTextContrastiveLoss()(img, txt)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    got16 = ImageTextContrastiveLoss()(img.bfloat16(), txt.bfloat16())
    assert got16.dtype == torch.float32 and torch.allclose(got16, ref, rtol=0.05)


# ---------------------------------------------------------------- L_local
def _local_case():
    """B=3, P=2, W=3 (sample 1 has one real word, sample 2 two); CLS at 0, 90, 180 degrees."""
    patches = torch.stack([unit(0, 45), unit(90, 90), unit(180, 135)])
    words = torch.stack([unit(0, 90, 7), unit(90, 11, 13), unit(180, 45, 17)])
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, False]])
    cls = unit(0, 90, 180)
    return patches, cls, words, mask, cls.clone()


def test_local_by_hand():
    patches, img_cls, words, mask, txt_cls = _local_case()
    h = math.sqrt(0.5)
    # image side: sims of each patch to t_j^cls (0, 90, 180 deg), its weight = var over j != i / max in the sample
    # sample 0: 0deg -> [1, 0, -1], negatives (0, -1) var .25; 45deg -> [h, h, -h], negatives (h, -h) var .5
    # sample 1: both 90deg -> [0, 1, 0], negatives (0, 0) var 0 -> flat sample: weights 1
    # sample 2: 180deg -> [-1, 0, 1], negatives (-1, 0) var .25; 135deg -> [-h, h, h], negatives (-h, h) var .5
    l_img = (0.5 * ce([1, 0, -1], 0) + 1.0 * ce([h, h, -h], 0)
             + ce([0, 1, 0], 1) + ce([0, 1, 0], 1)
             + 0.5 * ce([-1, 0, 1], 2) + 1.0 * ce([-h, h, h], 2)) / 6
    # text side (5 real words): sample 0: 0deg [1, 0, -1] var .25, 90deg [0, 1, 0] negatives (1, 0) var .25 -> 1, 1
    # sample 1: 90deg, a single real word, negatives (0, 0) -> flat -> 1
    # sample 2: 180deg [-1, 0, 1] negatives (-1, 0) var .25 -> 1; 45deg [h, h, -h] negatives (h, h) var 0 -> 0
    l_txt = (ce([1, 0, -1], 0) + ce([0, 1, 0], 0) + ce([0, 1, 0], 1) + ce([-1, 0, 1], 2) + 0.0) / 5
    got = LocalGlobalLoss()(patches, img_cls, words, mask, txt_cls)
    assert got.item() == pytest.approx((l_img + l_txt) / 2, rel=1e-10)


def _local_loop(patches, img_cls, words, mask, txt_cls, tau=TAU):
    """Per-token Python loop: the independent formulation of L_local."""
    b = patches.shape[0]

    def side(tokens, real, glob):
        total, count = 0.0, 0
        for i in range(b):
            idx = [n for n in range(tokens.shape[1]) if real[i][n]]
            sims = {n: [float(tokens[i, n] @ glob[j]) for j in range(b)] for n in idx}
            var = {n: statistics.pvariance([s for j, s in enumerate(sims[n]) if j != i]) for n in idx}
            vmax = max(var.values())
            for n in idx:
                w = var[n] / vmax if vmax > 1e-12 else 1.0
                total += w * ce(sims[n], i, tau)
                count += 1
        return total / count

    p_real = [[True] * patches.shape[1]] * b
    return (side(patches, p_real, txt_cls) + side(words, mask.tolist(), img_cls)) / 2


def _local_random(seed=0):
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False],
                         [True, True, True, True, True]])
    return (rnd(3, 4, 6, seed=seed), rnd(3, 6, seed=seed + 1), rnd(3, 5, 6, seed=seed + 2), mask,
            rnd(3, 6, seed=seed + 3))


def test_local_matches_loop():
    for seed in (0, 10):
        args = _local_random(seed)
        got = LocalGlobalLoss(temperature=0.2)(*args)
        assert got.item() == pytest.approx(_local_loop(*args, tau=0.2), rel=1e-9)


def test_local_padding_invariance():
    patches, img_cls, words, mask, txt_cls = _local_random()
    ref = LocalGlobalLoss()(patches, img_cls, words, mask, txt_cls)
    garbage = torch.full((3, 2, 6), float("nan"), dtype=torch.float64)
    words2 = torch.cat([torch.where(mask[..., None], words, 1e6), garbage], 1).requires_grad_()
    mask2 = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
    got = LocalGlobalLoss()(patches, img_cls, words2, mask2, txt_cls)
    assert torch.allclose(got, ref, rtol=1e-12)
    got.backward()
    assert torch.isfinite(words2.grad).all() and (words2.grad[~mask2] == 0).all()


def test_local_alignment_gradients_and_weights():
    cls = torch.eye(4, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 3, [True, True, False], [True] * 3, [True, False, False]])
    aligned = LocalGlobalLoss()(cls[:, None].expand(4, 5, 8), cls, cls[:, None].expand(4, 3, 8), mask, cls)
    randl = LocalGlobalLoss()(rnd(4, 5, 8), cls, rnd(4, 3, 8, seed=1), mask, cls)
    assert aligned < randl
    inputs = [rnd(4, 5, 8).requires_grad_(), rnd(4, 8, seed=1).requires_grad_(),
              rnd(4, 3, 8, seed=2).requires_grad_(), rnd(4, 8, seed=3).requires_grad_()]
    LocalGlobalLoss()(inputs[0], inputs[1], inputs[2], mask, inputs[3]).backward()
    for x in inputs:
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert (inputs[2].grad[~mask] == 0).all()
    w = variance_weights((inputs[0] @ inputs[3].T), torch.ones(4, 5, dtype=torch.bool))
    assert not w.requires_grad and w.min() >= 0 and torch.allclose(w.amax(1), torch.ones(4, dtype=w.dtype))


def test_local_temperature_changes_result():
    args = _local_random()
    assert LocalGlobalLoss(0.07)(*args).item() != pytest.approx(LocalGlobalLoss(0.5)(*args).item())


def test_local_errors():
    with pytest.raises(ValueError, match="temperature"):
        LocalGlobalLoss(temperature=0.0)
    patches, img_cls, words, mask, txt_cls = _local_random()
    with pytest.raises(ValueError, match="img_cls"):
        LocalGlobalLoss()(patches, img_cls[:2], words, mask, txt_cls)
    with pytest.raises(ValueError, match="words"):
        LocalGlobalLoss()(patches, img_cls, words[..., :3], mask, txt_cls)
    with pytest.raises(ValueError, match="word_mask"):
        LocalGlobalLoss()(patches, img_cls, words, mask[:, :2], txt_cls)
    with pytest.raises(ValueError, match="bool"):
        LocalGlobalLoss()(patches, img_cls, words, mask.long(), txt_cls)
    with pytest.raises(ValueError, match="txt_cls"):
        LocalGlobalLoss()(patches, img_cls, words, mask, txt_cls[:, :2])
    patches = patches.clone()
    patches[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="LocalGlobalLoss"):
        LocalGlobalLoss()(patches, img_cls, words, mask, txt_cls)


def test_local_autocast_float32():
    args = [a.float() if a.is_floating_point() else a for a in _local_random()]
    ref = LocalGlobalLoss()(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LocalGlobalLoss()(*args)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


# ---------------------------------------------------------------- L_mil (pooled patch-report contrast)
def test_mil_by_hand():
    # two images of two 2-d patches, two reports; S_ij = tau_p log(exp(s_i1j / tau_p) + exp(s_i2j / tau_p))
    patches = torch.stack([unit(0, 90), unit(180, 45)])
    txt = unit(10, 60)
    c = lambda a: math.cos(math.radians(a))  # noqa: E731
    tp = 0.2
    pool = lambda a, b: tp * math.log(math.exp(c(a) / tp) + math.exp(c(b) / tp))  # noqa: E731
    s = [[pool(0 - 10, 90 - 10), pool(0 - 60, 90 - 60)], [pool(180 - 10, 45 - 10), pool(180 - 60, 45 - 60)]]
    i2t = [ce(s[0], 0), ce(s[1], 1)]
    t2i = [ce([s[0][0], s[1][0]], 0), ce([s[0][1], s[1][1]], 1)]
    want = (sum(i2t) + sum(t2i)) / 4
    assert PooledPatchTextLoss(pool_temperature=tp)(patches, txt).item() == pytest.approx(want, rel=1e-10)


def _mil_loop(patches, txt, tau=TAU, tp=0.2):
    """L_mil written with loops: pooled scores by an explicit sum of exponentials, then row and column InfoNCE."""
    b, p, _ = patches.shape
    s = [[tp * math.log(sum(math.exp(float(patches[i, q] @ txt[j]) / tp) for q in range(p))) for j in range(b)]
         for i in range(b)]
    i2t = sum(ce(s[i], i, tau) for i in range(b)) / b
    t2i = sum(ce([s[k][j] for k in range(b)], j, tau) for j in range(b)) / b
    return (i2t + t2i) / 2


@pytest.mark.parametrize("tp", [0.05, 0.2, 1.0])
def test_mil_matches_loop(tp):
    patches, txt = rnd(5, 7, 6, seed=1), rnd(5, 6, seed=2)
    got = PooledPatchTextLoss(pool_temperature=tp)(patches, txt).item()
    assert got == pytest.approx(_mil_loop(patches, txt, tp=tp), rel=1e-12)


def test_mil_pooling_limits():
    patches, txt = rnd(4, 9, 5, seed=3), rnd(4, 5, seed=4)
    sim = torch.einsum("bpd,nd->bpn", patches, txt)
    # a small tau_p pools by the maximum; a large one by the mean (+ tau_p log P)
    assert torch.allclose(PooledPatchTextLoss(pool_temperature=1e-4).pooled(patches, txt), sim.amax(1), atol=1e-3)
    big = PooledPatchTextLoss(pool_temperature=1e4).pooled(patches, txt)
    assert torch.allclose(big - 1e4 * math.log(9), sim.mean(1), atol=1e-3)
    # the maximum sees only the best patch: changing another patch leaves max-pooled scores alone
    worst = sim[0, :, 0].argmin()
    moved = patches.clone()
    moved[0, worst] = -txt[0]
    tight = PooledPatchTextLoss(pool_temperature=1e-4)
    assert torch.allclose(tight.pooled(moved, txt)[0, 0], tight.pooled(patches, txt)[0, 0], atol=1e-3)


def test_mil_rewards_the_lesion_patch_and_penalises_background_that_matches_every_report():
    torch.manual_seed(0)
    shared = torch.eye(8, dtype=torch.float64)[0]  # reports share a component ("infection", "lung"), as real ones do
    txt = F.normalize(shared + 0.25 * torch.randn(4, 8, dtype=torch.float64), dim=-1)
    common = F.normalize(txt.mean(0), dim=0)  # similar to every report
    null = torch.linalg.svd(txt)[2][-1]  # orthogonal to every report
    assert (txt @ common > 0.3).all() and torch.allclose(txt @ null, torch.zeros(4, dtype=torch.float64), atol=1e-12)

    def images(background, lesion=True):
        x = background.expand(4, 6, 8).clone()
        if lesion:
            x[:, 0] = txt  # each image's "lesion" patch matches its own report
        return x

    loss = PooledPatchTextLoss()
    # a patch that matches its report lowers the loss; background that matches every report raises it
    assert loss(images(null), txt) < loss(images(null, lesion=False), txt)
    assert loss(images(null), txt) < loss(images(common), txt)


def test_mil_errors_and_autocast():
    with pytest.raises(ValueError, match="pool_temperature"):
        PooledPatchTextLoss(pool_temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        PooledPatchTextLoss(temperature=-1.0)
    patches, txt = rnd(3, 4, 5), rnd(3, 5)
    with pytest.raises(ValueError, match="txt"):
        PooledPatchTextLoss()(patches, txt[:2])
    with pytest.raises(ValueError, match="patches"):
        PooledPatchTextLoss()(patches[0], txt)
    bad = patches.clone()
    bad[1, 2, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="PooledPatchTextLoss"):
        PooledPatchTextLoss()(bad, txt)
    ref = PooledPatchTextLoss()(patches.float(), txt.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = PooledPatchTextLoss()(patches.float(), txt.float())
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_every_loss_with_a_reduction_honours_it_or_is_a_plain_module():
    """``_Loss`` promises ``reduction``: each subclass in the package takes it as an argument and stores it; the
    losses whose means run over tokens of the whole batch are plain modules instead."""
    import importlib
    import inspect
    import pkgutil

    import amvlm_monai.losses as pkg
    from torch.nn.modules.loss import _Loss

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"amvlm_monai.losses.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, torch.nn.Module):
                found[name] = cls
    losses = {n for n, c in found.items() if issubclass(c, _Loss)}
    assert {"ImageTextContrastiveLoss", "CSSLoss", "ConsistencyLoss", "TextGuidedLoss"} <= losses
    assert {"LocalGlobalLoss", "PooledPatchTextLoss", "ICLLoss"} & losses == set()
    for name in losses:
        assert "reduction" in inspect.signature(found[name]).parameters, name
        with pytest.raises(ValueError, match="reduction"):
            found[name](reduction="average")
