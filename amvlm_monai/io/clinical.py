"""Clinical inputs: NIfTI volumes, DICOM series folders, single DICOM files and PNG/TIF/JPEG, loaded natively.

Every format goes through MONAI's ``LoadImage`` with a reader picked by :func:`reader_for`, returning a channel-first
``MetaTensor`` whose ``affine`` is the input's geometry (RAS, as MONAI's readers give it); nothing is reoriented or
resampled here, so a prediction made on the array overlays the input voxel for voxel.

- ``nifti``: ``NibabelReader``, any orientation -> ``(C, X, Y, Z)`` (C = 1, or the 4th dim of a 4D file).
- ``dicom_series`` (a folder): ``ITKReader`` (GDCM sorts the slices by position, geometry kept); ``PydicomReader``
  on the same files sorted by position where ITK is absent -> ``(1, X, Y, Z)``, Z ascending along the slice normal.
- ``dicom`` (one file): ``PydicomReader`` (rescale slope/intercept applied) -> ``(1, X, Y)`` (``(1, X, Y, F)`` for a
  multi-frame file).
- ``image`` (PNG, TIF, JPEG, BMP): ``PILReader`` -> ``(1, W, H)``; RGB(A) averaged to grey.

A folder holding several series raises a ``ValueError`` listing them; pick one with ``--series-uid`` (volume
inference) or ``series_uid=`` (Python). A file a reader cannot read raises ``ValueError`` naming it (the reader's
exception is chained).

Intensity by modality (:class:`IntensityByModality`), always to [0, 1]:

- ``CT``: window ``ct_window`` (default (-160, 240) HU, clipped): -160 -> 0, 40 -> 0.5, 240 -> 1.
- ``MR``: ``mr_norm="zscore"`` (default): z-score over the nonzero voxels (MONAI ``NormalizeIntensity(nonzero=True)``),
  clipped to +-``z_clip`` and mapped linearly to [0, 1]; zero voxels (background, outside the scanned field) stay 0.
  ``mr_norm="percentile"``: the ``percentiles`` (0.5, 99.5) window, clipped (robust to bright outliers).
- any other DICOM modality (``XR``, ``CR``, ``DX``, ``MG``, ``US``, ``OT``, ...) and 2D image files: min-max to [0, 1]
  (what the 2D training chain does).
- ``"auto"``: the DICOM ``Modality`` tag when the input has one; 2D image files -> min-max; inputs without modality
  information (NIfTI) -> the ``percentiles`` window, a rule that suits CT and MR alike (said once per process in the
  log, and recorded in the output's ``meta["intensity"]``). Pass ``modality="CT"`` or ``"MR"`` for NIfTI.

Bad files are refused with one line naming them, before any reader runs: an empty (0-byte) file, a ``.dcm`` file that
is not DICOM, NaN or infinite voxels (:func:`check_finite_image`).

Masks, as people save them, are read by one rule (:func:`mask_channel`, :func:`binary_mask`, :func:`label_indices`),
used by the converters' checks (``data_prep``), training, evaluation and the bundles alike; a mask arrives
channel-first ``(C, *spatial)`` as MONAI's ``LoadImage`` gives it (a palette PNG as its indices, never its colours):

- a 2D mask with 2 or 4 channels (grey or RGB with alpha) loses the alpha channel;
- a 2D RGB mask whose three channels are equal is grey; one with colours is binary when it holds black (background)
  and at most one other colour (foreground, whatever colour); more colours are refused, listing them;
- one channel (grey 8 or 16 bit, palette indices, NIfTI integers or floats): a binary mask holds 0/1, 0/255 or
  0/65535 (only one of these pairs; nonzero is foreground); class-index labels hold whole numbers ``0..K-1``.

Anything else is refused with one line naming the file and the values found.

Example:
    >>> chain = Compose(clinical_load_chain(["image"], modality="auto"))
    >>> chain({"image": "/data/case1/"})["image"].shape        # a DICOM series folder
    torch.Size([1, 512, 512, 87])
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.config import PathLike
from monai.data import ITKReader, MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import (
    EnsureTyped,
    LoadImage,
    MapTransform,
    NormalizeIntensity,
    ScaleIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Transform,
)
from monai.utils import optional_import

logger = logging.getLogger(__name__)


FORMATS = ("nifti", "dicom_series", "dicom", "image")


NIFTI_SUFFIXES = (".nii", ".nii.gz")


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


MR_NORMS = ("zscore", "percentile")


# the restriction MONAI's ITKReader puts on GDCM's series identifiers; kept identical so that names match
_ITK_SERIES_RESTRICTION = "0008|0021"


def _has_itk() -> bool:
    """True when ``itk`` (with its GDCM IO) imports; tests monkeypatch this to force the pydicom fallback."""
    return optional_import("itk")[1]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` name or a DICOM preamble (files from scanners often have no extension)."""
    import pydicom

    if _suffix(path) == ".dcm":
        return True
    try:
        return pydicom.misc.is_dicom(str(path))
    except OSError:
        return False


