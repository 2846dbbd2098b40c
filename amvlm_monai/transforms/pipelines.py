"""Transform chains for the two stages, built from MONAI transforms.

All chains read a datalist item ``{"image": path, "label": path, "text": str}``. Images become one channel, are resized
to ``image_size`` and scaled to [0, 1], then normalised to [-1, 1]. Geometric augmentation is used only for the ICL
image view: flipping or rotating an image would contradict the left/right and upper/lower words of its report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
)

from amvlm_monai.io.clinical import CheckFinited, Load2Dd
from amvlm_monai.transforms.views import BinarizeLabeld, CheckTextd, LabelIndexd, TextViewd, ToColord, ToGrayscaled
from amvlm_monai.utils.shapes import spatial_size

__all__ = ["load_image_chain", "pretrain_transforms", "segmentation_transforms", "inference_transforms",
           "mask_postprocessing"]


def load_image_chain(keys: Sequence[str], image_size: int | Sequence[int], label_key: str | None = None,
                     in_channels: int = 1, multiclass: bool = False, num_classes: int | None = None) -> list:
    """Load, ``in_channels`` channels, resize (labels nearest), intensity to [0, 1].

    The image's path is kept under ``image_file`` (for messages: the engines name the files of a batch whose loss is
    not finite); an image with NaN or infinite values, or a binary mask with values other than 0/1 or 0/255, stops
    the run with a message naming the file.

    Args:
        keys: the keys to load (images and, if any, ``label_key``).
        image_size: square size or (H, W).
        label_key: the label's key: binary masks are binarised, multi-class labels kept as class indices.
        in_channels: 1 averages RGB(A) into grey; 3 keeps colour (grey images are repeated to 3 channels).
        multiclass: labels are class indices (not binarised).
        num_classes: with ``multiclass``, label values must lie in ``0 .. num_classes - 1``.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey) or 3 (colour), got {in_channels}.")
    keys = list(keys)
    img_keys = [k for k in keys if k != label_key]
    modes = ["bilinear" if k != label_key else "nearest" for k in keys]
    chain = [
        CopyItemsd(keys=img_keys[:1], names=["image_file"]),
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        CheckFinited(keys=img_keys),
        ToGrayscaled(keys=img_keys) if in_channels == 1 else ToColord(keys=img_keys),
    ]
    if label_key is not None:
        chain.append(LabelIndexd(keys=label_key, num_classes=num_classes) if multiclass else BinarizeLabeld(keys=label_key))
    chain += [
        Resized(keys=keys, spatial_size=spatial_size(image_size), mode=modes),
        ScaleIntensityd(keys=img_keys, minv=0.0, maxv=1.0),
    ]
    return chain


def _normalise(keys: Sequence[str]) -> NormalizeIntensityd:
    return NormalizeIntensityd(keys=list(keys), subtrahend=0.5, divisor=0.5)


