"""Command-line values: one typed schema of the bundle arguments, ``--set KEY=VALUE`` parsing, booleans, and
argparse types that refuse out-of-range numbers.

- :data:`BUNDLE_ARGS` is every top-level key of the bundle configs a user may set (``--key value`` on MONAI's command
  line): its type, the values allowed and what it does. :func:`check_bundle_args` parses and range-checks the values
  of a config before anything is built (``bundle_guard`` in :mod:`amvlm_monai.utils.errors` runs it at the start of
  every workflow and writes the parsed values back into the config), and ``scripts/build_bundles.py`` lists the
  schema in each bundle's ``docs/README.md``.
- A wrong value raises :class:`ArgError`, one line: ``--key: <what is wrong>; allowed: <what is>``.
- :func:`arg_type` turns a schema entry into an argparse ``type=``, so that the project's ``python -m`` commands
  check their numeric options with the same rules and words.

MONAI's command line (``fire``) passes ``--use_text false`` as the string ``"false"`` (truthy) and ``--use_text
False`` as a bool; the schema accepts both, and ``1/0``, ``yes/no`` in any case, and refuses anything else.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ArgError", "Arg", "BUNDLE_ARGS", "as_bool", "parse_arg", "check_bundle_args", "labeled_splits",
           "arg_type", "args_table", "parse_key_values", "is_derived", "suggest", "used_keys"]

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")
BOOL_WORDS = "true or false (also 1/0, yes/no; any case)"


class ArgError(ValueError):
    """A bad value of one argument; ``str()`` is the whole one-line message ``--key: <problem>; allowed: <...>``.

    Args:
        key: the argument (without ``--``).
        problem: what is wrong with the value.
        allowed: what would be accepted (omitted from the message when empty).
    """

    def __init__(self, key: str, problem: str, allowed: str = "") -> None:
        self.key, self.problem, self.allowed = key, problem, allowed
        self.detail = problem + (f"; allowed: {allowed}" if allowed else "")  # the message without ``--key: ``
        super().__init__(f"--{key}: {self.detail}")


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Arg:
    """One argument: its kind, the values allowed, what it does.

    Args:
        kind: ``"bool"``, ``"int"``, ``"float"``, ``"choice"``, ``"str"``, ``"path"``, ``"strings"`` (a string or a
            list of them), ``"amp"`` (a boolean or a precision name), ``"axcodes"`` (an orientation such as
            ``RAS``), ``"percent"`` (a label percentage naming a split file), ``"size"`` (an integer or an
            ``[H, W]`` pair of them).
        help: what it does (one line, for the docs).
        low, high: bounds of a number (None: unbounded); ``above``/``below`` make them exclusive.
        choices: the values of a ``"choice"``.
        null: None is allowed too.
    """

    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    choices: tuple = ()
    null: bool = False

    def allowed(self) -> str:
        """What is accepted, in words (the ``allowed:`` part of an error and the docs' column)."""
        if self.kind == "bool":
            text = BOOL_WORDS
        elif self.kind == "amp":
            text = BOOL_WORDS + ", or auto, bf16, bfloat16, fp16, float16"
        elif self.kind in ("int", "float", "percent"):
            noun = {"int": "an integer", "float": "a number", "percent": "a percentage"}[self.kind]
            text = noun + self._range()
        elif self.kind == "size":
            text = f"an integer{self._range()}, or a pair [H, W] of them"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "axcodes":
            text = "three letters, one of each pair L/R, A/P, S/I (e.g. RAS)"
        elif self.kind == "strings":
            text = "a string or a list of strings"
        elif self.kind == "path":
            text = "a path"
        else:
            text = "a string"
        return text + (" or null" if self.null else "")

    def _range(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if not self.above and not self.below:
                return f" from {_fmt(lo)} to {_fmt(hi)}"
            return f" {'>' if self.above else '>='} {_fmt(lo)} and {'<' if self.below else '<='} {_fmt(hi)}"
        if lo is not None:
            return f" {'>' if self.above else '>='} {_fmt(lo)}"
        if hi is not None:
            return f" {'<' if self.below else '<='} {_fmt(hi)}"
        return ""

    def parse(self, key: str, value: Any) -> Any:
        """``value`` as this argument's type (e.g. ``"false"`` -> False, ``"3"`` -> 3), range-checked.

        Raises:
            ArgError: naming ``--key``, what is wrong and what is allowed.
        """
        if value is None:
            if self.null:
                return None
            raise ArgError(key, "null is not allowed", self.allowed())
        kind = self.kind
        if kind == "bool":
            return _as_bool(key, value, self.allowed())
        if kind == "amp":
            if isinstance(value, str) and value.strip().lower() in ("auto", "bf16", "bfloat16", "fp16", "float16"):
                return value.strip().lower()
            return _as_bool(key, value, self.allowed())
        if kind in ("int", "float", "percent"):
            return self._number(key, value)
        if kind == "size":
            if isinstance(value, (list, tuple)) and len(value) != 2:
                raise ArgError(key, f"{_text(value)} is not one size or a pair", self.allowed())
            side = Arg("int", self.help, self.low, self.high)
            try:
                return [side.parse(key, v) for v in value] if isinstance(value, (list, tuple)) else side.parse(key, value)
            except ArgError as e:
                raise ArgError(key, e.problem, self.allowed()) from None
        if kind == "strings":
            if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                return value
            raise ArgError(key, f"{_text(value)} is not a string or a list of strings", self.allowed())
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Number, os.PathLike)):
            raise ArgError(key, f"{_text(value)} is not a string", self.allowed())
        # fire reads --dataset_dir 2024 as the number 2024
        text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        if kind == "choice":
            if text in self.choices:
                return text
            low = {str(c).lower(): c for c in self.choices}
            if text.lower() in low:
                return low[text.lower()]
            raise ArgError(key, f"{_text(value)} is not a choice", self.allowed())
        if kind == "axcodes":
            codes = text.upper()
            axes = sorted(next((i for i, p in enumerate(("LR", "AP", "SI")) if c in p), 9) for c in codes)
            if axes == [0, 1, 2]:
                return codes
            raise ArgError(key, f"{_text(value)} is not an orientation", self.allowed())
        if not text.strip():
            raise ArgError(key, "an empty string", self.allowed())
        return text

    def _number(self, key: str, value: Any) -> Any:
        allowed = self.allowed()
        kind = "an integer" if self.kind == "int" else "a number"
        if isinstance(value, bool):
            raise ArgError(key, f"{value} is a boolean, not {kind}", allowed)
        x: Any = value
        if isinstance(value, str):
            text = value.strip()
            if self.kind == "percent":
                text = text.replace("p", ".")  # split_labeled12p5.json: 12p5 = 12.5
            try:
                x = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
            except ValueError:
                raise ArgError(key, f"{_text(value)} is not {kind}", allowed) from None
        if not isinstance(x, numbers.Real):
            raise ArgError(key, f"{_text(value)} is not {kind}", allowed)
        if not math.isfinite(x):
            raise ArgError(key, f"{_text(value)} is not a finite number", allowed)
        if self.kind == "int":
            if x != int(x):
                raise ArgError(key, f"{_text(value)} is not an integer", allowed)
            x = int(x)
        elif self.kind != "percent":
            x = float(x)
        lo, hi = self.low, self.high
        if (lo is not None and (x < lo or (self.above and x == lo))) or (
                hi is not None and (x > hi or (self.below and x == hi))):
            raise ArgError(key, f"{value.strip() if isinstance(value, str) else value} is out of range", allowed)
        if self.kind == "percent":  # the token of its split file's name: 25 -> 25, 12.5 -> "12p5"
            return int(x) if x == int(x) else _pct_name(x)
        return x