def holds_dicom(folder: PathLike) -> bool:
    """True when ``folder`` itself (not its sub-folders) holds a DICOM file (a ``.dcm`` name or a DICOM preamble):
    a DICOM series folder. NIfTI and image files are not opened."""
    skip = NIFTI_SUFFIXES + IMAGE_SUFFIXES
    return any(f.is_file() and not f.name.startswith(".") and _suffix(f) not in skip and _is_dicom_file(f)
               for f in Path(folder).iterdir())


def detect_format(path: PathLike) -> str:
    """The input's format: ``"nifti"`` | ``"dicom_series"`` (a folder) | ``"dicom"`` | ``"image"`` (PNG/TIF/JPEG/BMP).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder without DICOM files, or a file of an unsupported type (the message names it).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder.")
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"{p}: empty file (0 bytes); nothing to read (an interrupted copy?).")
    if p.is_dir():
        if not holds_dicom(p):
            raise ValueError(f"{p}: folder holds no DICOM files (a DICOM series folder was expected).")
        return "dicom_series"
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if _is_dicom_file(p):
        _check_dicom(p)
        return "dicom"
    raise ValueError(f"{p}: unsupported file type {suffix or '(no suffix)'!r}; expected NIfTI {NIFTI_SUFFIXES}, "
                     f"DICOM (a .dcm file or a series folder) or an image {IMAGE_SUFFIXES}.")


@dataclass
class DicomSeries:
    """One DICOM series of a folder: its image files sorted by position along the slice normal (ascending)."""

    uid: str  # SeriesInstanceUID
    files: list = field(default_factory=list)  # Paths, sorted by position
    modality: str | None = None  # DICOM Modality (0008,0060), e.g. "CT"
    description: str = ""  # SeriesDescription (0008,103E)
    number: str = ""  # SeriesNumber (0020,0011)
    problem: str = ""  # why the files do not stack into one volume ("" when they do)

    def summary(self) -> str:
        extra = ", ".join(x for x in (self.modality or "", f"#{self.number}" if self.number else "",
                                      repr(self.description) if self.description else "",
                                      f"not one volume: {self.problem}" if self.problem else "") if x)
        files = f"{len(self.files)} file" + ("s" if len(self.files) != 1 else "")
        return f"{self.uid} ({files}{', ' + extra if extra else ''})"


def _check_dicom(path: Path) -> None:
    """Refuse a file named ``.dcm`` that is not DICOM, in one line (instead of every reader's traceback)."""
    import pydicom

    if pydicom.misc.is_dicom(str(path)):
        return
    try:  # DICOM without the 128-byte preamble (older files) still parses; require the tags of an image
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        ok = "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)
    except Exception:  # pydicom raises many types on random bytes
        ok = False
    if not ok:
        raise ValueError(f"{path}: not a DICOM file (no 'DICM' marker and no DICOM image tags); check that it was "
                         "exported as DICOM.")


def _read_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=_suffix(path) == ".dcm")
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, struct errors, ...
        raise ValueError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}).") from e


def _sort_by_position(items: list) -> tuple[list, str]:
    """Sort ``(path, header)`` of one series by ImagePositionPatient along the slice normal (ascending).

    Returns the sorted paths and a problem ("" when the slices stack into one volume).
    """
    by_number = [p for p, _ in sorted(items, key=lambda it: (int(it[1].get("InstanceNumber", 0) or 0), it[0].name))]
    shapes = {(int(h.Rows), int(h.Columns)) for _, h in items}
    if len(shapes) > 1:
        return by_number, f"mixes image sizes {sorted(shapes)}"
    if len(items) == 1 or not all("ImageOrientationPatient" in h and "ImagePositionPatient" in h for _, h in items):
        return by_number, ""  # no geometry: InstanceNumber order is the only order there is
    iops = [np.asarray(h.ImageOrientationPatient, float) for _, h in items]
    if not all(np.allclose(o, iops[0], atol=1e-4) for o in iops):
        return by_number, "mixes slice orientations (a localizer?)"
    normal = np.cross(iops[0][:3], iops[0][3:])
    pos = np.array([float(np.dot(np.asarray(h.ImagePositionPatient, float), normal)) for _, h in items])
    order = np.argsort(pos, kind="stable")
    if np.min(np.diff(pos[order])) < 1e-4:
        return by_number, "has several slices at one position (echoes or time points?)"
    return [items[i][0] for i in order], ""


