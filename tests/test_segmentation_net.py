"""build_segmentation_net: a plain MONAI UNet, validated arguments, TorchScript-able."""

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import UNet

from amvlm_monai.networks.segmentation import PAPER_CHANNELS, build_segmentation_net

SMALL = dict(channels=(4, 8, 16), strides=(2, 2))


def _convs(net):
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)) and not isinstance(m, nn.ConvTranspose2d)]


def test_default_binary_2d_shape():
    net = build_segmentation_net(**SMALL)
    assert isinstance(net, UNet)
    out = net(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)


def test_multiclass_and_3d_shapes():
    net = build_segmentation_net(in_channels=3, out_channels=4, **SMALL)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    net3 = build_segmentation_net(spatial_dims=3, out_channels=2, **SMALL)
    assert net3(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_norm_choices():
    kinds = {
        n: {type(m) for m in build_segmentation_net(norm=n, **SMALL).modules()} for n in ("batch", "instance", "none")
    }
    assert nn.BatchNorm2d in kinds["batch"] and nn.InstanceNorm2d not in kinds["batch"]
    assert nn.InstanceNorm2d in kinds["instance"] and nn.BatchNorm2d not in kinds["instance"]
    assert nn.BatchNorm2d not in kinds["none"] and nn.InstanceNorm2d not in kinds["none"]


def test_dropout_and_act_reach_the_net():
    net = build_segmentation_net(dropout=0.3, act="relu", **SMALL)
    ps = {m.p for m in net.modules() if isinstance(m, nn.Dropout)}
    assert 0.3 in ps
    assert any(isinstance(m, nn.ReLU) for m in net.modules())
    assert not any(isinstance(m, nn.PReLU) for m in net.modules())


def test_paper_size_has_64_base_channels():
    net = build_segmentation_net(size="paper")
    widths = [m.out_channels for m in _convs(net)]
    assert widths[0] == 64 and max(widths) == 1024
    assert PAPER_CHANNELS == (64, 128, 256, 512, 1024)
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_torchscript_matches_eager():
    net = build_segmentation_net(out_channels=2, **SMALL).eval()
    x = torch.randn(1, 1, 32, 32)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), net(x))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(size="huge"), "size"),
        (dict(size="paper", channels=(4, 8, 16), strides=(2, 2)), "size"),
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=1.5), "out_channels"),
        (dict(channels=(4,), strides=()), "channels"),
        (dict(channels=(4, -8, 16), strides=(2, 2)), "channels"),
        (dict(channels=(4, 8, 16), strides=(2,)), "strides"),
        (dict(num_res_units=-1, **SMALL), "num_res_units"),
        (dict(norm="layer", **SMALL), "norm"),
        (dict(act="gelu", **SMALL), "act"),
        (dict(dropout=1.0, **SMALL), "dropout"),
    ],
)
def test_ill_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_segmentation_net(**kwargs)
