"""TextGuidedLoss (L_tg): hand-computed case, loop reference, extended form, scale clamp, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.losses.text_guided import TextGuidedLoss, masked_pool


def _ce(logits, target):
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def _tiny():
    # image 0: locations [1,0], [0,1]; image 1: [0,1], [1,0]; masks keep the first location
    dense = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])  # (2, D=2, 1, 2)
    masks = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])  # (2, 1, 2) -> v0 = [1,0], v1 = [0,1]
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    return dense, masks, text


def test_hand_computed_tiny_case():
    dense, masks, text = _tiny()
    # S = [[<v0,t0>, <v0,t1>], [<v1,t0>, <v1,t1>]] = [[1, .6], [0, .8]]
    s = [[1.0, 0.6], [0.0, 0.8]]
    rows = [_ce(s[0], 0), _ce(s[1], 1)]
    cols = [_ce([s[0][0], s[1][0]], 0), _ce([s[0][1], s[1][1]], 1)]
    expected = (sum(rows) / 2 + sum(cols) / 2) / 2
    loss = TextGuidedLoss(temperature=1.0)
    assert loss(dense, masks, text).item() == pytest.approx(expected, rel=1e-5)
    # default tau = 0.07: logits scaled by 1/0.07
    sc = 1 / 0.07
    rows = [_ce([sc * 1.0, sc * 0.6], 0), _ce([0.0, sc * 0.8], 1)]
    cols = [_ce([sc * 1.0, 0.0], 0), _ce([sc * 0.6, sc * 0.8], 1)]
    assert TextGuidedLoss()(dense, masks, text).item() == pytest.approx((sum(rows) + sum(cols)) / 4, rel=1e-5)
    # per-sample: (row_i + col_i) / 2; sum = 2 * mean; (B, 1, h, w) masks accepted
    per = TextGuidedLoss(reduction="none")(dense, masks[:, None], text)
    assert per.tolist() == pytest.approx([(rows[0] + cols[0]) / 2, (rows[1] + cols[1]) / 2], rel=1e-5)
    assert TextGuidedLoss(reduction="sum")(dense, masks, text).item() == pytest.approx(sum(per.tolist()), rel=1e-5)


def test_soft_mask_weighted_average():
    dense, _, text = _tiny()
    masks = torch.tensor([[[0.5, 0.5]], [[0.25, 0.75]]])
    # v0 = normalize([.5,.5]) ; v1 = normalize(.25*[0,1] + .75*[1,0]) = normalize([.75,.25])
    v0 = [1 / math.sqrt(2), 1 / math.sqrt(2)]
    n1 = math.hypot(0.75, 0.25)
    v1 = [0.75 / n1, 0.25 / n1]
    t = text.tolist()
    s = [[sum(a * b for a, b in zip(v, tt)) for tt in t] for v in (v0, v1)]
    expected = (_ce(s[0], 0) + _ce(s[1], 1) + _ce([s[0][0], s[1][0]], 0) + _ce([s[0][1], s[1][1]], 1)) / 4
    assert TextGuidedLoss(temperature=1.0)(dense, masks, text).item() == pytest.approx(expected, rel=1e-5)
    pooled = masked_pool(dense, masks[:, None])
    torch.testing.assert_close(pooled[1, 0], torch.tensor([0.75, 0.25]) / (1 + 1e-6))


def _loop_reference(dense, masks, text, scale, extended):
    b = dense.shape[0]

    def pooled(i, m):
        num = (dense[i] * m).sum(dim=(1, 2))
        v = num / (m.sum() + 1e-6)
        return v / v.norm()

    logits = torch.zeros(b, b)
    for i in range(b):
        for j in range(b):
            v = pooled(i, masks[i, j] if extended else masks[i])
            logits[i, j] = scale * torch.dot(v, text[j])
    out = []
    for i in range(b):
        row = -torch.log_softmax(logits[i], 0)[i]
        col = -torch.log_softmax(logits[:, i], 0)[i]
        out.append((row + col) / 2)
    return torch.stack(out)


@pytest.mark.parametrize("extended", [False, True])
def test_batched_matches_loop(extended):
    torch.manual_seed(1)
    b, d = 4, 6
    dense = F.normalize(torch.randn(b, d, 3, 5), dim=1)
    masks = torch.rand(b, b, 3, 5) if extended else torch.rand(b, 3, 5)
    text = F.normalize(torch.randn(b, d), dim=-1)
    loss = TextGuidedLoss(extended=extended, reduction="none")
    ref = _loop_reference(dense, masks, text, 1 / 0.07, extended)
    torch.testing.assert_close(loss(dense, masks, text), ref, rtol=1e-4, atol=1e-5)


def test_extended_differs_and_reduces_to_standard():
    torch.manual_seed(2)
    b, d = 3, 5
    dense = F.normalize(torch.randn(b, d, 4, 4), dim=1)
    text = F.normalize(torch.randn(b, d), dim=-1)
    paired = torch.rand(b, 4, 4)
    ext_masks = torch.rand(b, b, 4, 4)
    ext_masks[torch.arange(b), torch.arange(b)] = paired  # same paired masks on the diagonal
    std = TextGuidedLoss()(dense, paired, text)
    ext = TextGuidedLoss(extended=True)(dense, ext_masks, text)
    assert abs(std.item() - ext.item()) > 1e-3
    # text-independent masks (mask of every text on image i = paired mask of i): both forms coincide
    same = paired[:, None].expand(b, b, 4, 4)
    torch.testing.assert_close(TextGuidedLoss(extended=True)(dense, same, text), std)


def test_scale_init_and_clamp():
    loss = TextGuidedLoss(temperature=0.07, max_scale=100.0)
    assert loss.scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert loss.logit_scale.requires_grad
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    assert loss.scale.item() == pytest.approx(100.0)
    dense, masks, text = _tiny()
    torch.testing.assert_close(loss.logits(dense, masks, text), 100.0 * torch.tensor([[1.0, 0.6], [0.0, 0.8]]))
    loss(dense, masks, text).backward()
    assert loss.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further
    free = TextGuidedLoss()
    free(dense, masks, text).backward()
    assert free.logit_scale.grad.item() != 0.0


def test_gradients_reach_dense_and_masks():
    torch.manual_seed(3)
    dense = F.normalize(torch.randn(2, 4, 3, 3), dim=1).requires_grad_()
    masks = torch.rand(2, 3, 3).requires_grad_()
    text = F.normalize(torch.randn(2, 4), dim=-1)
    TextGuidedLoss()(dense, masks, text).backward()
    assert dense.grad.abs().sum() > 0 and masks.grad.abs().sum() > 0


def test_ill_shape_and_options():
    dense, masks, text = _tiny()
    loss = TextGuidedLoss()
    with pytest.raises(ValueError, match="masks"):
        loss(dense, masks[:, :, :1], text)
    with pytest.raises(ValueError, match="masks"):
        TextGuidedLoss(extended=True)(dense, masks, text)
    with pytest.raises(ValueError, match="text"):
        loss(dense, masks, text[:1])
    with pytest.raises(ValueError, match="dense"):
        loss(dense[0], masks, text)
    bad = dense.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*dense"):
        loss(bad, masks, text)
    for kwargs, word in ((dict(reduction="avg"), "reduction"), (dict(temperature=0.0), "temperature"),
                         (dict(max_scale=-1.0), "max_scale"), (dict(extended="yes"), "extended")):
        with pytest.raises(ValueError, match=word):
            TextGuidedLoss(**kwargs)
