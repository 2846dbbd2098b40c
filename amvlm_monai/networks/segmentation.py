"""Segmentation network factory for stage 2 (student and teacher of the Mean Teacher).

The network is a plain MONAI :class:`monai.networks.nets.UNet`, so it works with ``monai.bundle verify_net_in_out``
and ``ckpt_export`` (TorchScript) as the bundles' ``network_def``. It sees images only: no text at test time.
"""

from __future__ import annotations

from typing import Optional, Sequence

from monai.networks.nets import UNet

__all__ = ["build_segmentation_net", "PAPER_CHANNELS", "DEFAULT_CHANNELS", "DEFAULT_STRIDES"]

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
DEFAULT_STRIDES = (2, 2, 2, 2)
# 64 base channels, four down-samplings: the widths of LViT's U-Net used in the paper
PAPER_CHANNELS = (64, 128, 256, 512, 1024)

_NORMS = {"batch": "batch", "instance": "instance", "none": None}
_ACTS = ("prelu", "relu", "leakyrelu")
_SIZES = (None, "paper")


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
) -> UNet:
    """Build the stage-2 U-Net (a MONAI ``UNet``).

    Args:
        spatial_dims: 1, 2 or 3 (the method uses 2).
        in_channels: image channels.
        out_channels: C output logits: 1 for binary (sigmoid), C >= 2 for multi-class (softmax, channel 0 background).
        channels: feature widths per level (at least 2); ignored in favour of ``PAPER_CHANNELS`` when
            ``size="paper"`` (then ``channels`` must be left at its default).
        strides: down-sampling stride per level transition, ``len(channels) - 1`` entries. The input's spatial size
            must be divisible by ``prod(strides)``.
        num_res_units: residual units per block (MONAI ``UNet``); 0 gives one conv per block.
        norm: ``"batch"`` (default, as LViT's U-Net), ``"instance"`` or ``"none"``.
        dropout: dropout probability in [0, 1).
        size: ``None`` (use ``channels``/``strides``) or ``"paper"``: 64 base channels ``(64, 128, 256, 512, 1024)``
            with strides ``(2, 2, 2, 2)``, the widths of LViT's U-Net. The blocks are MONAI's (strided-conv down,
            transposed-conv up, one conv per block unless ``num_res_units > 0``), not a copy of LViT's layers.
        act: activation, ``"prelu"`` (MONAI's default), ``"relu"`` or ``"leakyrelu"``.

    Returns:
        ``UNet`` mapping ``(B, in_channels, *spatial)`` to logits ``(B, out_channels, *spatial)``.

    Raises:
        ValueError: on any invalid argument (the message names it).

    Example:
        >>> net = build_segmentation_net(channels=(4, 8, 16), strides=(2, 2))
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 1, 32, 32])
    """
    if size not in _SIZES:
        raise ValueError(f"size must be one of {_SIZES}, got {size!r}.")
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if size == "paper":
        if tuple(channels) != DEFAULT_CHANNELS or tuple(strides) != DEFAULT_STRIDES:
            raise ValueError("size='paper' fixes channels and strides; leave them at their defaults or use size=None.")
        channels, strides = PAPER_CHANNELS, DEFAULT_STRIDES
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
