"""The AMVLM model: encoders, projection heads, momentum copies, cross-attention and PDT heads.

Checkpoint layout (what ``pretraining`` saves and stage 2 loads, see :func:`load_amvlm`): a dict with
``"model"`` (this module's ``state_dict``), ``"config"`` (the constructor arguments as plain values, so that the
model is rebuilt without the pretraining config) and ``"epoch"``. It is read with ``weights_only=True``
(:func:`~amvlm_monai.io.checkpoint.load_checkpoint`). Sub-module names inside ``"model"``:
``image_encoder``, ``text_encoder``, ``image_global``, ``image_local``, ``text_global``, ``text_local``,
``pdt_image``, ``pdt_text``, ``pdt_attended``, ``attend_words`` (patches attend over words),
``attend_patches`` (words attend over patches), and the ``momentum_*`` copies.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from amvlm_monai.io.checkpoint import CheckpointError, load_checkpoint
from amvlm_monai.networks.cross_attention import CrossAttention
from amvlm_monai.networks.heads import GlobalHead, LocalHead
from amvlm_monai.networks.momentum import momentum_copy, momentum_update
from amvlm_monai.networks.outputs import TokenOutput
from amvlm_monai.networks.pdt import PDT
from amvlm_monai.networks.text import TextEncoder
from amvlm_monai.networks.vit import ViTEncoder

__all__ = ["AMVLM", "build_amvlm", "load_amvlm", "PRESETS", "PARTS", "STAGE2_PARTS", "text_width"]

# Architecture presets: the paper's (ViT-B/16 at 224 px, 6-layer BERT, D = 128) and a small one for CPU demos.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(image_size=224, patch_size=16, vit_width=768, vit_depth=12, vit_heads=12, vit_mlp=3072,
                  text_layers=6, max_words=20, embed_dim=128, head_hidden=2048),
    "small": dict(image_size=64, patch_size=8, vit_width=128, vit_depth=4, vit_heads=4, vit_mlp=256,
                  text_layers=2, max_words=40, embed_dim=64, head_hidden=256),
}


# Sub-modules, in construction order. Stage 2 uses patch embeddings (image tower + local head) and report embeddings
# (text tower + global head): with ``parts=STAGE2_PARTS`` nothing else of a stage-1 checkpoint (momentum copies,
# PDTs, cross-attention, the other heads) is built or read.
PARTS = ("image_encoder", "text_encoder", "image_global", "image_local", "text_global", "text_local",
         "attend_words", "attend_patches", "pdt_image", "pdt_text", "pdt_attended")
STAGE2_PARTS = ("image_encoder", "image_local", "text_encoder", "text_global")


def text_width(text_model: Optional[str]) -> int:
    """Hidden width of a BERT-family folder (its ``config.json``), without loading the model."""
    from amvlm_monai.networks.text import _check_folder, default_text_model_path

    cfg = _check_folder(default_text_model_path() if text_model is None else os.fspath(text_model))
    return int(cfg["hidden_size"])


class AMVLM(nn.Module):
    """Image and text towers with the pieces the stage-1 losses need.

    Args:
        image_size: input side (square) or (H, W).
        in_channels: image channels (1 for grey-scale medical images).
        patch_size, vit_width, vit_depth, vit_heads, vit_mlp: the ViT image encoder.
        text_model: a local BERT-family folder; None = the packaged all-MiniLM-L6-v2.
        text_layers: keep the first N layers of the text encoder (None keeps all; the paper uses 6).
        max_words: tokenizer length limit (the paper: 20).
        embed_dim: D, the joint embedding width (paper: 128).
        head_hidden: hidden width of the projection heads (paper: 2048).
        head: kind of the four projection heads, ``"mlp"`` (MGCA's BatchNorm MLP, the paper's) or ``"linear"``
            (one linear map, as CLIP; no batch dependence; the CPU demo uses it), see :mod:`~.heads`.
        momentum: EMA factor of the momentum copies used for the ICL view (0.995).
        qkv_projections: Q/K/V projections in the CSS cross-attention (False: the authors' projection-free form).
        pdt_heads: attention heads of the PDT.
        with_momentum: build the momentum copies (not needed when ICL is off, or in stage 2).
        patch_embed: the ViT's tokeniser, ``"linear"`` (patch projection, the paper's ViT with DeiT weights) or
            ``"conv"`` (a convolutional stem, for training from scratch on little data; the CPU demo uses it).
        parts: build only these sub-modules of :data:`PARTS` (e.g. :data:`STAGE2_PARTS`); None builds all. Not part
            of ``config`` (a checkpoint always describes the whole model).
        text_cache_size: reports whose outputs a frozen text tower keeps (``TextEncoder(cache_size=...)``, memory per
            report there); 0 turns the cache off. Not part of ``config`` (it does not change the model).

    A frozen tower (no trainable parameter) and its momentum copy keep equal weights: the EMA step of such a pair is
    skipped (it would not change a value), and while they are equal the text view of the momentum branch is the frozen
    online tower's, so both views share its cache. Equality is checked once per change of either side's parameters.
    """

    def __init__(self, image_size: int | Sequence[int] = 224, in_channels: int = 1, patch_size: int = 16,
                 vit_width: int = 768, vit_depth: int = 12, vit_heads: int = 12, vit_mlp: int = 3072,
                 text_model: Optional[str] = None, text_layers: Optional[int] = 6, max_words: int = 20,
                 embed_dim: int = 128, head_hidden: int = 2048, momentum: float = 0.995,
                 qkv_projections: bool = True, pdt_heads: int = 8, with_momentum: bool = True,
                 patch_embed: str = "linear", head: str = "mlp", parts: Optional[Sequence[str]] = None,
                 text_cache_size: int = 50_000) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if embed_dim % pdt_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by pdt_heads ({pdt_heads}).")
        self.config = dict(image_size=image_size, in_channels=in_channels, patch_size=patch_size,
                           vit_width=vit_width, vit_depth=vit_depth, vit_heads=vit_heads, vit_mlp=vit_mlp,
                           text_model=None if text_model is None else os.fspath(text_model),
                           text_layers=text_layers, max_words=max_words, embed_dim=embed_dim,
                           head_hidden=head_hidden, momentum=momentum, qkv_projections=qkv_projections,
                           pdt_heads=pdt_heads, with_momentum=with_momentum, patch_embed=patch_embed,
                           head=head)
        self.momentum = momentum
        self.parts = tuple(PARTS if parts is None else parts)
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}.")
        if with_momentum and set(self.parts) != set(PARTS):
            raise ValueError("with_momentum=True needs every part (the momentum copies follow the online towers).")
        build = {
            "image_encoder": lambda: ViTEncoder(img_size=image_size, patch_size=patch_size, in_channels=in_channels,
                                                hidden_size=vit_width, num_layers=vit_depth, num_heads=vit_heads,
                                                mlp_dim=vit_mlp, patch_embed=patch_embed),
            "text_encoder": lambda: TextEncoder(model_path=text_model, max_length=max_words, num_layers=text_layers,
                                                cache_size=text_cache_size),
            "image_global": lambda: GlobalHead(vit_width, embed_dim, head_hidden, head),
            "image_local": lambda: LocalHead(vit_width, embed_dim, head_hidden, head),
            "text_global": lambda: GlobalHead(text_width(text_model), embed_dim, head_hidden, head),
            "text_local": lambda: LocalHead(text_width(text_model), embed_dim, head_hidden, head),
            "attend_words": lambda: CrossAttention(embed_dim, qkv_projections=qkv_projections),
            "attend_patches": lambda: CrossAttention(embed_dim, qkv_projections=qkv_projections),
            "pdt_image": lambda: PDT(embed_dim, num_heads=pdt_heads),
            "pdt_text": lambda: PDT(embed_dim, num_heads=pdt_heads),
            "pdt_attended": lambda: PDT(embed_dim, num_heads=pdt_heads),
        }
        for name in PARTS:  # always in this order, so that seeded initialisation does not depend on ``parts``
            if name in self.parts:
                setattr(self, name, build[name]())
        self.with_momentum = with_momentum
        if with_momentum:
            self.momentum_image_encoder = momentum_copy(self.image_encoder)
            self.momentum_image_global = momentum_copy(self.image_global)
            self.momentum_image_local = momentum_copy(self.image_local)
            self.momentum_text_encoder = momentum_copy(self.text_encoder)
            # an EMA copy of a trained tower changes every step (its cache would never hit); of a frozen one, the
            # online tower stands in for it (``momentum_encode_text``)
            self.momentum_text_encoder.module.cache_size = 0
            self.momentum_text_global = momentum_copy(self.text_global)
            self.momentum_text_local = momentum_copy(self.text_local)
        self._twins: dict[str, tuple[tuple, bool]] = {}  # name -> (tensor versions of both sides, equal?)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AMVLM":
        """Build from :data:`PRESETS` (``"paper"`` or ``"small"``), any argument overridable."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; choose from {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    # ---- encoding -------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "AMVLM":
        """As ``nn.Module.train``, except that an encoder with no trainable parameter (a frozen tower, e.g. the text
        encoder with ``text_learning_rate`` 0) stays in eval mode: its dropout would only add noise to features that
        never learn (``docs/method.md``, "Measurements behind the defaults")."""
        super().train(mode)
        for name in ("image_encoder", "text_encoder"):
            tower = getattr(self, name, None)
            if mode and tower is not None and not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self

    def tokenize(self, texts: Sequence[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Reports -> ``input_ids``, ``attention_mask``, ``word_index``, each (B, L), on ``device``."""
        tokens = self.text_encoder.tokenize(list(texts))
        return {k: v.to(device) for k, v in tokens.items()} if device is not None else tokens

    @staticmethod
    def _project(out: TokenOutput, global_head: nn.Module, local_head: nn.Module) -> TokenOutput:
        return TokenOutput(cls=global_head(out.cls), tokens=local_head(out.tokens, out.mask), mask=out.mask,
                           attn=out.attn)

    def encode_image(self, images: torch.Tensor) -> TokenOutput:
        """(B, C, H, W) -> projected, L2-normalised CLS (B, D) and patches (B, P, D)."""
        return self._project(self.image_encoder(images), self.image_global, self.image_local)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> TokenOutput:
        """Tokenised reports -> projected, L2-normalised CLS (B, D) and words (B, W, D) with their mask."""
        return self._project(self.text_encoder(**tokens), self.text_global, self.text_local)

    @torch.no_grad()
    def momentum_encode_image(self, images: torch.Tensor) -> TokenOutput:
        """The momentum copies' view of (augmented) images; no gradient."""
        self._require_momentum()
        return self._project(self.momentum_image_encoder(images), self.momentum_image_global,
                             self.momentum_image_local)

    @torch.no_grad()
    def momentum_encode_text(self, tokens: dict[str, torch.Tensor]) -> TokenOutput:
        """The momentum copies' view of (augmented) reports; no gradient. A frozen text tower in eval mode whose
        momentum copy equals it runs in the copy's place (same weights, no dropout either way; its cache serves both)."""
        self._require_momentum()
        same = not self.text_encoder.training and self._frozen_twin("text_encoder")
        encoder = self.text_encoder if same else self.momentum_text_encoder
        return self._project(encoder(**tokens), self.momentum_text_global, self.momentum_text_local)

    def _require_momentum(self) -> None:
        if not self.with_momentum:
            raise RuntimeError("this AMVLM was built with with_momentum=False; the ICL view needs the momentum copies.")

    @torch.no_grad()
    def update_momentum(self) -> None:
        """EMA step of every momentum copy towards its online module (m = ``self.momentum``)."""
        if not self.with_momentum:
            return
        for name in ("image_encoder", "image_global", "image_local", "text_encoder", "text_global", "text_local"):
            if not self._frozen_twin(name):  # m * x + (1 - m) * x = x: nothing to do
                momentum_update(getattr(self, f"momentum_{name}"), getattr(self, name), self.momentum)

    def _frozen_twin(self, name: str) -> bool:
        """Whether online module ``name`` has no trainable parameter and its momentum copy holds the same parameters
        and buffers, bit for bit. Memoised on the tensors' identity and version counters, so the comparison runs again
        only after either side changed (an EMA step, a load)."""
        online = getattr(self, name)
        if any(p.requires_grad for p in online.parameters()):
            return False
        copy = getattr(self, f"momentum_{name}").module
        mine = {**dict(online.named_parameters()), **dict(online.named_buffers())}
        theirs = {**dict(copy.named_parameters()), **dict(copy.named_buffers())}
        version = tuple((id(t), t.data_ptr(), t._version) for t in (*mine.values(), *theirs.values()))
        known = self._twins.get(name)
        if known is not None and known[0] == version:
            return known[1]
        same = mine.keys() == theirs.keys() and all(  # small tensors first: a difference shows up cheaply
            mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype and
            torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in sorted(mine, key=lambda k: mine[k].numel()))
        self._twins[name] = (version, same)
        return same

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(): tensors are replaced or rewritten
        self._twins.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._twins.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def cross_attend(self, img: TokenOutput, txt: TokenOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Bidirectional cross-attention inside each pair.

        Returns:
            att_words (B, P, D): for each patch, the attended (normalised) mix of its report's words.
            att_patches (B, W, D): for each word, the attended mix of its image's patches (zeros on padding).
        """
        att_words = F.normalize(self.attend_words(img.tokens, txt.tokens, txt.mask), dim=-1)
        att_patches = F.normalize(self.attend_patches(txt.tokens, img.tokens, img.mask), dim=-1)
        return att_words, att_patches * txt.mask.unsqueeze(-1)

    def distributions(self, img: TokenOutput, txt: TokenOutput, att_words: torch.Tensor,
                      att_patches: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """PDT (mu, sigma) of the four token sets, keyed as :class:`~amvlm_monai.losses.css.CSSLoss` expects."""
        return {
            "patches": self.pdt_image(img.tokens, img.mask),
            "att_words": self.pdt_attended(att_words, img.mask),
            "words": self.pdt_text(txt.tokens, txt.mask),
            "att_patches": self.pdt_attended(att_patches, txt.mask),
        }

    # ---- stage-2 helpers ------------------------------------------------------------------------------------
    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised patch embeddings (B, P, D), the text mask generator's input."""
        out = self.image_encoder(images)
        return self.image_local(out.tokens, out.mask)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Reports -> normalised global text embeddings (N, D) (the word heads are not run)."""
        device = next(self.text_global.parameters()).device
        return self.text_global(self.text_encoder(**self.tokenize(texts, device)).cls)


def build_amvlm(preset: str = "paper", **overrides: Any) -> AMVLM:
    """An AMVLM from a preset name (``"paper"`` or ``"small"``) with any argument overridden (config-friendly)."""
    return AMVLM.from_preset(preset, **overrides)


def load_amvlm(path: str | os.PathLike, map_location: str | torch.device = "cpu", with_momentum: bool = False,
               text_model: Optional[str] = None, parts: Optional[Sequence[str]] = None,
               text_cache_size: int = 0) -> AMVLM:
    """Rebuild a pretrained AMVLM from a stage-1 checkpoint (see the module docstring for its keys).

    The file is memory-mapped (``torch.load(mmap=True)``) and the model takes its tensors as they are
    (``load_state_dict(assign=True)``): only the pages of the built parts are ever read, when they are first used, so
    a checkpoint with momentum copies and optimiser state costs no more memory than the parts loaded from it.

    Args:
        path: the checkpoint file.
        with_momentum: keep the momentum copies (stage 2 does not need them).
        text_model: override the text model folder recorded in the checkpoint (e.g. when it moved); the
            architecture must be the same, the weights come from the checkpoint.
        parts: build and load only these sub-modules (e.g. :data:`STAGE2_PARTS`); None: all of them.
        text_cache_size: the frozen text tower's cache (see :class:`AMVLM`); off by default, as stage 2 encodes each
            distinct report once and keeps only its global embedding (``guidance.TextGuidance``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage-1 checkpoint not found: {path}")
    try:  # weights_only: a crafted file cannot run code; mmap: only the tensors of the built parts are read
        ckpt = load_checkpoint(path, map_location=map_location, mmap=True)
    except CheckpointError as e:  # a legacy (non-zip) file cannot be memory-mapped: read it whole
        if "mmap" not in str(e):
            raise
        ckpt = load_checkpoint(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not an AMVLM stage-1 checkpoint (needs keys 'model' and 'config', found {keys}).")
    config = dict(ckpt["config"], with_momentum=with_momentum)
    if text_model is not None:
        config["text_model"] = text_model
    # Parts without the text tower are built on the meta device (no memory, no random initialisation) and then take
    # the checkpoint's memory-mapped tensors as they are (assign=True): the file's pages are read as they are used.
    # The text tower loads its BERT folder first, so it is built normally; its weights are then replaced the same way.
    on_meta = parts is not None and "text_encoder" not in parts
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = AMVLM(**config, parts=parts, text_cache_size=text_cache_size)
    wanted = set(model.state_dict())
    state = {k: v for k, v in ckpt["model"].items() if k in wanted}  # only these pages of the file are read
    skipped = ("momentum_",) if not with_momentum else ()
    skipped += tuple(f"{name}." for name in PARTS if name not in model.parts)
    unexpected = [k for k in ckpt["model"] if k not in wanted and not k.startswith(skipped)]
    missing = sorted(wanted - set(state))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing}, unexpected {unexpected}.")
    model.load_state_dict(state, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: no values for {left} (built on the meta device).")
    del state, ckpt
    return model
