"""Text guidance of stage 2: the frozen stage-1 towers, the text mask generator on them, and L_tg.

:class:`PatchEncoder` turns the frozen stage-1 image tower into the patch grid that the
:class:`~amvlm_monai.networks.mask_generator.TextMaskGenerator` decodes; :class:`TextGuidance` gives the text masks
of a batch, the text-guided loss that trains their decoder, and the fusion of teacher and text masks into pseudo
labels. The Mean-Teacher engine (:mod:`amvlm_monai.engines.mean_teacher`) calls it once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from amvlm_monai.losses.semi import fuse_pseudo_labels
from amvlm_monai.networks.mask_generator import TextMaskGenerator
from amvlm_monai.utils.shapes import spatial_size


@torch.no_grad()
def encode_reports(amvlm: nn.Module, reports: Sequence[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Distinct report -> its frozen global text embedding (D,) on the CPU, encoded in batches (eval mode)."""
    amvlm.eval()
    distinct = sorted(set(reports))
    out: dict[str, torch.Tensor] = {}
    for i in range(0, len(distinct), batch_size):
        chunk = distinct[i: i + batch_size]
        out.update(zip(chunk, amvlm.text_embeddings(chunk).float().cpu()))
    return out


class PatchEncoder(nn.Module):
    """Frozen stage-1 image tower as the mask generator expects it: (B, C, H, W) -> patches (B, P, D), float32.

    Images are resized to the encoder's input size when the segmentation runs at another size.

    Args:
        amvlm: the stage-1 model (its ``image_encoder`` and ``image_local`` are used).
        dtype: autocast dtype of the tower (e.g. ``torch.bfloat16``), or None for float32. Use a reduced dtype only
            where the device computes it natively (:func:`~amvlm_monai.utils.precision.amp_dtype`); the patch
            embeddings of bfloat16 agree with float32 to a cosine similarity above 0.99 (tested).
    """

    def __init__(self, amvlm: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.encoder = amvlm.image_encoder
        self.head = amvlm.image_local
        self.dtype = dtype
        size = amvlm.config["image_size"]
        self.size = spatial_size(size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        if self.dtype is None:
            out = self.encoder(images)
            return self.head(out.tokens, out.mask)
        with torch.autocast(images.device.type, dtype=self.dtype):
            out = self.encoder(images)
            return self.head(out.tokens, out.mask).float()


class TextGuidance(nn.Module):
    """Text masks from a frozen stage-1 AMVLM, and the text-guided loss that trains their decoder.

    The frozen text tower's embedding of each distinct report is computed once and cached (reports repeat across
    epochs), never every step.

    Args:
        amvlm: the pretrained :class:`~amvlm_monai.networks.amvlm.AMVLM` (frozen here).
        generator: a :class:`~amvlm_monai.networks.mask_generator.TextMaskGenerator` on ``PatchEncoder(amvlm)``.
        tg_loss: a :class:`~amvlm_monai.losses.text_guided.TextGuidedLoss`, or None (decoder stays untrained:
            the ablation rows MT + CSS / ICL without L_tg).
        tg_weight: weight of L_tg in the total loss.
        fusion_lambda: lambda of the logit-space fusion.
        fusion_mode: "logit" (default) or "authors" (sigmoid(P_T + T), kept for comparison).
        class_prompts: multi-class data: one prompt per foreground class (K = C - 1 masks); None: the paired report.
    """

    def __init__(self, amvlm: nn.Module, generator: TextMaskGenerator, tg_loss: Optional[nn.Module] = None,
                 tg_weight: float = 1.0, fusion_lambda: float = 1.0, fusion_mode: str = "logit",
                 class_prompts: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if fusion_mode not in ("logit", "authors"):
            raise ValueError(f"fusion_mode must be 'logit' or 'authors', got '{fusion_mode}'.")
        self.amvlm = amvlm.requires_grad_(False).eval()
        self.generator = generator
        self.tg_loss = tg_loss
        self.tg_weight = tg_weight
        self.fusion_lambda = fusion_lambda
        self.fusion_mode = fusion_mode
        self.class_prompts = list(class_prompts) if class_prompts else None
        self._cache: dict[str, torch.Tensor] = {}
        self.text_source: Optional[Callable[[], nn.Module]] = None  # rebuilds a released text tower on demand

    def train(self, mode: bool = True) -> "TextGuidance":
        super().train(mode)
        self.amvlm.eval()  # frozen towers keep their BatchNorm statistics
        return self

    def get_extra_state(self) -> dict:
        """The cached report embeddings, part of ``state_dict`` so that a resumed run continues with the same ones (a
        report's embedding differs in its last bits with the batch it was first encoded in)."""
        texts = list(self._cache)
        features = torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0)
        return {"texts": texts, "features": features}

    def set_extra_state(self, state: dict) -> None:
        self._cache = dict(zip(state["texts"], state["features"]))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """(N,) reports -> (N, D) frozen global text embeddings, each distinct report encoded once."""
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            if hasattr(self.amvlm, "text_encoder"):
                self._cache.update(encode_reports(self.amvlm, new))
            elif self.text_source is not None:  # released: load the text tower for these reports, then free it again
                tower = self.text_source()
                self._cache.update(encode_reports(tower, new))
                del tower
            else:
                raise ValueError(f"report {new[0]!r} was not encoded before the text tower was released; pass every "
                                 "report of the data to build_text_guidance(reports=...) (or do not release it).")
        return torch.stack([self._cache[t] for t in texts]).to(device)

    def release_text_tower(self, source: Optional[Callable[[], nn.Module]] = None) -> None:
        """Free the frozen text tower (its features are cached). A report not cached afterwards is encoded by a tower
        that ``source()`` builds for the occasion (an AMVLM with ``text_encoder`` and ``text_global``) and frees again;
        without ``source`` it is an error."""
        self.text_source = source
        for name in ("text_encoder", "text_global"):
            if hasattr(self.amvlm, name):
                delattr(self.amvlm, name)

    def prompts(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Prompt embeddings per image, (B, K, D): the paired report, or the shared class prompts."""
        if self.class_prompts is None:
            return self.text_features(texts, device).unsqueeze(1)
        shared = self.text_features(self.class_prompts, device)
        return shared.unsqueeze(0).expand(len(texts), -1, -1)

    def forward(self, images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Text masks and L_tg for a batch.

        Args:
            images: (B, C, H, W).
            texts: B paired reports.

        Returns:
            masks (B, K, H, W) in [0, 1] (detached: they only supervise through the pseudo labels) and L_tg
            (a scalar with gradient into the decoder and the scale) or None when there is no ``tg_loss``.
        """
        prompts = self.prompts(texts, images.device)
        dense = self.generator.dense(images)
        low = self.generator.masks(dense, prompts)
        masks = F.interpolate(low.detach(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.tg_loss is None:
            return masks, None
        text = self.text_features(texts, images.device)
        if getattr(self.tg_loss, "extended", False):
            pair_masks = self.generator.masks(dense, text)  # (B, B, h, w): every report on every image
        else:
            pair_masks = self.generator.masks(dense, text.unsqueeze(1))[:, 0]
        return masks, self.tg_loss(dense, pair_masks, text)

    def fuse(self, teacher_logits: torch.Tensor, masks: torch.Tensor, multiclass: bool) -> torch.Tensor:
        """Pseudo labels (B, C, H, W) from teacher logits and text masks.

        Binary: masks (B, 1, H, W). Multi-class: masks (B, C-1, H, W) for the foreground classes; the background's
        text mask is taken as 1 - max over the foreground masks.
        """
        if multiclass and masks.shape[1] == teacher_logits.shape[1] - 1:
            background = 1 - masks.max(dim=1, keepdim=True)[0]
            masks = torch.cat([background, masks], dim=1)
        return fuse_pseudo_labels(teacher_logits, masks, lam=self.fusion_lambda, mode=self.fusion_mode,
                                  multiclass=multiclass)

    @torch.no_grad()
    def text_masks(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Text masks only, (B, K, H, W) in [0, 1], without L_tg (diagnostics and pictures)."""
        low = self.generator.masks(self.generator.dense(images), self.prompts(texts, images.device))
        return F.interpolate(low, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_text_guidance(checkpoint: str, use_tg: bool = True, tg_weight: float = 1.0, extended: bool = False,
                        temperature: float = 0.07, fusion_lambda: float = 1.0, fusion_mode: str = "logit",
                        num_blocks: int = 2, class_prompts: Optional[Sequence[str]] = None,
                        text_model: Optional[str] = None, device: str | torch.device = "cpu",
                        frozen_amp: bool | str = True, reports: Optional[Sequence[str]] = None) -> TextGuidance:
    """A :class:`TextGuidance` on a stage-1 checkpoint (see :func:`~amvlm_monai.networks.amvlm.load_amvlm`).

    Only the parts stage 2 uses are built and read (memory-mapped) from the checkpoint.

    Args:
        frozen_amp: precision of the frozen image tower, as ``amp`` of :func:`~amvlm_monai.utils.precision.amp_dtype`:
            True keeps its weights in bfloat16 and runs it under bfloat16 autocast where the device computes
            bfloat16 natively, else float32; False: float32.
        reports: the reports the run will show the guidance (e.g. those of the datalist): they are encoded once here
            and the text tower is not kept in memory; another report met later is encoded by a text tower loaded for
            the occasion. None keeps the text tower and encodes reports as they come.
        Others: see :class:`TextGuidance`, :class:`~amvlm_monai.losses.text_guided.TextGuidedLoss` and
            :class:`~amvlm_monai.networks.mask_generator.TextMaskGenerator`.
    """
    from amvlm_monai.losses.text_guided import TextGuidedLoss
    from amvlm_monai.networks.amvlm import STAGE2_PARTS, load_amvlm
    from amvlm_monai.utils.precision import amp_dtype

    def text_tower() -> nn.Module:
        return load_amvlm(checkpoint, text_model=text_model, parts=("text_encoder", "text_global")).to(device)

    cache: dict[str, torch.Tensor] = {}
    if reports is not None:  # encode with a text-only model first, so that both towers are never in memory together
        texts = sorted(set(reports) | set(class_prompts or ()))
        if not texts:
            raise ValueError("reports is empty: give the reports of the training data, or None.")
        cache = encode_reports(text_tower(), texts)
    parts = ("image_encoder", "image_local") if reports is not None else STAGE2_PARTS
    amvlm = load_amvlm(checkpoint, text_model=text_model, parts=parts)
    dtype = amp_dtype(device, frozen_amp)
    dtype = dtype if dtype == torch.bfloat16 else None  # float16's range is too narrow for unscaled activations
    if dtype is not None:
        amvlm.image_encoder.to(dtype)  # half the memory and no casts per step; autocast keeps norms in float32
        amvlm.image_local.to(dtype)
    patches = PatchEncoder(amvlm, dtype=dtype)
    grid = tuple(amvlm.image_encoder.grid_size)
    generator = TextMaskGenerator(patches, grid_size=grid, embed_dim=amvlm.config["embed_dim"],
                                  num_blocks=num_blocks)
    tg = TextGuidedLoss(temperature=temperature, extended=extended) if use_tg else None
    guidance = TextGuidance(amvlm, generator, tg, tg_weight, fusion_lambda, fusion_mode, class_prompts)
    guidance._cache.update(cache)
    if reports is not None:
        guidance.release_text_tower(source=text_tower)  # a report met later (e.g. in pictures) still works
    return guidance.to(device)