def _as_bool(key: str, value: Any, allowed: str = BOOL_WORDS) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ArgError(key, f"{_text(value)} is not a boolean", allowed)


def as_bool(value: Any, name: str) -> bool:
    """A command-line switch as bool: True/False, 1/0, or the strings true/false/yes/no/1/0 (any case).

    Raises:
        ArgError: ``--name: ... is not a boolean; allowed: ...``.
    """
    return _as_bool(name, value)


def _bool(help: str) -> Arg:
    return Arg("bool", help)


def _int(help: str, low: float | None = None, high: float | None = None) -> Arg:
    return Arg("int", help, low, high)


def _float(help: str, low: float | None = None, high: float | None = None, above: bool = False,
           below: bool = False, null: bool = False) -> Arg:
    return Arg("float", help, low, high, above, below, null=null)


def _choice(help: str, *choices: Any, null: bool = False) -> Arg:
    return Arg("choice", help, choices=choices, null=null)


def _path(help: str, null: bool = False) -> Arg:
    return Arg("path", help, null=null)


#: every bundle argument a user may set, in the order of the docs' table. The choices repeat the library's own
#: lists (this module may not import the layers above it); tests/test_args.py checks that they agree.
BUNDLE_ARGS: dict[str, Arg] = {
    # data and folders
    "dataset_dir": _path("the converted data set (datalist.json, split_labeled<N>.json); for inferring, the images"),
    "datalist": _path("the datalist of pretraining"),
    "labeled_percent": Arg("percent", "the split to train on: split_labeled<N>.json of --dataset_dir (12.5 names "
                           "split_labeled12p5.json)", 0, 100, above=True),
    "split_file": _path("the split file (default: from --dataset_dir and --labeled_percent)"),
    "allow_outside_paths": _bool("accept datalist paths that leave the data folder (../, absolute)"),
    "input_dir": _path("the images to infer on: a folder or one file (default: --dataset_dir)"),
    "image_glob": Arg("strings", "file patterns of the images to infer on"),
    "recursive": _bool("also read the images in the sub-folders of --input_dir (outputs keep their relative paths)"),
    "bundle_root": _path("the bundle folder"),
    "output_dir": _path("where checkpoints and models are written (default: <bundle_root>/models)"),
    "ckpt_dir": _path("where training writes model.pt, model_info.json and its states (default: --output_dir)"),
    "pretrained_path": _path("the stage-1 checkpoint pretraining writes and training reads"),
    "model_path": _path("the trained model evaluation and inference read"),
    "output_masks_dir": _path("where inferring writes the masks"),
    "output_ext": Arg("str", "file type of the masks inferring writes"),
    "eval_dir": _path("where evaluating writes scores, metrics and panels"),
    "scores_csv": _path("the per-image scores evaluating writes"),
    "panels_dir": _path("where evaluating writes its panels"),
    "eval_key": _choice("the datalist section evaluating scores", "training", "validation", "test"),
    "text_model": _path("a local BERT-family folder for the text tower (null: the packaged all-MiniLM-L6-v2)",
                        null=True),
    # run
    "seed": _int("random seed", 0, 2 ** 32 - 1),
    "max_epochs": _int("epochs to train", 1),
    "epoch_length": _int("iterations per epoch (default: from the data)", 1),
    "batch_size": _int("images (pairs in pretraining) per batch", 1),
    "unlabeled_batch_size": _int("unlabelled images per batch", 1),
    "num_workers": _int("data loader processes", 0),
    "cache_rate": _float("fraction of the data cached in memory", 0, 1),
    "val_interval": _int("epochs between validations (no more than --max_epochs: validation keeps the model)", 1),
    "save_interval": _int("epochs between resumable states (0: at the end only)", 0),
    "resume": _bool("continue the run from its last saved state"),
    "overwrite": _bool("start afresh where an earlier run left its outputs, replacing them (inference: replace "
                       "existing masks)"),
    "amp": Arg("amp", "mixed precision: true = bfloat16 where native (float16 on older GPUs), false = float32"),
    "cudnn_benchmark": _bool("cuDNN autotuning on CUDA"),
    "channels_last": _bool("channels-last memory format for the U-Net (default: on CUDA)"),
    "progress": _choice("progress display", "auto", "bar", "log", "off"),
    "tensorboard": _bool("TensorBoard logs (losses, learning rates, metrics, panels)"),
    "tensorboard_dir": _path("where TensorBoard logs go"),
    "num_panels": _int("validation panels logged to TensorBoard", 0),
    "eval_panels": _int("test images drawn as panels by evaluating", 0),
    "panels_per_case": _int("panels per volume (volume data)", 1),
    "selection_metric": Arg("str", "the validation metric that keeps the best model"),
    # data shape
    "image_size": Arg("size", "image side in pixels, or [H, W] (the light U-Net needs multiples of 16)", 16),
    "in_channels": _int("image channels", 1),
    "out_channels": _int("output channels (classes with background when multi-class)", 1),
    "multiclass": _bool("multi-class labels (softmax) instead of one binary mask"),
    "class_names": Arg("strings", "names of the foreground classes", null=True),
    "class_prompts": Arg("strings", "one text prompt per foreground class (multi-class text guidance)", null=True),
    "slice_axis": _int("axis volumes are sliced along", 0, 2),
    "slice_axcodes": Arg("axcodes", "orientation volumes are brought to before slicing"),
    "modality": Arg("str", "modality of the data (auto, CT, MR, ...): intensity rules of volume inference"),
    "threshold": _float("binary threshold on the sigmoid", 0, 1, above=True, below=True),
    # stage 1
    "preset": _choice("AMVLM size", "paper", "small"),
    "patch_embed": _choice("ViT patch embedding", "linear", "conv"),
    "head": _choice("projection heads", "mlp", "linear"),
    "qkv_projections": _bool("query/key/value projections in the cross-attention"),
    "learning_rate": _float("learning rate", 0, above=True),
    "text_learning_rate": _float("learning rate of the text tower (0: frozen)", 0),
    "grad_clip": _float("gradient-norm clipping (0 or null: off)", 0, null=True),
    "ita_weight": _float("weight of L_ita (0 skips it)", 0),
    "css_weight": _float("weight of L_CSS (0 skips it)", 0),
    "local_weight": _float("weight of L_local (0 skips it)", 0),
    "icl_weight": _float("weight of L_ICL (0 skips it)", 0),
    "mil_weight": _float("weight of L_mil, not in the paper (0 skips it)", 0),
    "mil_pool_temperature": _float("pooling temperature of L_mil", 0, above=True),
    "temperature": _float("contrastive temperature", 0, above=True),
    "pdt_mode": _choice("how the PDT supervises L_CSS", "modulate", "soft_targets", "none"),
    "token_weighting": _choice("token weights of L_CSS", "uniform", "attention"),
    "text_drop_prob": _float("word drop probability of the text view", 0, 1, below=True),
    "bn_refresh_images": _int("images the BatchNorm refresh before validation uses (0: none)", 0),
    # stage 2
    "unet_size": _choice("U-Net: paper (LViT's) or light (CPU)", "paper", "light"),
    "eta_min": _float("lowest learning rate of the cosine schedule", 0),
    "restart_epochs": _int("epochs of the first cosine cycle", 1),
    "rampup_epochs": _float("epochs of the consistency ramp-up", 0),
    "use_unlabeled": _bool("Mean-Teacher on the unlabelled images (false: supervised)"),
    "use_text": _bool("text guidance of the pseudo labels (needs the stage-1 checkpoint)"),
    "use_tg": _bool("train the text-mask decoder with L_tg"),
    "tg_weight": _float("weight of L_tg", 0),
    "tg_extended": _bool("L_tg on the labelled images too"),
    "consistency_weight": _float("weight of the consistency loss", 0),
    "ema_max_alpha": _float("EMA decay of the teacher", 0, 1),
    "teacher_noise": _float("noise added to the teacher's input", 0),
    "teacher_bn": _choice("the teacher's BatchNorm statistics", "batch", "recompute", "ema"),
    "fusion_lambda": _float("weight of the text mask in the pseudo labels", 0),
    "fusion_mode": _choice("pseudo-label fusion", "logit", "authors"),
    "pseudo_label_diagnostic": _bool("score the pseudo labels against the hidden labels"),
    "text_mask_interval": _int("iterations between text-mask diagnostics (0: never)", 0),
}

