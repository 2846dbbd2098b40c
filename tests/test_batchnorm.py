"""The one BatchNorm refresh against torch's ``update_bn``, and its no-batch and skip rules."""

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from amvlm_monai.networks.batchnorm import refresh_batchnorm


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))


def test_matches_torch_update_bn_and_restores_mode():
    batches = [torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(i)) + i for i in range(4)]
    ours, ref = _net().eval(), _net()
    seen = refresh_batchnorm(ours, lambda x: ours(x).shape[0], batches)
    update_bn(batches, ref)
    assert seen == 12 and not ours.training
    for a, b in zip(ours.modules(), ref.modules()):
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(a.running_mean, b.running_mean)
            torch.testing.assert_close(a.running_var, b.running_var)
            assert a.momentum == b.momentum == 0.1


def test_max_images_no_batch_and_skip():
    net = _net()
    before = [net[1].running_mean.clone()]
    assert refresh_batchnorm(net, lambda x: net(x).shape[0], []) == 0
    torch.testing.assert_close(net[1].running_mean, before[0])  # nothing seen: left exactly as it was
    calls = []
    batches = [torch.randn(2, 1, 8, 8) for _ in range(5)]
    refresh_batchnorm(net, lambda x: calls.append(1) or net(x).shape[0], batches, max_images=3)
    assert len(calls) == 2  # stops after the batch that reaches 3 images
    kept = net[4].running_mean.clone()
    refresh_batchnorm(net, lambda x: net(x + 5).shape[0], batches, skip=lambda name: name == "4")
    torch.testing.assert_close(net[4].running_mean, kept)  # skipped layer untouched
    assert not torch.allclose(net[1].running_mean, before[0])
