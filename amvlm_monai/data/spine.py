"""MRSpineSeg's classes: names by label value, one text prompt per foreground class, the per-slice text.

Label values (MRSpineSeg, Pang et al. 2021): 0 background, 1 S (sacrum), 2-10 the vertebrae L5, L4, L3, L2, L1,
T12, T11, T10, T9, 11-19 the intervertebral discs L5/S, L4/L5, L3/L4, L2/L3, L1/L2, T12/L1, T11/T12, T10/T11, T9/T10.

Example:
    >>> SPINE_CLASSES[3], SPINE_PROMPTS[3], SPINE_PROMPTS[12]
    ('L4', 'The L4 vertebra.', 'The L4/L5 intervertebral disc.')
    >>> import numpy as np
    >>> describe_spine(np.array([[0, 1, 2], [3, 11, 12]]))
    'Visible levels: S, L5, L4, L5/S, L4/L5.'
"""

from __future__ import annotations

from .describe import describe_levels

__all__ = ["VERTEBRAE", "DISCS", "SPINE_CLASSES", "SPINE_FOREGROUND", "NUM_SPINE_CLASSES", "SPINE_PROMPTS",
           "SPINE_PROMPT_LIST", "describe_spine"]

#: Vertebrae from the bottom up (label values 1..10).
VERTEBRAE = ("S", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9")
#: Discs from the bottom up (label values 11..19): the disc between VERTEBRAE[i] and VERTEBRAE[i - 1].
DISCS = tuple(f"{VERTEBRAE[i]}/{VERTEBRAE[i - 1]}" for i in range(1, len(VERTEBRAE)))
#: Class names, index = label value (0 = background).
SPINE_CLASSES = ("background",) + VERTEBRAE + DISCS
NUM_SPINE_CLASSES = len(SPINE_CLASSES)  # 20


def _prompt(value: int) -> str:
    name = SPINE_CLASSES[value]
    if name == "S":
        return "The sacrum."
    if "/" in name:
        return f"The {name} intervertebral disc."
    return f"The {name} vertebra."


#: One short text prompt per foreground class, keyed by label value 1..19 ("The L4 vertebra.").
SPINE_PROMPTS: dict[int, str] = {v: _prompt(v) for v in range(1, NUM_SPINE_CLASSES)}
#: The same prompts as a list in label order 1..19 (the text guidance's ``class_prompts``: one mask per class).
SPINE_PROMPT_LIST = tuple(SPINE_PROMPTS[v] for v in range(1, NUM_SPINE_CLASSES))
#: Foreground class names in label order 1..19 (column names of per-class scores).
SPINE_FOREGROUND = SPINE_CLASSES[1:]


def describe_spine(label_map, min_area: int = 1) -> str:
    """The levels present in a spine label map, bottom-up, vertebrae then discs: "Visible levels: S, L5, L4/L5.".

    Args:
        label_map: integer array (a slice or a volume) of MRSpineSeg label values.
        min_area: a level is listed when it has at least this many pixels.

    Returns:
        see `amvlm_monai.data.describe.describe_levels`; "No labelled structure is visible." when none is.
    """
    return describe_levels(label_map, SPINE_CLASSES, min_area=min_area)
