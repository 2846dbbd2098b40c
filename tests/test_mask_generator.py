"""TextMaskGenerator: shapes, frozen encoder, trainable decoder/w/b, gated decoder starts as nearest up-sampling."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amvlm_monai.networks.mask_generator import TextMaskGenerator

D, GRID, IMG = 8, 4, 32


class PatchEnc(nn.Module):
    """8x8 patchify conv + BatchNorm -> (B, 16, D) L2-normalised (row-major patches)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(1, D, kernel_size=8, stride=8)
        self.bn = nn.BatchNorm2d(D)

    def forward(self, x):
        y = self.bn(self.proj(x))  # (B, D, 4, 4)
        return F.normalize(y.flatten(2).transpose(1, 2), dim=-1)


def _gen(**kw):
    torch.manual_seed(0)
    return TextMaskGenerator(PatchEnc(), grid_size=GRID, embed_dim=D, **kw)


def _text(*shape):
    return F.normalize(torch.randn(*shape, D), dim=-1)


def test_shapes():
    gen = _gen()
    x = torch.randn(2, 1, IMG, IMG)
    dense = gen.dense(x)
    assert dense.shape == (2, D, 16, 16) and gen.dense_size == (16, 16)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 16, 16))
    assert gen.masks(dense, _text(2, 3)).shape == (2, 3, 16, 16)
    assert gen.masks(dense, _text(5)).shape == (2, 5, 16, 16)  # shared prompts
    out = gen(x, _text(2, 1))
    assert out.shape == (2, 1, IMG, IMG) and out.min() > 0 and out.max() < 1
    assert _gen(num_blocks=1).dense(x).shape == (2, D, 8, 8)
    assert TextMaskGenerator(PatchEnc(), grid_size=(4, 4), embed_dim=D, num_blocks=0).dense(x).shape == (2, D, 4, 4)


def test_fresh_decoder_is_nearest_upsampling():
    gen = _gen()
    x = torch.randn(2, 1, IMG, IMG)
    with torch.no_grad():
        patches = gen.patch_encoder(x)  # (B, 16, D)
    grid = patches.reshape(2, GRID, GRID, D).permute(0, 3, 1, 2)  # independent reshape: row-major patches
    expected = grid.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(gen.dense(x), expected)
    with torch.no_grad():
        gen.decoder[0].gate.fill_(0.5)
    assert not torch.allclose(gen.dense(x), expected)


def test_mask_formula_by_hand():
    gen = _gen()
    dense = F.normalize(torch.randn(1, D, 2, 2), dim=1)
    t = _text(1, 1)
    m = gen.masks(dense, t)
    for i in range(2):
        for j in range(2):
            sim = float(sum(dense[0, d, i, j] * t[0, 0, d] for d in range(D)))
            assert m[0, 0, i, j].item() == pytest.approx(1 / (1 + math.exp(-10 * (sim - 0.25))), rel=1e-5)
    with torch.no_grad():
        gen.w.fill_(2.0)
        gen.b.fill_(-0.5)
    sim = float((dense[0, :, 0, 0] * t[0, 0]).sum())
    assert gen.masks(dense, t)[0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-2 * (sim + 0.5))), rel=1e-5)


def test_prompts_per_class_and_shared():
    gen = _gen()
    dense = gen.dense(torch.randn(2, 1, IMG, IMG))
    t = _text(2, 3)  # one prompt per class, C = 3
    m = gen.masks(dense, t)
    for c in range(3):
        torch.testing.assert_close(m[:, c : c + 1], gen.masks(dense, t[:, c : c + 1]))
    shared = _text(3)
    torch.testing.assert_close(gen.masks(dense, shared), gen.masks(dense, shared.expand(2, 3, D)))


def test_forward_is_bilinear_upsampling_of_masks():
    gen = _gen()
    x, t = torch.randn(2, 1, IMG, IMG), _text(2, 2)
    low = gen.masks(gen.dense(x), t)
    torch.testing.assert_close(gen(x, t), F.interpolate(low, size=(IMG, IMG), mode="bilinear", align_corners=False))


def test_only_decoder_w_b_train():
    gen = _gen()
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trainable == {"w", "b", "decoder.0.gate", "decoder.0.conv.weight", "decoder.0.conv.bias",
                         "decoder.1.gate", "decoder.1.conv.weight", "decoder.1.conv.bias"}
    x, t = torch.randn(2, 1, IMG, IMG), _text(2, 1)
    gen(x, t).pow(2).sum().backward()
    for n, p in gen.named_parameters():
        if n.startswith("patch_encoder"):
            assert p.grad is None
    assert gen.w.grad.abs() > 0 and gen.b.grad.abs() > 0 and gen.decoder[0].gate.grad.abs() > 0
    # zero gate: the conv branch is switched off, so its weights get no gradient yet
    assert gen.decoder[0].conv.weight.grad.abs().max() == 0
    gen.zero_grad()
    with torch.no_grad():
        for blk in gen.decoder:
            blk.gate.fill_(0.3)
    gen(x, t).pow(2).sum().backward()
    assert gen.decoder[0].conv.weight.grad.abs().max() > 0


def test_encoder_frozen_and_in_eval():
    gen = _gen()
    gen.train()
    assert gen.training and gen.decoder.training and not gen.patch_encoder.training
    before = gen.patch_encoder.bn.running_mean.clone()
    gen.dense(torch.randn(4, 1, IMG, IMG) + 3.0)
    torch.testing.assert_close(gen.patch_encoder.bn.running_mean, before)  # eval BN: statistics untouched
    assert all(not p.requires_grad for p in gen.patch_encoder.parameters())
    gen.eval()
    gen.train(True)
    assert not gen.patch_encoder.training


def test_ill_inputs():
    gen = _gen()
    with pytest.raises(ValueError, match="patch_encoder output"):
        TextMaskGenerator(PatchEnc(), grid_size=3, embed_dim=D).dense(torch.randn(1, 1, IMG, IMG))
    with pytest.raises(ValueError, match="patch_encoder output"):
        TextMaskGenerator(PatchEnc(), grid_size=4, embed_dim=D + 1).dense(torch.randn(1, 1, IMG, IMG))
    dense = gen.dense(torch.randn(2, 1, IMG, IMG))
    with pytest.raises(ValueError, match="text"):
        gen.masks(dense, torch.randn(3, 1, D))
    with pytest.raises(ValueError, match="text"):
        gen.masks(dense, torch.randn(2, 1, D + 1))
    with pytest.raises(ValueError, match="images"):
        gen.dense(torch.randn(1, IMG, IMG))
    with pytest.raises(ValueError, match="grid_size"):
        TextMaskGenerator(PatchEnc(), grid_size=(4, 0), embed_dim=D)
    with pytest.raises(ValueError, match="num_blocks"):
        TextMaskGenerator(PatchEnc(), grid_size=4, embed_dim=D, num_blocks=-1)
    with pytest.raises(ValueError, match="norm"):
        TextMaskGenerator(PatchEnc(), grid_size=4, embed_dim=D, norm="batch")


def test_group_norm_option_runs():
    gen = _gen(norm="group")
    with torch.no_grad():
        gen.decoder[0].gate.fill_(1.0)
    assert torch.isfinite(gen(torch.randn(1, 1, IMG, IMG), _text(1, 1))).all()
