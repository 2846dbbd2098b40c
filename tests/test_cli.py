"""Errors for people: error lines and exit status of the commands, the bundles' message-first report, overrides
MONAI's command line would drop."""

import contextlib
import io
import logging
import runpy
import shutil
import sys
from pathlib import Path

import monai.bundle  # noqa: F401  (imported before any test captures output: MONAI's module loggers keep this stream)
import pytest

from amvlm_monai.utils import errors
from amvlm_monai.utils.args import parse_key_values
from amvlm_monai.utils.errors import (
    DataError,
    bundle_guard,
    check_writable,
    cli_errors,
    dropped_overrides,
    error_lines,
    is_user_error,
    root_cause,
)

ROOT = Path(__file__).resolve().parents[1]


def test_key_values_json_or_string_and_the_option_named():
    assert parse_key_values(["a=1", "b=x", "c=[1, 2]", "d=null", "e="]) == {"a": 1, "b": "x", "c": [1, 2], "d": None,
                                                                         "e": ""}
    for bad in ("nope", "=1"):
        with pytest.raises(ValueError, match="--pretrain-set: .* is not KEY=VALUE"):
            parse_key_values([bad], "--pretrain-set")


def test_error_lines():
    assert error_lines(DataError("2 problems in x:", ["/a.png: bad", "/b.png: worse"])) == [
        "error: /a.png: bad", "error: /b.png: worse"]
    assert error_lines(FileNotFoundError(2, "No such file or directory", "/x.pt")) == [
        "error: /x.pt: No such file or directory"]
    assert error_lines(ValueError("/f: first\n  detail")) == ["error: /f: first", "  detail"]