_SPLIT = re.compile(r"^split_labeled(\d+(?:p\d+)?)\.json$")


def is_derived(value: Any) -> bool:
    """A config value computed from others (``$`` expression, ``@`` reference, ``%`` macro, or a component: a dict),
    not a user's literal."""
    return isinstance(value, dict) or (isinstance(value, str) and value[:1] in ("$", "@", "%"))


def parse_arg(key: str, value: Any) -> Any:
    """``value`` of the bundle argument ``key`` parsed and checked (:data:`BUNDLE_ARGS`); another key's value or a
    derived value (:func:`is_derived`) is returned as it is."""
    spec = BUNDLE_ARGS.get(key)
    return value if spec is None or is_derived(value) else spec.parse(key, value)


def _pct_name(x: float) -> str:
    return f"{round(x, 6):g}".replace(".", "p")


def labeled_splits(folder: str | os.PathLike) -> list[str]:
    """The label percentages of the ``split_labeled<N>.json`` files in ``folder``, in increasing order (``"12.5"``
    for ``split_labeled12p5.json``)."""
    found = []
    for path in Path(folder).glob("split_labeled*.json"):
        m = _SPLIT.match(path.name)
        if m:
            found.append(float(m.group(1).replace("p", ".")))
    return [_fmt(x) for x in sorted(found)]


