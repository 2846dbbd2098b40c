"""AMVLM networks: encoders, projection heads, PDT, cross-attention, momentum copies.

Names are imported lazily (PEP 562) so that ``import amvlm_monai.networks`` neither imports ``transformers`` nor
pays for modules that are not used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TokenOutput": "outputs",
    "ViTEncoder": "vit",
    "VIT_PRESETS": "vit",
    "TextEncoder": "text",
    "default_text_model_path": "text",
    "BERT_FAMILY": "text",
    "GlobalHead": "heads",
    "LocalHead": "heads",
    "PDT": "pdt",
    "CrossAttention": "cross_attention",
    "MomentumCopy": "momentum",
    "momentum_copy": "momentum",
    "momentum_update": "momentum",
    "TextMaskGenerator": "mask_generator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
