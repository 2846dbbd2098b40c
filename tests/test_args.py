"""The bundle arguments' schema: every value parsed and range-checked with one clear line, the schema complete and in
step with the configs and the library, and its table in each bundle's docs."""

import argparse
import json
from pathlib import Path

import pytest

from amvlm_monai.utils.args import (
    BUNDLE_ARGS,
    Arg,
    ArgError,
    arg_type,
    as_bool,
    check_bundle_args,
    is_derived,
    labeled_splits,
    parse_arg,
    used_keys,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "bundles" / "_template" / "configs"


@pytest.mark.parametrize("text,value", [("true", True), ("TRUE", True), ("True", True), ("yes", True), ("1", True),
                                        ("false", False), ("FALSE", False), ("No", False), ("0", False),
                                        (True, True), (False, False), (1, True), (0, False)])
def test_booleans_in_any_spelling(text, value):
    assert parse_arg("use_text", text) is value
    assert as_bool(text, "resume") is value


@pytest.mark.parametrize("bad", ["maybe", "", "2", 2, -1, 0.5, "ture", [True]])
def test_other_booleans_are_refused_naming_the_key(bad):
    with pytest.raises(ArgError) as e:
        parse_arg("use_unlabeled", bad)
    assert str(e.value).startswith("--use_unlabeled: ") and "is not a boolean" in str(e.value)
    assert str(e.value).endswith("allowed: true or false (also 1/0, yes/no; any case)") and "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,message", [
    ("seed", "abc", "--seed: 'abc' is not an integer; allowed: an integer from 0 to 4294967295"),
    ("learning_rate", "fast", "--learning_rate: 'fast' is not a number; allowed: a number > 0"),
    ("max_epochs", "ten", "--max_epochs: 'ten' is not an integer; allowed: an integer >= 1"),
    ("max_epochs", True, "--max_epochs: True is a boolean, not an integer; allowed: an integer >= 1"),
    ("max_epochs", 2.5, "--max_epochs: 2.5 is not an integer; allowed: an integer >= 1"),
    ("max_epochs", 0, "--max_epochs: 0 is out of range; allowed: an integer >= 1"),
    ("val_interval", 0, "--val_interval: 0 is out of range; allowed: an integer >= 1"),
    ("batch_size", -4, "--batch_size: -4 is out of range; allowed: an integer >= 1"),
    ("num_workers", -1, "--num_workers: -1 is out of range; allowed: an integer >= 0"),
    ("learning_rate", 0, "--learning_rate: 0 is out of range; allowed: a number > 0"),
    ("learning_rate", "nan", "--learning_rate: 'nan' is not a finite number; allowed: a number > 0"),
    ("cache_rate", 1.5, "--cache_rate: 1.5 is out of range; allowed: a number from 0 to 1"),
    ("text_drop_prob", 1, "--text_drop_prob: 1 is out of range; allowed: a number >= 0 and < 1"),
    ("labeled_percent", 150, "--labeled_percent: 150 is out of range; allowed: a percentage > 0 and <= 100"),
    ("unet_size", "huge", "--unet_size: 'huge' is not a choice; allowed: one of paper, light"),
    ("slice_axcodes", "RRS", "--slice_axcodes: 'RRS' is not an orientation; allowed: three letters, one of each pair "
                             "L/R, A/P, S/I (e.g. RAS)"),
    ("amp", "half", "--amp: 'half' is not a boolean; allowed: true or false (also 1/0, yes/no; any case), or auto, "
                    "bf16, bfloat16, fp16, float16"),
    ("dataset_dir", None, "--dataset_dir: null is not allowed; allowed: a path"),
    ("image_size", 8, "--image_size: 8 is out of range; allowed: an integer >= 16, or a pair [H, W] of them"),
    ("image_size", [32, "x"], "--image_size: 'x' is not an integer; allowed: an integer >= 16, or a pair [H, W] of them"),
    ("image_size", [32, 32, 3], "--image_size: [32, 32, 3] is not one size or a pair; allowed: an integer >= 16, or a "
                                "pair [H, W] of them"),
])
def test_wrong_values_give_one_line_naming_the_key(key, value, message):
    with pytest.raises(ArgError) as e:
        parse_arg(key, value)
    assert str(e.value) == message and e.value.key == key


