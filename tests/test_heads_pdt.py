"""GlobalHead / LocalHead (padding never reaches BatchNorm) and the PDT."""

import math

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.networks.heads import GlobalHead, LocalHead
from amvlm_monai.networks.pdt import PDT


# ---- heads -------------------------------------------------------------------------------------------------------
def test_global_head_hand_computed_eval():
    torch.manual_seed(0)
    head = GlobalHead(6, out_dim=4, hidden_dim=8).eval()
    x = torch.randn(3, 6)
    lin1, bn1, _, lin2, bn2 = head.mlp
    assert not bn2.affine and bn1.affine
    eps = bn1.eps
    h = torch.relu((x @ lin1.weight.T + lin1.bias) / math.sqrt(1 + eps))  # fresh BN: mean 0, var 1, w 1, b 0
    y = (h @ lin2.weight.T + lin2.bias) / math.sqrt(1 + eps)
    ref = y / y.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(head(x), ref)


def test_global_head_train_mode_normalised_and_shape_errors():
    head = GlobalHead(6, out_dim=4, hidden_dim=8).train()
    y = head(torch.randn(5, 6))
    assert y.shape == (5, 4)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(5))
    with pytest.raises(ValueError, match="x must have shape"):
        head(torch.randn(5, 7))
    with pytest.raises(ValueError, match="hidden_dim"):
        GlobalHead(6, hidden_dim=0)


def test_linear_head_is_one_linear_map_and_independent_of_the_batch():
    torch.manual_seed(0)
    head = GlobalHead(6, out_dim=4, hidden_dim=8, kind="linear").train()
    (lin,) = head.mlp
    x = torch.randn(5, 6)
    ref = F.normalize(x @ lin.weight.T + lin.bias, dim=-1)
    torch.testing.assert_close(head(x), ref)
    torch.testing.assert_close(head(x[:1]), ref[:1])  # no batch statistics: one sample alone gives the same
    local = LocalHead(6, out_dim=4, hidden_dim=8, kind="linear")
    local.load_state_dict(head.state_dict())
    mask = torch.tensor([[True, True, False], [True, False, False]])
    tokens = torch.randn(2, 3, 6)
    torch.testing.assert_close(local(tokens, mask)[mask], head(tokens[mask]))
    with pytest.raises(ValueError, match="head kind must be one of"):
        GlobalHead(6, kind="batchnorm")


def test_mlp_head_depends_on_the_batch_in_training_mode():  # why the linear kind exists (heads.py docstring)
    torch.manual_seed(0)
    head = GlobalHead(6, out_dim=4, hidden_dim=8).train()
    x = torch.randn(5, 6)
    assert not torch.allclose(head(x)[:2], head(x[:2]), atol=1e-3)


def _pair(seed=0):
    torch.manual_seed(seed)
    local = LocalHead(6, out_dim=4, hidden_dim=8)
    glob = GlobalHead(6, out_dim=4, hidden_dim=8)
    glob.load_state_dict(local.state_dict())
    return local, glob


@pytest.mark.parametrize("train", [True, False])
def test_local_head_is_the_global_mlp_on_real_tokens_only(train):
    local, glob = _pair()
    local.train(train), glob.train(train)
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    y = local(x, mask)
    ref = glob(x[mask])  # BatchNorm over the 4 real tokens only
    torch.testing.assert_close(y[mask], ref)
    assert bool((y[~mask] == 0).all())
    if train:  # running statistics saw the real tokens only
        torch.testing.assert_close(local.mlp[1].running_mean, glob.mlp[1].running_mean)


@pytest.mark.parametrize("train", [True, False])
def test_local_head_padding_invariance(train):
    local, _ = _pair(1)
    local2, _ = _pair(1)
    local.train(train), local2.train(train)
    x = torch.randn(2, 3, 6)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    y = local(x, mask)
    # two more padded slots filled with garbage, and garbage in the existing padded slot
    xp = torch.cat([x, torch.full((2, 2, 6), 1e6)], dim=1)
    xp[0, 2] = float("nan")
    mp = torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    yp = local2(xp, mp)
    torch.testing.assert_close(yp[:, :3][mask], y[mask])
    assert bool((yp[~mp] == 0).all()) and not bool(yp.isnan().any())
    if train:
        torch.testing.assert_close(local.mlp[4].running_var, local2.mlp[4].running_var)