def _splits_there(folder: Path) -> str:
    splits = labeled_splits(folder)
    return f"the splits in {folder}: {', '.join(splits)}" if splits else f"none: {folder} has no split_labeled<N>.json"


def _check_percent(raw: Any, folder: Any) -> int | str:
    """``labeled_percent`` parsed (25, or "12p5" for 12.5) and checked to name a split file of ``folder``."""
    folder = Path(os.fspath(folder))
    if not folder.is_dir():
        raise ArgError("dataset_dir", f"{str(folder)!r} is not a folder",
                       "the converted data set's folder (datalist.json, split_labeled<N>.json)")
    try:
        percent = BUNDLE_ARGS["labeled_percent"].parse("labeled_percent", raw)
    except ArgError as e:
        raise ArgError("labeled_percent", e.problem, _splits_there(folder)) from None
    name = f"split_labeled{percent}.json"
    if not (folder / name).is_file():
        shown = str(percent).replace("p", ".")
        raise ArgError("labeled_percent", f"{shown} has no split file ({name} is not in {folder})",
                       _splits_there(folder))
    return percent


def check_bundle_args(config: Mapping[str, Any], resolve: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Parse and check the bundle arguments of a (merged, overridden) bundle config.

    Each top-level key of ``config`` that :data:`BUNDLE_ARGS` lists and whose value is a literal (not derived) is
    parsed and range-checked; then the checks between keys: ``labeled_percent`` must name a split file of
    ``dataset_dir`` (when ``split_file`` is derived from it), and ``val_interval`` may not exceed ``max_epochs``
    (validation keeps the model: no validation, no model).

    Args:
        config: top-level key -> value (a MONAI ``ConfigParser``'s ``config``).
        resolve: gives the value of a derived key (e.g. ``dataset_dir`` computed from another); None: derived values
            are not looked at.

    Returns:
        key -> parsed value, for every literal bundle argument of ``config``.

    Raises:
        ArgError: the first wrong value, one line naming its key.
    """
    literal = {k: v for k, v in config.items() if k in BUNDLE_ARGS and not is_derived(v)}
    split = config.get("split_file")
    by_split = "labeled_percent" in literal and isinstance(split, str) and "@labeled_percent" in split
    out = {k: BUNDLE_ARGS[k].parse(k, v) for k, v in literal.items() if not (by_split and k == "labeled_percent")}
    if by_split:
        folder = out.get("dataset_dir")
        if folder is None and resolve is not None and is_derived(config.get("dataset_dir")):
            folder = resolve("dataset_dir")
        if folder is None:
            out["labeled_percent"] = BUNDLE_ARGS["labeled_percent"].parse("labeled_percent", literal["labeled_percent"])
        else:
            out["labeled_percent"] = _check_percent(literal["labeled_percent"], folder)
    epochs, interval = out.get("max_epochs"), out.get("val_interval")
    if isinstance(epochs, int) and isinstance(interval, int) and interval > epochs:
        raise ArgError("val_interval", f"{interval} is more than --max_epochs {epochs}: no validation would run and "
                       "no model would be kept", f"an integer from 1 to {epochs}")
    return out


_REF = re.compile(r"@([A-Za-z_]\w*)")


def _refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_refs, value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*map(_refs, value)) if value else set()
    return set(_REF.findall(value)) if isinstance(value, str) else set()


def used_keys(config: Mapping[str, Any], roots: Iterable[str]) -> set[str]:
    """The top-level keys a workflow uses: its ``roots`` (e.g. ``initialize``, ``training``, ``finalize``) and every
    key they refer to (``@key``, ``@key#sub``), transitively. A key outside it changes nothing in that workflow."""
    seen: set[str] = set()
    todo = [r for r in roots if r in config]
    while todo:
        key = todo.pop()
        if key not in seen:
            seen.add(key)
            todo.extend(k for k in _refs(config[key]) if k in config and k not in seen)
    return seen


def suggest(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean --x?"`` for the closest of ``candidates``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean --{close[0]}?" if close else ""


def arg_type(spec: Arg, name: str = "") -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``spec``: ``add_argument("--limit", type=arg_type(Arg("int", "", 1)))``.
    A wrong value ends the command with argparse's usage and ``error: argument --limit: <what is wrong>; allowed:
    ...`` (exit status 2)."""

    def parse(text: str) -> Any:
        try:
            return spec.parse(name, text)
        except ArgError as e:
            raise argparse.ArgumentTypeError(e.detail) from None

    parse.__name__ = spec.kind  # argparse names the type in some messages
    return parse


def args_table(columns: Mapping[str, tuple[Mapping[str, Any], Iterable[str]]]) -> str:
    """The schema as a Markdown table of the keys some workflow uses, with each workflow's default.

    Args:
        columns: heading -> (that workflow's merged config, its run ids); a key the workflow does not use
            (:func:`used_keys`) shows ``-``, a derived value ``derived``.
    """
    used = {name: used_keys(config, roots) for name, (config, roots) in columns.items()}
    head = ["argument", "allowed", *columns, "what"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, spec in BUNDLE_ARGS.items():
        cells = []
        for name, (config, _) in columns.items():
            value = config.get(key)
            if key not in used[name] or isinstance(value, dict):
                cells.append("-")
            elif is_derived(value):
                cells.append("derived")
            else:
                cells.append(f"`{json.dumps(value)}`")
        if any(c != "-" for c in cells):
            rows.append(f"| `--{key}` | {spec.allowed()} | " + " | ".join(cells) + f" | {spec.help} |")
    return "\n".join(rows)


def parse_key_values(pairs: Sequence[str], option: str = "--set") -> dict:
    """``["key=json", ...]`` from a command line -> dict; a value that is not JSON is taken as a string.

    Raises:
        ValueError: naming ``option`` and the pair, when a pair is not KEY=VALUE.
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{option}: {pair!r} is not KEY=VALUE (VALUE in JSON or a bare string)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
