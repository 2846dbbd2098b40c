"""Segment a NIfTI volume, a DICOM series, a DICOM file or a 2D image with the 2D network, slice by slice.

The input is loaded natively (:mod:`amvlm_monai.io.clinical`: any orientation, intensity by modality to
[0, 1]), normalised to [-1, 1] as in training, and the 2D network runs on every slice along ``axis`` through MONAI's
``SliceInferer``. Resizing lives in the network: :class:`ResizedSliceNet` resizes each slice batch to ``image_size``
(bilinear, as the training chain's ``Resized``), runs the network, and resizes the logits back to the slice's size
(bilinear) before the sigmoid/argmax. So the volume itself is never resampled and the label map is written with the
input's affine (spacing, orientation, origin): it overlays the input voxel for voxel.

``axcodes`` (e.g. ``"RAS"``) optionally reorients the volume before slicing (so that ``axis=0`` means sagittal
whatever the storage order); the prediction is reoriented back with ``Invertd`` before writing. Models trained on
``data_prep.mrspineseg`` slices (closest-canonical RAS+, sagittal = axis 0) match ``axcodes="RAS", axis=0``.

Intensity: by default the modality rule of the whole volume (CT window, MR z-score, ...) then [-1, 1].
``slice_minmax=True`` instead scales every resized slice by its own min and max, as the 2D training chain
(``load_image_chain``: ``Resized`` then ``ScaleIntensityd``) did for each training slice; use it when the model was
trained on raw-intensity slices cut from volumes.

Output: ``<output_dir>/<input stem>_seg.nii.gz``, uint8: {0, 1} (binary, sigmoid > ``threshold``) or class indices
(``multiclass``, argmax over the channels). Trailing singleton dimensions are dropped (as MONAI's ``SaveImage`` does).
2D inputs (image files, one DICOM frame, a 2D NIfTI) are segmented as they are, never reoriented, as in 2D training.
An existing output is never replaced unless asked (``overwrite``, ``--overwrite``).

Several inputs (the CLI): each gets its own output, its path relative to the inputs' common folder kept
(``p01/t2.nii.gz p02/t2.nii.gz`` -> ``out/p01/t2_seg.nii.gz``, ``out/p02/t2_seg.nii.gz``; `amvlm_monai.io.outputs`);
a folder that is not a DICOM series folder is searched, with its sub-folders, for NIfTI files and DICOM series
folders, segmented file by file (``--input study/`` -> ``out/<path below study/>_seg.nii.gz``). Every input and every
output is checked before the first is segmented.

Refused with a message naming the file: a 4D NIfTI (several volumes), NaN or infinite voxels, an empty file, a
``.dcm`` file that is not DICOM, a folder of several series (unless ``series_uid``, ``--series-uid``), two inputs
that would share an output, an output that exists (unless ``--overwrite``).

CLI: the model and the input are all it needs; the settings the model was trained with are read from
``model_info.json`` beside it (`amvlm_monai.io.model_info`, written by every training run), and flags override them::

    python -m amvlm_monai.inference.volume --model models/model.pt --input case1.nii.gz dicom_folder/ --output preds/
    python -m amvlm_monai.inference.volume --model models/model.pt --input study/ --output preds/ [--overwrite]
    python -m amvlm_monai.inference.volume --bundle bundles/mrspineseg_spine_mr_segmentation --input case1.nii.gz \\
        --output preds/ [--axis 0 --axcodes RAS --image-size 64 --slice-minmax ...]

Bad input prints ``error: <file>: <what is wrong>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import PathLike
from monai.data import MetaTensor, NibabelWriter
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd, NormalizeIntensityd, Orientationd
from torch import nn

from amvlm_monai.io.clinical import (
    IntensityByModalityd,
    check_finite_image,
    clinical_load_chain,
)
from amvlm_monai.io.outputs import output_paths, refuse_existing
from amvlm_monai.utils.progress import progress
from amvlm_monai.utils.shapes import spatial_size

__all__ = ["ResizedSliceNet", "VolumeSegmenter", "segment_volume", "output_path", "main", "cli"]


#: what volume inference appends to an input's stem
SUFFIX = "_seg.nii.gz"


class ResizedSliceNet(nn.Module):
    """A 2D network run at a fixed input size: ``(B, C, h, w)`` -> resize to ``image_size`` -> network -> logits
    ``(B, K, h, w)`` resized back (bilinear, ``align_corners=False``; no resizing where the sizes already match).

    Args:
        network: 2D network ``(B, C, H, W) -> (B, K, H, W)`` logits.
        image_size: the network's input size, int or (H, W); None runs at the slice's own size.
        slice_minmax: after resizing, scale each slice to [0, 1] by its min and max (0 for a constant slice, as
            MONAI's ``ScaleIntensity``), then to [-1, 1], as the 2D training chain does per image.

    Example:
        >>> net = ResizedSliceNet(torch.nn.Conv2d(1, 1, 1), image_size=32)
        >>> net(torch.zeros(2, 1, 19, 23)).shape
        torch.Size([2, 1, 19, 23])
    """

    def __init__(self, network: nn.Module, image_size: int | Sequence[int] | None = 224,
                 slice_minmax: bool = False) -> None:
        super().__init__()
        self.network = network
        self.image_size = None if image_size is None else spatial_size(image_size)
        self.slice_minmax = slice_minmax

    @staticmethod
    def _minmax(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        span = hi - lo
        return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x)) * 2 - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        resize = self.image_size is not None and size != self.image_size
        if resize:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        out = self.network(self._minmax(x) if self.slice_minmax else x)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False) if resize else out


def output_path(path: PathLike, output_dir: PathLike) -> Path:
    """``<output_dir>/<stem>_seg.nii.gz`` of one input; the stem drops ``.nii.gz``/any suffix of a file, a folder keeps
    its name (several inputs: `amvlm_monai.io.outputs.output_paths`)."""
    return output_paths([path], output_dir, SUFFIX)[0]


class VolumeSegmenter:
    """Segment clinical inputs with a 2D network and write label maps in the input's geometry.

    Args:
        network: 2D network ``(B, C, H, W) -> (B, K, H, W)`` logits (e.g. ``build_segmentation_net(...)``); it is
            put in eval mode and moved to ``device``.
        image_size: the network's input size (int or (H, W)); each slice is resized to it and the logits back;
            None runs at the slices' own size.
        axis: the spatial axis the slices are taken along (0, 1 or 2 of the (possibly reoriented) volume), e.g. the
            left-right axis for sagittal spine slices. Ignored for 2D inputs.
        modality: ``"auto"`` or a DICOM modality code (see
            :class:`~amvlm_monai.io.clinical.IntensityByModality`).
        multiclass: argmax over K >= 2 channels (class indices) instead of sigmoid > ``threshold`` on K = 1.
        threshold: binary threshold on the sigmoid probability.
        device: where the network runs; the volume is stitched on the CPU.
        series_uid: the series to read from a DICOM folder holding several.
        axcodes: reorient to these axis codes (e.g. ``"RAS"``) before slicing; None keeps the stored order.
        ct_window: CT window (low, high) in HU.
        mr_norm: ``"zscore"`` or ``"percentile"`` for MR.
        sw_batch_size: slices per network call.
        slice_minmax: per-slice min-max intensity (as in 2D training) instead of the volume's modality rule.
        in_channels: the network's input channels: 1 (colour images averaged to grey) or 3 (colour kept; grey
            inputs repeated, alpha dropped), as the 2D training chain does.

    Example:
        >>> seg = VolumeSegmenter(build_segmentation_net(), image_size=224, axis=0, modality="MR")
        >>> seg("Case1.nii.gz", "preds/")
        PosixPath('preds/Case1_seg.nii.gz')
    """

    def __init__(self, network: nn.Module, image_size: int | Sequence[int] | None = 224, axis: int = 0,
                 modality: str = "auto", multiclass: bool = False, threshold: float = 0.5,
                 device: str | torch.device = "cpu", series_uid: str | None = None, axcodes: str | None = None,
                 ct_window: Sequence[float] = (-160.0, 240.0), mr_norm: str = "zscore", sw_batch_size: int = 8,
                 slice_minmax: bool = False, in_channels: int = 1) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}.")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}.")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}.")
        if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}.")
        self.device = torch.device(device)
        self.net = ResizedSliceNet(network, image_size, slice_minmax=slice_minmax).to(self.device).eval()
        self.axis = axis
        self.multiclass = multiclass
        self.threshold = float(threshold)
        self.axcodes = axcodes
        self.sw_batch_size = sw_batch_size
        self.in_channels = in_channels
        chain = clinical_load_chain(["image"], modality=modality, ct_window=ct_window, mr_norm=mr_norm,
                                    series_uid=series_uid, grayscale=in_channels == 1)
        # the loader runs outside Compose so that its ValueError (naming the file) is not wrapped in a RuntimeError
        self.load, chain = chain[0], chain[1:]
        if slice_minmax:  # raw intensities: the network wrapper scales each slice
            chain = [t for t in chain if not isinstance(t, IntensityByModalityd)]
        else:
            chain.append(NormalizeIntensityd(keys="image", subtrahend=0.5, divisor=0.5))  # [0, 1] -> [-1, 1]
        self.preprocess_2d = Compose(chain)  # 2D inputs are never reoriented (2D training did not either)
        if axcodes:
            chain.append(Orientationd(keys="image", axcodes=axcodes, labels=None))
        self.preprocess = Compose(chain)

    def _checked(self, path: PathLike, image: MetaTensor) -> MetaTensor:
        """The loaded ``(C, *spatial)`` input, checked and brought to ``in_channels``."""
        fmt = image.meta.get("source_format")
        spatial = tuple(image.shape[1:])
        if fmt == "nifti" and image.shape[0] > 1:
            raise ValueError(f"{path}: a 4D NIfTI holding {image.shape[0]} volumes of shape {spatial}; volume "
                             "inference takes one 3D volume (extract one first, e.g. nibabel's img.slicer or "
                             "fslroi).")
        if len(spatial) not in (2, 3):
            raise ValueError(f"{path}: input of shape {spatial}: expected a 2D image or a 3D volume.")
        check_finite_image(image, path)
        c = image.shape[0]
        if self.in_channels == 3 and c != 3:
            if c == 4:  # RGBA: drop alpha
                image = image[:3]
            elif c == 1:
                image = image.repeat(3, *([1] * len(spatial)))
            else:
                raise ValueError(f"{path}: {c} channels, the model takes 3 (colour).")
        elif self.in_channels == 1 and c != 1:
            raise ValueError(f"{path}: {c} channels, the model takes 1 (grey).")
        return image

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(C, *spatial)`` image, 2D or 3D -> ``(K, *spatial)`` logits on the CPU."""
        x = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image)[None]
        x = x.to(self.device, torch.float32)
        with torch.no_grad():
            if x.ndim == 4:
                return self.net(x)[0].cpu()
            if x.ndim != 5:
                raise ValueError(f"image must be (C, H, W) or (C, X, Y, Z), got shape {tuple(image.shape)}.")
            roi = [s for i, s in enumerate(x.shape[2:]) if i != self.axis]
            inferer = SliceInferer(spatial_dim=self.axis, roi_size=roi, sw_batch_size=self.sw_batch_size,
                                   overlap=0.0, sw_device=self.device, device=torch.device("cpu"), progress=False)
            return inferer(x, self.net)[0]

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """``(K, *spatial)`` logits -> ``(1, *spatial)`` uint8: argmax (``multiclass``) or sigmoid > threshold."""
        k = logits.shape[0]
        if self.multiclass:
            if not 2 <= k <= 256:
                raise ValueError(f"multiclass needs 2..256 output channels, the network gives {k}.")
            return logits.argmax(0, keepdim=True).to(torch.uint8)
        if k != 1:
            raise ValueError(f"binary segmentation needs 1 output channel, the network gives {k}; "
                             "pass multiclass=True for class indices.")
        return (torch.sigmoid(logits) > self.threshold).to(torch.uint8)

    def predict(self, path: PathLike) -> MetaTensor:
        """Load ``path`` and segment it: ``(1, *spatial)`` uint8 ``MetaTensor`` in the input's geometry."""
        data = self.load({"image": str(path)})
        data["image"] = self._checked(path, data["image"])
        is_2d = data["image"].ndim == 3
        preprocess = self.preprocess_2d if is_2d else self.preprocess
        data = preprocess(data)
        image = data["image"]
        pred = MetaTensor(self.labels(self.logits(image)), meta=dict(image.meta))  # meta holds the affine
        if self.axcodes and not is_2d:
            pred.applied_operations = list(image.applied_operations)
            data["pred"] = pred
            pred = Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=True)(data)["pred"]
        return pred

    def __call__(self, path: PathLike, output_dir: PathLike, overwrite: bool = False) -> Path:
        """Segment ``path`` and write ``<output_dir>/<stem>_seg.nii.gz`` (uint8, the input's affine); its path.

        Raises:
            FileExistsError: the output exists and ``overwrite`` is False (checked before the work).
        """
        out = output_path(path, output_dir)
        if not overwrite:
            refuse_existing([out], "overwrite=True")
        return self.write(path, out)

    def write(self, path: PathLike, out: PathLike) -> Path:
        """Segment ``path`` and write the label map to the file ``out`` (replaced if it exists); ``out`` as a Path."""
        pred = self.predict(path)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        affine = np.asarray(pred.affine, dtype=np.float64)
        if pred.ndim == 3:  # a 2D input: MONAI's NibabelWriter cannot write it without resampling; nibabel can
            import nibabel as nib

            nib.save(nib.Nifti1Image(np.asarray(pred[0].numpy(), np.uint8), affine), str(out))
            return out
        writer = NibabelWriter(output_dtype=np.uint8)
        writer.set_data_array(pred, channel_dim=0)
        writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
        writer.write(out)
        return out


