"""Write every bundle's configs from the one shared template (`bundles/_template/configs`) and its settings in
`bundles/datasets.json`, so that shared settings live in one place while each bundle stays self-contained
(the model zoo ships bundles one by one).

    python scripts/build_bundles.py          # write
    python scripts/build_bundles.py --check  # exit 1 if a bundle's configs differ from what would be written

A setting replaces the top-level key of that name in every template config that has it; a setting that no config
uses is an error (it would be a silent typo). ``metadata.json`` is per bundle and never generated.

``inference.json``'s ``model_defaults`` (what inference assumes when no ``model_info.json`` lies beside the weights,
so that ``verify_net_in_out`` builds ``network_def`` in a fresh checkout) take ``train.json``'s values of the same
keys: a model of the bundle's own training configuration.

Each bundle's ``docs/README.md`` is written by hand except its arguments table (between the ``<!-- arguments``
markers): the schema of ``amvlm_monai/utils/args.py`` with this bundle's defaults per workflow, written here too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
TEMPLATE = BUNDLES / "_template" / "configs"
SETTINGS = BUNDLES / "datasets.json"
if str(ROOT) not in sys.path:  # the schema and the library values of this checkout, not of an installed copy
    sys.path.insert(0, str(ROOT))
BEGIN = "<!-- arguments: written by scripts/build_bundles.py from amvlm_monai/utils/args.py; do not edit -->"
END = "<!-- end of arguments -->"
#: workflow -> the configs it merges (the docs table's columns)
WORKFLOWS = {"pretraining": ["pretrain.json"], "training": ["train.json"],
             "evaluating": ["train.json", "evaluate.json"], "inferring": ["inference.json"]}


def _value(value):
    if isinstance(value, dict) and set(value) == {"_from_"}:
        module, name = value["_from_"].split(":")
        value = getattr(importlib.import_module(module), name)
        return list(value) if isinstance(value, tuple) else value
    return value


def render(name: str, settings: dict) -> dict[Path, str]:
    """Relative path -> file text of one bundle's configs."""
    files: dict[Path, str] = {}
    configs: dict[Path, dict] = {}
    used: set[str] = set()
    for src in sorted(TEMPLATE.rglob("*")):
        if not src.is_file():
            continue
        rel = src.relative_to(TEMPLATE)
        if src.suffix != ".json":
            files[rel] = src.read_text()
            continue
        config = configs[rel] = json.loads(src.read_text())
        for key, value in settings.items():
            if key in config:
                config[key] = _value(value)
                used.add(key)
    unused = set(settings) - used
    if unused:
        raise ValueError(f"{SETTINGS}: settings of '{name}' used by no template config: {sorted(unused)}")
    model_defaults(configs)
    files.update({rel: json.dumps(config, indent=4) + "\n" for rel, config in configs.items()})
    return dict(sorted(files.items()))


def model_defaults(configs: dict[Path, dict]) -> None:
    """Set ``inference.json``'s ``model_defaults`` to ``train.json``'s values of the same keys (in place)."""
    infer, train = configs.get(Path("inference.json"), {}), configs.get(Path("train.json"), {})
    defaults = infer.get("model_defaults")
    if isinstance(defaults, dict):
        infer["model_defaults"] = {k: train.get(k, v) for k, v in defaults.items()}


def arguments_section(rendered: dict[Path, str]) -> str:
    """The docs' arguments block (markers included) for a bundle's rendered configs."""
    from amvlm_monai.utils.args import args_table

    from monai.bundle import ConfigParser

    columns = {}
    for workflow, names in WORKFLOWS.items():
        parser = ConfigParser({})
        for name in names:  # as MONAI merges them: "a#b" keys of a later file go into the earlier file's "a"
            for key, value in json.loads(rendered[Path(name)]).items():
                parser[key] = value
        columns[workflow] = (parser.config, ["initialize", workflow, "finalize"])
    intro = ("Every argument below is checked before a run builds anything: a value of the wrong type or out of range "
             "stops the command with one line `error: --key: <what is wrong>; allowed: <what is>` and exit status 2. "
             "Booleans accept true/false in any case, 1/0 and yes/no. An override that is no key of the workflow is "
             "refused too (a typo would otherwise change nothing); an argument of another workflow gets a `warning:` "
             "line. `derived`: computed from other keys or "
             "read from `models/model_info.json`; `-`: that workflow does not use it.")
    return f"{BEGIN}\n{intro}\n\n{args_table(columns)}\n{END}"


def render_docs(text: str, section: str) -> str:
    """``text`` (a bundle's docs/README.md) with its arguments block replaced by ``section``; a README without one
    gets an ``## Arguments`` section before ``## System configuration`` (or at the end)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    block = f"## Arguments\n{section}\n\n"
    anchor = "## System configuration"
    return text.replace(anchor, block + anchor, 1) if anchor in text else text.rstrip("\n") + "\n\n" + block


def bundles() -> dict[str, dict]:
    data = json.loads(SETTINGS.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def differences() -> list[str]:
    """Files whose committed text differs from the rendered one (or that are missing or stale)."""
    problems = []
    for name, settings in bundles().items():
        configs = BUNDLES / name / "configs"
        rendered = render(name, settings)
        for rel, text in rendered.items():
            path = configs / rel
            if not path.is_file() or path.read_text() != text:
                problems.append(str(path.relative_to(ROOT)))
        for path in configs.rglob("*"):
            rel = path.relative_to(configs)
            if path.is_file() and rel not in rendered and rel.name != "metadata.json":
                problems.append(f"{path.relative_to(ROOT)} (not in the template)")
        readme = BUNDLES / name / "docs" / "README.md"
        if readme.is_file() and render_docs(readme.read_text(), arguments_section(rendered)) != readme.read_text():
            problems.append(f"{readme.relative_to(ROOT)} (its arguments table)")
    return problems


def write() -> None:
    for name, settings in bundles().items():
        rendered = render(name, settings)
        for rel, text in rendered.items():
            path = BUNDLES / name / "configs" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        readme = BUNDLES / name / "docs" / "README.md"
        if readme.is_file():
            readme.write_text(render_docs(readme.read_text(), arguments_section(rendered)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences()
        for p in problems:
            print(f"out of date: {p}")
        if problems:
            print("run: python scripts/build_bundles.py")
        return 1 if problems else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