def pretrain_transforms(image_size: int | Sequence[int] = 224, drop_prob: float = 0.1, rotate_degrees: float = 20.0,
                        augment: bool = True, in_channels: int = 1) -> Compose:
    """Stage 1: image, its augmented view ``image_aug``, the report ``text`` and its view ``text_aug``.

    The view is augmented in [0, 1] intensity space, before normalisation (the authors' code cast it to uint8 there).

    Args:
        image_size: square size or (H, W).
        drop_prob: word-drop probability of the text view.
        rotate_degrees: the view's random rotation range, +- degrees.
        augment: False gives identical views (for evaluation and deterministic tests).
        in_channels: 1 (grey) or 3 (colour, e.g. H&E).
    """
    chain = [CheckTextd(keys="text")] + load_image_chain(["image"], image_size, in_channels=in_channels)
    chain.append(CopyItemsd(keys=["image", "text"], times=1, names=["image_aug", "text_aug"]))
    if augment:
        rad = math.radians(rotate_degrees)
        chain += [
            RandRotate90d(keys="image_aug", prob=0.5),
            RandFlipd(keys="image_aug", prob=0.5, spatial_axis=0),
            RandFlipd(keys="image_aug", prob=0.5, spatial_axis=1),
            RandRotated(keys="image_aug", range_x=rad, prob=0.5, padding_mode="border"),
            RandScaleIntensityd(keys="image_aug", factors=0.2, prob=0.8),
            RandShiftIntensityd(keys="image_aug", offsets=0.1, prob=0.8),
            RandAdjustContrastd(keys="image_aug", gamma=(0.7, 1.5), prob=0.5),
            ScaleIntensityRanged(keys="image_aug", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
            TextViewd(keys="text", out_keys="text_aug", drop_prob=drop_prob),
        ]
    chain += [_normalise(["image", "image_aug"]), EnsureTyped(keys=["image", "image_aug"], track_meta=False)]
    return Compose(chain)


def segmentation_transforms(image_size: int | Sequence[int] = 224, labeled: bool = True, augment: bool = False,
                            with_text: bool = True, in_channels: int = 1, multiclass: bool = False,
                            num_classes: int | None = None) -> Compose:
    """Stage 2 and evaluation: ``image`` (C,H,W) in [-1, 1], ``label`` (1,H,W) when ``labeled`` ({0,1}, or class
    indices with ``multiclass``), ``text``.

    ``augment`` adds intensity-only augmentation (no flips or rotations, which would contradict the report).
    """
    keys = ["image", "label"] if labeled else ["image"]
    chain = [CheckTextd(keys="text")] if with_text else []
    chain += load_image_chain(keys, image_size, label_key="label" if labeled else None, in_channels=in_channels,
                              multiclass=multiclass, num_classes=num_classes)
    if augment:
        chain += [
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ]
    chain += [_normalise(["image"]), EnsureTyped(keys=keys, track_meta=not augment)]
    return Compose(chain)


def inference_transforms(image_size: int | Sequence[int] = 224, in_channels: int = 1) -> Compose:
    """Images only; metadata kept so that predictions can be inverted to the input's size and written.

    The training chain's steps after loading; the loader (`Load2Dd`) also reads single-frame DICOM files and refuses
    volumes, empty files and non-DICOM ``.dcm`` files with a message naming them.
    """
    chain = load_image_chain(["image"], image_size, in_channels=in_channels)
    chain = [Load2Dd(keys="image") if isinstance(t, LoadImaged) else t for t in chain
             if not isinstance(t, (EnsureChannelFirstd, CheckFinited, CopyItemsd))]
    return Compose(chain + [_normalise(["image"]), EnsureTyped(keys="image", track_meta=True)])


def mask_postprocessing(preprocessing: Compose, output_dir: str, multiclass: bool = False, threshold: float = 0.5,
                        output_ext: str = ".png") -> Compose:
    """Logits -> masks at the input's size and geometry, each written to the file its item names under ``"output"``
    (`amvlm_monai.inference.files.input_items`: the input's path relative to the input folder, never two inputs on
    one file), else to ``<output_dir>/<input stem>_mask<output_ext>``.

    Binary masks are written 0/255 (PNG) and multi-class label maps as class indices.
    """
    from monai.transforms import Activationsd, AsDiscreted, Invertd

    from amvlm_monai.io.clinical import SaveImagePathd, SaveNiftid

    chain = [
        Activationsd(keys="pred", softmax=multiclass, sigmoid=not multiclass),
        AsDiscreted(keys="pred", argmax=multiclass, threshold=None if multiclass else threshold),
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True),
    ]
    if output_ext.lower() in (".nii", ".nii.gz"):  # label maps with the input's 4x4 affine (2D slices of volumes)
        chain.append(SaveNiftid(keys="pred", output_dir=output_dir, output_ext=output_ext))
    else:
        chain.append(SaveImagePathd(keys="pred", output_dir=output_dir, output_ext=output_ext,
                                    scale=None if multiclass else 255))
    return Compose(chain)
