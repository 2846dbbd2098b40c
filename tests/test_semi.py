"""Pseudo-label fusion, ramp-up, consistency loss and the supervised loss factory."""

import math

import pytest
import torch

from amvlm_monai.losses.semi import (
    AUTHORS_FUSION_RANGE,
    ConsistencyLoss,
    build_supervised_loss,
    consistency_weight,
    fuse_pseudo_labels,
    sigmoid_rampup,
)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_binary_logit_fusion_is_product_of_experts():
    logits = torch.tensor([1.0, -2.0, 0.5, 3.0]).reshape(1, 1, 2, 2)
    t = torch.tensor([0.8, 0.3, 0.5, 0.1]).reshape(1, 1, 2, 2)
    for lam in (1.0, 2.0, 0.0):
        out = fuse_pseudo_labels(logits, t, lam=lam).flatten().tolist()
        for y, l, tm in zip(out, logits.flatten().tolist(), t.flatten().tolist()):
            p = _sig(l)  # independent form: p T^lam / (p T^lam + (1-p)(1-T)^lam)
            assert y == pytest.approx(p * tm**lam / (p * tm**lam + (1 - p) * (1 - tm) ** lam), rel=1e-5)
    # one pixel by hand: sigmoid(1 + ln 4)
    assert fuse_pseudo_labels(logits, t)[0, 0, 0, 0].item() == pytest.approx(4 * math.e / (4 * math.e + 1), rel=1e-6)
    # T = 0.5 leaves the teacher unchanged; T = 0 or 1 stays finite
    torch.testing.assert_close(fuse_pseudo_labels(logits, torch.full_like(t, 0.5)), torch.sigmoid(logits))
    edge = fuse_pseudo_labels(logits, torch.tensor([0.0, 1.0, 0.0, 1.0]).reshape(1, 1, 2, 2))
    assert torch.isfinite(edge).all() and edge[0, 0, 0, 0] < 1e-4 and edge[0, 0, 0, 1] > 1 - 1e-4


def test_multiclass_fusion_by_hand():
    logits = torch.tensor([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1)
    t = torch.tensor([0.5, 0.2, 0.9]).reshape(1, 3, 1, 1)
    e = [math.exp(v) for v in (0.0, 1.0, 2.0)]
    for lam in (1.0, 0.5):
        num = [e[c] * t.flatten()[c].item() ** lam for c in range(3)]
        expected = [n / sum(num) for n in num]
        out = fuse_pseudo_labels(logits, t, lam=lam, multiclass=True).flatten().tolist()
        assert out == pytest.approx(expected, rel=1e-5)
    out = fuse_pseudo_labels(logits.expand(2, 3, 4, 4), t.expand(2, 3, 4, 4), multiclass=True)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2, 4, 4))


def test_authors_fusion_and_its_floor():
    logits = torch.tensor([1.0, -100.0, 100.0, 0.0]).reshape(1, 1, 2, 2)
    t = torch.tensor([0.8, 0.0, 1.0, 0.5]).reshape(1, 1, 2, 2)
    out = fuse_pseudo_labels(logits, t, mode="authors").flatten().tolist()
    assert out[0] == pytest.approx(_sig(_sig(1.0) + 0.8), rel=1e-6)
    assert out[1] == pytest.approx(0.5, abs=1e-7)  # the floor: sigmoid(0 + 0)
    assert out[2] == pytest.approx(_sig(2.0), rel=1e-6)  # the ceiling: sigmoid(1 + 1)
    assert AUTHORS_FUSION_RANGE == pytest.approx((0.5, _sig(2.0)))
    torch.manual_seed(0)
    many = fuse_pseudo_labels(torch.randn(4, 1, 16, 16) * 20, torch.rand(4, 1, 16, 16), mode="authors")
    assert many.min() >= 0.5 and many.max() <= _sig(2.0) + 1e-6
    # the background is never labelled: a confident-background teacher and an empty text mask still give >= 0.5,
    # while the default fusion gives ~0
    assert fuse_pseudo_labels(torch.full((1, 1, 1, 1), -8.0), torch.full((1, 1, 1, 1), 0.1), mode="authors") > 0.5
    assert fuse_pseudo_labels(torch.full((1, 1, 1, 1), -8.0), torch.full((1, 1, 1, 1), 0.1)) < 1e-3
    # the released pipeline's T had one more sigmoid (T >= 0.5): floor sigmoid(0.5) ~ 0.62
    t_authors = torch.sigmoid(torch.rand(1, 1, 8, 8))
    assert fuse_pseudo_labels(torch.full((1, 1, 8, 8), -50.0), t_authors, mode="authors").min() >= _sig(0.5) - 1e-6


