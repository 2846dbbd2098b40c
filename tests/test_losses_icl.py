"""Tests of amvlm_monai.losses.icl.ICLLoss."""

import math

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.losses import ICLLoss, NonFiniteLossError

TAU = 0.07
TERMS = ("coarse_image", "coarse_text", "fine_image", "fine_text")


def unit(*deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in deg], dtype=torch.float64)


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def c(a):
    return math.cos(math.radians(a))


def ce(sims, target, tau=TAU):
    return math.log(sum(math.exp(s / tau) for s in sims)) - sims[target] / tau


def _hand_inputs():
    garbage = [[5.0, -5.0]]
    words_aug = torch.stack([torch.cat([unit(35, 200), torch.tensor(garbage, dtype=torch.float64)]),
                             torch.cat([unit(160), torch.tensor(garbage * 2, dtype=torch.float64)])])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return (unit(0, 90), unit(20, 80), torch.stack([unit(10, 60), unit(100, 45)]),
            unit(30, 150), unit(40, 170), words_aug, mask)


def test_icl_by_hand():
    coarse_image = (ce([c(0 - 20), c(0 - 80)], 0) + ce([c(90 - 20), c(90 - 80)], 1)) / 2
    coarse_text = (ce([c(30 - 40), c(30 - 170)], 0) + ce([c(150 - 40), c(150 - 170)], 1)) / 2
    # fine image: for patch slot p, CLS i must pick its own augmented patch p among patches p of the batch
    fine_image = (ce([c(0 - 10), c(0 - 100)], 0) + ce([c(90 - 10), c(90 - 100)], 1)
                  + ce([c(0 - 60), c(0 - 45)], 0) + ce([c(90 - 60), c(90 - 45)], 1)) / 4
    # fine text: slot 0 real in both texts; slot 1 real only in text 0 (a softmax over itself: 0); slot 2 padding
    fine_text = (ce([c(30 - 35), c(30 - 160)], 0) + ce([c(150 - 35), c(150 - 160)], 1) + 0.0) / 3
    loss, terms = ICLLoss(return_terms=True)(*_hand_inputs())
    want = dict(zip(TERMS, (coarse_image, coarse_text, fine_image, fine_text)))
    for k in TERMS:
        assert terms[k].item() == pytest.approx(want[k], rel=1e-10), k
    assert loss.item() == pytest.approx(sum(want.values()) / 4, rel=1e-10)
    assert ICLLoss()(*_hand_inputs()).item() == pytest.approx(loss.item(), rel=1e-12)
    assert ICLLoss(temperature=0.5)(*_hand_inputs()).item() != pytest.approx(loss.item())


def _icl_loop(img, img_a, patches_a, txt, txt_a, words_a, mask, tau=TAU):
    """Per-term Python loop: the independent formulation of L_ICL."""
    b = img.shape[0]
    sim = lambda x, y: float(x @ y)  # noqa: E731
    coarse = [sum(ce([sim(q[i], k[j]) for j in range(b)], i, tau) for i in range(b)) / b
              for q, k in ((img, img_a), (txt, txt_a))]
    fine = []
    for q, toks, m in ((img, patches_a, torch.ones(patches_a.shape[:2], dtype=torch.bool)), (txt, words_a, mask)):
        total, count = 0.0, 0
        for i in range(b):
            for p in range(toks.shape[1]):
                if not m[i, p]:
                    continue
                js = [j for j in range(b) if m[j, p]]
                total += ce([sim(q[i], toks[j, p]) for j in js], js.index(i), tau)
                count += 1
        fine.append(total / count)
    return dict(zip(TERMS, coarse + fine))


def _random_case(seed=0):
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False],
                         [True, True, True, True, False]])
    return (rnd(3, 6, seed=seed), rnd(3, 6, seed=seed + 1), rnd(3, 4, 6, seed=seed + 2), rnd(3, 6, seed=seed + 3),
            rnd(3, 6, seed=seed + 4), rnd(3, 5, 6, seed=seed + 5), mask)


def test_icl_matches_loop():
    for seed in (0, 20):
        args = _random_case(seed)
        loss, terms = ICLLoss(temperature=0.2, return_terms=True)(*args)
        want = _icl_loop(*args, tau=0.2)
        for k in TERMS:
            assert terms[k].item() == pytest.approx(want[k], rel=1e-10), k
        assert loss.item() == pytest.approx(sum(want.values()) / 4, rel=1e-10)


def test_icl_padding_invariance_and_gradients():
    args = [a.clone().requires_grad_() if a.is_floating_point() else a for a in _random_case()]
    mask = args[-1]
    ref = ICLLoss()(*args)
    words2 = torch.cat([torch.where(mask[..., None], args[5], -1e6),
                        torch.full((3, 2, 6), float("nan"), dtype=torch.float64)], 1)
    words2 = words2.detach().requires_grad_()
    mask2 = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
    got = ICLLoss()(*args[:5], words2, mask2)
    assert torch.allclose(got, ref, rtol=1e-12)
    got.backward()
    assert torch.isfinite(words2.grad).all() and (words2.grad[~mask2] == 0).all() and words2.grad.abs().sum() > 0
    ref.backward()
    for x in args[:6]:  # every input, the augmented (momentum) side included: the caller decides what is detached
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_icl_alignment_lower_than_random():
    cls = torch.eye(3, 6, dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    aligned = ICLLoss()(cls, cls, cls[:, None].expand(3, 4, 6), cls, cls, cls[:, None].expand(3, 2, 6), mask)
    random = ICLLoss()(cls, rnd(3, 6), rnd(3, 4, 6, seed=1), cls, rnd(3, 6, seed=2), rnd(3, 2, 6, seed=3), mask)
    assert aligned < random


def test_icl_errors():
    with pytest.raises(ValueError, match="temperature"):
        ICLLoss(temperature=-0.1)
    with pytest.raises(ValueError, match="return_terms"):
        ICLLoss(return_terms="yes")
    img, img_a, pa, txt, txt_a, wa, mask = _random_case()
    with pytest.raises(ValueError, match="img_cls_aug"):
        ICLLoss()(img, img_a[:2], pa, txt, txt_a, wa, mask)
    with pytest.raises(ValueError, match="patches_aug"):
        ICLLoss()(img, img_a, pa[..., :3], txt, txt_a, wa, mask)
    with pytest.raises(ValueError, match="txt_cls"):
        ICLLoss()(img, img_a, pa, txt[:, :3], txt_a, wa, mask)
    with pytest.raises(ValueError, match="words_aug"):
        ICLLoss()(img, img_a, pa, txt, txt_a, wa[:2], mask)
    with pytest.raises(ValueError, match="word_mask_aug"):
        ICLLoss()(img, img_a, pa, txt, txt_a, wa, mask[:, :3])
    with pytest.raises(ValueError, match="bool"):
        ICLLoss()(img, img_a, pa, txt, txt_a, wa, mask.int())
    bad = pa.clone()
    bad[0, 1, 2] = float("inf")
    with pytest.raises(NonFiniteLossError, match="ICLLoss"):
        ICLLoss()(img, img_a, bad, txt, txt_a, wa, mask)


def test_icl_autocast_float32():
    args = [a.float() if a.is_floating_point() else a for a in _random_case()]
    ref = ICLLoss()(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ICLLoss()(*args)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
