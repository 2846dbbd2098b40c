"""Segmentation network factory for stage 2 (student and teacher of the Mean Teacher).

Two presets (``size``), both TorchScript-able, so they work with ``monai.bundle verify_net_in_out`` and
``ckpt_export`` as the bundles' ``network_def``; they see images only (no text at test time):

- ``"paper"``: :class:`LViTUNet`, the U-Net the paper's numbers were measured with (LViT's): two 3x3
  conv-BN-ReLU per level, the first level at full resolution, max-pool down-sampling, widths 64-128-256-512-512,
  up-sampling then two convolutions on the concatenated skip, decoder widths 256-128-64-64; 14.8 M parameters,
  24.4 GMAC (49 GFLOP) per 224 x 224 image. Built from MONAI's ``BasicUNet`` blocks.
- ``"light"``: a MONAI :class:`~monai.networks.nets.UNet` with widths 16-32-64-128-256, strided convolutions and one
  convolution per block; 0.66 M parameters and 0.4 GFLOP per 224 x 224 image: the CPU preset of the demo and the
  tests.

``size=None`` builds a MONAI ``UNet`` from ``channels`` and ``strides``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from monai.networks.layers import Conv
from monai.networks.nets import UNet
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

__all__ = ["build_segmentation_net", "LViTUNet", "PAPER_FEATURES", "DEFAULT_CHANNELS", "DEFAULT_STRIDES", "SIZES"]

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
DEFAULT_STRIDES = (2, 2, 2, 2)
#: encoder widths of LViT's U-Net (64 base channels, four max-pool levels)
PAPER_FEATURES = (64, 128, 256, 512, 512)

_NORMS = {"batch": "batch", "instance": "instance", "none": None}
_ACTS = ("prelu", "relu", "leakyrelu")
#: the presets: None (channels/strides given), "light" (CPU), "paper" (LViT's U-Net)
SIZES = (None, "light", "paper")
_SIZES = SIZES


class LViTUNet(nn.Module):
    """LViT's U-Net (the paper's segmentation network) from MONAI's ``BasicUNet`` blocks.

    Encoder: ``TwoConv`` at full resolution, then four ``Down`` (max-pool + two conv-BN-act) to widths
    ``features``; decoder: four ``UpCat`` (transposed-convolution up-sampling that keeps the width, concatenation
    with the skip, two conv-BN-act) to widths ``f2, f1, f0, f0``; a 1x1 convolution to the logits.

    Args:
        spatial_dims: 2 (or 3).
        in_channels: image channels.
        out_channels: logit channels.
        features: the five encoder widths.
        act, norm, dropout: as for MONAI's ``BasicUNet``.

    Example:
        >>> LViTUNet(features=(4, 8, 16, 32, 32))(torch.zeros(1, 1, 32, 32)).shape
        torch.Size([1, 1, 32, 32])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1,
                 features: Sequence[int] = PAPER_FEATURES, act: str | tuple = ("relu", {"inplace": True}),
                 norm: Optional[str] = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        f = tuple(features)
        if len(f) != 5:
            raise ValueError(f"features needs the 5 encoder widths, got {f!r}.")
        bias = True
        d = spatial_dims
        self.conv_0 = TwoConv(d, in_channels, f[0], act, norm, bias, dropout)
        self.down_1 = Down(d, f[0], f[1], act, norm, bias, dropout)
        self.down_2 = Down(d, f[1], f[2], act, norm, bias, dropout)
        self.down_3 = Down(d, f[2], f[3], act, norm, bias, dropout)
        self.down_4 = Down(d, f[3], f[4], act, norm, bias, dropout)
        self.up_4 = UpCat(d, f[4], f[3], f[2], act, norm, bias, dropout, "deconv", halves=False)
        self.up_3 = UpCat(d, f[2], f[2], f[1], act, norm, bias, dropout, "deconv", halves=False)
        self.up_2 = UpCat(d, f[1], f[1], f[0], act, norm, bias, dropout, "deconv", halves=False)
        self.up_1 = UpCat(d, f[0], f[0], f[0], act, norm, bias, dropout, "deconv", halves=False)
        self.final_conv = Conv[Conv.CONV, d](f[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *spatial) -> logits (B, out_channels, *spatial); spatial sizes divisible by 16."""
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u = self.up_4(x4, x3)
        u = self.up_3(u, x2)
        u = self.up_2(u, x1)
        u = self.up_1(u, x0)
        return self.final_conv(u)


def _positive_ints(name: str, values: Sequence[int]) -> tuple:
    values = tuple(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}.")
    return values


def build_segmentation_net(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 1,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    strides: Sequence[int] = DEFAULT_STRIDES,
    num_res_units: int = 0,
    norm: str = "batch",
    dropout: float = 0.0,
    size: Optional[str] = None,
    act: str = "prelu",
) -> nn.Module:
    """Build the stage-2 U-Net (a MONAI ``UNet``).

    Args:
        spatial_dims: 1, 2 or 3 (the method uses 2).
        in_channels: image channels.
        out_channels: C output logits: 1 for binary (sigmoid), C >= 2 for multi-class (softmax, channel 0 background).
        channels: feature widths per level (at least 2) of the MONAI ``UNet``; with a ``size`` preset they must be
            left at their defaults.
        strides: down-sampling stride per level transition, ``len(channels) - 1`` entries. The input's spatial size
            must be divisible by ``prod(strides)``.
        num_res_units: residual units per block (MONAI ``UNet``); 0 gives one conv per block.
        norm: ``"batch"`` (default, as LViT's U-Net), ``"instance"`` or ``"none"``.
        dropout: dropout probability in [0, 1).
        size: ``None`` (a MONAI ``UNet`` from ``channels``/``strides``), ``"light"`` (the same with the default
            widths 16..256: the CPU preset) or ``"paper"`` (:class:`LViTUNet`; ReLU unless ``act`` says otherwise;
            ``num_res_units`` does not apply).
        act: activation, ``"prelu"`` (MONAI's default), ``"relu"`` or ``"leakyrelu"``.

    Returns:
        A network mapping ``(B, in_channels, *spatial)`` to logits ``(B, out_channels, *spatial)``.

    Raises:
        ValueError: on any invalid argument (the message names it).

    Example:
        >>> net = build_segmentation_net(channels=(4, 8, 16), strides=(2, 2))
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 1, 32, 32])
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}.")
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if size is not None and (tuple(channels) != DEFAULT_CHANNELS or tuple(strides) != DEFAULT_STRIDES):
        raise ValueError(f"size={size!r} fixes channels and strides; leave them at their defaults or use size=None.")
    channels = _positive_ints("channels", channels)
    if len(channels) < 2:
        raise ValueError(f"channels needs at least 2 levels, got {channels!r}.")
    strides = _positive_ints("strides", strides)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides needs len(channels) - 1 = {len(channels) - 1} entries, got {strides!r}.")
    if not isinstance(num_res_units, int) or isinstance(num_res_units, bool) or num_res_units < 0:
        raise ValueError(f"num_res_units must be a non-negative int, got {num_res_units!r}.")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {tuple(_NORMS)}, got {norm!r}.")
    if act not in _ACTS:
        raise ValueError(f"act must be one of {_ACTS}, got {act!r}.")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if size == "paper":
        paper_act = ("relu", {"inplace": True}) if act == "prelu" else act  # LViT's U-Net uses ReLU
        return LViTUNet(spatial_dims, in_channels, out_channels, PAPER_FEATURES, paper_act, _NORMS[norm],
                        float(dropout))
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=strides,
        num_res_units=num_res_units,
        act=act,
        norm=_NORMS[norm],
        dropout=float(dropout),
    )


def build_network(info: Mapping[str, Any], **overrides: Any) -> torch.nn.Module:
    """The (untrained) network a model info describes: ``build_segmentation_net(**info["network"], **overrides)``."""
    return build_segmentation_net(**{**info["network"], **overrides})


def state_shapes(net: torch.nn.Module) -> dict[str, tuple]:
    """The shape of every entry of ``net.state_dict()``."""
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}
