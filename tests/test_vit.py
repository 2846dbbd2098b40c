"""ViTEncoder: shapes, CLS attention (hand-computed), fused vs explicit path, gradients, timm weight loading."""

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.networks.vit import VIT_PRESETS, ViTEncoder


def _tiny(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return ViTEncoder.from_preset("tiny", **kw).eval()


def test_shapes_mask_and_attention_rows():
    enc = _tiny(in_channels=1)
    out = enc(torch.rand(3, 1, 32, 32))
    assert enc.grid_size == (4, 4) and enc.num_patches == 16 and enc.hidden_size == 32
    assert out.cls.shape == (3, 32) and out.tokens.shape == (3, 16, 32)
    assert out.mask.dtype == torch.bool and out.mask.shape == (3, 16) and bool(out.mask.all())
    assert out.attn.shape == (3, 16) and bool((out.attn >= 0).all())
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(3))


def test_non_square_image():
    enc = ViTEncoder(img_size=(32, 16), patch_size=8, in_channels=2, hidden_size=16, num_layers=1, num_heads=2,
                     mlp_dim=32).eval()
    out = enc(torch.rand(2, 2, 32, 16))
    assert enc.grid_size == (4, 2) and out.tokens.shape == (2, 8, 16) and out.attn.shape == (2, 8)


