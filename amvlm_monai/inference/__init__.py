"""Inference on clinical inputs: 2D networks run slice by slice over volumes, outputs in the input's geometry.

Names are imported lazily so that ``python -m amvlm_monai.inference.volume`` runs the module once.
"""

from __future__ import annotations

__all__ = ["VolumeSegmenter", "ResizedSliceNet", "segment_volume", "input_items"]


def __getattr__(name: str):
    if name == "input_items":
        from amvlm_monai.inference.files import input_items

        return input_items
    if name in __all__:
        from amvlm_monai.inference import volume

        return getattr(volume, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