def list_dicom_series(folder: PathLike) -> list[DicomSeries]:
    """Every image series in ``folder`` (not recursive), files sorted by position; in SeriesNumber order.

    Files that are not DICOM are skipped, as are DICOM files without pixel rows (DICOMDIR, reports). A series whose
    slices do not stack into one volume (mixed sizes or orientations, repeated positions) is listed with its
    ``problem``; :func:`select_dicom_series` refuses it.

    Raises:
        ValueError: a DICOM file whose header cannot be read (the message names it).
    """
    folder = Path(folder)
    groups: dict[str, list] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or not _is_dicom_file(f):
            continue
        h = _read_header(f)
        if "SeriesInstanceUID" not in h or "Rows" not in h:
            continue
        groups.setdefault(str(h.SeriesInstanceUID), []).append((f, h))
    out = []
    for uid, items in groups.items():
        first = items[0][1]
        files, problem = _sort_by_position(items)
        out.append(DicomSeries(uid=uid, files=files, problem=problem, modality=str(first.get("Modality", "")) or None,
                               description=str(first.get("SeriesDescription", "") or ""),
                               number=str(first.get("SeriesNumber", "") or "")))
    return sorted(out, key=lambda s: (s.number.zfill(8), s.uid))


def select_dicom_series(folder: PathLike, series_uid: str | None = None) -> DicomSeries:
    """The one series of ``folder``, or the one named by ``series_uid``.

    Raises:
        ValueError: no image series; several series and no ``series_uid`` (the message lists them all);
            ``series_uid`` not found; the series does not stack into one volume.
    """
    series = list_dicom_series(folder)
    listing = "\n".join(f"  - {s.summary()}" for s in series)
    if not series:
        raise ValueError(f"{folder}: no DICOM image series found.")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise ValueError(f"{folder}: no series with SeriesInstanceUID {series_uid}; found:\n{listing}")
    elif len(series) > 1:
        raise ValueError(f"{folder}: holds {len(series)} DICOM series; pick one with --series-uid UID (series_uid= "
                         f"in Python); SeriesInstanceUID (files, modality, number, description):\n{listing}")
    else:
        chosen = series
    if chosen[0].problem:
        raise ValueError(f"{folder}: series {chosen[0].uid} {chosen[0].problem}; it is not one volume.")
    return chosen[0]


class _SortedSeriesPydicomReader(PydicomReader):
    """``PydicomReader`` for one series (given files, sorted by position) of a folder: the fallback without ITK.

    MONAI's ``PydicomReader`` reads every DICOM file of a folder and stacks them in InstanceNumber order. This reader
    reads only ``files`` and renumbers their in-memory ``InstanceNumber`` 1..N in the given (position) order, so the
    stack and its affine (first and last ImagePositionPatient) follow the slice positions. Files are not modified.
    """

    def __init__(self, files: Sequence[PathLike], **kwargs) -> None:
        super().__init__(**kwargs)
        self.files = [str(f) for f in files]

    def read(self, data, **kwargs):
        import pydicom

        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)  # LoadImage passes a tuple
        if len(names) != 1 or not Path(names[0]).is_dir():
            return super().read(data, **kwargs)
        kw = {**self.kwargs, **kwargs}
        slices = []
        for rank, f in enumerate(self.files, start=1):
            ds = pydicom.dcmread(f, **kw)
            ds.InstanceNumber = rank
            slices.append(ds)
        self.has_series = len(slices) > 1
        self.filenames = [self.files] if self.has_series else [self.files[0]]
        return slices if self.has_series else slices[0]


