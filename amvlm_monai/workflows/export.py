"""Export a bundle that runs without this repository, as the MONAI model zoo ships bundles.

    python -m amvlm_monai.workflows.export --bundle qata_covid19_cxr_segmentation --model-dir runs/qata/models \\
        --eval-dir runs/qata/eval --out dist/ [--set image_size=64 --set unet_size='"light"'] \\
        [--weights-url https://example.org/weights/qata/]  # or a template: 'https://example.org/{bundle}_{name}'

writes ``dist/<bundle>/`` and ``dist/<bundle>.zip`` holding:

- ``configs/``: the bundle's configs with every ``amvlm_monai...`` target pointing at ``scripts.amvlm_monai...``
  (the zoo's convention: code a bundle needs lives in its ``scripts/`` folder and ``monai.bundle run`` puts the
  bundle root on ``sys.path``); ``--set KEY=JSON`` overrides a top-level key in every config that has it (the
  settings the weights were trained with). ``inference.json`` states the settings read from ``model_info.json``
  beside the weights, and its ``network_def`` is the plain MONAI network (``UNet`` ...) with its arguments spelled
  out, checked to load the weights and give the same outputs, so that ``verify_net_in_out`` and ``ckpt_export`` need
  nothing but MONAI. ``train.json`` gets the same network settings (checked to load the weights), so that
  ``ckpt_export`` on it, the command of the bundle's README, exports these weights.
- ``scripts/amvlm_monai/``: this package's source with its imports made relative to ``scripts``.
- ``models/model.pt``, ``models/model.ts`` (TorchScript, as ``monai.bundle ckpt_export`` writes it) and the
  settings beside them (``model_info.json``, ``model.json``); ``large_files.yml`` lists both weights files with
  their URL and SHA-256 hash, as the zoo asks (it keeps weights out of its repository; the paper-size U-Net is over
  its 25 MB file limit) and as ``python -m monai.bundle download_large_files`` reads it.
  ``--weights-url`` says where the two files will be uploaded: a URL with ``{name}`` (the file name, ``model.pt``
  or ``model.ts``), optionally ``{bundle}`` and ``{version}``, is a template; any other URL is the folder both files
  go in (``https://host/dir`` and ``https://host/dir/`` both give ``https://host/dir/model.pt``); ``file://`` URLs
  work too. Without it the URLs are placeholders and the export warns: upload the files, then export again with
  ``--weights-url``, or edit the ``url`` lines.
- ``configs/metadata.json`` with ``eval_metrics`` read from the evaluation of the weights (MetricsSaver's
  ``metrics.csv``, or the per-image ``scores_*.csv``), the monai/torch/numpy versions of this environment and
  ``required_packages_version``: the registry packages the vendored code imports, the readers MONAI uses for the
  bundle's files, and what ``python -m monai.bundle`` needs for the zoo's checks (``fire``, ``jsonschema``,
  ``pyyaml``), at the versions installed here. ``amvlm-monai`` itself is not listed: it is not on the registry.
- ``docs/README.md`` in the zoo's README layout (``bundles/_template/docs/export_readme.md``): the bundle's own
  README sections (without its ``<!-- repo-only -->`` blocks, which name the repository's commands), input and
  output from the metadata, these weights' scores and training time (``--training-time``, else measured from the
  run's TensorBoard logs under ``--model-dir``), and only commands this bundle ships.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import importlib.metadata
import inspect
import json
import logging
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from amvlm_monai.utils.args import parse_key_values

logger = logging.getLogger(__name__)


PACKAGE = Path(__file__).resolve().parents[1]


REPO_BUNDLES = PACKAGE.parent / "bundles"


VENDOR = "scripts"


ZOO_FILE_LIMIT = 25 * 1024 * 1024


WEIGHTS_URL_PLACEHOLDER = "TO BE FILLED: the URL where models/{name} is uploaded"


WEIGHT_FILES = ("model.pt", "model.ts")  # what large_files.yml lists, as the zoo's bundles do


HASH_TYPE = "sha256"


# what `python -m monai.bundle` needs for the zoo's checks: fire (its command line), jsonschema (verify_metadata),
# pyyaml (large_files.yml)
BUNDLE_TOOLS = ("fire", "jsonschema", "pyyaml")


# packages used through MONAI rather than imported by the code: image readers, TensorBoard, the bundle tools
RUNTIME_PACKAGES = ("pillow", "nibabel", "tensorboard") + BUNDLE_TOOLS


README_TEMPLATE = REPO_BUNDLES / "_template" / "docs" / "export_readme.md"


REPO_ONLY = re.compile(r"<!-- repo-only -->.*?<!-- /repo-only -->\n?", re.DOTALL)


# commands of the repository that an exported bundle does not ship
_REPO_COMMAND = re.compile(r"(?<![\w.])(?:data_prep|amvlm_monai)\.\w+|\bmake (?:demo|test|bench)\b")


BASE_PACKAGES = {"torch", "numpy", "monai"}  # metadata has fields of their own for these


_SYS_PATH = ("$sys.path.insert(1, os.path.abspath(@bundle_root)) if os.path.abspath(@bundle_root) not in sys.path "
             "else None")


_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)amvlm_monai\b", re.MULTILINE)


_REFERENCE = re.compile(r"(?<![\w.])amvlm_monai\.")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- code ------------------------------------------------------------------------------------------------------
def vendor_package(dst: Path, package: Path = PACKAGE, prefix: str = VENDOR) -> list[Path]:
    """Copy the package's ``.py`` files under ``dst/<prefix>/amvlm_monai`` with ``import amvlm_monai...`` and
    ``from amvlm_monai...`` rewritten to ``<prefix>.amvlm_monai...``; returns the written files."""
    root = dst / prefix
    root.mkdir(parents=True, exist_ok=True)
    init = root / "__init__.py"
    init.write_text('"""Code of this bundle: a copy of the amvlm_monai package (configs name it as scripts.amvlm_monai)."""\n')
    written = [init]
    for src in sorted(package.rglob("*.py")):
        if "__pycache__" in src.parts:
            continue
        text = _IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{prefix}.amvlm_monai", src.read_text())
        out = root / "amvlm_monai" / src.relative_to(package)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        written.append(out)
    for path in written:  # every import of the package must now go through the prefix
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            bad = [n for n in names if n == "amvlm_monai" or n.startswith("amvlm_monai.")]
            if bad:
                raise RuntimeError(f"{path}: import of {bad} was not rewritten to {prefix}.amvlm_monai.")
    return written


def _imported_modules(files: Sequence[Path]) -> set[str]:
    """Top-level names of the absolute imports in ``files`` (function-level imports included)."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def required_packages(files: Sequence[Path], extra: Sequence[str] = RUNTIME_PACKAGES) -> dict[str, str]:
    """``{distribution: installed version}`` of the registry packages that ``files`` import, plus ``extra``.

    The standard library, the package itself, and torch / numpy / monai (metadata fields of their own) are left out;
    an import whose distribution is not installed here (an optional extra) is skipped.
    """
    by_module = importlib.metadata.packages_distributions()
    dists: set[str] = {_canonical(e) for e in extra}
    for name in _imported_modules(files):
        if name in sys.stdlib_module_names or name in ("amvlm_monai", VENDOR, "__future__"):
            continue
        dists.update(_canonical(d) for d in by_module.get(name, []))
    out = {}
    for dist in sorted(dists - BASE_PACKAGES - {"amvlm-monai"}):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            logger.info(f"{dist} is not installed here: left out of required_packages_version.")
    return out


