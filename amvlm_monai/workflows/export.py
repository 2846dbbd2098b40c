"""Export a bundle that runs without this repository, as the MONAI model zoo ships bundles.

    python -m amvlm_monai.workflows.export --bundle qata_covid19_cxr_segmentation --model-dir runs/qata/models \\
        --eval-dir runs/qata/eval --out dist/ [--set image_size=64 --set unet_size='"light"'] [--weights-url URL]

writes ``dist/<bundle>/`` and ``dist/<bundle>.zip`` holding:

- ``configs/``: the bundle's configs with every ``amvlm_monai...`` target pointing at ``scripts.amvlm_monai...``
  (the zoo's convention: code a bundle needs lives in its ``scripts/`` folder and ``monai.bundle run`` puts the
  bundle root on ``sys.path``); ``--set KEY=JSON`` overrides a top-level key in every config that has it (the
  settings the weights were trained with). ``inference.json``'s ``network_def`` is the plain MONAI network
  (``UNet`` ...) with its arguments spelled out, checked to load the weights and give the same outputs, so that
  ``verify_net_in_out`` and ``ckpt_export`` need nothing but MONAI.
- ``scripts/amvlm_monai/``: this package's source with its imports made relative to ``scripts``.
- ``models/model.pt`` and ``large_files.yml`` (its URL and MD5: the zoo keeps weights out of its repository; the
  paper-size U-Net is over its 25 MB file limit). The URL is a placeholder unless ``--weights-url`` is given.
- ``configs/metadata.json`` with ``eval_metrics`` read from the evaluation of the weights (MetricsSaver's
  ``metrics.csv``, or the per-image ``scores_*.csv``), the monai/torch/numpy versions of this environment and
  ``required_packages_version``: the registry packages the vendored code imports (and the readers MONAI uses for the
  bundle's files), at the versions installed here. ``amvlm-monai`` itself is not listed: it is not on the registry.
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


WEIGHTS_URL_PLACEHOLDER = "TO BE FILLED: the URL where models/model.pt is uploaded"


# packages used through MONAI rather than imported by the code: image readers and TensorBoard
RUNTIME_PACKAGES = ("pillow", "nibabel", "tensorboard")


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
    size = inference.get("image_size", 64)
    size = size if isinstance(size, int) else size[0]
    x = torch.randn(2, int(inference.get("in_channels", 1)), size, size, generator=torch.Generator().manual_seed(0))
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


# ---- the bundle ------------------------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_bundle(bundle: str | Path, model_dir: str | Path, out: str | Path, eval_dir: Optional[str | Path] = None,
                  overrides: Optional[dict] = None, weights_url: Optional[str] = None, version: Optional[str] = None,
                  overwrite: bool = False) -> dict[str, Path]:
    """Write the stand-alone bundle folder and its zip (see the module docstring).

    Args:
        bundle: a bundle folder, or the name of one in this repository's ``bundles/``.
        model_dir: folder holding ``model.pt`` (the trained stage-2 network's state dict).
        out: output folder; the bundle goes to ``out/<name>/`` and ``out/<name>.zip``.
        eval_dir: the evaluation output of these weights (default: the first of ``<model_dir>/../eval``,
            ``<model_dir>/eval`` and ``<model_dir>`` that holds ``metrics.csv`` or ``scores_*.csv``).
        overrides: top-level config keys to set in every config that has them (e.g. ``{"image_size": 64}``).
        weights_url: where ``models/model.pt`` is downloaded from (``large_files.yml``).
        version: the bundle version (default: the source metadata's).
        overwrite: replace an existing ``out/<name>``.

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
    dst = Path(out) / name
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it.")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)

    # configs: overrides, vendored targets, plain MONAI network for inference
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
    inference = configs["inference.json"] = _freeze(configs["inference.json"], model)
    spec, _ = _plain_network(inference, model)
    if spec is not None:
        inference["network_def"] = spec
    else:
        logger.warning(f"{name}: network_def is not a plain MONAI network; inference.json keeps the vendored factory.")
    for rel, config in configs.items():
        if isinstance(config.get("initialize"), list):
            # `monai.bundle run` puts the bundle root on sys.path only after `initialize`: do it first, so that
            # scripts.* targets there resolve from any working folder
            imports = list(config.get("imports", []))
            config["imports"] = imports + [i for i in ("$import os", "$import sys") if i not in imports]
            config["initialize"] = [_SYS_PATH] + config["initialize"]
        path = dst / "configs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_rewrite(config), indent=4) + "\n")
    for path in (src / "configs").rglob("*"):
        if path.is_file() and path.suffix != ".json":
            shutil.copy2(path, dst / "configs" / path.relative_to(src / "configs"))

    code = vendor_package(dst)
    for item in ("LICENSE", "docs"):
        if (src / item).is_dir():
            shutil.copytree(src / item, dst / item)
        elif (src / item).is_file():
            shutil.copy2(src / item, dst / item)
    (dst / "models").mkdir()
    shutil.copy2(model, dst / "models" / "model.pt")
    for side in model.parent.glob("model_info.json"):  # the settings file some tools read beside the weights
        shutil.copy2(side, dst / "models" / side.name)
    size = model.stat().st_size
    (dst / "large_files.yml").write_text(
        "large_files:\n"
        '  - path: "models/model.pt"\n'
        f'    url: "{weights_url or WEIGHTS_URL_PLACEHOLDER}"\n'
        f'    hash_val: "{_md5(model)}"\n'
        '    hash_type: "md5"\n')

    import monai
    import numpy
    import torch

    meta = json.loads((src / "configs" / "metadata.json").read_text())
    meta["version"] = version or meta.get("version", "0.1.0")
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

    readme = dst / "docs" / "README.md"
    if readme.is_file():
        readme.write_text(readme.read_text().rstrip() + "\n\n" + _standalone_note(size) + "\n")
    archive = shutil.make_archive(str(Path(out) / name), "zip", root_dir=str(Path(out)), base_dir=name)
    logger.info(f"exported {dst} and {archive}")
    return {"folder": dst, "zip": Path(archive)}


def _standalone_note(weights_bytes: int) -> str:
    over = " (over the model zoo's 25 MB file limit)" if weights_bytes > ZOO_FILE_LIMIT else ""
    return (
        "## Stand-alone use\n\n"
        "This bundle runs without the amvlm-monai repository: its code is in `scripts/amvlm_monai` and the configs "
        "name it as `scripts.amvlm_monai...`; `configs/metadata.json` lists the registry packages it needs "
        "(`required_packages_version`). From the bundle folder:\n\n"
        "```bash\n"
        "python -m monai.bundle download_large_files --bundle_path .   # models/model.pt, if not present\n"
        "python -m monai.bundle run inferring --config_file configs/inference.json --input_dir /path/to/images\n"
        "```\n\n"
        f"`models/model.pt` is {weights_bytes / 2**20:.1f} MB{over}; `large_files.yml` gives its URL and MD5. "
        "`eval_metrics` in the metadata come from the evaluation of these weights (see its description).")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amvlm_monai.workflows.export", description=__doc__.splitlines()[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle name in bundles/ or a bundle folder")
    parser.add_argument("--model-dir", required=True, help="folder with the trained model.pt")
    parser.add_argument("--eval-dir", default=None, help="evaluation output of these weights (metrics.csv)")
    parser.add_argument("--out", required=True, help="output folder (gets <bundle>/ and <bundle>.zip)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="top-level config value the weights were trained with, e.g. image_size=64")
    parser.add_argument("--weights-url", default=None, help="URL of the uploaded model.pt, for large_files.yml")
    parser.add_argument("--version", default=None, help="bundle version (default: the metadata's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = export_bundle(args.bundle, args.model_dir, args.out, eval_dir=args.eval_dir,
                                overrides=parse_key_values(args.set), weights_url=args.weights_url, version=args.version,
                                overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"bundle: {written['folder']}\nzip: {written['zip']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