@pytest.mark.parametrize("key,value,parsed", [
    ("seed", "7", 7), ("max_epochs", 3.0, 3), ("learning_rate", "1e-3", 1e-3), ("learning_rate", 1, 1.0),
    ("labeled_percent", "50", 50), ("labeled_percent", 12.5, "12p5"), ("labeled_percent", "12p5", "12p5"),
    ("amp", "BF16", "bf16"), ("amp", "false", False), ("unet_size", "Light", "light"), ("slice_axcodes", "las", "LAS"),
    ("dataset_dir", 2024, "2024"), ("image_size", "64", 64), ("image_size", (32, "48"), [32, 48]), ("text_model", None, None), ("grad_clip", None, None),
    ("use_text", "$@x", "$@x"), ("not_an_argument", "anything", "anything"),
])
def test_values_are_parsed_to_what_the_configs_use(key, value, parsed):
    out = parse_arg(key, value)
    assert out == parsed and type(out) is type(parsed)


def test_labeled_percent_names_the_splits_that_exist(tmp_path):
    for n in ("25", "50", "12p5"):
        (tmp_path / f"split_labeled{n}.json").write_text("{}")
    (tmp_path / "split_fewshot1.json").write_text("{}")
    assert labeled_splits(tmp_path) == ["12.5", "25", "50"]
    config = {"dataset_dir": str(tmp_path), "split_file": "$@dataset_dir + '/split_labeled' + str(@labeled_percent)"}
    there = f"allowed: the splits in {tmp_path}: 12.5, 25, 50"
    with pytest.raises(ArgError) as e:
        check_bundle_args({**config, "labeled_percent": 150})
    assert str(e.value) == f"--labeled_percent: 150 is out of range; {there}"
    with pytest.raises(ArgError) as e:
        check_bundle_args({**config, "labeled_percent": "30"})
    assert str(e.value) == f"--labeled_percent: 30 has no split file (split_labeled30.json is not in {tmp_path}); {there}"
    assert check_bundle_args({**config, "labeled_percent": "50"})["labeled_percent"] == 50
    assert check_bundle_args({**config, "labeled_percent": 12.5})["labeled_percent"] == "12p5"
    # a derived data folder is looked up; a split file given directly leaves the percentage unchecked against files
    derived = {**config, "dataset_dir": "$@somewhere", "labeled_percent": 30}
    with pytest.raises(ArgError, match="split_labeled30.json is not in"):
        check_bundle_args(derived, resolve=lambda key: str(tmp_path))
    assert check_bundle_args({**config, "split_file": "/x/split.json", "labeled_percent": 30})["labeled_percent"] == 30
    with pytest.raises(ArgError, match=r"^--dataset_dir: '/nowhere/x' is not a folder"):
        check_bundle_args({**config, "dataset_dir": "/nowhere/x", "labeled_percent": 25})


def test_validation_interval_beyond_the_epochs_is_refused():
    with pytest.raises(ArgError) as e:
        check_bundle_args({"max_epochs": 3, "val_interval": "5"})
    assert str(e.value) == ("--val_interval: 5 is more than --max_epochs 3: no validation would run and no model would "
                            "be kept; allowed: an integer from 1 to 3")
    assert check_bundle_args({"max_epochs": "3", "val_interval": "3"}) == {"max_epochs": 3, "val_interval": 3}


def test_derived_values_and_components_are_left_to_the_config():
    assert is_derived("$@x + 1") and is_derived("@x") and is_derived("%file.json#x") and is_derived({"_target_": "X"})
    assert not is_derived("light") and not is_derived(3)
    assert check_bundle_args({"image_size": "$@model_info['image_size']", "datalist": {"_target_": "f"},
                              "use_text": "no"}) == {"use_text": False}


