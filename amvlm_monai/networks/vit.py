"""Vision Transformer image encoder (the AMVLM image tower).

A plain pre-norm ViT (Dosovitskiy et al. 2021) that returns the CLS token, the patch tokens and the last block's
CLS->patch attention as a :class:`~amvlm_monai.networks.outputs.TokenOutput`.

Why not MONAI's ``monai.networks.nets.ViT`` blocks: MONAI's ``PatchEmbeddingBlock`` gives no position embedding to
the CLS token and its ``TransformerBlock`` uses LayerNorm eps 1e-5, so timm/DeiT weights (the paper's
initialisation) would not reproduce the pretrained network exactly. The modules here are named like timm's
``VisionTransformer`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``), so :meth:`ViTEncoder.load_timm_state_dict` maps keys one to one and only
adapts values (input channels, position-embedding grid, DeiT's distillation token).

Attention uses the fused ``F.scaled_dot_product_attention`` in every block; the last block additionally computes
the CLS query's attention row explicitly (a ``(B, heads, 1, N)`` product, cheap). Setting ``fused_attn = False`` on
an :class:`Attention` module switches it to the fully explicit path (used in tests to check both agree).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from amvlm_monai.networks.outputs import TokenOutput
from amvlm_monai.utils.shapes import spatial_size

__all__ = ["ViTEncoder", "Attention", "Block", "VIT_PRESETS"]

# Architecture presets (timm/DeiT names in comments). Any entry can be overridden in ``ViTEncoder.from_preset``.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    # ViT-B/16 (DeiT-B), the paper's image encoder.
    "vit_b16": dict(img_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    # ViT-S/16 (DeiT-S).
    "vit_s16": dict(img_size=224, patch_size=16, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    # ViT-Ti/16 (DeiT-Ti).
    "vit_ti16": dict(img_size=224, patch_size=16, hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    # A CPU-sized toy for tests and demos: 32 px, 4 x 4 patches of 8 px, width 32, 2 blocks.
    "tiny": dict(img_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
}

# timm/DeiT keys that carry no image-encoder weights and are skipped by ``load_timm_state_dict``.
_IGNORED_PREFIXES = ("head.", "head_dist.")


class Attention(nn.Module):
    """Multi-head self-attention with a fused fast path and an explicit path that returns the CLS row.

    Args:
        dim: token width d.
        num_heads: number of heads (must divide ``dim``).
        qkv_bias: bias in the fused q/k/v projection.
        proj_drop: dropout after the output projection.
    """

    fused_attn: bool = True

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, need_cls_attn: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            x: ``(B, N, d)`` tokens, CLS first.
            need_cls_attn: also return the CLS query's attention over all N tokens.

        Returns:
            ``(B, N, d)`` output and ``(B, heads, N)`` CLS attention (rows sum to 1) or None.
        """
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        cls_attn = None
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
            if need_cls_attn:
                cls_attn = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = attn @ v
            if need_cls_attn:
                cls_attn = attn[:, :, 0]
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        return out, cls_attn


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); LayerNorm eps 1e-6 as in timm.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        qkv_bias: bias in the q/k/v projection.
        drop: dropout rate after the attention projection and inside the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, drop)

    def forward(self, x: torch.Tensor, need_cls_attn: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(B, N, d) -> (B, N, d)``, plus the ``(B, heads, N)`` CLS attention when asked."""
        h, cls_attn = self.attn(self.norm1(x), need_cls_attn)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x, cls_attn


class _PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens through a strided convolution (timm's ``patch_embed.proj``)."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, d)


class _ConvStem(nn.Module):
    """A convolutional stem in place of the patch projection (Xiao et al., "Early convolutions help transformers see
    better", NeurIPS 2021): log2(patch) stride-2 3x3 conv-BN-ReLU layers, widths doubling up to ``dim`` (``dim / 2^k``
    for the k-th last), then a 1x1 convolution to ``dim``. Tokens sit on the same grid as the patch projection's.

    A ViT trained from scratch on a few hundred images learns far faster with it (``docs/method.md``, "Measurements
    behind the defaults"); pretrained timm/DeiT weights need the patch projection.
    """

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int]) -> None:
        super().__init__()
        if patch[0] != patch[1] or patch[0] < 2 or patch[0] & (patch[0] - 1):
            raise ValueError(f"patch_embed='conv' needs a square power-of-two patch size, got {patch}.")
        depth = patch[0].bit_length() - 1
        layers, c_in = [], in_channels
        for i in range(depth):
            c_out = max(dim >> (depth - 1 - i), 8)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, dim, kernel_size=1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x).flatten(2).transpose(1, 2)  # (B, P, d)


class ViTEncoder(nn.Module):
    """ViT image encoder returning CLS, patch tokens and the last block's CLS->patch attention.

    Args:
        img_size: input side, an int (square) or ``(H, W)``; must be a multiple of ``patch_size``.
        patch_size: patch side, an int or ``(ph, pw)``.
        in_channels: image channels (1 for grey-scale medical images).
        hidden_size: token width d.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block (must divide ``hidden_size``).
        mlp_dim: hidden width of the block MLPs.
        dropout_rate: dropout after the position embedding, after each attention projection and inside the
            MLPs (attention probabilities are never dropped, so the returned attention is exact).
        qkv_bias: bias in the q/k/v projections (True for timm/DeiT weights).
        patch_embed: ``"linear"`` (the ViT's patch projection, what timm/DeiT weights fit) or ``"conv"`` (a
            convolutional stem, far more sample-efficient when training from scratch; power-of-two square patches).

    Attributes:
        grid_size: ``(h, w)`` patch grid; P = h * w.
        num_patches: P.
        hidden_size: d.

    Example::

        >>> enc = ViTEncoder.from_preset("tiny", in_channels=1)
        >>> out = enc(torch.rand(2, 1, 32, 32))
        >>> out.cls.shape, out.tokens.shape, out.attn.shape
        (torch.Size([2, 32]), torch.Size([2, 16, 32]), torch.Size([2, 16]))
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int | Sequence[int] = 16,
                 in_channels: int = 3, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, dropout_rate: float = 0.0, qkv_bias: bool = True,
                 patch_embed: str = "linear") -> None:
        super().__init__()
        img, patch = spatial_size(img_size, "img_size"), spatial_size(patch_size, "patch_size")
        if patch_embed not in ("linear", "conv"):
            raise ValueError(f"patch_embed must be 'linear' or 'conv', got {patch_embed!r}.")
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"img_size {img} must be a multiple of patch_size {patch}.")
        for name, val in (("in_channels", in_channels), ("hidden_size", hidden_size), ("num_layers", num_layers),
                          ("num_heads", num_heads), ("mlp_dim", mlp_dim)):
            if int(val) < 1:
                raise ValueError(f"{name} must be >= 1, got {val}.")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        self.img_size = img
        self.patch_size = patch
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.grid_size = (img[0] // patch[0], img[1] // patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        stem = _PatchEmbed if patch_embed == "linear" else _ConvStem
        self.patch_embed = stem(in_channels, hidden_size, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, hidden_size))
        self.pos_drop = nn.Dropout(dropout_rate)
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_dim, qkv_bias=qkv_bias, drop=dropout_rate) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ViTEncoder":
        """Build from :data:`VIT_PRESETS` (``"vit_b16"``, ``"vit_s16"``, ``"vit_ti16"``, ``"tiny"``).

        Any constructor argument can be overridden, e.g. ``from_preset("vit_b16", in_channels=1)``.
        """
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset '{name}'; choose from {sorted(VIT_PRESETS)}.")
        return cls(**{**VIT_PRESETS[name], **overrides})

    def forward(self, x: torch.Tensor) -> TokenOutput:
        """
        Args:
            x: ``(B, C, H, W)`` images, ``C = in_channels`` and ``(H, W) = img_size``.

        Returns:
            TokenOutput with ``cls (B, d)``, ``tokens (B, P, d)`` (row-major over ``grid_size``), ``mask (B, P)``
            all True, and ``attn (B, P)``: the last block's CLS->patch attention averaged over heads and
            renormalised over the patches (each row sums to 1).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(x.shape)}."
            )
        b = x.shape[0]
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1) + self.pos_embed
        t = self.pos_drop(t)
        cls_attn = None
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            t, a = blk(t, need_cls_attn=i == last)
            if a is not None:
                cls_attn = a
        t = self.norm(t)
        attn = cls_attn[:, :, 1:].mean(dim=1)  # (B, P): CLS->patch, mean over heads
        attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
        mask = torch.ones(b, self.num_patches, dtype=torch.bool, device=x.device)
        return TokenOutput(cls=t[:, 0], tokens=t[:, 1:], mask=mask, attn=attn)

    # ---- timm / DeiT weights ----------------------------------------------------------------------------------
    def load_timm_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                             interpolate_pos_embed: bool = True) -> tuple[list[str], list[str]]:
        """Load timm / DeiT ``VisionTransformer`` weights.

        Keys map one to one (this module uses timm's names): ``cls_token``, ``pos_embed``,
        ``patch_embed.proj.{weight,bias}``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
        ``norm.*``. Adaptations:

        - ``head.*`` and ``head_dist.*`` (classifiers) are ignored. DeiT's distilled checkpoints carry a
          ``dist_token``: it is ignored and its row of ``pos_embed`` (index 1) is dropped.
        - A checkpoint dict with a ``"model"`` (or ``"state_dict"``) entry is unwrapped; a DDP ``"module."``
          prefix is stripped.
        - In-channels: when this encoder has ``in_channels == 1`` and the checkpoint's patch embedding has C > 1
          input channels, the weight is summed over them. A grey image then gives exactly the same patch
          embedding as the RGB network applied to that image replicated over the C channels.
        - Position embedding: when the checkpoint's patch grid differs from ``grid_size`` and
          ``interpolate_pos_embed`` is True, the patch part (a square grid) is resized bicubically
          (``align_corners=False``) and the CLS row kept; with ``interpolate_pos_embed=False`` it is a shape
          mismatch.

        Args:
            state_dict: the timm state dict (or a checkpoint holding it under ``"model"`` / ``"state_dict"``).
            strict: raise on missing or unexpected keys (shape mismatches always raise).
            interpolate_pos_embed: resize a position embedding made for another patch grid.

        Returns:
            ``(missing_keys, unexpected_keys)`` (both empty when ``strict``).

        Raises:
            ValueError: listing every missing, unexpected and shape-mismatched key.
        """
        sd = self._unwrap_checkpoint(state_dict)
        own = self.state_dict()
        has_dist = "dist_token" in sd
        new: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, val in sd.items():
            if key.startswith(_IGNORED_PREFIXES) or key == "dist_token":
                continue
            if key not in own:
                unexpected.append(key)
                continue
            if not isinstance(val, torch.Tensor):
                mismatched.append(f"{key}: expected a tensor, got {type(val).__name__}")
                continue
            val = self._adapt(key, val, has_dist, interpolate_pos_embed)
            if val.shape != own[key].shape:
                mismatched.append(f"{key}: checkpoint {tuple(val.shape)} vs model {tuple(own[key].shape)}")
                continue
            new[key] = val
        seen = set(new) | {m.split(":")[0] for m in mismatched}
        missing = [k for k in own if k not in seen]
        if mismatched or (strict and (missing or unexpected)):
            lines = [f"cannot load timm ViT weights into ViTEncoder (strict={strict}):"]
            lines += [f"  missing key: {k}" for k in missing]
            lines += [f"  unexpected key: {k}" for k in unexpected]
            lines += [f"  shape mismatch: {m}" for m in mismatched]
            raise ValueError("\n".join(lines))
        with torch.no_grad():
            for key, val in new.items():
                own[key].copy_(val.to(dtype=own[key].dtype))
        return missing, unexpected

    @staticmethod
    def _unwrap_checkpoint(state_dict: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}.")
        sd = state_dict
        for wrapper in ("model", "state_dict"):
            if wrapper in sd and isinstance(sd[wrapper], Mapping) and "pos_embed" not in sd:
                sd = sd[wrapper]
                break
        keys = list(sd)
        if keys and all(k.startswith("module.") for k in keys):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        return dict(sd)

    def _adapt(self, key: str, val: torch.Tensor, has_dist: bool, interpolate: bool) -> torch.Tensor:
        if key == "patch_embed.proj.weight" and val.ndim == 4 and self.in_channels == 1 and val.shape[1] > 1:
            return val.sum(dim=1, keepdim=True)
        if key == "pos_embed" and val.ndim == 3:
            if has_dist and val.shape[1] >= 2:
                val = torch.cat([val[:, :1], val[:, 2:]], dim=1)
            n_old = val.shape[1] - 1
            if n_old != self.num_patches and interpolate and val.shape[2] == self.hidden_size:
                g = math.isqrt(n_old)
                if g * g != n_old:
                    return val  # not a square grid: reported as a shape mismatch
                grid = val[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
                grid = F.interpolate(grid, size=self.grid_size, mode="bicubic", align_corners=False)
                grid = grid.permute(0, 2, 3, 1).reshape(1, self.num_patches, -1).to(val.dtype)
                val = torch.cat([val[:, :1], grid], dim=1)
        return val