def test_cls_attention_hand_computed():
    """attn = softmax(q_cls k^T / sqrt(dh)) of the LAST block, heads averaged, CLS column dropped, renormalised."""
    enc = _tiny(in_channels=1)
    x = torch.rand(2, 1, 32, 32)
    seen = {}
    last = enc.blocks[-1]
    handle = last.norm1.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    out = enc(x)
    handle.remove()
    h = seen["h"]  # (B, 17, 32): input of the last block's attention
    b, n, c = h.shape
    heads = last.attn.num_heads
    qkv = h @ last.attn.qkv.weight.T + last.attn.qkv.bias
    q, k = qkv[..., :c], qkv[..., c:2 * c]
    q = q.reshape(b, n, heads, c // heads).transpose(1, 2)
    k = k.reshape(b, n, heads, c // heads).transpose(1, 2)
    a = torch.softmax(q[:, :, 0:1] @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)[:, :, 0]  # (B, heads, 17)
    ref = a[:, :, 1:].mean(1)
    ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(out.attn, ref)


def test_fused_and_explicit_paths_agree():
    enc = _tiny(in_channels=1)
    x = torch.rand(2, 1, 32, 32)
    fused = enc(x)
    for blk in enc.blocks:
        blk.attn.fused_attn = False
    explicit = enc(x)
    torch.testing.assert_close(fused.cls, explicit.cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.tokens, explicit.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.attn, explicit.attn, atol=1e-6, rtol=1e-5)


def test_batch_independence():
    enc = _tiny(in_channels=1)
    x = torch.rand(3, 1, 32, 32)
    full = enc(x)
    one = enc(x[1:2])
    torch.testing.assert_close(full.tokens[1:2], one.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.attn[1:2], one.attn, atol=1e-6, rtol=1e-5)


def test_gradients_reach_every_parameter():
    enc = _tiny(in_channels=1).train()
    out = enc(torch.rand(2, 1, 32, 32))
    r1, r2 = torch.randn_like(out.cls), torch.randn_like(out.tokens)
    ((out.cls * r1).sum() + (out.tokens * r2).sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_ill_shapes_and_bad_config():
    enc = _tiny(in_channels=1)
    for bad in (torch.rand(2, 3, 32, 32), torch.rand(2, 1, 16, 32), torch.rand(1, 32, 32)):
        with pytest.raises(ValueError, match="x must have shape"):
            enc(bad)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTEncoder(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTEncoder(img_size=32, patch_size=8, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown ViT preset"):
        ViTEncoder.from_preset("vit_h14")
    assert VIT_PRESETS["vit_b16"]["hidden_size"] == 768


# ---- timm weights -----------------------------------------------------------------------------------------------
def _timm_sd(model, distilled=False):
    """A timm/DeiT-style state dict holding ``model``'s weights (plus classifier heads)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    d = model.hidden_size
    sd["head.weight"], sd["head.bias"] = torch.randn(10, d), torch.randn(10)
    if distilled:
        sd["dist_token"] = torch.randn(1, 1, d)
        pe = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pe[:, :1], torch.randn(1, 1, d), pe[:, 1:]], dim=1)
        sd["head_dist.weight"], sd["head_dist.bias"] = torch.randn(10, d), torch.randn(10)
    return sd


@pytest.mark.parametrize("distilled", [False, True])
def test_timm_round_trip(distilled):
    src = _tiny(in_channels=3, seed=1)
    dst = _tiny(in_channels=3, seed=2)
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(src(x).cls, dst(x).cls)
    missing, unexpected = dst.load_timm_state_dict({"model": _timm_sd(src, distilled)})
    assert missing == [] and unexpected == []
    a, b = src(x), dst(x)
    assert torch.equal(a.cls, b.cls) and torch.equal(a.tokens, b.tokens) and torch.equal(a.attn, b.attn)


def test_timm_three_channels_summed_into_one():
    src = _tiny(in_channels=3, seed=1)
    dst = _tiny(in_channels=1, seed=2)
    dst.load_timm_state_dict(_timm_sd(src))
    torch.testing.assert_close(dst.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(dst(x).tokens, src(x.repeat(1, 3, 1, 1)).tokens, atol=1e-5, rtol=1e-5)


def test_timm_bad_keys_are_all_listed():
    src = _tiny(in_channels=3)
    sd = _timm_sd(src)
    del sd["norm.weight"]
    sd["blocks.0.ls1.gamma"] = torch.ones(32)
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(65, 32)
    dst = _tiny(in_channels=3, seed=3)
    before = dst.norm.bias.clone()
    with pytest.raises(ValueError) as err:
        dst.load_timm_state_dict(sd)
    msg = str(err.value)
    assert "missing key: norm.weight" in msg
    assert "unexpected key: blocks.0.ls1.gamma" in msg
    assert "shape mismatch: blocks.1.mlp.fc1.weight: checkpoint (65, 32) vs model (64, 32)" in msg
    assert torch.equal(dst.norm.bias, before)  # nothing loaded on error
    # strict=False tolerates missing/unexpected keys but never a shape mismatch
    with pytest.raises(ValueError, match="shape mismatch"):
        dst.load_timm_state_dict(sd, strict=False)
    del sd["blocks.1.mlp.fc1.weight"]
    missing, unexpected = dst.load_timm_state_dict(sd, strict=False)
    assert missing == ["blocks.1.mlp.fc1.weight", "norm.weight"] and unexpected == ["blocks.0.ls1.gamma"]
    torch.testing.assert_close(dst.norm.bias, src.norm.bias)
    with pytest.raises(ValueError, match="patch_embed.proj.weight: checkpoint"):  # 16 px patches vs 8 px
        dst.load_timm_state_dict({**_timm_sd(src), "patch_embed.proj.weight": torch.zeros(32, 3, 16, 16)})


def test_timm_pos_embed_resize():
    src = _tiny(in_channels=1, seed=1)  # 4 x 4 grid
    big = ViTEncoder(img_size=64, patch_size=8, in_channels=1, hidden_size=32, num_layers=2, num_heads=2,
                     mlp_dim=64)  # 8 x 8 grid
    with pytest.raises(ValueError, match=r"shape mismatch: pos_embed: checkpoint \(1, 17, 32\) vs model \(1, 65, 32\)"):
        big.load_timm_state_dict(_timm_sd(src), interpolate_pos_embed=False)
    sd = _timm_sd(src)
    sd["pos_embed"][:, 1:] = 0.25  # a constant grid stays constant under bicubic resizing
    big.load_timm_state_dict(sd)
    torch.testing.assert_close(big.pos_embed[:, 0], sd["pos_embed"][:, 0])
    torch.testing.assert_close(big.pos_embed[:, 1:], torch.full((1, 64, 32), 0.25))
    sd = _timm_sd(src)
    big.load_timm_state_dict(sd)
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 32)
    torch.testing.assert_close(big.pos_embed[:, 1:], ref)
    assert big(torch.rand(1, 1, 64, 64)).tokens.shape == (1, 64, 32)


def test_timm_checkpoint_wrappers():
    src = _tiny(in_channels=3, seed=1)
    x = torch.rand(1, 3, 32, 32)
    for wrapped in ({"state_dict": _timm_sd(src)}, {f"module.{k}": v for k, v in _timm_sd(src).items()}):
        dst = _tiny(in_channels=3, seed=2)
        dst.load_timm_state_dict(wrapped)
        assert torch.equal(dst(x).cls, src(x).cls)
    with pytest.raises(TypeError):
        src.load_timm_state_dict([1, 2])


def test_conv_stem_gives_the_same_token_grid():
    from amvlm_monai.networks.vit import _ConvStem

    enc = ViTEncoder(img_size=32, patch_size=8, in_channels=1, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                     patch_embed="conv")
    assert isinstance(enc.patch_embed, _ConvStem)
    convs = [m for m in enc.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]  # log2(8) stride-2 layers, then 1x1
    assert [c.out_channels for c in convs] == [8, 16, 32, 32]
    out = enc(torch.rand(2, 1, 32, 32))
    assert out.tokens.shape == (2, 16, 32) and enc.grid_size == (4, 4)
    # a token sees only its own patch's neighbourhood: changing the top-left corner leaves far tokens alone
    x = torch.rand(1, 1, 32, 32)
    y = x.clone()
    y[..., :4, :4] += 1
    enc.eval()
    with torch.no_grad():
        a, b = enc.patch_embed(x), enc.patch_embed(y)
    assert not torch.allclose(a[0, 0], b[0, 0]) and torch.allclose(a[0, -1], b[0, -1])
    with pytest.raises(ValueError, match="power-of-two"):
        ViTEncoder(img_size=24, patch_size=6, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                   patch_embed="conv")
    with pytest.raises(ValueError, match="patch_embed"):
        ViTEncoder(img_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                   patch_embed="mlp")
