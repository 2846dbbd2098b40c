"""Views and checks for image-report pairs: the ICL text view, the report check and grey-scale conversion."""

from __future__ import annotations

import random
import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

from amvlm_monai.io.clinical import binary_mask, label_indices

__all__ = ["TextView", "TextViewd", "CheckTextd", "ToGrayscaled", "ToColord", "BinarizeLabeld", "LabelIndexd"]


class TextView(RandomizableTransform):
    """Augmented report for intra-modal contrast: shuffle comma-separated clauses, then drop words.

    The first word is never dropped and at least one word always survives, so the view is never empty.

    Args:
        drop_prob: probability of dropping each word.
        shuffle: shuffle the clauses (split on "," and ";"; the sentence's final period is kept at the end).

    Example:
        >>> view = TextView(drop_prob=0.0)
        >>> sorted(view("upper left lung, lower right lung.").rstrip(".").split(", "))
        ['lower right lung', 'upper left lung']
    """

    def __init__(self, drop_prob: float = 0.1, shuffle: bool = True) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}.")
        self.drop_prob = drop_prob
        self.shuffle = shuffle

    def __call__(self, text: str) -> str:
        body = text.strip()
        end = "." if body.endswith(".") else ""
        body = body.rstrip(".").strip()
        clauses = [c.strip() for c in re.split(r"[,;]", body) if c.strip()]
        if self.shuffle and len(clauses) > 1:
            order = self.R.permutation(len(clauses))
            clauses = [clauses[i] for i in order]
        out = []
        for clause in clauses:
            words = clause.split()
            keep = [w for w in words if self.R.rand() >= self.drop_prob]
            out.append(" ".join(keep))
        joined = ", ".join(c for c in out if c)
        if not joined:  # every word dropped: fall back to the first clause
            joined = clauses[0] if clauses else body
        return joined + end


class TextViewd(MapTransform, RandomizableTransform):
    """Dictionary version of :class:`TextView`: writes the view of ``keys`` under ``out_keys``."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, out_keys: Sequence[Hashable] | Hashable,
                 drop_prob: float = 0.1, shuffle: bool = True) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.out_keys = [out_keys] if isinstance(out_keys, str) else list(out_keys)
        if len(self.out_keys) != len(self.keys):
            raise ValueError(f"out_keys {self.out_keys} must match keys {list(self.keys)} one to one.")
        self.view = TextView(drop_prob=drop_prob, shuffle=shuffle)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.view.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key, out in zip(self.key_iterator(d), self.out_keys):
            d[out] = self.view(d[key])
        return d


class CheckTextd(MapTransform):
    """Fail early, naming the file, when a sample has no usable report.

    Args:
        keys: the text key(s).
        source_key: the key whose value names the sample in the error (usually the image path).
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable = "text", source_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.source_key = source_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        src = d.get(self.source_key)
        name = getattr(src, "meta", {}).get("filename_or_obj", src) if src is not None else "<unknown>"
        for key in self.keys:
            if key not in d or d[key] is None:
                raise ValueError(f"{name}: no report under key '{key}'.")
            if not isinstance(d[key], str):
                raise ValueError(f"{name}: report under key '{key}' is {type(d[key]).__name__}, expected str.")
            if not d[key].strip():
                raise ValueError(f"{name}: report under key '{key}' is empty.")
        return d


class ToGrayscaled(MapTransform):
    """Average the channels of channel-first images that have 3 or 4 (RGB[A]) channels into one."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] in (3, 4):
                d[key] = img[:3].mean(dim=0, keepdim=True) if isinstance(img, torch.Tensor) \
                    else np.mean(img[:3], axis=0, keepdims=True)
        return d


class ToColord(MapTransform):
    """Three channels: grey images are repeated, an alpha channel is dropped (colour data such as H&E)."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] == 1:
                d[key] = img.repeat(3, 1, 1) if isinstance(img, torch.Tensor) else np.repeat(img, 3, axis=0)
            elif img.shape[0] == 4:
                d[key] = img[:3]
            elif img.shape[0] != 3:
                raise ValueError(f"{_name(img)}: expected 1, 3 or 4 channels, found {img.shape[0]}.")
        return d


def _name(img) -> str:
    return str(getattr(img, "meta", {}).get("filename_or_obj", "image"))


class LabelIndexd(MapTransform):
    """Multi-class labels as one channel of class indices (float, so that nearest resizing keeps them exact).

    Read by the project's one mask rule (:func:`~amvlm_monai.io.clinical.label_indices`: palette PNGs by their
    indices, alpha dropped, an RGB label with equal channels is grey).

    Args:
        keys: label keys.
        num_classes: if given, a value outside ``0 .. num_classes - 1`` raises an error naming the file.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, num_classes: int | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = label_indices(d[key], _name(d[key]), self.num_classes)
        return d


class BinarizeLabeld(MapTransform):
    """Binary masks as ``(1, H, W)`` {0, 1} float.

    With ``strict`` (default) the project's one mask rule (:func:`~amvlm_monai.io.clinical.binary_mask`) reads it: 0/1,
    0/255 or 0/65535 in one channel (grey, palette indices, NIfTI floats), an RGB mask with equal channels, or black
    and one colour; anything else (a label map, an anti-aliased or JPEG mask) raises an error naming the file and the
    values found instead of silently becoming lesion. Without ``strict``, any value above ``threshold`` in any channel
    is foreground.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, threshold: float = 0.0, strict: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold
        self.strict = strict

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            if self.strict:
                d[key] = binary_mask(lab, _name(lab))
                continue
            if lab.shape[0] != 1:
                lab = lab.max(0, keepdim=True)[0] if isinstance(lab, torch.Tensor) else lab.max(0, keepdims=True)
            d[key] = (lab > self.threshold).float() if isinstance(lab, torch.Tensor) \
                else (lab > self.threshold).astype(np.float32)
        return d


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (MONAI's `set_determinism` without forcing deterministic kernels)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
