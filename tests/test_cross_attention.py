"""CrossAttention: hand-computed values, per-sample loop, padding invariance, all-padding guard, gradients."""

import math

import pytest
import torch

from amvlm_monai.networks.cross_attention import CrossAttention


def test_hand_computed_projection_free():
    ca = CrossAttention(2, qkv_projections=False)
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    c = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    out, attn = ca(q, c, mask, return_attn=True)
    # query 0: scores (1/sqrt2, 0); query 1: scores (0, 2/sqrt2)
    a0 = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    a1 = 1 / (1 + math.exp(2 / math.sqrt(2)))
    ref_attn = torch.tensor([[[a0, 1 - a0, 0.0], [a1, 1 - a1, 0.0]]])
    torch.testing.assert_close(attn, ref_attn)
    torch.testing.assert_close(out, torch.tensor([[[a0, 1 - a0], [a1, 1 - a1]]]))


def test_with_projections_matches_manual():
    torch.manual_seed(0)
    ca = CrossAttention(4)
    q, c = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    Q, K, V = q @ ca.q.weight.T, c @ ca.k.weight.T, c @ ca.v.weight.T
    ref = torch.softmax(Q @ K.transpose(1, 2) / 2.0, dim=-1) @ V
    torch.testing.assert_close(ca(q, c), ref)
    torch.testing.assert_close(ca(q, c, torch.ones(1, 5, dtype=torch.bool)), ref)


@pytest.mark.parametrize("proj", [True, False])
def test_batch_equals_per_sample_loop(proj):
    torch.manual_seed(0)
    ca = CrossAttention(8, qkv_projections=proj)
    q, c = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    lengths = [6, 2, 4]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    out, attn = ca(q, c, mask, return_attn=True)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4))
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i], ca(q[i:i + 1], c[i:i + 1, :n])[0])
        assert bool((attn[i, :, n:] == 0).all())


def test_padding_invariance_with_garbage():
    torch.manual_seed(1)
    ca = CrossAttention(8)
    q, c = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = ca(q, c, mask)
    cp = torch.cat([c, torch.randn(2, 3, 8) * 1e4], dim=1)
    cp[0, 3] = float("nan")
    cp[1, 5] = float("inf")
    mp = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(ca(q, cp, mp), out)


def test_fully_masked_context_gives_zeros_not_nan():
    torch.manual_seed(0)
    ca = CrossAttention(4)
    q = torch.randn(2, 3, 4, requires_grad=True)
    c = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    out, attn = ca(q, c, mask, return_attn=True)
    assert bool((out[1] == 0).all()) and bool((attn[1] == 0).all())
    assert not bool(out.isnan().any())
    (out * torch.randn_like(out)).sum().backward()
    assert not bool(q.grad.isnan().any()) and not bool(c.grad.isnan().any())
    assert bool((c.grad[~mask] == 0).all())
    for name in ("q", "k", "v"):
        assert getattr(ca, name).weight.grad.abs().sum() > 0, name


def test_shape_errors():
    ca = CrossAttention(4)
    with pytest.raises(ValueError, match="query"):
        ca(torch.randn(2, 3, 5), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="context"):
        ca(torch.randn(2, 3, 4), torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="context_mask"):
        ca(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    assert not hasattr(CrossAttention(4, qkv_projections=False), "q")