def _template_configs():
    return {p.relative_to(TEMPLATE).as_posix(): json.loads(p.read_text()) for p in sorted(TEMPLATE.rglob("*.json"))}


def test_the_schema_covers_every_literal_key_of_the_configs_and_no_other():
    literal, everywhere = set(), set()
    for config in _template_configs().values():
        for key, value in config.items():
            everywhere.add(key)
            if "#" not in key and not is_derived(value) and not isinstance(value, list) or key in BUNDLE_ARGS:
                literal.add(key)
    settings = json.loads((ROOT / "bundles" / "datasets.json").read_text())
    literal |= {k for name, s in settings.items() if not name.startswith("_") for k in s}
    assert sorted(literal - set(BUNDLE_ARGS)) == []  # a settable key without a type
    assert sorted(set(BUNDLE_ARGS) - everywhere) == []  # an argument no config has


def test_every_bundle_default_passes_its_own_schema():
    for bundle in sorted((ROOT / "bundles").glob("*/configs")):
        if bundle.parent.name.startswith("_"):
            continue
        for path in sorted(bundle.rglob("*.json")):
            if path.name != "metadata.json":
                config = json.loads(path.read_text())
                check_bundle_args({k: v for k, v in config.items() if k not in ("labeled_percent",)})


def test_the_choices_are_the_librarys():
    from amvlm_monai.engines.ema import TEACHER_BN
    from amvlm_monai.losses import css, semi
    from amvlm_monai.networks.amvlm import PRESETS
    from amvlm_monai.networks.heads import KINDS
    from amvlm_monai.networks.segmentation import SIZES
    from amvlm_monai.utils import progress
    from amvlm_monai.utils.precision import _DTYPES

    choices = {k: set(a.choices) for k, a in BUNDLE_ARGS.items() if a.kind == "choice"}
    assert choices["unet_size"] == set(SIZES) - {None}
    assert choices["head"] == set(KINDS) and choices["teacher_bn"] == set(TEACHER_BN)
    assert choices["fusion_mode"] == set(semi._MODES) and choices["progress"] == set(progress._MODES)
    assert choices["pdt_mode"] == set(css._PDT_MODES) and choices["token_weighting"] == set(css._WEIGHTINGS)
    assert choices["preset"] == set(PRESETS)
    assert set(_DTYPES) | {"auto"} == {"auto", "bf16", "bfloat16", "fp16", "float16"}


def test_workflows_use_what_their_run_ids_reach():
    configs = _template_configs()
    train = configs["train.json"]
    evaluate = {**train, **{k: v for k, v in configs["evaluate.json"].items() if "#" not in k}}
    training = used_keys(train, ["initialize", "training", "finalize"])
    assert {"use_text", "use_unlabeled", "tensorboard", "max_epochs", "val_interval", "labeled_percent"} <= training
    assert "preset" not in training
    evaluating = used_keys(evaluate, ["initialize", "evaluating", "finalize"])
    assert {"model_path", "eval_dir", "labeled_percent"} <= evaluating
    assert not {"max_epochs", "learning_rate", "val_interval"} & evaluating


def test_argparse_types_refuse_out_of_range_numbers(capsys):
    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--limit", type=arg_type(Arg("int", "", 1)))
    assert parser.parse_args(["--limit", "3"]).limit == 3
    for bad, why in (("-1", "-1 is out of range"), ("x", "'x' is not an integer")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--limit", bad])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"prog: error: argument --limit: {why}; allowed: an integer >= 1"


def test_each_bundle_docs_list_the_arguments():
    for readme in sorted((ROOT / "bundles").glob("*/docs/README.md")):
        text = readme.read_text()
        assert "| `--use_text` | true or false" in text and "| `--labeled_percent` | a percentage" in text, readme