def segment_volume(network: nn.Module, path: PathLike, output_dir: PathLike,
                   image_size: int | Sequence[int] | None = 224, axis: int = 0, modality: str = "auto",
                   multiclass: bool = False, threshold: float = 0.5, device: str | torch.device = "cpu",
                   overwrite: bool = False, **kwargs) -> Path:
    """Segment one input (NIfTI, DICOM series folder or file, 2D image) slice by slice; returns the written path.

    See :class:`VolumeSegmenter` for the arguments (``kwargs``: ``series_uid``, ``axcodes``, ``ct_window``,
    ``mr_norm``, ``sw_batch_size``, ``slice_minmax``).
    The output ``<output_dir>/<stem>_seg.nii.gz`` has the input's shape and affine; an existing one is refused
    (``FileExistsError``) unless ``overwrite``.
    """
    seg = VolumeSegmenter(network, image_size=image_size, axis=axis, modality=modality, multiclass=multiclass,
                          threshold=threshold, device=device, **kwargs)
    return seg(path, output_dir, overwrite=overwrite)


def _settings(info: dict | None) -> dict:
    if info is None:
        return {"image_size": [224], "axis": 0, "axcodes": None, "modality": "auto", "multiclass": False,
                "threshold": 0.5, "slice_minmax": False, "network": {"spatial_dims": 2, "in_channels": 1,
                                                                      "out_channels": 1}}
    return {"image_size": list(info["image_size"]), "axis": info["slicing"]["axis"],
            "axcodes": info["slicing"].get("axcodes"), "modality": info.get("modality", "auto"),
            "multiclass": info["multiclass"], "threshold": info.get("threshold", 0.5),
            "slice_minmax": info["intensity"] == "slice_minmax", "network": dict(info["network"])}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m amvlm_monai.inference.volume", description=__doc__.split("\n")[0],
                                epilog="Settings not given are read from model_info.json beside the model.")
    p.add_argument("--model", default=None, help="model.pt of a training run (state dict of build_segmentation_net)")
    p.add_argument("--bundle", default=None, help="a bundle folder: its models/model.pt (instead of --model)")
    p.add_argument("--input", required=True, nargs="+",
                   help="NIfTI files, DICOM series folders, DICOM or image files, or folders of NIfTI files and DICOM "
                        "series folders (searched with their sub-folders)")
    p.add_argument("--output", required=True,
                   help="output folder for <stem>_seg.nii.gz, keeping each input's path relative to the inputs' "
                        "common folder")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist (refused otherwise)")
    p.add_argument("--image-size", type=int, nargs="+", default=None, help="network input size (H [W]); 0: native")
    p.add_argument("--axis", type=int, default=None, choices=(0, 1, 2), help="slice axis of the volume")
    p.add_argument("--modality", default=None, help="auto or a DICOM modality code (CT, MR, XR, ...)")
    p.add_argument("--multiclass", default=None, action=argparse.BooleanOptionalAction,
                   help="argmax class indices (needs --out-channels >= 2)")
    p.add_argument("--threshold", type=float, default=None, help="binary threshold on the sigmoid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--series-uid", default=None, help="SeriesInstanceUID to read from a folder with several series")
    p.add_argument("--axcodes", default=None, help="reorient before slicing, e.g. RAS ('none': as stored); the "
                                                    "output keeps the input's geometry")
    p.add_argument("--ct-window", type=float, nargs=2, default=(-160.0, 240.0), metavar=("LOW", "HIGH"))
    p.add_argument("--mr-norm", default="zscore", choices=("zscore", "percentile"))
    p.add_argument("--sw-batch-size", type=int, default=8, help="slices per network call")
    p.add_argument("--slice-minmax", default=None, action=argparse.BooleanOptionalAction,
                   help="min-max each slice (as the 2D training chain) instead of the modality rule")
    net = p.add_argument_group("network (build_segmentation_net arguments)")
    net.add_argument("--in-channels", type=int, default=None)
    net.add_argument("--out-channels", type=int, default=None)
    net.add_argument("--channels", type=int, nargs="+", default=None, help="feature widths, e.g. 16 32 64 128 256")
    net.add_argument("--strides", type=int, nargs="+", default=None, help="e.g. 2 2 2 2")
    net.add_argument("--num-res-units", type=int, default=None)
    net.add_argument("--norm", default=None, choices=("batch", "instance", "none"))
    net.add_argument("--act", default=None, choices=("prelu", "relu", "leakyrelu"))
    net.add_argument("--size", default=None, help="the network size preset of the training run (unet_size)")
    return p