def test_fusion_detach_and_errors():
    logits, t = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.7, requires_grad=True)
    assert not fuse_pseudo_labels(logits, t).requires_grad
    assert fuse_pseudo_labels(logits, t, detach=False).requires_grad
    with pytest.raises(ValueError, match="mode"):
        fuse_pseudo_labels(logits, t, mode="sum")
    with pytest.raises(ValueError, match="lam"):
        fuse_pseudo_labels(logits, t, lam=-1.0)
    with pytest.raises(ValueError, match="text_mask"):
        fuse_pseudo_labels(logits, t[:, :, :1])
    with pytest.raises(ValueError, match="multiclass"):
        fuse_pseudo_labels(logits, t, multiclass=True)
    with pytest.raises(ValueError, match="authors"):
        fuse_pseudo_labels(torch.zeros(1, 2, 2, 2), torch.rand(1, 2, 2, 2), mode="authors", multiclass=True)


def test_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(8, 10) == pytest.approx(math.exp(-5 * 0.04))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(25, 10) == 1.0
    assert sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(3, 0) == 1.0
    assert consistency_weight(5, 0.1, 10) == pytest.approx(0.1 * math.exp(-1.25))
    with pytest.raises(ValueError, match="length"):
        sigmoid_rampup(1, -1)
    with pytest.raises(ValueError, match="w_max"):
        consistency_weight(1, -0.1, 10)


def _entropy(t):
    return -(t * torch.log(t) + (1 - t) * torch.log(1 - t))


def test_consistency_binary_hard_targets():
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    loss = ConsistencyLoss()
    perfect = loss(30 * (2 * target - 1), target)
    wrong = loss(-30 * (2 * target - 1), target)
    assert perfect.item() < 1e-4 and wrong.item() > 10


def test_consistency_binary_soft_targets():
    torch.manual_seed(1)
    target = torch.rand(2, 1, 8, 8) * 0.8 + 0.1
    loss = ConsistencyLoss()
    at_target = loss(torch.logit(target), target)
    # Dice term is 0 at p = target (soft_label), BCE equals the targets' entropy
    assert at_target.item() == pytest.approx(_entropy(target).mean().item(), rel=1e-4)
    logits = torch.logit(target).requires_grad_()
    ConsistencyLoss(dice_weight=0.0)(logits, target).backward()
    assert logits.grad.abs().max() < 1e-6  # BCE: a smooth minimum; soft Dice |p - t| / (|p| + |t|): a kink at 0
    for delta in (0.05, -0.05, 0.5):
        assert loss(torch.logit(target) + delta, target) > at_target + 1e-4
    assert loss(-torch.logit(target), target) > at_target + 1e-2


def test_consistency_dice_term_by_hand():
    # soft Dice with soft labels: 1 - (2 tp)/(|p| + |t|), tp = (|p| + |t| - |p - t|) / 2  =>  |p - t| / (|p| + |t|)
    p = torch.tensor([0.9, 0.2, 0.6, 0.5]).reshape(1, 1, 2, 2)
    t = torch.tensor([1.0, 0.0, 0.3, 0.5]).reshape(1, 1, 2, 2)
    expected = (0.1 + 0.2 + 0.3 + 0.0) / (2.2 + 1.8)
    got = ConsistencyLoss(ce_weight=0.0)(torch.logit(p), t)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean().item()
    got = ConsistencyLoss(dice_weight=0.5, ce_weight=2.0)(torch.logit(p), t)
    assert got.item() == pytest.approx(0.5 * expected + 2.0 * bce, rel=1e-4)


def test_consistency_multiclass():
    torch.manual_seed(2)
    target = torch.softmax(torch.randn(2, 3, 4, 4), dim=1)
    loss = ConsistencyLoss(multiclass=True)
    at_target = loss(torch.log(target), target)
    ent = -(target * torch.log(target)).sum(1).mean()
    assert at_target.item() == pytest.approx(ent.item(), rel=1e-4)
    assert loss(torch.randn(2, 3, 4, 4) * 3, target) > at_target + 1e-2
    per = ConsistencyLoss(multiclass=True, reduction="none")(torch.log(target), target)
    assert per.shape == (2,) and per.mean().item() == pytest.approx(at_target.item(), rel=1e-5)


def test_consistency_errors():
    with pytest.raises(ValueError, match="reduction"):
        ConsistencyLoss(reduction="avg")
    with pytest.raises(ValueError, match="dice_weight"):
        ConsistencyLoss(dice_weight=-1.0)
    with pytest.raises(ValueError, match="both"):
        ConsistencyLoss(dice_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="target"):
        ConsistencyLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="multiclass"):
        ConsistencyLoss(multiclass=True)(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_supervised_loss_factory():
    label = torch.zeros(2, 1, 4, 4)
    label[:, :, :2] = 1
    binary = build_supervised_loss(multiclass=False)
    assert binary(30 * (2 * label - 1), label).item() < 1e-4
    assert binary(-30 * (2 * label - 1), label).item() > 10
    idx = torch.randint(0, 3, (2, 1, 4, 4))
    onehot = torch.nn.functional.one_hot(idx[:, 0], 3).permute(0, 3, 1, 2).float()
    multi = build_supervised_loss(multiclass=True)
    assert multi(30 * onehot, idx).item() < 1e-4
    assert multi(-30 * onehot, idx).item() > 10
