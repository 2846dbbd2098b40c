"""momentum_copy / momentum_update: frozen copies (dropout off, BatchNorm on batch statistics) and EMA of parameters and buffers (hand-computed)."""

import pytest
import torch
from torch import nn

from amvlm_monai.networks.momentum import MomentumCopy, momentum_copy, momentum_update


def _net():
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))


def test_copy_is_frozen_deep_dropout_off_batch_norm_on_batch_statistics_in_training():
    torch.manual_seed(0)
    src = _net()
    parent = nn.Module()
    parent.online = src
    parent.target = momentum_copy(src)
    assert isinstance(parent.target, MomentumCopy)
    parent.train()
    assert src.training and not parent.target.training
    assert [type(m).__name__ for m in parent.target.modules() if m.training] == ["BatchNorm1d"]
    parent.eval()
    assert not any(m.training for m in parent.target.modules())  # evaluation: running statistics, as the online
    parent.train()
    assert all(not p.requires_grad for p in parent.target.parameters())
    assert all(p.requires_grad for p in src.parameters())
    with torch.no_grad():
        src[0].weight.add_(1.0)  # deep copy: the copy does not follow
    assert not torch.equal(src[0].weight, parent.target.module[0].weight)
    x = torch.randn(4, 2, requires_grad=True)
    y = parent.target(x)
    assert not y.requires_grad
    src.train()
    src[2].p = 0.0  # the copy's dropout is off: compare with the source in training mode without dropout
    momentum_update(parent.target, src, m=0.0)  # m = 0 copies the source
    buffers = [b.clone() for b in parent.target.buffers() if b.is_floating_point()]
    torch.testing.assert_close(parent.target(x), src(x))
    assert all(torch.equal(a, b) for a, b in zip(buffers, [b for b in parent.target.buffers() if b.is_floating_point()]))  # running stats untouched
    assert "module.0.weight" in parent.target.state_dict()


def test_attribute_fall_through():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.hidden_size = 2

        def tokenize(self, s):
            return s.upper()

    c = momentum_copy(Enc())
    assert c.hidden_size == 2 and c.tokenize("ab") == "AB" and isinstance(c.lin, nn.Linear)
    with pytest.raises(AttributeError):
        c.nope


def test_update_hand_computed_parameters_and_buffers():
    src, tgt = _net(), _net()
    with torch.no_grad():
        for p in tgt.parameters():
            p.fill_(1.0)
        for p in src.parameters():
            p.fill_(3.0)
    tgt[1].running_mean.fill_(2.0)
    src[1].running_mean.fill_(4.0)
    tgt[1].num_batches_tracked.fill_(5)
    src[1].num_batches_tracked.fill_(9)
    target = momentum_copy(tgt)
    momentum_update(target, src, m=0.9)
    inner = target.module
    torch.testing.assert_close(inner[0].weight, torch.full((3, 2), 1.2))  # 0.9 * 1 + 0.1 * 3
    torch.testing.assert_close(inner[1].bias, torch.full((3,), 1.2))
    torch.testing.assert_close(inner[1].running_mean, torch.full((3,), 2.2))  # 0.9 * 2 + 0.1 * 4
    torch.testing.assert_close(inner[1].running_var, torch.ones(3))  # both 1
    assert inner[1].num_batches_tracked.item() == 9  # integer buffer copied
    assert inner[1].num_batches_tracked.dtype == torch.long
    momentum_update(target, src, m=1.0)
    torch.testing.assert_close(inner[0].weight, torch.full((3, 2), 1.2))
    assert all(not p.requires_grad for p in target.parameters())


def test_default_momentum_and_plain_modules():
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(1.0)
    momentum_update(a, b)  # m = 0.995
    assert a.weight.item() == pytest.approx(0.005)


def test_update_errors():
    with pytest.raises(ValueError, match="m must be in"):
        momentum_update(_net(), _net(), m=1.5)
    with pytest.raises(ValueError, match="parameter names"):
        momentum_update(nn.Linear(2, 3), _net())
    with pytest.raises(ValueError, match="parameter shapes"):
        momentum_update(nn.Linear(2, 3), nn.Linear(2, 4))
    with pytest.raises(TypeError):
        momentum_copy(3)


def test_copy_of_a_head_keeps_samples_apart_when_its_input_varies_little():
    """A [CLS] that varies by 5 % across reports: with running statistics (mean 0, var 1) every output would be the
    same vector; on the batch's statistics the copy spreads them as the online head does in training."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, affine=False))
    x = 1.0 + 0.05 * torch.randn(6, 8)
    y = momentum_copy(head)(x)
    head.eval()
    z_running = nn.functional.normalize(head(x), dim=1)
    assert (z_running @ z_running.T).min() > 0.99  # what the old copy, on running statistics, produced
    head.train()
    with torch.no_grad():
        torch.testing.assert_close(y, head(x))  # the online head in training mode
    z = nn.functional.normalize(y, dim=1)
    assert (z @ z.T)[~torch.eye(6, dtype=torch.bool)].max() < 0.9