def _model_path(args, parser) -> Path:
    if (args.model is None) == (args.bundle is None):
        parser.error("give --model or --bundle (one of them)")
    return Path(args.model) if args.model is not None else Path(args.bundle) / "models" / "model.pt"


def segmenter_from_args(args, parser: argparse.ArgumentParser) -> VolumeSegmenter:
    """The `VolumeSegmenter` a command line asks for: model info beside the model, then the flags over it."""
    from amvlm_monai.io.model_info import load_state, read_model_info
    from amvlm_monai.networks.segmentation import build_network

    model = _model_path(args, parser)
    info = read_model_info(model, required=False)
    cfg = _settings(info)
    net_kwargs = dict(cfg["network"])
    for flag, key in (("in_channels", "in_channels"), ("out_channels", "out_channels"), ("channels", "channels"),
                      ("strides", "strides"), ("num_res_units", "num_res_units"), ("norm", "norm"), ("act", "act"),
                      ("size", "size")):
        value = getattr(args, flag)
        if value is not None:
            net_kwargs[key] = tuple(value) if isinstance(value, list) else value
    network = build_network({"network": net_kwargs})
    state = load_state(model)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        where = f"the settings of {info and 'model_info.json beside it' or 'the flags (no model_info.json beside it)'}"
        first = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise ValueError(f"{model}: does not fit build_segmentation_net({net_kwargs}) built from {where}: {first} "
                         "(give the training run's --in-channels/--out-channels/--size)") from None
    size = args.image_size if args.image_size is not None else cfg["image_size"]
    image_size = None if list(size) == [0] else size[0] if len(size) == 1 else tuple(size)
    axcodes = args.axcodes if args.axcodes is not None else cfg["axcodes"]
    return VolumeSegmenter(
        network, image_size=image_size, axis=args.axis if args.axis is not None else cfg["axis"],
        modality=args.modality or cfg["modality"],
        multiclass=args.multiclass if args.multiclass is not None else cfg["multiclass"],
        threshold=args.threshold if args.threshold is not None else cfg["threshold"], device=args.device,
        series_uid=args.series_uid, axcodes=None if str(axcodes).lower() == "none" else axcodes,
        ct_window=args.ct_window, mr_norm=args.mr_norm, sw_batch_size=args.sw_batch_size,
        slice_minmax=args.slice_minmax if args.slice_minmax is not None else cfg["slice_minmax"],
        in_channels=net_kwargs.get("in_channels", 1))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """CLI entry point; returns the written paths. Bad input: ``error: <file>: <what>`` lines, exit status 2.

    Every input (its type: an empty file, a non-DICOM ``.dcm``) and every output (two inputs on one, one that exists
    without ``--overwrite``) is checked before the model is loaded; then the inputs are segmented one by one, with
    progress.
    """
    from amvlm_monai.inference.files import volume_inputs
    from amvlm_monai.utils.errors import check_writable, cli_errors

    parser = _parser()
    args = parser.parse_args(argv)
    written = []
    with cli_errors():
        inputs, anchors, skipped = volume_inputs(args.input, args.output)
        outputs = output_paths(inputs, args.output, SUFFIX, anchors)
        if not args.overwrite:
            refuse_existing(outputs, "--overwrite")
        if skipped:
            shown = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            print(f"note: {len(skipped)} file{'s' if len(skipped) > 1 else ''} in the input folders "
                  f"{'are' if len(skipped) > 1 else 'is'} neither NIfTI nor in a DICOM series folder, skipped: "
                  f"{shown}", file=sys.stderr)
        seg = segmenter_from_args(args, parser)
        check_writable(args.output)
        for path, out in progress(list(zip(inputs, outputs)), "volumes"):
            seg.write(path, out)
            print(out)
            written.append(out)
    return written


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``amvlm-volume`` console entry point: :func:`main` with exit status 0 on success."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
