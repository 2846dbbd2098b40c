"""What inference needs to know about a trained model, saved beside it as ``model_info.json``.

A stage-2 training run writes ``<ckpt_dir>/model_info.json`` when it starts (`SaveModelInfo`, a handler of the
bundles' ``train.json``), so that ``models/model.pt`` and the file beside it are all that 2D inference
(``inferring``), evaluation (``evaluating``) and volume inference (`amvlm_monai.inference.volume`) need::

    {"format": "amvlm-monai model info", "version": 1,
     "network": {"spatial_dims": 2, "in_channels": 1, "out_channels": 20, "size": "light"},   # build_segmentation_net
     "image_size": [64, 64], "in_channels": 1, "out_channels": 20, "unet_size": "light",
     "multiclass": true, "class_names": ["S", "L5", ...], "threshold": 0.5,
     "slicing": {"axis": 0, "axcodes": "RAS"},   # volumes: reorient to axcodes, then 2D slices along axis
     "intensity": "slice_minmax",                # each (resized) slice min-max scaled to [0, 1], then [-1, 1]
     "modality": "MR"}

``slicing`` says how volumes are cut into the 2D images the model was trained on (``data_prep.mrspineseg`` writes
sagittal slices of the closest-canonical RAS+ volume: axis 0 with ``axcodes`` "RAS"); ``intensity`` names what the
2D training chain did to each image (``load_image_chain``: resize, then min-max per image), which volume inference
repeats per slice; ``modality`` is the data's modality, for the record and for volume inference's modality rules when
``intensity`` is not ``slice_minmax``. Command-line flags of each consumer still override every value.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from amvlm_monai.utils.errors import DataError
from amvlm_monai.utils.shapes import spatial_size

logger = logging.getLogger(__name__)


INFO_NAME = "model_info.json"


FORMAT = "amvlm-monai model info"


INTENSITY_RULES = ("slice_minmax", "modality")


_VERSION = 1


def info_path(model: str | os.PathLike) -> Path:
    """``model_info.json`` beside a model file (or inside a folder)."""
    model = Path(model)
    return model / INFO_NAME if model.is_dir() else model.with_name(INFO_NAME)


def make_model_info(network: Mapping[str, Any], image_size: int | Sequence[int], multiclass: bool = False,
                    class_names: Optional[Sequence[str]] = None, threshold: float = 0.5, slice_axis: int = 2,
                    axcodes: Optional[str] = "RAS", modality: str = "auto", intensity: str = "slice_minmax") -> dict:
    """The model-info record (see the module docstring); values are checked.

    Args:
        network: the keyword arguments of `build_segmentation_net` that rebuild the network.
        image_size: the network's 2D input size.
        multiclass: softmax/argmax over ``out_channels`` classes (else one sigmoid channel).
        class_names: foreground class names, if any.
        threshold: the binary threshold on the sigmoid.
        slice_axis: the volume axis (after ``axcodes``) the 2D training images are slices along.
        axcodes: the orientation volumes are brought to before slicing (None: as stored).
        modality: the data's modality (``"auto"`` when unknown).
        intensity: ``"slice_minmax"`` (what the 2D training chain does) or ``"modality"``.
    """
    network = dict(network)
    for key in ("in_channels", "out_channels"):
        if not isinstance(network.get(key), int):
            raise ValueError(f"network needs an int {key!r}, got {network.get(key)!r}.")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}.")
    if intensity not in INTENSITY_RULES:
        raise ValueError(f"intensity must be one of {INTENSITY_RULES}, got {intensity!r}.")
    return {
        "format": FORMAT,
        "version": _VERSION,
        "network": network,
        "image_size": list(spatial_size(image_size)),
        "in_channels": network["in_channels"],
        "out_channels": network["out_channels"],
        "unet_size": network.get("size"),
        "multiclass": bool(multiclass),
        "class_names": list(class_names) if class_names is not None else None,
        "threshold": float(threshold),
        "slicing": {"axis": int(slice_axis), "axcodes": axcodes or None},
        "intensity": intensity,
        "modality": str(modality),
    }


def write_model_info(path: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write ``info`` as JSON (to a temporary file renamed over ``path``, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(info), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_model_info(model: str | os.PathLike, required: bool = True,
                    defaults: Optional[Mapping[str, Any]] = None) -> Optional[dict]:
    """The model info beside ``model`` (a ``model.pt`` path, or the folder holding it).

    Args:
        model: the model file (the info is ``model_info.json`` in its folder) or a folder.
        required: raise when there is none (else return None).
        defaults: returned (a copy) when there is none, with a warning naming the missing file: the settings a
            bundle's own training configuration gives its model (the bundles' ``model_defaults``), so that a fresh
            bundle's ``network_def`` builds before any training run.

    Raises:
        DataError: naming the file, when it is missing (with ``required`` and no ``defaults``), unreadable or not a
            model info.
    """
    path = info_path(model)
    if not path.is_file():
        if defaults is not None:
            logger.warning(f"{path}: no model info beside {model}; using the bundle's defaults {dict(defaults)}.")
            return dict(defaults)
        if not required:
            return None
        raise DataError(f"{path}: no model info beside {model} (a training run of this project writes it when it "
                        "starts); give the network settings explicitly (--image_size, --in_channels, --out_channels, "
                        "--unet_size, --multiclass) or copy model_info.json from the training run's model folder.")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable model info ({e}).") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{path}: not a model info file (expected \"format\": {FORMAT!r}).")
    missing = [k for k in ("network", "image_size", "multiclass", "slicing", "intensity") if k not in info]
    if missing:
        raise DataError(f"{path}: model info lacks {missing}.")
    return info


def _state_dict(obj: Any, path: Path) -> dict:
    """A plain state dict, or one wrapped under a single usual key (``state_dict``, ``model``, ``network``, ``net``)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "network", "net"):
            if isinstance(obj.get(key), dict) and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise DataError(f"{path}: not a network state dict (parameter name -> tensor).")


def load_state(path: str | os.PathLike) -> dict:
    """The network state dict in ``path`` (``torch.load(weights_only=True)``: tensors and plain containers only),
    or one error naming the file (missing, truncated, corrupt, or not a state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file.")
    from amvlm_monai.io.checkpoint import load_checkpoint

    return _state_dict(load_checkpoint(path), path)  # weights_only; unsafe or damaged files: one error naming it
