"""Progress: timed log lines with hand-checked ETAs, no carriage returns in log mode, the mode switch."""

import logging
import sys

import pytest

from amvlm_monai.utils import progress as prog


def _lines(caplog):
    """This module's lines only (other loggers, e.g. ignite's, may propagate INFO records too)."""
    return [r.getMessage() for r in caplog.records if r.name == "amvlm_monai.utils.progress"]


@pytest.fixture
def clock(monkeypatch):
    """A fake monotonic clock: tests advance ``clock["t"]`` by hand."""
    state = {"t": 1000.0}
    monkeypatch.setattr(prog.time, "monotonic", lambda: state["t"])
    return state


def test_format_seconds():
    assert prog.format_seconds(0) == "0:00:00"
    assert prog.format_seconds(3725.2) == "1:02:05"
    assert prog.format_seconds(float("nan")) == "?"
    assert prog.format_seconds(float("inf")) == "?"


def test_mode_auto_is_log_without_a_terminal_and_env_overrides(monkeypatch):
    monkeypatch.delenv("AMVLM_PROGRESS", raising=False)
    assert prog.progress_mode("auto") == "log"  # pytest captures stdout/stderr: not terminals
    monkeypatch.setenv("AMVLM_PROGRESS", "off")
    assert prog.progress_mode("auto") == "off"
    assert prog.progress_mode("bar") == "bar"  # an explicit mode wins over the variable
    with pytest.raises(ValueError, match="progress mode must be one of"):
        prog.progress_mode("fancy")


def test_progress_log_lines_with_eta(clock, caplog):
    def slow(n):
        for i in range(n):
            clock["t"] += 10.0  # 10 s per item
            yield i

    caplog.set_level(logging.INFO, logger="amvlm_monai.utils.progress")
    out = list(prog.progress(slow(6), "converting", total=6, every_s=25.0, mode="log"))
    assert out == list(range(6))
    lines = _lines(caplog)
    # a line after 30 s (3 items: 25 s passed), after 60 s, and the final one
    assert lines[0] == "converting: 3/6 (50%), 0.10 it/s, elapsed 0:00:30, ETA 0:00:30"
    assert lines[-1] == "converting: 6/6 (100%), 0.10 it/s, elapsed 0:01:00, ETA 0:00:00"
    assert all("\r" not in line for line in lines)


def test_progress_off_and_unknown_total(caplog):
    caplog.set_level(logging.INFO, logger="amvlm_monai.utils.progress")
    assert list(prog.progress(iter(range(3)), "x", mode="off")) == [0, 1, 2]
    assert not _lines(caplog)
    list(prog.progress(iter(range(3)), "x", mode="log"))
    assert _lines(caplog)[-1].startswith("x: 3 done")


def test_progress_prints_when_logging_is_not_set_up(capsys, monkeypatch):
    monkeypatch.setattr(logging.Logger, "hasHandlers", lambda self: False)
    list(prog.progress(range(2), "volumes", mode="log"))
    assert "volumes: 2/2 (100%)" in capsys.readouterr().err


def test_progress_handler_epochs_iterations_and_run_eta(clock, caplog):
    from ignite.engine import Engine

    def step(engine, batch):
        clock["t"] += 2.0  # 2 s per iteration
        return {"loss": 1.0 / engine.state.iteration}

    engine = Engine(step)
    handler = prog.ProgressHandler(every_s=3.0, mode="log", name="train")
    handler.attach(engine)
    caplog.set_level(logging.INFO, logger="amvlm_monai.utils.progress")
    engine.run(list(range(4)), max_epochs=3)
    lines = _lines(caplog)
    # iteration 2 of epoch 1 is 4 s after the epoch started: 2 of 12 iterations in 4 s, 10 left -> 20 s
    assert lines[0] == ("train epoch 1/3, 2/4 (50%), 0.50 it/s, elapsed 0:00:04, ETA 0:00:04 | run ETA 0:00:20"
                        " | loss 0.5")
    assert "train epoch 1/3 done in 0:00:08, run ETA 0:00:16" in lines
    assert lines[-1] == "train epoch 3/3 done in 0:00:08, run ETA 0:00:00"
    assert all("\r" not in line for line in lines)


def test_progress_handler_evaluator_has_no_run_eta(clock, caplog):
    from ignite.engine import Engine

    def step(engine, batch):
        clock["t"] += 1.0
        return None

    engine = Engine(step)
    prog.ProgressHandler(every_s=100.0, mode="log", name="evaluate").attach(engine)
    caplog.set_level(logging.INFO, logger="amvlm_monai.utils.progress")
    engine.run(list(range(3)), max_epochs=1)
    assert _lines(caplog) == ["evaluate done in 0:00:03"]


def test_bar_mode_is_ignites_progress_bar_and_log_lines_go_through_tqdm(capsys, caplog):
    """In a terminal: ignite's ProgressBar, and while it runs every log line is written by tqdm (``tqdm.write``),
    so MONAI's log lines no longer cut the bar; the logging handlers are back as they were afterwards."""
    from ignite.engine import Engine
    from ignite.handlers import ProgressBar

    log = logging.getLogger("amvlm_test_bar")
    log.propagate = False
    stream = logging.StreamHandler(sys.stderr)
    log.addHandler(stream)
    log.setLevel(logging.INFO)
    seen = []

    def step(engine, batch):
        seen.append([type(h).__name__ for h in log.handlers])
        log.info("a log line at iteration %d", engine.state.iteration)
        return {"loss": 0.5}

    engine = Engine(step)
    handler = prog.ProgressHandler(mode="bar", name="train")
    handler.attach(engine)
    handler.attach(engine)  # attached once
    assert isinstance(handler._bar, ProgressBar)
    caplog.set_level(logging.INFO, logger="amvlm_monai.utils.progress")
    engine.run(list(range(3)), max_epochs=2)
    assert all(names == ["_TqdmLoggingHandler"] for names in seen)
    assert log.handlers == [stream]
    err = capsys.readouterr().err
    assert err.count("a log line at iteration") == 6 and "train [2/2]" in err  # ignite's bar
    assert "train epoch 1/2 done, run ETA" in caplog.text
    log.removeHandler(stream)