# ---- configs ---------------------------------------------------------------------------------------------------
def _rewrite(value: Any, prefix: str = VENDOR) -> Any:
    if isinstance(value, str):
        return _REFERENCE.sub(f"{prefix}.amvlm_monai.", value)
    if isinstance(value, list):
        return [_rewrite(v, prefix) for v in value]
    if isinstance(value, dict):
        return {k: _rewrite(v, prefix) for k, v in value.items()}
    return value


def _jsonable(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{type(value).__name__} is not a config value")


def monai_network_def(build: Callable[[], Any]) -> Optional[dict]:
    """The config of a MONAI network that ``build()`` returns, as ``{"_target_": ..., arguments}``, or None when it
    is not a plain MONAI network (or its arguments are not config values).

    The arguments are recorded from the network's own constructor call while ``build`` runs, so any factory that
    ends in ``UNet(...)`` / ``BasicUNet(...)`` is covered without knowing its presets.
    """
    cls = type(build())
    if not cls.__module__.startswith("monai.networks.nets"):
        return None
    import monai.networks.nets as nets

    if getattr(nets, cls.__name__, None) is not cls:
        return None
    original = cls.__init__
    signature = inspect.signature(original)
    calls: list[dict] = []

    def recording_init(self, *args, **kwargs):
        if type(self) is cls and not calls:
            calls.append(dict(signature.bind(self, *args, **kwargs).arguments))
        original(self, *args, **kwargs)

    cls.__init__ = recording_init
    try:
        build()
    finally:
        cls.__init__ = original
    if not calls:
        return None
    arguments = calls[0]
    arguments.pop("self", None)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
            return None
    arguments = {k: v for k, v in arguments.items() if signature.parameters.get(k) is None
                 or signature.parameters[k].kind is not inspect.Parameter.VAR_POSITIONAL}
    try:
        return {"_target_": cls.__name__, **_jsonable(arguments)}
    except TypeError:
        return None


def _parse(configs: dict, key: str, overrides: Optional[dict] = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser(dict(configs))
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser.get_parsed_content(key, instantiate=True)


def _load_weights(net, path: Path, what: str) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit {what} (train-time settings such as unet_size, "
                         f"in_channels or out_channels differ? pass them with --set KEY=VALUE): {e}") from e


def _at_model(config: dict, model: Path) -> dict:
    """The config with its model location keys pointing at ``model`` (for parsing at export time)."""
    where = {"model_path": str(model), "output_dir": str(model.parent)}
    return dict(config, **{k: v for k, v in where.items() if k in config})


def _freeze(config: dict, model: Path) -> dict:
    """Top-level ``$`` expressions that read the model's settings (``@model_info[...]``, from the JSON written beside
    the weights) replaced by their values, so that the exported config states them and its network needs no code."""
    frozen = dict(config)
    for key, raw in config.items():
        if isinstance(raw, str) and raw.startswith("$") and "@model_info" in raw:
            frozen[key] = _jsonable(_parse(_at_model(config, model), key))
    return frozen


def example_input(inference: dict, batch: int = 2):
    """A seeded random batch of the network's input shape (``image_size``, ``in_channels`` of ``inference``)."""
    import torch

    size = inference.get("image_size", 64)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    return torch.randn(batch, int(inference.get("in_channels", 1)), h, w, generator=torch.Generator().manual_seed(0))


def _plain_network(inference: dict, model: Path) -> tuple[Optional[dict], Any]:
    """(MONAI network_def or None, the original network with the weights loaded)."""
    import torch

    inference = _at_model(inference, model)
    original = _parse(inference, "network_def")
    _load_weights(original, model, "the bundle's network_def")
    spec = monai_network_def(lambda: _parse(inference, "network_def"))
    if spec is None:
        return None, original
    for key in ("in_channels", "out_channels"):
        if spec.get(key) == inference.get(key):
            spec[key] = f"@{key}"
    plain = _parse(dict(inference, network_def=spec), "network_def")
    _load_weights(plain, model, f"the MONAI network {spec['_target_']}")
    original.eval()
    plain.eval()
    x = example_input(inference)
    with torch.no_grad():
        same = torch.allclose(original(x), plain(x), atol=1e-5)
    return (spec if same else None), original


# ---- evaluation ----------------------------------------------------------------------------------------------
def read_eval_metrics(eval_dir: Path) -> tuple[dict[str, float], str]:
    """``eval_metrics`` and a sentence saying where they come from, from an evaluation folder.

    Reads MetricsSaver's ``metrics.csv`` (``val_mean_dice,0.81`` lines; the ``val_`` prefix is dropped), else the
    mean of the per-image ``scores_<split>.csv`` columns ``dice`` and ``iou``.

    Raises:
        FileNotFoundError: the folder holds neither.
    """
    eval_dir = Path(eval_dir)
    scores = sorted(eval_dir.glob("scores_*.csv"))
    n_images = split = None
    means: dict[str, float] = {}
    if scores:
        split = scores[0].stem[len("scores_"):]
        with open(scores[0], newline="") as f:
            rows = list(csv.DictReader(f))
        n_images = len(rows)
        for col in ("dice", "iou"):
            if rows and col in rows[0]:
                means[f"mean_{col}"] = sum(float(r[col]) for r in rows) / len(rows)
    metrics: dict[str, float] = {}
    saver = eval_dir / "metrics.csv"
    if saver.is_file():
        for line in saver.read_text().splitlines():
            name, _, value = line.partition(",")
            if name.strip() and value.strip():
                metrics[re.sub(r"^val_", "", name.strip())] = float(value)
    if not metrics:
        metrics = means
    if not metrics:
        raise FileNotFoundError(f"{eval_dir}: no evaluation results (metrics.csv or scores_*.csv); run "
                                "the bundle's 'evaluating' workflow on the weights first.")
    where = f"the '{split}' split" if split else "the evaluation split"
    count = f", {n_images} images" if n_images is not None else ""
    return metrics, f"eval_metrics: evaluation of these weights on {where}{count} (per-image means)."


# ---- weights --------------------------------------------------------------------------------------------------
def weights_urls(url: Optional[str], names: Sequence[str] = WEIGHT_FILES, bundle: str = "",
                 version: str = "") -> dict[str, str]:
    """The download URL of each weights file in ``names``.

    Args:
        url: a template with ``{name}`` (the file name) and optionally ``{bundle}``, ``{version}``; or the URL of the
            folder the files are uploaded to (the file name is appended, after a ``/`` where it has none); or None:
            placeholders (the export then warns).
        names: the file names (``model.pt``, ``model.ts``).
        bundle, version: values of ``{bundle}`` and ``{version}``.

    Raises:
        ValueError: a URL of another scheme than http(s), ftp or file, or a template with other fields.
    """
    from urllib.parse import urlparse

    if not url:
        return {n: WEIGHTS_URL_PLACEHOLDER.format(name=n) for n in names}
    if urlparse(url).scheme not in ("http", "https", "ftp", "file"):
        raise ValueError(f"--weights-url {url!r}: not an http(s), ftp or file:// URL.")
    if "{" in url or "}" in url:
        try:
            urls = {n: url.format(name=n, bundle=bundle, version=version) for n in names}
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"--weights-url {url!r}: a template may use {{name}}, {{bundle}} and {{version}} "
                             f"only ({type(e).__name__}: {e}).") from None
        if len(set(urls.values())) < len(urls):
            raise ValueError(f"--weights-url {url!r}: a template needs {{name}} (one URL per file).")
        return urls
    base = url if url.endswith("/") else url + "/"
    return {n: base + n for n in names}


def file_hash(path: Path, hash_type: str = HASH_TYPE) -> str:
    """The hex digest of a file (``md5``, ``sha1``, ``sha256``, ``sha512``: what ``large_files.yml`` allows)."""
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def large_files_yml(models: Path, urls: dict[str, str], hash_type: str = HASH_TYPE) -> str:
    """``large_files.yml`` in the zoo's format: ``path``, ``url``, ``hash_val``, ``hash_type`` of each file in
    ``urls`` (name -> URL; the files are in ``models``)."""
    lines = ["large_files:"]
    for name, url in urls.items():
        lines += [f"  - path: {json.dumps('models/' + name)}", f"    url: {json.dumps(url)}",
                  f'    hash_val: "{file_hash(models / name, hash_type)}"', f'    hash_type: "{hash_type}"']
    return "\n".join(lines) + "\n"


def write_torchscript(net, path: Path, meta: dict, configs: dict[str, str], example) -> None:
    """``net`` as TorchScript with ``meta`` and the ``configs`` (file name -> JSON text) inside, as
    ``monai.bundle ckpt_export`` writes it; the scripted module is checked against ``net`` on ``example``."""
    import torch
    from monai.data import save_net_with_metadata
    from monai.networks.utils import convert_to_torchscript

    scripted = convert_to_torchscript(net.eval(), verify=True, inputs=[example], device=torch.device("cpu"),
                                      atol=1e-5)
    save_net_with_metadata(scripted, str(path), meta_values=meta,
                           more_extra_files={name: text.encode() for name, text in configs.items()})


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min" if minutes else f"{int(round(seconds))} s"


TRAINING_LOGS = {"stage 1 (pretraining)": "amvlm_pretrained_tensorboard", "stage 2 (training)": "tensorboard"}


def training_time(model_dir: Path) -> Optional[str]:
    """The wall-clock training time read from the TensorBoard logs the bundles write under ``model_dir``
    (``amvlm_pretrained_tensorboard/`` for stage 1, ``tensorboard/`` for stage 2): per event file, the time of the
    last logged value minus the first's, summed (a resumed run starts a new file, so the pause is not counted).
    None without logs."""
    parts, total = [], 0.0
    for stage, folder in TRAINING_LOGS.items():
        files = sorted(Path(model_dir, folder).rglob("events.out.tfevents.*"))
        if not files:
            continue
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        seconds = 0.0
        for f in files:
            times = [e.wall_time for e in EventFileLoader(str(f)).Load() if e.summary.value]  # logged values
            seconds += max(times) - min(times) if times else 0.0
        parts.append(f"{stage} {_duration(seconds)}")
        total += seconds
    if not parts:
        return None
    return (", ".join(parts) + (f"; {_duration(total)} in all" if len(parts) > 1 else "")
            + " (wall-clock, from the TensorBoard logs of the run).")


# ---- docs ---------------------------------------------------------------------------------------------------------
def readme_sections(text: str) -> dict[str, str]:
    """``## Title`` (lower case, without ``*``) -> the section's text, without its ``<!-- repo-only -->`` blocks."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in REPO_ONLY.sub("", text).splitlines():
        if line.startswith("## "):
            current = line[3:].strip().strip("*").strip().lower()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def _io_text(spec: dict, classes: str) -> str:
    n = spec.get("num_channels", 1)
    shape = " x ".join(str(s) for s in spec.get("spatial_shape", []))
    rng = spec.get("value_range") or []
    values = f", values in [{rng[0]}, {rng[1]}]" if len(rng) == 2 else ""
    lines = [f"{n} channel{'s' if n != 1 else ''} of {shape} {spec.get('dtype', 'float32')}{values}: {classes}"]
    lines += [f"- channel {k}: {v}" for k, v in spec.get("channel_def", {}).items()]
    return "\n".join(lines)


def network_summary(inference: dict) -> str:
    """One line saying what network ``inference.json`` builds, e.g. ``UNet (unet_size "light"), 1 -> 1 channels,
    32 x 32 px``."""
    target = str((inference.get("network_def") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
    size = inference.get("image_size")
    shape = f"{size} x {size}" if isinstance(size, int) else " x ".join(str(s) for s in size or [])
    preset = f' (unet_size "{inference["unet_size"]}")' if isinstance(inference.get("unet_size"), str) else ""
    return (f"`{target}`{preset}, {inference.get('in_channels')} -> {inference.get('out_channels')} channels, "
            f"{shape} px input (`network_def` of `configs/inference.json` and `configs/train.json`)")


def export_readme(source: Optional[Path], meta: dict, provenance: str, train_time: Optional[str], weights_mb: float,
                  dataset_dir: str, network: str = "", template: Path = README_TEMPLATE) -> str:
    """The exported bundle's ``docs/README.md``: ``template`` (the zoo's README layout) filled from the source
    README's sections (``source``, may be None), the metadata, the evaluation's provenance, the training time and
    the network (`network_summary`).

    Raises:
        ValueError: naming ``source``, when a section it contributes names a command of this repository (a converter
            in ``data_prep``, an ``amvlm_monai`` module, ``make``) outside ``<!-- repo-only -->`` blocks: the exported
            bundle does not ship it.
    """
    import string

    sections = readme_sections(source.read_text()) if source is not None and source.is_file() else {}
    missing = "Not described in the source bundle's README."

    def section(*names: str) -> str:
        return "\n\n".join(sections[n] for n in names if sections.get(n)) or missing

    fmt = meta.get("network_data_format", {})
    inputs = next(iter(fmt.get("inputs", {}).values()), {})
    outputs = next(iter(fmt.get("outputs", {}).values()), {})
    scores = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in meta.get("eval_metrics", {}).items())
    performance = f"These weights: {scores}." if scores else "These weights have not been evaluated."
    detail = provenance.split("eval_metrics:", 1)[-1].strip()
    refs = meta.get("references") or []
    fields = {
        "title": meta.get("name", ""),
        "network": network or "see `configs/inference.json`",
        "authors": sections.get("authors") or meta.get("authors", missing),
        "tags": sections.get("tags") or meta.get("task", missing),
        "description": section("description", "model overview"),
        "data": section("data"),
        "preprocessing": section("preprocessing"),
        "inputs": _io_text(inputs, meta.get("image_classes", "")),
        "outputs": _io_text(outputs, meta.get("pred_classes", "")),
        "performance": f"{performance} From the {detail[0].lower() + detail[1:]}" if detail else performance,
        "training_time": train_time or "not recorded (give it with the export's --training-time).",
        "reference": (f"#### **Reference results**\n{sections['performance']}" if sections.get("performance") else ""),
        "weights_mb": f"{weights_mb:.1f}" + (", over the zoo's 25 MB file limit" if weights_mb * 2**20 > ZOO_FILE_LIMIT
                                             else ""),
        "dataset_dir": dataset_dir,
        "system": section("system configuration"),
        "limitations": section("limitations"),
        "citation": section("citation"),
        "references": "\n".join(f"[{i}] {r}" for i, r in enumerate(refs, 1)) or missing,
        "license": sections.get("license") or f"See `LICENSE`. {meta.get('copyright', '')}".strip(),
    }
    for name in ("authors", "tags", "description", "data", "preprocessing", "reference", "system", "limitations",
                 "citation", "license"):
        found = _REPO_COMMAND.search(fields[name])
        if found:
            raise ValueError(f"{source}: its '{name}' section names '{found.group(0)}', a command of the amvlm-monai "
                             "repository that the exported bundle does not ship; put it between <!-- repo-only --> "
                             "and <!-- /repo-only -->.")
    text = string.Template(template.read_text()).substitute(fields)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


# ---- the bundle ------------------------------------------------------------------------------------------------
def _match_train(configs: dict[str, dict], frozen: dict, model: Path) -> None:
    """Give ``train.json`` the network settings ``inference.json`` states for these weights (the keys it read from
    ``model_info.json``), so that its ``network_def`` is the exported network: checked to load the weights."""
    train = configs.get("train.json")
    if train is None or "network_def" not in train:
        return
    for key, value in frozen.items():
        if key in train:
            train[key] = value
    _load_weights(_parse(train, "network_def"), model, "train.json's network_def")


def export_bundle(bundle: str | Path, model_dir: str | Path, out: str | Path, eval_dir: Optional[str | Path] = None,
                  overrides: Optional[dict] = None, weights_url: Optional[str] = None, version: Optional[str] = None,
                  overwrite: bool = False, training_time_text: Optional[str] = None) -> dict[str, Path]:
    """Write the stand-alone bundle folder and its zip (see the module docstring).

    Args:
        bundle: a bundle folder, or the name of one in this repository's ``bundles/``.
        model_dir: folder holding ``model.pt`` (the trained stage-2 network's state dict).
        out: output folder; the bundle goes to ``out/<name>/`` and ``out/<name>.zip``.
        eval_dir: the evaluation output of these weights (default: the first of ``<model_dir>/../eval``,
            ``<model_dir>/eval`` and ``<model_dir>`` that holds ``metrics.csv`` or ``scores_*.csv``).
        overrides: top-level config keys to set in every config that has them (e.g. ``{"image_size": 64}``).
        weights_url: where ``models/model.pt`` and ``models/model.ts`` are downloaded from (`weights_urls`); None
            leaves placeholders in ``large_files.yml`` and logs a warning saying how to fill them.
        version: the bundle version (default: the source metadata's).
        overwrite: replace an existing ``out/<name>``.
        training_time_text: how long training took (and on what), for the README; default: measured from the
            TensorBoard logs under ``model_dir`` (`training_time`).

    Returns:
        ``{"folder": path, "zip": path}``.
    """
    src = Path(bundle)
    if not src.is_dir():
        src = REPO_BUNDLES / str(bundle)
    if not (src / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{bundle}: not a bundle folder (no configs/metadata.json), nor a bundle name in "
                                f"{REPO_BUNDLES}.")
    model = Path(model_dir) / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no trained weights (model.pt) in --model-dir.")
    if eval_dir is None:  # the bundle layout (models/ beside eval/), or the demo's (scores beside model.pt)
        candidates = (Path(model_dir).parent / "eval", Path(model_dir) / "eval", Path(model_dir))
        eval_dir = next((d for d in candidates if (d / "metrics.csv").is_file() or any(d.glob("scores_*.csv"))),
                        candidates[0])
    metrics, provenance = read_eval_metrics(Path(eval_dir))
    name = src.name
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    meta["version"] = version or meta.get("version", "0.1.0")
    urls = weights_urls(weights_url, WEIGHT_FILES, name, meta["version"])  # a bad URL fails before anything is written
    dst = Path(out) / name
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it.")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)

    # configs: overrides, vendored targets, plain MONAI network for inference, train.json of the same network
    overrides = dict(overrides or {})
    used: set[str] = set()
    configs: dict[str, dict] = {}
    for path in sorted((src / "configs").rglob("*.json")):
        rel = path.relative_to(src / "configs")
        if rel.name == "metadata.json":
            continue
        config = json.loads(path.read_text())
        for key, value in overrides.items():
            if key in config:
                config[key] = value
                used.add(key)
        configs[str(rel)] = config
    unused = set(overrides) - used
    if unused:
        raise ValueError(f"--set keys used by no config of {name}: {sorted(unused)}")
    source_inference = configs["inference.json"]
    inference = configs["inference.json"] = _freeze(source_inference, model)
    spec, network = _plain_network(inference, model)
    if spec is not None:
        inference["network_def"] = spec
    else:
        logger.warning(f"{name}: network_def is not a plain MONAI network; inference.json keeps the vendored factory.")
    frozen = {k: v for k, v in inference.items() if source_inference.get(k) != v and k != "network_def"}
    _match_train(configs, frozen, model)  # --set values are in every config already
    if not any("@model_info" in json.dumps(v) for k, v in inference.items() if k != "model_info"):
        for key in ("model_info", "model_defaults"):  # read by nothing now that the settings are stated
            inference.pop(key, None)
    texts: dict[str, str] = {}
    for rel, config in configs.items():
        if isinstance(config.get("initialize"), list):
            # `monai.bundle run` puts the bundle root on sys.path only after `initialize`: do it first, so that
            # scripts.* targets there resolve from any working folder
            imports = list(config.get("imports", []))
            config["imports"] = imports + [i for i in ("$import os", "$import sys") if i not in imports]
            config["initialize"] = [_SYS_PATH] + config["initialize"]
        path = dst / "configs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[rel] = json.dumps(_rewrite(config), indent=4) + "\n"
        path.write_text(texts[rel])
    for path in (src / "configs").rglob("*"):
        if path.is_file() and path.suffix != ".json":
            shutil.copy2(path, dst / "configs" / path.relative_to(src / "configs"))

    code = vendor_package(dst)
    for item in ("LICENSE", "docs"):
        if (src / item).is_dir():
            shutil.copytree(src / item, dst / item)
        elif (src / item).is_file():
            shutil.copy2(src / item, dst / item)
    models = dst / "models"
    models.mkdir()
    shutil.copy2(model, models / "model.pt")
    for side in ("model_info.json", "model.json"):  # the settings and the selection record beside the weights
        if (model.parent / side).is_file():
            shutil.copy2(model.parent / side, models / side)

    import monai
    import numpy
    import torch

    meta.setdefault("changelog", {}).setdefault(meta["version"], "stand-alone export with trained weights")
    meta["monai_version"] = monai.__version__
    meta["pytorch_version"] = torch.__version__.split("+")[0]
    meta["numpy_version"] = numpy.__version__
    meta["required_packages_version"] = required_packages(code)
    meta["eval_metrics"] = metrics
    description = meta.get("description", "").split("eval_metrics:")[0].rstrip()  # drop the "to be filled" note
    meta["description"] = f"{description} {provenance}".strip()
    image_size = inference.get("image_size")
    if image_size is not None:
        shape = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        for side in ("inputs", "outputs"):
            for spec_ in meta.get("network_data_format", {}).get(side, {}).values():
                spec_["spatial_shape"] = shape
    (dst / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")

    write_torchscript(network, models / "model.ts", meta, {"inference.json": texts["inference.json"]},
                      example_input(inference, batch=1))
    (dst / "large_files.yml").write_text(large_files_yml(models, urls))
    if not weights_url:
        logger.warning(f"warning: {dst / 'large_files.yml'} has placeholder URLs: upload models/model.pt and "
                       "models/model.ts, then export again with --weights-url URL (the folder they are in, or a "
                       "template with {name}), or write their URLs into its url lines.")

    train_time = training_time_text or training_time(Path(model_dir))
    if train_time is None:
        logger.warning(f"warning: no TensorBoard logs under {model_dir}: the README's training time says 'not "
                       "recorded'; give it with --training-time.")
    (dst / "docs").mkdir(exist_ok=True)
    train = configs.get("train.json", {})
    (dst / "docs" / "README.md").write_text(export_readme(
        src / "docs" / "README.md", meta, provenance, train_time, model.stat().st_size / 2**20,
        str(train.get("dataset_dir", "/path/to/converted_data")), network_summary(inference)))
    archive = shutil.make_archive(str(Path(out) / name), "zip", root_dir=str(Path(out)), base_dir=name)
    logger.info(f"exported {dst} and {archive}")
    return {"folder": dst, "zip": Path(archive)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.workflows.export", description=__doc__.splitlines()[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle name in bundles/ or a bundle folder")
    parser.add_argument("--model-dir", required=True, help="folder with the trained model.pt")
    parser.add_argument("--eval-dir", default=None, help="evaluation output of these weights (metrics.csv)")
    parser.add_argument("--out", required=True, help="output folder (gets <bundle>/ and <bundle>.zip)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="top-level config value the weights were trained with, e.g. image_size=64")
    parser.add_argument("--weights-url", default=None, metavar="URL",
                        help="where model.pt and model.ts are uploaded, for large_files.yml: the folder's URL, or a "
                             "template with {name} (and {bundle}, {version}); file:// works")
    parser.add_argument("--training-time", default=None, metavar="TEXT",
                        help="how long training took and on what, for the README (default: measured from the "
                             "TensorBoard logs under --model-dir)")
    parser.add_argument("--version", default=None, help="bundle version (default: the metadata's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = export_bundle(args.bundle, args.model_dir, args.out, eval_dir=args.eval_dir,
                                overrides=parse_key_values(args.set), weights_url=args.weights_url,
                                version=args.version, overwrite=args.overwrite,
                                training_time_text=args.training_time)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"bundle: {written['folder']}\nzip: {written['zip']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