def _itk_series_name(folder: Path, series: DicomSeries) -> str:
    """GDCM's identifier (as MONAI's ``ITKReader`` computes it) of the series whose files are ``series.files``."""
    import itk

    gen = itk.GDCMSeriesFileNames.New()
    gen.SetUseSeriesDetails(True)
    gen.AddSeriesRestriction(_ITK_SERIES_RESTRICTION)
    gen.SetDirectory(str(folder))
    wanted = {os.path.realpath(f) for f in series.files}
    names = [n for n in gen.GetSeriesUIDs() if {os.path.realpath(f) for f in gen.GetFileNames(n)} <= wanted]
    if len(names) != 1 or {os.path.realpath(f) for f in gen.GetFileNames(names[0])} != wanted:
        raise ValueError(f"{folder}: ITK splits series {series.uid} into {len(names)} parts (differing acquisition "
                         "details); it is not one volume.")
    return names[0]


def reader_for(path: PathLike, series_uid: str | None = None, series: DicomSeries | None = None) -> ImageReader:
    """A MONAI reader for ``path`` (see the module table); pass it to ``LoadImage(reader=...)``.

    Args:
        path: a NIfTI file, a DICOM series folder, a DICOM file or a PNG/TIF/JPEG/BMP image.
        series_uid: the SeriesInstanceUID to read when a folder holds several series.
        series: the already selected series of the folder (skips scanning it again).

    Raises:
        ValueError: as :func:`detect_format` and :func:`select_dicom_series`; ``series_uid`` given for a non-folder.
    """
    fmt = detect_format(path)
    if series_uid is not None and fmt != "dicom_series":
        raise ValueError(f"{path}: series_uid applies to DICOM series folders only, this is a {fmt} input.")
    if fmt == "nifti":
        return NibabelReader()
    if fmt == "image":
        return PILReader()
    if fmt == "dicom":
        return PydicomReader()
    series = series or select_dicom_series(path, series_uid)
    if _has_itk():
        return ITKReader(series_name=_itk_series_name(Path(path), series), series_meta=True)
    return _SortedSeriesPydicomReader(series.files)


def load_clinical(path: PathLike, series_uid: str | None = None, grayscale: bool = True) -> MetaTensor:
    """Load one clinical input as a channel-first ``MetaTensor`` with its geometry.

    Args:
        path: see :func:`reader_for`.
        series_uid: the series to read from a folder holding several.
        grayscale: average RGB(A) 2D images to one channel (as the training chain's ``ToGrayscaled``).

    Returns:
        ``(C, *spatial)`` float32 ``MetaTensor`` (shapes in the module table); ``meta`` adds ``"modality"`` (the DICOM
        Modality or None) and ``"source_format"`` (one of ``FORMATS``); ``affine`` is the input's (RAS).

    Raises:
        ValueError: naming ``path`` (or the offending file) for unreadable, corrupt or ambiguous inputs.
    """
    fmt = detect_format(path)
    series, modality = None, None
    if fmt == "dicom_series":
        series = select_dicom_series(path, series_uid)
        modality = series.modality
    elif fmt == "dicom":
        modality = str(_read_header(Path(path)).get("Modality", "")) or None
    reader = reader_for(path, series_uid, series=series)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*more than one DICOM series.*")
            img = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
    except Exception as e:  # each reader fails in its own way on truncated or corrupt data
        raise ValueError(f"{path}: cannot read this {fmt} input ({type(e).__name__}: {e}).") from e
    if grayscale and img.ndim == 3 and img.shape[0] in (3, 4):
        img = img[:3].mean(dim=0, keepdim=True)
    img.meta["modality"] = modality
    img.meta["source_format"] = fmt
    return img


class ClinicalLoadd(MapTransform):
    """Dictionary loader for clinical inputs: each of ``keys`` holds a path, replaced by :func:`load_clinical`'s
    ``(C, *spatial)`` ``MetaTensor``.

    Args:
        keys: the path keys.
        series_uid: the series to read from folders holding several.
        grayscale: average RGB(A) 2D images to one channel.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, series_uid: str | None = None, grayscale: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid = series_uid
        self.grayscale = grayscale

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_clinical(d[key], series_uid=self.series_uid, grayscale=self.grayscale)
        return d


_DICOM_MODALITY_KEYS = ("modality", "0008|0060", "00080060")  # ours, ITKReader's, PydicomReader's (JSON) keys


def resolve_modality(img: torch.Tensor | np.ndarray, modality: str = "auto") -> str | None:
    """The modality an image is handled as: ``modality`` upper-cased, or with ``"auto"`` the DICOM Modality found in
    the image's ``meta``; ``"IMAGE"`` for a 2D image file without one; ``None`` when nothing says (NIfTI)."""
    if modality != "auto":
        return str(modality).upper()
    meta = getattr(img, "meta", {}) or {}
    for key in _DICOM_MODALITY_KEYS:
        value = meta.get(key)
        if isinstance(value, dict):  # pydicom JSON form {"vr": "CS", "Value": ["CT"]}
            value = (value.get("Value") or [None])[0]
        if isinstance(value, str) and value.strip():
            return value.strip().upper()
    if meta.get("source_format") == "image":
        return "IMAGE"
    return None


