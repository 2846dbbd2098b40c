"""Tests of amvlm_monai.losses.css: w2_pairwise, attention_token_weights, CSSLoss."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.losses import CSSLoss, NonFiniteLossError, attention_token_weights, w2_pairwise

TAU = 0.07
MODES = ("none", "modulate", "soft_targets")


def unit(*deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in deg], dtype=torch.float64)


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def col(mat, k):
    return [r[k] for r in mat]


def cos(a):
    return math.cos(math.radians(a))


# ---------------------------------------------------------------- w2_pairwise
def test_w2_pairwise_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    sig_a, sig_b = torch.rand(2, 3, 5, generator=g) + 0.1, torch.rand(2, 4, 5, generator=g) + 0.1
    got = w2_pairwise(mu_a, sig_a, mu_b, sig_b)
    assert got.shape == (2, 3, 4)
    for b in range(2):
        for n in range(3):
            for m in range(4):
                want = sum(float(mu_a[b, n, d] - mu_b[b, m, d]) ** 2 + float(sig_a[b, n, d] - sig_b[b, m, d]) ** 2
                           for d in range(5))
                assert got[b, n, m].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    # identical distributions are at distance 0, never negative
    same = w2_pairwise(mu_a, sig_a, mu_a, sig_a)
    assert (same >= 0).all() and torch.allclose(same.diagonal(dim1=1, dim2=2), torch.zeros(2, 3), atol=1e-5)


def test_w2_pairwise_by_hand_and_gradients():
    mu_a = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]], requires_grad=True)
    sig_a = torch.tensor([[[1.0, 1.0], [2.0, 1.0]]], requires_grad=True)
    mu_b = torch.tensor([[[3.0, 4.0]]], requires_grad=True)
    sig_b = torch.tensor([[[1.0, 3.0]]], requires_grad=True)
    got = w2_pairwise(mu_a, sig_a, mu_b, sig_b)
    # (0-3)^2+(0-4)^2 + (1-1)^2+(1-3)^2 = 25 + 4; (1-3)^2+(2-4)^2 + (2-1)^2+(1-3)^2 = 8 + 5
    assert got.flatten().tolist() == pytest.approx([29.0, 13.0])
    got.sum().backward()
    for x in (mu_a, sig_a, mu_b, sig_b):
        assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mu_b"):
        w2_pairwise(mu_a, sig_a, mu_b[..., :1], sig_b)
    with pytest.raises(ValueError, match="sig_a"):
        w2_pairwise(mu_a, sig_a[:, :1], mu_b, sig_b)


# ---------------------------------------------------------------- attention_token_weights
def test_attention_weights_by_hand():
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False], [True] * 5])
    w = attention_token_weights(attn, mask)
    # row 0: quantiles over the 4 real values: 10% at position 0.3 -> 0.13, 90% at 2.7 -> 0.37
    assert w[0].tolist() == pytest.approx([0.13, 0.2, 0.3, 0.37, 0.0])
    # row 1: all zero attention -> uniform over the 3 real tokens
    assert w[1].tolist() == pytest.approx([1 / 3] * 3 + [0, 0])
    # row 2: quantiles 0 and 0.3 (90% at position 3.6 between 0 and 0.5) -> [0.3, 0, 0, 0, 0.3] / 0.6
    assert w[2].tolist() == pytest.approx([0.5, 0, 0, 0, 0.5])
    assert torch.allclose(w.sum(1), torch.ones(3))
    wide = attention_token_weights(attn, mask, low=0.0, high=1.0)
    assert wide[0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.0])


def test_attention_weights_padding_and_errors():
    attn, mask = torch.rand(3, 4), torch.tensor([[True, True, False, False], [True] * 4, [True, True, True, False]])
    ref = attention_token_weights(attn, mask)
    pad = torch.cat([torch.where(mask, attn, float("nan")), torch.full((3, 2), 5.0)], 1)
    got = attention_token_weights(pad, torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1))
    assert torch.allclose(got[:, :4], ref) and (got[:, 4:] == 0).all()
    with pytest.raises(ValueError, match="low"):
        attention_token_weights(attn, mask, low=0.9, high=0.1)
    with pytest.raises(ValueError, match="mask"):
        attention_token_weights(attn, mask[:, :2])
    with pytest.raises(ValueError, match="bool"):
        attention_token_weights(attn, mask.float())


# ---------------------------------------------------------------- CSSLoss: by hand
def _hand_inputs():
    patches, att_words = unit(0, 90)[None], unit(30, 120)[None]
    words = torch.cat([unit(10, 80), torch.full((1, 2), 7.0)])[None]  # slot 2 is padding holding garbage
    att_patches = torch.cat([unit(20, 50), torch.full((1, 2), -3.0)])[None]
    mask = torch.tensor([[True, True, False]])
    dists = {
        "patches": (torch.tensor([[[0.0], [1.0]]]), torch.tensor([[[1.0], [1.0]]])),
        "att_words": (torch.tensor([[[0.0], [2.0]]]), torch.tensor([[[2.0], [1.0]]])),
        "words": (torch.tensor([[[0.0], [0.0], [99.0]]]), torch.tensor([[[1.0], [1.0], [99.0]]])),
        "att_patches": (torch.tensor([[[1.0], [3.0], [-99.0]]]), torch.tensor([[[1.0], [1.0], [99.0]]])),
    }
    dists = {k: (m.double(), s.double()) for k, (m, s) in dists.items()}
    return (patches, att_words, words, att_patches, mask), dists


def _hand_terms(s, q1=None, q2=None):
    """Mean over the 2 tokens of (term1 + term2) / 2 for a 2x2 logit matrix s (hard or soft targets)."""
    total = 0.0
    for p in range(2):
        r1, r2 = log_softmax(s[p]), log_softmax(col(s, p))
        t1 = -r1[p] if q1 is None else -sum(q * x for q, x in zip(q1[p], r1))
        t2 = -r2[p] if q2 is None else -sum(q * x for q, x in zip(q2[p], r2))
        total += (t1 + t2) / 2
    return total / 2


# cosine logits of the hand case: rows = tokens, columns = attended tokens
S_V = [[cos(0 - 30) / TAU, cos(0 - 120) / TAU], [cos(90 - 30) / TAU, cos(90 - 120) / TAU]]
S_T = [[cos(10 - 20) / TAU, cos(10 - 50) / TAU], [cos(80 - 20) / TAU, cos(80 - 50) / TAU]]
# W2^2 and ||mu_a - mu_b||^2 of the hand dists (1-D)
DMU_V, W2_V = [[0, 4], [1, 1]], [[0 + 1, 4 + 0], [1 + 1, 1 + 0]]
DMU_T, W2_T = [[1, 9], [1, 9]], [[1, 9], [1, 9]]


def test_css_none_by_hand():
    args, _ = _hand_inputs()
    want = (_hand_terms(S_V) + _hand_terms(S_T)) / 2
    assert CSSLoss(pdt_mode="none")(*args).item() == pytest.approx(want, rel=1e-10)


def test_css_modulate_by_hand():
    args, dists = _hand_inputs()
    eps = 1e-6

    def modulate(s, dmu, w2):
        return [[1 - (1 - s[p][k]) * sigmoid(w2[p][k] / (dmu[p][k] + eps)) for k in range(2)] for p in range(2)]

    want = (_hand_terms(modulate(S_V, DMU_V, W2_V)) + _hand_terms(modulate(S_T, DMU_T, W2_T))) / 2
    assert CSSLoss(pdt_mode="modulate", eps=eps)(*args, dists=dists).item() == pytest.approx(want, rel=1e-9)


def test_css_soft_targets_by_hand():
    args, dists = _hand_inputs()

    def q(w2, t=0.5):
        rows = [[math.exp(-x / t) for x in r] for r in w2]
        return [[x / sum(r) for x in r] for r in rows]

    tr = lambda m: [col(m, 0), col(m, 1)]  # noqa: E731
    want = (_hand_terms(S_V, q(W2_V), q(tr(W2_V))) + _hand_terms(S_T, q(W2_T), q(tr(W2_T)))) / 2
    got = CSSLoss(pdt_mode="soft_targets", soft_temperature=0.5)(*args, dists=dists)
    assert got.item() == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------- CSSLoss: loop reference on random inputs
def _random_case(seed=0, b=3, p=4, w=5, dm=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True, True, True, False, False], [True, True, False, False, False], [True] * 5])[:b, :w]
    args = (rnd(b, p, 6, seed=seed), rnd(b, p, 6, seed=seed + 1), rnd(b, w, 6, seed=seed + 2),
            rnd(b, w, 6, seed=seed + 3), mask)
    n = {"patches": p, "att_words": p, "words": w, "att_patches": w}
    dists = {k: (torch.randn(b, m, dm, generator=g, dtype=torch.float64),
                 torch.rand(b, m, dm, generator=g, dtype=torch.float64) + 0.2) for k, m in n.items()}
    attn = {"patch_attn": torch.rand(b, p, generator=g, dtype=torch.float64),
            "word_attn": torch.rand(b, w, generator=g, dtype=torch.float64)}
    return args, dists, attn


def _ref_weights(att, idx, weighting):
    if weighting == "uniform":
        return {n: 1 / len(idx) for n in idx}
    vals = [float(att[n]) for n in idx]
    qs = statistics.quantiles(vals, n=10, method="inclusive")
    clipped = {n: min(max(float(att[n]), qs[0]), qs[-1]) for n in idx}
    total = sum(clipped.values())
    return {n: c / total for n, c in clipped.items()}


def _css_loop(args, dists, attn, mode, weighting, tau=TAU, eps=1e-6, soft_t=1.0):
    patches, att_words, words, att_patches, mask = args
    per_sample = []
    for i in range(patches.shape[0]):
        parts = []
        for x, a, dx, da, att, idx in (
            (patches, att_words, dists["patches"], dists["att_words"], attn["patch_attn"],
             list(range(patches.shape[1]))),
            (words, att_patches, dists["words"], dists["att_patches"], attn["word_attn"],
             [n for n in range(words.shape[1]) if mask[i, n]]),
        ):
            def w2(n, k):
                return sum(float(dx[0][i, n, d] - da[0][i, k, d]) ** 2 + float(dx[1][i, n, d] - da[1][i, k, d]) ** 2
                           for d in range(dx[0].shape[-1]))

            def dmu(n, k):
                return sum(float(dx[0][i, n, d] - da[0][i, k, d]) ** 2 for d in range(dx[0].shape[-1]))

            s = {(n, k): float(x[i, n] @ a[i, k]) / tau for n in idx for k in idx}
            if mode == "modulate":
                s = {(n, k): 1 - (1 - v) * sigmoid(w2(n, k) / (dmu(n, k) + eps)) for (n, k), v in s.items()}
            wts = _ref_weights(att[i], idx, weighting)
            total = 0.0
            for n in idx:
                r1 = dict(zip(idx, log_softmax([s[n, k] for k in idx])))  # sim(x^n, att^k)
                r2 = dict(zip(idx, log_softmax([s[k, n] for k in idx])))  # sim(att^n, x^k)
                if mode == "soft_targets":
                    q1 = dict(zip(idx, [math.exp(v) for v in log_softmax([-w2(n, k) / soft_t for k in idx])]))
                    q2 = dict(zip(idx, [math.exp(v) for v in log_softmax([-w2(k, n) / soft_t for k in idx])]))
                    t1, t2 = -sum(q1[k] * r1[k] for k in idx), -sum(q2[k] * r2[k] for k in idx)
                else:
                    t1, t2 = -r1[n], -r2[n]
                total += wts[n] * (t1 + t2) / 2
            parts.append(total)
        per_sample.append((parts[0] + parts[1]) / 2)
    return per_sample


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighting", ("uniform", "attention"))
def test_css_matches_loop(mode, weighting):
    args, dists, attn = _random_case(seed=3)
    loss = CSSLoss(temperature=0.1, pdt_mode=mode, token_weighting=weighting, soft_temperature=0.7, reduction="none")
    got = loss(*args, dists=dists, **attn)
    want = _css_loop(args, dists, attn, mode, weighting, tau=0.1, soft_t=0.7)
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    mean = CSSLoss(temperature=0.1, pdt_mode=mode, token_weighting=weighting, soft_temperature=0.7)
    assert mean(*args, dists=dists, **attn).item() == pytest.approx(sum(want) / 3, rel=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_css_padding_invariance(mode):
    args, dists, attn = _random_case(seed=5)
    patches, att_words, words, att_patches, mask = args
    loss = CSSLoss(pdt_mode=mode, token_weighting="attention")
    ref = loss(*args, dists=dists, **attn)
    mask2 = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)

    def pad(x):  # garbage in existing padded slots and in 2 new ones
        x = torch.where(mask[..., None], x, 1e6)
        return torch.cat([x, torch.full((3, 2, x.shape[-1]), float("nan"), dtype=x.dtype)], 1)

    dists2 = {k: ((pad(m), pad(s)) if k in ("words", "att_patches") else (m, s)) for k, (m, s) in dists.items()}
    words2 = pad(words).requires_grad_()
    word_attn2 = torch.cat([torch.where(mask, attn["word_attn"], 50.0), torch.full((3, 2), 7.0).double()], 1)
    got = loss(patches, att_words, words2, pad(att_patches), mask2, dists=dists2, patch_attn=attn["patch_attn"],
               word_attn=word_attn2)
    assert torch.allclose(got, ref, rtol=1e-12)
    got.backward()
    assert torch.isfinite(words2.grad).all() and (words2.grad[~mask2] == 0).all()


def test_css_alignment_lower_than_random():
    eye = torch.eye(4, 8, dtype=torch.float64)[None].expand(2, 4, 8)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])

    def dists(v, tv, t, vt):  # a PDT that keeps the embeddings as means, constant spread
        return {k: (3 * x, torch.ones_like(x)) for k, x in zip(("patches", "att_words", "words", "att_patches"),
                                                            (v, tv, t, vt))}

    for mode in MODES:
        loss = CSSLoss(pdt_mode=mode)
        aligned = (eye, eye, eye, eye)
        random = (eye, rnd(2, 4, 8), eye, rnd(2, 4, 8, seed=1))
        assert loss(*aligned, mask, dists=dists(*aligned)) < loss(*random, mask, dists=dists(*random)), mode


def test_css_options_change_result():
    args, dists, attn = _random_case(seed=7)
    vals = {m: CSSLoss(pdt_mode=m)(*args, dists=dists).item() for m in MODES}
    assert len({round(v, 8) for v in vals.values()}) == 3, vals
    uni = CSSLoss(token_weighting="uniform")(*args, dists=dists, **attn).item()
    att = CSSLoss(token_weighting="attention")(*args, dists=dists, **attn).item()
    assert uni != pytest.approx(att, rel=1e-6)
    soft1 = CSSLoss(pdt_mode="soft_targets", soft_temperature=1.0)(*args, dists=dists).item()
    soft2 = CSSLoss(pdt_mode="soft_targets", soft_temperature=0.1)(*args, dists=dists).item()
    assert soft1 != pytest.approx(soft2, rel=1e-6)
    assert CSSLoss(pdt_mode="none", temperature=0.5)(*args).item() != pytest.approx(vals["none"], rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_css_gradients(mode):
    args, dists, attn = _random_case(seed=2)
    args = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    dists = {k: (m.clone().requires_grad_(), s.clone().requires_grad_()) for k, (m, s) in dists.items()}
    attn = {k: v.clone().requires_grad_() for k, v in attn.items()}
    CSSLoss(pdt_mode=mode, token_weighting="attention")(*args, dists=dists, **attn).backward()
    for x in args[:4]:
        assert x.grad is not None and x.grad.abs().sum() > 0
    for k, (m, s) in dists.items():
        if mode == "none":
            assert m.grad is None and s.grad is None
        else:
            assert m.grad.abs().sum() > 0 and s.grad.abs().sum() > 0, k
            if k in ("words", "att_patches"):
                assert (m.grad[~args[4]] == 0).all()
    assert all(v.grad is None for v in attn.values())  # the token weights are detached


def test_css_errors():
    for kw, name in (({"temperature": 0.0}, "temperature"), ({"pdt_mode": "kl"}, "pdt_mode"),
                     ({"token_weighting": "cls"}, "token_weighting"), ({"soft_temperature": -1.0}, "soft_temperature"),
                     ({"eps": 0.0}, "eps"), ({"reduction": "max"}, "reduction")):
        with pytest.raises(ValueError, match=name):
            CSSLoss(**kw)
    args, dists, attn = _random_case()
    patches, att_words, words, att_patches, mask = args
    with pytest.raises(ValueError, match="needs dists"):
        CSSLoss()(*args)
    with pytest.raises(ValueError, match="att_patches"):
        CSSLoss()(*args, dists={k: v for k, v in dists.items() if k != "att_patches"})
    with pytest.raises(ValueError, match="words"):
        CSSLoss()(*args, dists={**dists, "words": (dists["words"][0][:, :2], dists["words"][1])})
    with pytest.raises(ValueError, match="mu dims"):
        CSSLoss()(*args, dists={**dists, "patches": (dists["patches"][0][..., :2], dists["patches"][1][..., :2])})
    with pytest.raises(ValueError, match="patch_attn"):
        CSSLoss(pdt_mode="none", token_weighting="attention")(*args)
    with pytest.raises(ValueError, match="word_attn"):
        CSSLoss(pdt_mode="none", token_weighting="attention")(*args, patch_attn=attn["patch_attn"],
                                                             word_attn=attn["word_attn"][:, :2])
    with pytest.raises(ValueError, match="att_words"):
        CSSLoss(pdt_mode="none")(patches, att_words[:, :2], words, att_patches, mask)
    with pytest.raises(ValueError, match="att_patches"):
        CSSLoss(pdt_mode="none")(patches, att_words, words, att_patches[..., :2], mask)
    with pytest.raises(ValueError, match="word_mask"):
        CSSLoss(pdt_mode="none")(patches, att_words, words, att_patches, mask.float())
    bad = patches.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="CSSLoss"):
        CSSLoss(pdt_mode="none")(bad, att_words, words, att_patches, mask)
    bad_d = {**dists, "att_words": (dists["att_words"][0], dists["att_words"][1] * float("inf"))}
    with pytest.raises(FloatingPointError, match="CSSLoss"):
        CSSLoss(pdt_mode="soft_targets")(*args, dists=bad_d)


def test_css_autocast_float32():
    args, dists, _ = _random_case()
    args = [a.float() if a.is_floating_point() else a for a in args]
    dists = {k: (m.float(), s.float()) for k, (m, s) in dists.items()}
    ref = CSSLoss()(*args, dists=dists)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = CSSLoss()(*args, dists=dists)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.parametrize("mode", ("modulate", "soft_targets"))
def test_css_gradcheck(mode):
    args, dists, attn = _random_case(seed=4, b=2, p=2, w=3, dm=2)
    loss = CSSLoss(temperature=0.5, pdt_mode=mode, token_weighting="attention")
    names = list(dists)

    def f(patches, words, *flat):
        d = {k: (flat[2 * i], flat[2 * i + 1]) for i, k in enumerate(names)}
        return loss(patches, args[1], words, args[3], args[4], dists=d, **attn)

    inputs = [args[0], args[2]] + [x for k in names for x in dists[k]]
    assert torch.autograd.gradcheck(f, [x.clone().requires_grad_() for x in inputs], fast_mode=True)