def test_cli_errors_exit_2_with_the_lines(capsys, monkeypatch):
    monkeypatch.delenv("AMVLM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        with cli_errors():
            raise DataError("1 problem", ["/data/m.png: mask values {0, 7} are not binary"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: /data/m.png: mask values {0, 7} are not binary\n"
    monkeypatch.setenv("AMVLM_DEBUG", "1")  # the traceback on request
    with pytest.raises(DataError):
        with cli_errors():
            raise DataError("x")
    with pytest.raises(KeyError):  # not a data error: a bug keeps its traceback
        with cli_errors():
            raise KeyError("k")


def test_dropped_overrides_and_the_guard(capsys):
    assert dropped_overrides(["run", "training", "--unet_size", "None", "--x=None", "--y", "1", "--z", "null"]) == [
        "unet_size", "x"]
    with pytest.raises(SystemExit) as e:  # a bundle command line: the line and exit status 2
        bundle_guard(argv=["/venv/lib/monai/bundle/__main__.py", "run", "training", "--unet_size", "None"])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --unet_size None: MONAI's command line drops")
    assert bundle_guard(argv=["pytest", "--unet_size", "None"])  # only a monai.bundle command line is checked


def test_check_writable_names_the_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        check_writable(tmp_path / "file" / "sub")  # a file in the way
    assert e.value.filename == str(tmp_path / "file" / "sub") and "cannot be written" in str(e.value)
    assert check_writable(tmp_path / "new" / "out").is_dir()


@pytest.fixture
def qata_cli(tmp_path, monkeypatch):
    """``python -m monai.bundle run ...`` in this process (MONAI's own command line), from a copy of the QaTa bundle:
    returns ``run(*args) -> (exit status, stderr lines)``. Only stderr is captured (``capsys`` would leave MONAI's
    module loggers writing to a closed stream in later tests)."""
    bundle = tmp_path / "qata"
    shutil.copytree(ROOT / "bundles" / "qata_covid19_cxr_segmentation", bundle)
    monkeypatch.chdir(bundle)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # MONAI's logging.conf adds its own
    monkeypatch.delenv("AMVLM_DEBUG", raising=False)

    def run(*args):
        sys.argv = ["monai.bundle", "run", *args]
        err = io.StringIO()
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
        return e.value.code, err.getvalue().splitlines()

    return run


TRAIN = ("training", "--config_file", "configs/train.json")


@pytest.mark.parametrize("args,line", [
    (("--unet_size", "None"), "error: --unet_size None: MONAI's command line drops overrides whose value is None"),
    (("--val_interval", "0"), "error: --val_interval: 0 is out of range; allowed: an integer >= 1"),
    (("--seed", "abc"), "error: --seed: 'abc' is not an integer; allowed: an integer from 0 to 4294967295"),
    (("--learning_rate", "fast"), "error: --learning_rate: 'fast' is not a number; allowed: a number > 0"),
    (("--max_epochs", "ten"), "error: --max_epochs: 'ten' is not an integer; allowed: an integer >= 1"),
    (("--use_text", "maybe"), "error: --use_text: 'maybe' is not a boolean; allowed: true or false"),
    (("--use_txt", "false"), "error: --use_txt: not a key of this workflow's configs, so it would change nothing; did "
                             "you mean --use_text?"),
    (("--labeled_percent", "150"), "error: --labeled_percent: 150 is out of range; allowed: the splits in {data}: 25, 50"),
    (("--labeled_percent", "30"), "error: --labeled_percent: 30 has no split file (split_labeled30.json is not in "
                                  "{data}); allowed: the splits in {data}: 25, 50"),
])
def test_a_wrong_override_ends_the_command_with_one_line(qata_cli, demo_data, args, line):
    """Before anything is built: exit status 2 and one ``error: --key: ...`` line, no traceback."""
    code, err = qata_cli(*TRAIN, "--dataset_dir", str(demo_data), *args)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(line.format(data=demo_data)), err


def test_a_missing_model_in_evaluation_names_the_command_that_writes_it(qata_cli, demo_data, monkeypatch):
    code, err = qata_cli("evaluating", "--config_file", "['configs/train.json','configs/evaluate.json']",
                         "--dataset_dir", str(demo_data), "--max_epochs", "2")  # a training setting: named only
    assert code == 2 and err == ["warning: --max_epochs: the evaluating workflow does not use it; it changes nothing",
                                 "error: ./models/model.pt: trained model not found; the training workflow writes it: "
                                 "python -m monai.bundle run training --config_file configs/train.json"]
    monkeypatch.setenv("AMVLM_DEBUG", "1")  # the traceback on request: the error goes through as MONAI raises it
    sys.argv = ["monai.bundle", "run", "evaluating", "--config_file", "['configs/train.json','configs/evaluate.json']",
                "--dataset_dir", str(demo_data)]
    with pytest.raises(RuntimeError) as e:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    assert isinstance(root_cause(e.value), FileNotFoundError)


def test_a_bug_keeps_its_traceback_with_the_message_first(capsys, monkeypatch):
    """What Python does at exit with an error that is not the user's (here a KeyError inside MONAI's wrapper)."""
    monkeypatch.delenv("AMVLM_DEBUG", raising=False)
    hook = errors._excepthook(lambda *a: print("default hook", file=sys.stderr))
    try:
        try:
            {}["missing"]
        except KeyError as inner:
            raise RuntimeError("Failed to instantiate {'_target_': 'x'}") from inner
    except RuntimeError as e:
        hook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: 'missing'" and err[-1] == err[0]
    assert any(line.startswith("Traceback") for line in err) and "  RuntimeError: Failed to instantiate" in "\n".join(err)
    with pytest.raises(ValueError):  # a user error that reaches the hook: its line only
        raise ValueError("/data/x.png: bad")
    try:
        raise RuntimeError("wrapper") from ValueError("/data/x.png: bad")
    except RuntimeError as e:
        hook(type(e), e, e.__traceback__)
    assert capsys.readouterr().err == "error: /data/x.png: bad\n"


def test_error_raised_in_a_dataloader_worker_shows_its_original_message():
    """A worker sends its traceback as text; MONAI's wrapper comes last in it, the project's message first."""
    text = ("Caught RuntimeError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise ValueError(msg)\n'
            "ValueError: /data/b.png: empty file (0 bytes); nothing to read.\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            "Traceback (most recent call last):\n  File \"y.py\", line 2, in g\n"
            "RuntimeError: applying transform <amvlm_monai.io.clinical.Load2Dd object at 0x7f>\n")
    assert error_lines(RuntimeError(text)) == ["error: /data/b.png: empty file (0 bytes); nothing to read."]


def test_error_in_a_worker_counts_as_a_user_error_only_when_it_is_one():
    text = "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n{}\n"
    assert is_user_error(RuntimeError(text.format("FileNotFoundError: /data/a.png: missing")))
    assert not is_user_error(RuntimeError(text.format("KeyError: 'image'")))
    assert is_user_error(RuntimeError("Failed to instantiate").with_traceback(None)) is False


@pytest.mark.parametrize("argv,why", [
    (["amvlm_monai.evaluation.alignment", "--checkpoint", "x.pt", "--datalist", "d.json", "--limit", "-1"],
     "argument --limit: -1 is out of range; allowed: an integer >= 1"),
    (["amvlm_monai.evaluation.alignment", "--checkpoint", "x.pt", "--datalist", "d.json", "--batch-size", "0"],
     "argument --batch-size: 0 is out of range; allowed: an integer >= 1"),
    (["amvlm_monai.workflows.protocol", "--bundle", "b", "--data", "d", "--work", "w", "--labeled", "150"],
     "argument --labeled: 150 is out of range; allowed: an integer from 1 to 100"),
    (["amvlm_monai.workflows.protocol", "--bundle", "b", "--data", "d", "--work", "w", "--seeds", "-1"],
     "argument --seeds: -1 is out of range; allowed: an integer from 0 to 4294967295"),
    (["amvlm_monai.workflows.protocol", "--bundle", "b", "--data", "d", "--work", "w", "--alpha", "1.5"],
     "argument --alpha: 1.5 is out of range; allowed: a number > 0 and < 1"),
    (["amvlm_monai.workflows.demo", "--epochs", "0"], "argument --epochs: 0 is out of range; allowed: an integer >= 1"),
    (["amvlm_monai.workflows.demo", "--labeled", "0"],
     "argument --labeled: 0 is out of range; allowed: an integer from 1 to 100"),
])
def test_numeric_options_of_the_commands_are_range_checked(argv, why, capsys):
    import importlib

    main = importlib.import_module(argv[0]).main
    with pytest.raises(SystemExit) as e:
        main(argv[1:])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {why}")


def test_protocol_checks_its_overrides_before_any_run(tmp_path, capsys):
    from amvlm_monai.workflows.protocol import main

    args = ["--bundle", str(ROOT / "bundles" / "qata_covid19_cxr_segmentation"), "--data", str(tmp_path), "--work",
            str(tmp_path / "w")]
    assert main(args + ["--set", "use_text=maybe"]) == 2
    assert capsys.readouterr().err == ("error: --set --use_text: 'maybe' is not a boolean; allowed: true or false "
                                       "(also 1/0, yes/no; any case)\n")
    assert main(args + ["--method-set", "amvlm:fusion_lambda=-1"]) == 2
    assert "error: --method-set amvlm: --fusion_lambda: -1 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_parsed_values_are_what_the_config_uses(demo_data, tmp_path):
    """MONAI's command line passes ``--use_unlabeled false`` as the (truthy) string "false": the guard's parsed values
    replace the strings in the config before anything reads them."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(ROOT / "bundles/qata_covid19_cxr_segmentation/configs/train.json"),
                        logging_file=False, bundle_root=str(tmp_path), dataset_dir=str(demo_data),
                        use_unlabeled="false", use_text="FALSE", tensorboard="no", max_epochs="2",
                        labeled_percent="50", amp="0", unet_size="Light", image_size="32")
    wf.initialize()
    parser = wf.parser
    assert parser.get_parsed_content("teacher") is None and parser.get_parsed_content("guidance") is None
    assert parser.get_parsed_content("stage1_checkpoint") is None  # no text guidance: no stage-1 checkpoint needed
    assert [parser[k] for k in ("use_unlabeled", "use_text", "tensorboard", "amp")] == [False] * 4
    assert (parser["max_epochs"], parser["image_size"], parser["unet_size"]) == (2, 32, "light")
    assert parser.get_parsed_content("split_file").endswith("split_labeled50.json")
    assert parser.get_parsed_content("network_def").__class__.__name__ == "UNet"