_NOTED: set = set()


def _note_default_rule(percentiles: tuple) -> None:
    """Say once per process (log, not a warning per file) which rule inputs without a modality get."""
    if percentiles not in _NOTED:
        _NOTED.add(percentiles)
        logger.info("inputs without modality information (NIfTI) are scaled by their %s percentiles to [0, 1]; pass "
                    "modality='CT' (HU window) or 'MR' (z-score) to use a modality rule.", percentiles)


def check_finite_image(img: torch.Tensor | np.ndarray, name: PathLike | None = None) -> None:
    """Raise ``ValueError`` naming the file when ``img`` holds NaN or infinite values (a network turns them into a
    NaN loss or an empty mask without a word)."""
    t = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img)
    if t.is_floating_point() and not torch.isfinite(t).all():
        if name is None:
            name = getattr(img, "meta", {}).get("filename_or_obj", "image")
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise ValueError(f"{name}: {n_nan} NaN and {n_inf} infinite values of {t.numel()}; repair or replace the "
                         "file (a network cannot use them).")


#: the value pairs a binary mask may hold (one pair, or one of its values: an empty mask is all 0)
BINARY_MASK_VALUES = ((0, 1), (0, 255), (0, 65535))


def _shown(values: Sequence, limit: int = 8) -> str:
    """``{0, 7, 128}``: up to ``limit`` values, numbers as ``%g``, colours as tuples."""
    text = [f"({', '.join(f'{c:g}' for c in v)})" if isinstance(v, (list, tuple)) else f"{v:g}" for v in values[:limit]]
    return "{" + ", ".join(text) + (", ..." if len(values) > limit else "") + "}"


