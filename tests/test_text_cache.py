"""The row cache of a frozen text tower (TextEncoder) and the momentum text view of a frozen tower (AMVLM).

Each cached output is checked against an uncached encoder with the same weights; the model's forward calls are counted
to see which rows were really run."""

import math

import pytest
import torch
from conftest import REPORTS, TINY

from amvlm_monai.networks.text import TextEncoder

MORE = REPORTS + ["Small lower right lung.", "Two infected areas."]  # 6 reports of 3 to 17 words


@pytest.fixture
def pair():
    """A frozen 1-layer MiniLM with a cache and an uncached twin with the same weights, and a row counter."""
    torch.manual_seed(0)
    enc = TextEncoder(max_length=24, num_layers=1, cache_size=100).requires_grad_(False).eval()
    ref = TextEncoder(max_length=24, num_layers=1, cache_size=0).requires_grad_(False).eval()
    ref.load_state_dict(enc.state_dict())
    rows = []
    enc.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return enc, ref, rows


def _same(out, ref, atol=1e-5):
    assert torch.equal(out.mask, ref.mask)
    for name in ("cls", "tokens", "attn"):
        a, b = getattr(out, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)
    assert (out.tokens[~out.mask] == 0).all() and (out.attn[~out.mask] == 0).all()


def _enc(enc, texts):
    return enc(**enc.tokenize(texts))


def test_cached_rows_equal_the_uncached_batch(pair):
    enc, ref, rows = pair
    first = [MORE[i] for i in (0, 1, 2, 3)]
    _enc(enc, first)  # first call under these weights: not cached
    _enc(enc, first)  # all four run and are kept
    assert enc.cache_info()["size"] == 4 and rows == [4, 4]
    mixed = [MORE[i] for i in (2, 4, 2, 0, 5, 1, 4)]  # cached, new, repeated; lengths 17, 3, 5, ...
    out = _enc(enc, mixed)
    assert rows[-1] == 2  # only the two new distinct reports ran, in one batch
    _same(out, _enc(ref, mixed))
    assert enc.cache_info()["size"] == 6
    again = _enc(enc, mixed[::-1])
    assert len(rows) == 3  # everything from the cache: the model did not run
    _same(again, _enc(ref, mixed[::-1]))
    assert enc.cache_info()["hits"] == 5 + 7 and enc.cache_info()["misses"] == 4 + 4 + 2


def test_a_trainable_or_training_tower_never_caches(pair):
    enc, _, rows = pair
    enc.requires_grad_(True)
    for _ in range(3):
        out = _enc(enc, REPORTS)
        assert out.cls.requires_grad and out.tokens.requires_grad
    assert rows == [4, 4, 4] and enc.cache_info()["size"] == 0
    enc.requires_grad_(False).train()  # frozen but with dropout: outputs are random
    for _ in range(3):
        _enc(enc, REPORTS)
    assert rows[3:] == [4, 4, 4] and enc.cache_info()["size"] == 0


def _fill(enc):
    for _ in range(2):
        _enc(enc, REPORTS)
    assert enc.cache_info()["size"] == 4


def test_unfreezing_and_training_clears_the_cache(pair):
    """A fused Adam step does not move the parameters' version counters: only the clear on a trainable call keeps
    the old outputs from coming back after the tower is frozen again."""
    enc, ref, _ = pair
    _fill(enc)
    enc.requires_grad_(True)
    params = [p for p in enc.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2, fused=True)
    out = _enc(enc, REPORTS)
    assert enc.cache_info()["size"] == 0
    (out.cls.sum() + out.tokens.sum()).backward()
    opt.step()
    enc.requires_grad_(False)
    ref.load_state_dict(enc.state_dict())
    _enc(enc, REPORTS)
    _same(_enc(enc, REPORTS), _enc(ref, REPORTS))


def test_load_state_dict_and_in_place_changes_clear_the_cache(pair):
    enc, ref, _ = pair
    _fill(enc)
    old = _enc(enc, REPORTS).cls
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in enc.state_dict().items()}
    enc.load_state_dict(state)
    assert enc.cache_info()["size"] == 0
    ref.load_state_dict(state)
    _same(_enc(enc, REPORTS), _enc(ref, REPORTS))
    assert not torch.allclose(_enc(enc, REPORTS).cls, old)
    _fill(enc)
    with torch.no_grad():  # an EMA-like in-place step, no load: the version counter moves
        enc.model.embeddings.word_embeddings.weight.mul_(0.5)
        ref.model.embeddings.word_embeddings.weight.mul_(0.5)
    _same(_enc(enc, REPORTS), _enc(ref, REPORTS))
    enc.load_state_dict(enc.state_dict(), assign=True)
    assert enc.cache_info()["size"] == 0


def test_to_another_dtype_clears_the_cache(pair):
    enc, ref, _ = pair
    _fill(enc)
    enc.double()
    assert enc.cache_info()["size"] == 0
    for _ in range(3):
        out = _enc(enc, REPORTS)
    assert out.cls.dtype == torch.float64
    _same(out, _enc(ref.double(), REPORTS), atol=1e-10)


def test_lru_bound(pair):
    enc, ref, _ = pair
    enc.cache_size = 3
    _enc(enc, MORE[:2])  # not cached (first call)
    _enc(enc, MORE[:2])
    _enc(enc, [MORE[2]])
    _enc(enc, [MORE[0]])  # touched: now the most recent
    _enc(enc, [MORE[3]])  # evicts MORE[1], the least recently used
    keys = [k for k in enc._cache]
    assert len(keys) == 3
    _, _, rows = pair
    n = len(rows)
    _enc(enc, [MORE[0], MORE[2], MORE[3]])
    assert len(rows) == n  # all three kept
    _enc(enc, [MORE[1]])
    assert rows[-1] == 1 and enc.cache_info()["size"] == 3
    big = MORE  # more distinct rows than the cache holds, in one batch: the batch is still complete and right
    _same(_enc(enc, big), _enc(ref, big))
    assert enc.cache_info()["size"] == 3