def test_local_head_grad_and_no_mask():
    local, _ = _pair(2)
    x = torch.randn(2, 3, 6, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    y = local(x, mask)
    (y * torch.randn_like(y)).sum().backward()
    assert bool((x.grad[~mask] == 0).all()) and bool((x.grad[mask].abs().sum(-1) > 0).all())
    assert all(p.grad is not None for p in local.parameters())
    local.eval()
    torch.testing.assert_close(local(x), local(x, torch.ones(2, 3, dtype=torch.bool)))
    torch.testing.assert_close(local(x).norm(dim=-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must have shape"):
        local(x, torch.ones(2, 4, dtype=torch.bool))


# ---- PDT ---------------------------------------------------------------------------------------------------------
def test_pdt_single_token_hand_computed():
    """With one token the attention weight is 1, so h = v = Wv x'; the rest follows the formula."""
    torch.manual_seed(0)
    d = 8
    pdt = PDT(d, num_heads=2).eval()
    x = torch.randn(1, 1, d)
    mu, sigma = pdt(x)
    xp = F.layer_norm(F.gelu(x @ pdt.fc.weight.T + pdt.fc.bias), (d,), pdt.norm1.weight, pdt.norm1.bias)
    v = xp @ pdt.qkv.weight[2 * d:].T  # qkv has no bias
    h1, h2 = v[..., : d // 2], v[..., d // 2:]
    ref_mu = x + pdt.mu_proj(h1)
    ref_mu = ref_mu + pdt.mu_mlp(pdt.norm2(ref_mu))
    ls = pdt.logsig_proj(h2)
    ls = ls + pdt.logsig_mlp(pdt.norm3(ls))
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(sigma, ls.exp())


def test_pdt_shapes_and_positive_sigma():
    pdt = PDT(16).eval()  # 8 heads by default
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    mu, sigma = pdt(torch.randn(2, 5, 16), mask)
    assert mu.shape == sigma.shape == (2, 5, 16)
    assert bool((sigma[mask] > 0).all())
    assert bool((mu[~mask] == 0).all()) and bool((sigma[~mask] == 0).all())


@pytest.mark.parametrize("train", [False, True])
def test_pdt_padding_invariance(train):
    torch.manual_seed(0)
    pdt = PDT(16, num_heads=4, dropout=0.0).train(train)
    x = torch.randn(2, 3, 16)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    mu, sigma = pdt(x, mask)
    xp = torch.cat([x, torch.randn(2, 4, 16) * 1e4], dim=1)
    xp[1, 2] = float("nan")
    mp = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    mu2, sigma2 = pdt(xp, mp)
    torch.testing.assert_close(mu2[:, :3], mu)
    torch.testing.assert_close(sigma2[:, :3], sigma)
    assert not bool(mu2.isnan().any() or sigma2.isnan().any())
    # batch vs per sample: sample 1 alone with its 2 real tokens
    mu1, sigma1 = pdt(x[1:2, :2])
    torch.testing.assert_close(mu[1, :2], mu1[0])
    torch.testing.assert_close(sigma[1, :2], sigma1[0])


def test_pdt_fully_padded_sample_and_grads():
    torch.manual_seed(0)
    pdt = PDT(8, num_heads=2, dropout=0.0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    mu, sigma = pdt(x, mask)
    assert bool((mu[1] == 0).all()) and bool((sigma[1] == 0).all())
    (mu.sum() + sigma.sum()).backward()
    assert not bool(x.grad.isnan().any()) and bool((x.grad[~mask] == 0).all())
    for name, p in pdt.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_pdt_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        PDT(7, num_heads=1)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        PDT(12, num_heads=8)
    pdt = PDT(8, num_heads=2)
    with pytest.raises(ValueError, match="x must have shape"):
        pdt(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="mask must have shape"):
        pdt(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))
