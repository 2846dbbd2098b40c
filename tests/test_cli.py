"""Errors for people: error lines and exit status of the commands, the bundles' message-first report, overrides
MONAI's command line would drop."""

import runpy
import shutil
import sys
from pathlib import Path

import pytest

from amvlm_monai.utils.args import parse_key_values
from amvlm_monai.utils.errors import (
    DataError,
    bundle_guard,
    check_writable,
    cli_errors,
    dropped_overrides,
    error_lines,
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


def test_dropped_overrides_and_the_guard():
    assert dropped_overrides(["run", "training", "--unet_size", "None", "--x=None", "--y", "1", "--z", "null"]) == [
        "unet_size", "x"]
    with pytest.raises(ValueError, match="--unet_size None: MONAI's command line drops"):
        bundle_guard(argv=["/venv/lib/monai/bundle/__main__.py", "run", "training", "--unet_size", "None"])
    assert bundle_guard(argv=["pytest", "--unet_size", "None"])  # only a monai.bundle command line is checked


def test_check_writable_names_the_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        check_writable(tmp_path / "file" / "sub")  # a file in the way
    assert e.value.filename == str(tmp_path / "file" / "sub") and "cannot be written" in str(e.value)
    assert check_writable(tmp_path / "new" / "out").is_dir()


def test_bundle_run_reports_the_project_message_first(tmp_path, monkeypatch, capsys):
    """``python -m monai.bundle run ... --unet_size None`` (through MONAI's own command line, in this process): the
    report starts with ``error: <the project's message>``, not with MONAI's wrapping errors."""
    bundle = tmp_path / "qata"
    shutil.copytree(ROOT / "bundles" / "qata_covid19_cxr_segmentation", bundle)
    monkeypatch.chdir(bundle)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "training", "--config_file", "configs/train.json",
                                      "--dataset_dir", str(tmp_path / "nowhere"), "--unet_size", "None"])
    with pytest.raises(RuntimeError) as e:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    assert "Failed to instantiate" in str(e.value)  # MONAI's wrapper ...
    capsys.readouterr()
    sys.excepthook(type(e.value), e.value, e.value.__traceback__)  # ... what Python does with it at exit
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: --unet_size None: MONAI's command line drops overrides whose value is None")
    assert err[-1] == err[0] and len(err) < 25
    assert isinstance(root_cause(e.value), ValueError)


def test_error_raised_in_a_dataloader_worker_shows_its_original_message():
    """A worker sends its traceback as text; MONAI's wrapper comes last in it, the project's message first."""
    text = ("Caught RuntimeError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise ValueError(msg)\n'
            "ValueError: /data/b.png: empty file (0 bytes); nothing to read.\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            "Traceback (most recent call last):\n  File \"y.py\", line 2, in g\n"
            "RuntimeError: applying transform <amvlm_monai.io.clinical.Load2Dd object at 0x7f>\n")
    assert error_lines(RuntimeError(text)) == ["error: /data/b.png: empty file (0 bytes); nothing to read."]