def _plain(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain tensor of ``x`` (a copy of a NumPy array, which may be a read-only view of a PIL image)."""
    return torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x).as_subclass(torch.Tensor)


def _name_of(mask, name: PathLike | None) -> str:
    return str(name if name is not None else (getattr(mask, "meta", None) or {}).get("filename_or_obj", "mask"))


def mask_channel(mask: torch.Tensor | np.ndarray, name: PathLike | None = None) -> torch.Tensor | np.ndarray:
    """The one channel of a channel-first mask ``(C, *spatial)`` -> ``(1, *spatial)``, same type (and meta).

    2D masks (``(C, H, W)``): 2 or 4 channels lose the alpha channel; 3 equal channels (grey saved as RGB) are grey. A
    colour mask (3 channels that differ) holding black and at most one other colour becomes that colour's foreground
    (``1``) on black (``0``). Volumes need one channel.

    Raises:
        ValueError: naming the file (``name``, or the mask's ``filename_or_obj``): a colour mask with several colours
            besides black, listing them; any other number of channels.
    """
    c = mask.shape[0]
    if mask.ndim == 3 and c in (2, 4):  # LA / PA / RGBA: drop alpha
        mask, c = mask[: c - 1], c - 1
    if c == 1:
        return mask
    if mask.ndim == 3 and c == 3:
        t = _plain(mask)
        if bool((t[0] == t[1]).all()) and bool((t[0] == t[2]).all()):
            return mask[:1]
        colours = torch.unique(t.reshape(3, -1), dim=1).T  # (K, 3)
        others = colours[(colours != 0).any(1)]
        if len(others) > 1:
            raise ValueError(f"{_name_of(mask, name)}: mask colours {_shown(colours.tolist())} are not binary: a "
                             "colour mask holds black (background) and one colour (foreground); save a label map of "
                             "several classes as class indices (grey or palette PNG).")
        fg = (t != 0).any(0, keepdim=True)
        if isinstance(mask, np.ndarray):
            return fg.numpy().astype(mask.dtype)
        out = mask[:1].clone()
        out[:] = fg.to(out.dtype)
        return out
    raise ValueError(f"{_name_of(mask, name)}: a mask of shape {tuple(mask.shape[1:])} with {c} channels: expected "
                     "one (grey, palette indices) or, for a 2D image, RGB(A).")


def binary_mask(mask: torch.Tensor | np.ndarray, name: PathLike | None = None) -> torch.Tensor | np.ndarray:
    """A channel-first mask ``(C, *spatial)`` as it was saved -> ``(1, *spatial)`` float32 {0, 1}, same type.

    :func:`mask_channel` first; the one channel must then hold only 0/1, 0/255 or 0/65535 (``BINARY_MASK_VALUES``),
    whatever the dtype (8 or 16 bit, palette indices, NIfTI floats); nonzero is foreground.

    Raises:
        ValueError: ``<file>: mask values {0, 7, 128} are not binary: ...`` naming the values found.

    Example:
        >>> binary_mask(np.array([[[0, 65535], [65535, 0]]], np.uint16)).tolist()
        [[[0.0, 1.0], [1.0, 0.0]]]
    """
    one = mask_channel(mask, name)
    values = torch.unique(_plain(one)).tolist()
    if not any(set(values) <= set(ok) for ok in BINARY_MASK_VALUES):
        raise ValueError(f"{_name_of(mask, name)}: mask values {_shown(values)} are not binary: expected 0/1, 0/255 or "
                         "0/65535 (binarise it, e.g. mask > 0, and save it losslessly as PNG or NIfTI).")
    return (one > 0).astype(np.float32) if isinstance(one, np.ndarray) else (one > 0).float()


def label_indices(mask: torch.Tensor | np.ndarray, name: PathLike | None = None, num_classes: int | None = None
                  ) -> torch.Tensor:
    """A channel-first class-index label ``(C, *spatial)`` -> ``(1, *spatial)`` float tensor of whole class indices.

    Alpha is dropped and 3 equal channels are one, as in :func:`mask_channel`; colour label maps are refused (save
    class indices: grey or palette PNG, NIfTI).

    Raises:
        ValueError: naming the file: several channels that differ, values that are not whole numbers, or (with
            ``num_classes``) outside ``0 .. num_classes - 1``.
    """
    c = mask.shape[0]
    if mask.ndim == 3 and c in (2, 4):
        mask, c = mask[: c - 1], c - 1
    lab = torch.from_numpy(np.array(mask)) if isinstance(mask, np.ndarray) else mask
    lab = lab if lab.is_floating_point() else lab.float()  # 16-bit and bool labels: float, as MONAI loads them
    if c == 3 and mask.ndim == 3 and bool((lab[0] == lab[1]).all()) and bool((lab[0] == lab[2]).all()):
        lab, c = lab[:1], 1
    if c != 1:
        raise ValueError(f"{_name_of(mask, name)}: a multi-class label needs one channel of class indices (grey or "
                         f"palette PNG, NIfTI), found {c} channels that differ.")
    if not torch.equal(lab, lab.round()):
        values = torch.unique(_plain(lab)).tolist()
        raise ValueError(f"{_name_of(mask, name)}: multi-class label values {_shown(values)} are not whole class "
                         "indices.")
    if num_classes is not None and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"{_name_of(mask, name)}: label values {int(lab.min())}..{int(lab.max())} are outside the "
                         f"class set 0..{num_classes - 1}.")
    return lab.float()


_DICOM_TAG = re.compile(r"^[0-9A-Fa-f]{8}$|\|")


class Load2Dd(MapTransform):
    """Load 2D inputs for 2D inference: PNG/TIF/JPEG/BMP, single-frame DICOM files and 2D NIfTI, as ``(C, W, H)``
    ``MetaTensor`` (C = 1, 3 or 4: RGB(A) is left to ``ToGrayscaled``/``ToColord``).

    A trailing singleton dimension (``(X, Y, 1)``, as one DICOM frame or a one-slice NIfTI) is dropped. Refused with
    a message naming the file: volumes and multi-frame DICOM (use volume inference), DICOM series folders, NaN or
    infinite values, and whatever :func:`load_clinical` refuses (an empty file, a ``.dcm`` that is not DICOM).
    Metadata that cannot be batched (DICOM tag dicts, None values) is dropped.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if Path(path).is_dir():
                raise ValueError(f"{path}: a folder (a DICOM series?); 2D inference takes image files, volume "
                                 "inference (python -m amvlm_monai.inference.volume) takes series folders.")
            img = load_clinical(path, grayscale=False)
            while img.ndim > 3 and img.shape[-1] == 1:
                img = img[..., 0]
            if img.ndim != 3:
                raise ValueError(f"{path}: a {img.meta.get('source_format')} input of shape {tuple(img.shape[1:])} "
                                 "is not a 2D image; segment volumes (and multi-frame DICOM) with "
                                 "python -m amvlm_monai.inference.volume.")
            check_finite_image(img, path)
            for k in [k for k, v in img.meta.items() if v is None or (isinstance(k, str) and _DICOM_TAG.search(k))]:
                img.meta.pop(k)
            img.meta["spatial_shape"] = np.asarray(img.shape[1:])
            d[key] = img
        return d


class CheckFinited(MapTransform):
    """Refuse, naming the file, an image with NaN or infinite values (:func:`check_finite_image`)."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            check_finite_image(d[key])
        return d


class IntensityByModality(Transform):
    """Intensity to [0, 1] by modality (rules in the module docstring).

    Args:
        modality: ``"auto"`` or a DICOM modality code (``"CT"``, ``"MR"``, ``"XR"``, ``"CR"``, ...).
        ct_window: (low, high) HU of the CT window.
        mr_norm: ``"zscore"`` (nonzero z-score, clipped to +-``z_clip``) or ``"percentile"``.
        z_clip: z-scores beyond +-``z_clip`` are clipped (MR ``zscore``).
        percentiles: (low, high) percentiles of the fallback window (and of MR ``percentile``).

    ``__call__(img (C, *spatial))`` returns the same shape and type, ``meta["intensity"]`` naming the rule applied.

    Example:
        >>> IntensityByModality("CT")(torch.tensor([[-160.0, 40.0, 240.0, 1000.0]]))
        tensor([[0.0000, 0.5000, 1.0000, 1.0000]])
    """

    def __init__(self, modality: str = "auto", ct_window: Sequence[float] = (-160.0, 240.0), mr_norm: str = "zscore",
                 z_clip: float = 3.0, percentiles: Sequence[float] = (0.5, 99.5)) -> None:
        if not isinstance(modality, str) or not modality.strip():
            raise ValueError(f"modality must be 'auto' or a DICOM modality code such as 'CT', got {modality!r}.")
        if len(ct_window) != 2 or not float(ct_window[0]) < float(ct_window[1]):
            raise ValueError(f"ct_window must be (low, high) with low < high, got {ct_window!r}.")
        if mr_norm not in MR_NORMS:
            raise ValueError(f"mr_norm must be one of {MR_NORMS}, got {mr_norm!r}.")
        if not float(z_clip) > 0:
            raise ValueError(f"z_clip must be positive, got {z_clip!r}.")
        if len(percentiles) != 2 or not 0.0 <= float(percentiles[0]) < float(percentiles[1]) <= 100.0:
            raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}.")
        self.modality = modality if modality == "auto" else modality.upper()
        self.ct_window = (float(ct_window[0]), float(ct_window[1]))
        self.mr_norm = mr_norm
        self.z_clip = float(z_clip)
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))

    def _percentile(self, img):
        return ScaleIntensityRangePercentiles(lower=self.percentiles[0], upper=self.percentiles[1], b_min=0.0,
                                              b_max=1.0, clip=True)(img)

    def __call__(self, img, modality: str | None = None):
        mod = resolve_modality(img, modality or self.modality)
        if mod == "CT":
            lo, hi = self.ct_window
            out, rule = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img), \
                f"ct_window({lo:g}, {hi:g})"
        elif mod == "MR" and self.mr_norm == "zscore":
            z = NormalizeIntensity(nonzero=True)(img)
            out = ScaleIntensityRange(a_min=-self.z_clip, a_max=self.z_clip, b_min=0.0, b_max=1.0, clip=True)(z)
            out = out * (img != 0)  # background stays 0
            rule = f"mr_zscore_nonzero(clip {self.z_clip:g})"
        elif mod is None or (mod == "MR" and self.mr_norm == "percentile"):
            if mod is None:
                _note_default_rule(self.percentiles)
            out, rule = self._percentile(img), f"percentiles{self.percentiles}"
        else:  # XR, CR, DX, MG, US, OT, ... and 2D image files
            out, rule = ScaleIntensity(minv=0.0, maxv=1.0)(img), "minmax"
        if isinstance(out, MetaTensor):
            out.meta["intensity"] = rule
            out.meta["modality"] = mod
        return out


class IntensityByModalityd(MapTransform):
    """Dictionary version of :class:`IntensityByModality` (same arguments after ``keys``)."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, modality: str = "auto",
                 ct_window: Sequence[float] = (-160.0, 240.0), mr_norm: str = "zscore", z_clip: float = 3.0,
                 percentiles: Sequence[float] = (0.5, 99.5), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = IntensityByModality(modality, ct_window=ct_window, mr_norm=mr_norm, z_clip=z_clip,
                                          percentiles=percentiles)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


def clinical_load_chain(keys: Sequence[str], modality: str = "auto", ct_window: Sequence[float] = (-160.0, 240.0),
                        mr_norm: str = "zscore", series_uid: str | None = None, grayscale: bool = True) -> list:
    """Load clinical inputs and scale their intensity by modality to [0, 1]; geometry kept (no resizing).

    Returns a list of transforms (wrap in ``Compose``): :class:`ClinicalLoadd`, :class:`IntensityByModalityd`,
    ``EnsureTyped(track_meta=True)``. Each key ends as a ``(C, *spatial)`` float32 ``MetaTensor`` whose ``affine`` is
    the input's. Follow it with the 2D chain's normalisation to [-1, 1] before a trained network.
    """
    keys = list(keys)
    return [
        ClinicalLoadd(keys, series_uid=series_uid, grayscale=grayscale),
        IntensityByModalityd(keys, modality=modality, ct_window=ct_window, mr_norm=mr_norm),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
    ]


class SaveNiftid:
    """Write ``data[key]`` (``(1, *spatial)`` labels, already at the input's size) as a uint8 NIfTI with the input's
    original affine, unchanged: to ``data[path_key]`` when the item names its output (`amvlm_monai.inference.files`),
    else ``<output_dir>/<input stem>_<postfix><output_ext>``.

    MONAI's ``SaveImaged`` reduces a 2D image's 4x4 affine to 3x3 before writing, which is singular for 2D slices cut
    from a volume along another axis than the last (a sagittal slice has no in-plane z); nibabel keeps the 4x4
    affine, so each mask overlays its slice in world space.
    """

    def __init__(self, keys: str, output_dir: str | os.PathLike, output_ext: str = ".nii.gz",
                 postfix: str = "mask", path_key: str = "output") -> None:
        self.key = keys
        self.output_dir = Path(output_dir)
        self.output_ext = output_ext
        self.postfix = postfix
        self.path_key = path_key

    def __call__(self, data: dict) -> dict:
        import nibabel as nib
        import numpy as np

        pred = data[self.key]
        meta = getattr(pred, "meta", {})
        out = data.get(self.path_key)
        if out is None:
            source = str(meta.get("filename_or_obj", "image"))
            name = Path(source).name
            for ext in (".nii.gz", ".nii"):
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
            else:
                name = Path(name).stem
            out = self.output_dir / f"{name}_{self.postfix}{self.output_ext}"
        affine = np.asarray(meta.get("original_affine", getattr(pred, "affine", np.eye(4))), np.float64)
        arr = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)[0].astype(np.uint8)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), str(out))
        return data


