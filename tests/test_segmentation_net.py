"""build_segmentation_net: a plain MONAI UNet, validated arguments, TorchScript-able."""

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import UNet

from amvlm_monai.networks.segmentation import DEFAULT_CHANNELS, LViTUNet, build_segmentation_net

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


def test_paper_size_is_lvits_unet():
    net = build_segmentation_net(size="paper")
    assert isinstance(net, LViTUNet)
    assert sum(p.numel() for p in net.parameters()) == 14_787_777  # LViT's U-Net: about 14.8 M
    x = torch.zeros(1, 1, 32, 32)
    first = net.conv_0(x)
    assert first.shape == (1, 64, 32, 32)  # the first level convolves at full resolution
    convs = [m for m in net.conv_0.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]  # two 3x3 conv-BN-ReLU per level
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)][::2] == [
        64, 128, 256, 512, 512, 256, 128, 64, 64]
    assert any(isinstance(m, nn.ReLU) for m in net.modules()) and not any(isinstance(m, nn.PReLU) for m in net.modules())
    assert net(x).shape == (1, 1, 32, 32)


def test_light_size_is_the_default_monai_unet():
    light = build_segmentation_net(size="light")
    assert [m.out_channels for m in _convs(light)][:5] == list(DEFAULT_CHANNELS)
    assert sum(p.numel() for p in light.parameters()) == sum(p.numel() for p in build_segmentation_net().parameters())


def test_paper_unet_torchscript_matches_eager():
    net = LViTUNet(out_channels=2, features=(4, 8, 16, 32, 32)).eval()
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(torch.jit.script(net)(x), net(x))


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
        (dict(size="light", channels=(4, 8, 16), strides=(2, 2)), "size"),
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