def test_cache_is_not_state_and_survives_inference_mode(pair):
    enc, ref, _ = pair
    assert set(enc.state_dict()) == set(ref.state_dict())
    with torch.inference_mode():  # entries made here are inference tensors
        _fill(enc)
    head = torch.nn.Linear(enc.hidden_size, 1)
    out = _enc(enc, REPORTS)
    head(out.tokens).sum().backward()  # they can feed a graph afterwards
    assert head.weight.grad is not None
    with pytest.raises(ValueError, match="cache_size"):
        TextEncoder(max_length=24, num_layers=1, cache_size=-1)


def test_autocast_outputs_are_kept_apart(pair):
    enc, ref, _ = pair
    _fill(enc)
    plain = _enc(enc, REPORTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            out = _enc(enc, REPORTS)
        want = _enc(ref, REPORTS)
    _same(out, want, atol=1e-3)
    assert not torch.allclose(out.cls, plain.cls, atol=1e-4)  # bfloat16 products: not the float32 entries
    assert enc.cache_info()["size"] == 8
    _same(_enc(enc, REPORTS), plain, atol=0)


# ---- AMVLM: the momentum text view of a frozen tower -------------------------------------------------------------
def _frozen(model):
    model.text_encoder.requires_grad_(False)
    return model.train()


def test_momentum_text_view_of_a_frozen_tower_shares_the_cache(tiny_amvlm):
    m = _frozen(tiny_amvlm)
    tokens = m.tokenize(REPORTS)
    copy = [t.clone() for t in m.momentum_text_encoder.parameters()]
    versions = [t._version for t in m.momentum_text_encoder.parameters()]
    for _ in range(3):
        m.encode_text(tokens)
        m.update_momentum()
    assert [t._version for t in m.momentum_text_encoder.parameters()] == versions  # the EMA step was skipped
    assert all(torch.equal(a, b) for a, b in zip(copy, m.momentum_text_encoder.parameters()))
    rows = []
    m.text_encoder.model.register_forward_pre_hook(lambda mod, a, kw: rows.append(1), with_kwargs=True)
    view = m.momentum_encode_text(tokens)
    assert rows == []  # served from the online tower's cache
    enc = m.momentum_text_encoder(**tokens)  # the copy itself (no cache)
    want = m._project(enc, m.momentum_text_global, m.momentum_text_local)
    _same(view, want)


def test_a_momentum_copy_that_differs_is_used_and_updated(tiny_amvlm):
    m = _frozen(tiny_amvlm)
    tokens = m.tokenize(REPORTS)
    with torch.no_grad():
        for p in m.momentum_text_encoder.parameters():
            p.add_(0.01)
    online = m.text_encoder(**tokens).cls
    view = m.momentum_text_encoder(**tokens).cls
    assert not torch.allclose(online, view, atol=1e-4)
    got = m.momentum_encode_text(tokens)
    want = m._project(m.momentum_text_encoder(**tokens), m.momentum_text_global, m.momentum_text_local)
    _same(got, want)
    before = m.momentum_text_encoder.model.embeddings.word_embeddings.weight.clone()
    m.update_momentum()
    after = m.momentum_text_encoder.model.embeddings.word_embeddings.weight
    target = m.text_encoder.model.embeddings.word_embeddings.weight
    torch.testing.assert_close(after, 0.995 * before + 0.005 * target)


def test_a_trainable_tower_keeps_its_momentum_update(tiny_amvlm):
    m = tiny_amvlm.train()
    with torch.no_grad():
        for p in m.text_encoder.parameters():
            p.add_(0.01)
    m.update_momentum()
    a = m.momentum_text_encoder.model.embeddings.word_embeddings.weight
    b = m.text_encoder.model.embeddings.word_embeddings.weight
    assert not torch.equal(a, b)
    assert m.text_encoder.cache_info()["size"] == 0 and m.momentum_text_encoder.cache_size == 0


def test_frozen_pretraining_steps_equal_with_and_without_cache():
    """Three optimiser steps with the full loss (ICL included): the cache and the shared momentum text view give the
    same losses as the uncached model."""
    from amvlm_monai.engines.step import param_groups
    from amvlm_monai.losses.amvlm import AMVLMLoss
    from amvlm_monai.networks.amvlm import AMVLM

    losses = {}
    for size in (1000, 0):
        torch.manual_seed(0)
        model = AMVLM(**TINY, text_cache_size=size)
        opt = torch.optim.Adam(param_groups(model, 1e-3, 0.0), lr=1e-3)
        loss = AMVLMLoss(icl_weight=0.1)
        g = torch.Generator().manual_seed(1)
        out = []
        for step in range(3):
            x = torch.randn(4, 1, 32, 32, generator=g)
            texts = [REPORTS[(step + i) % 4] for i in range(4)]
            model.train()
            terms = loss(model, x, model.tokenize(texts), x.flip(-1), model.tokenize(texts[::-1]))
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            model.update_momentum()
            out.append(terms["loss"].item())
        losses[size] = out
        if size:
            assert model.text_encoder.cache_info()["hits"] > 0
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses[1000], losses[0])), losses