class SaveImagePathd:
    """Write ``data[key]`` with MONAI's ``SaveImage`` (PNG and the other formats it writes) to the file named by
    ``data[path_key]`` (which ends with ``output_ext``; its folder is created); items without one get MONAI's
    ``<output_dir>/<input stem>_<postfix><output_ext>``.

    Args:
        keys: the key to write.
        output_dir: the folder of items that do not name their output.
        output_ext: the file type, e.g. ``".png"``.
        scale: MONAI's ``scale`` (255 writes a {0, 1} mask as 0/255; None writes values as they are).
        postfix: see above.
        path_key: the item's key holding its output path.
    """

    def __init__(self, keys: str, output_dir: str | os.PathLike, output_ext: str = ".png", scale: int | None = 255,
                 postfix: str = "mask", path_key: str = "output") -> None:
        from monai.transforms import SaveImage

        self.key = keys
        self.output_ext = output_ext
        self.path_key = path_key
        self.saver = SaveImage(output_dir=output_dir, output_ext=output_ext, output_postfix=postfix, resample=False,
                               separate_folder=False, print_log=False, output_dtype="uint8", scale=scale)

    def __call__(self, data: dict) -> dict:
        out = data.get(self.path_key)
        if out is None:
            self.saver(data[self.key])
            return data
        out = str(out)
        if not out.endswith(self.output_ext):
            raise ValueError(f"{out}: an output path of a {self.output_ext} writer must end with {self.output_ext}.")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        self.saver(data[self.key], filename=out[: len(out) - len(self.output_ext)])
        return data
