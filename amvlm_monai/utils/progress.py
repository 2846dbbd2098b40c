"""Progress with an ETA that reads well both in a terminal and in a log file.

In a terminal (stdout and stderr both TTYs) progress is a ``tqdm`` bar; anywhere else (a log file, a pipe, a
``make demo`` sub-process) it is a plain line every ``every_s`` seconds and at the end, written through ``logging``
so the bundle's ``logging.conf`` formats it: a bar redrawn with carriage returns would fill a log file with
thousands of fragments. ``AMVLM_PROGRESS=bar|log|off`` overrides the choice.

- :func:`progress` wraps any loop (data conversion, volume inference).
- :class:`ProgressHandler` is an ignite handler for the engines: in a terminal ignite's ``ProgressBar``, with every
  log line written through ``tqdm`` while it runs (MONAI's log lines would otherwise cut the bar) and the whole run's
  ETA logged after each epoch; in a log, lines with the epoch's ETA and the whole run's ETA for a trainer,
  iterations with an ETA for an evaluator (ignite's bar has no line mode for logs, hence this handler).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional, TypeVar

T = TypeVar("T")


_MODES = ("auto", "bar", "log", "off")


logger = logging.getLogger("amvlm_monai.utils.progress")


def progress_mode(mode: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"bar"`` (both stdout and stderr are terminals) or ``"log"``; ``AMVLM_PROGRESS``
    overrides ``"auto"``."""
    if mode not in _MODES:
        raise ValueError(f"progress mode must be one of {_MODES}, got {mode!r}.")
    if mode == "auto":
        mode = os.environ.get("AMVLM_PROGRESS", "auto").lower()
        if mode not in _MODES:
            raise ValueError(f"AMVLM_PROGRESS must be one of {_MODES}, got {mode!r}.")
    if mode == "auto":
        tty = all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))
        mode = "bar" if tty else "log"
    return mode


def format_seconds(seconds: float) -> str:
    """``3725.2 -> "1:02:05"``; unknown (NaN, inf) -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _emit(log: logging.Logger, line: str) -> None:
    """An INFO line through ``log``; printed to stderr when logging is not set up (a bare CLI), so it is not lost."""
    if log.hasHandlers():
        log.info(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _line(desc: str, done: int, total: Optional[int], elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else float("nan")
    if total:
        eta = (total - done) / rate if rate > 0 else float("nan")
        return (f"{desc}: {done}/{total} ({100 * done / total:.0f}%), {rate:.2f} it/s, "
                f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}")
    return f"{desc}: {done} done, {rate:.2f} it/s, elapsed {format_seconds(elapsed)}"


def progress(iterable: Iterable[T], desc: str, total: Optional[int] = None, every_s: float = 30.0,
             mode: str = "auto", log: Optional[logging.Logger] = None) -> Iterator[T]:
    """Iterate over ``iterable`` showing progress (see the module docstring for the modes).

    Args:
        iterable: what to loop over.
        desc: a short label ("converting QaTa", "volumes").
        total: number of items (default ``len(iterable)`` when it has one).
        every_s: seconds between lines in log mode (a line is also written at the end).
        mode: "auto", "bar", "log" or "off".
        log: logger for log mode (default ``amvlm_monai.utils.progress``).
    """
    mode = progress_mode(mode)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if mode == "off":
        yield from iterable
        return
    if mode == "bar":
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total, dynamic_ncols=True)
        return
    log = log or logger
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            _emit(log, _line(desc, done, total, now - start))
    _emit(log, _line(desc, done, total, time.monotonic() - start))


class ProgressHandler:
    """Progress of an ignite engine (trainer or evaluator): iterations of the epoch with their ETA, and for runs of
    several epochs the epoch count and the whole run's ETA (measured over wall time, validation included).

    Args:
        every_s: seconds between lines in log mode; a line is also written at the end of every epoch.
        mode: "auto", "bar", "log" or "off" (see :func:`progress_mode`).
        output_transform: engine output -> dict of floats shown beside the progress (default: the ``loss`` of a
            trainer's output dict; nothing for other outputs).
        name: label of the lines ("train", "evaluate", "infer").
    """

    def __init__(self, every_s: float = 30.0, mode: str = "auto", output_transform: Optional[Callable] = None,
                 name: str = "train") -> None:
        if not every_s > 0:
            raise ValueError(f"every_s must be > 0, got {every_s}.")
        self.every_s = float(every_s)
        self.mode = mode
        self.output_transform = output_transform or _loss_of
        self.name = name
        self._bar = None  # ignite's ProgressBar in bar mode
        self._redirect = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        self.mode = progress_mode(self.mode)
        if self.mode == "off":
            return
        if engine.has_event_handler(self._started, Events.STARTED):
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._close)
        if self.mode == "bar":
            from ignite.handlers import ProgressBar

            self._bar = ProgressBar(persist=False, desc=self.name)
            self._bar.attach(engine, output_transform=self._postfix)
        else:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)

    def _postfix(self, output: Any) -> dict:
        try:
            return dict(self.output_transform(output) or {})
        except Exception:  # an output of another shape: show progress without it
            return {}

    # ---- state -------------------------------------------------------------------------------------------------
    def _started(self, engine: Any) -> None:
        self._run_start = time.monotonic()
        s = engine.state
        self._start_iteration = s.iteration  # resumed runs: ETA from the iterations of this run only
        self._epoch_length = s.epoch_length or 0
        self._total = (s.max_epochs or 1) * self._epoch_length if self._epoch_length else None
        if self.mode == "bar" and self._redirect is None:  # log lines go through tqdm.write: the bar stays whole
            from tqdm.contrib.logging import logging_redirect_tqdm

            loggers = [logging.root] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                        if isinstance(lg, logging.Logger) and lg.handlers]
            self._redirect = logging_redirect_tqdm(loggers)
            self._redirect.__enter__()

    def _epoch_started(self, engine: Any) -> None:
        self._epoch_start = self._last = time.monotonic()
        self._epoch_length = engine.state.epoch_length or 0

    def _epoch_label(self, engine: Any) -> str:
        s = engine.state
        return f"{self.name} epoch {s.epoch}/{s.max_epochs}" if (s.max_epochs or 1) > 1 else self.name

    def _in_epoch(self, engine: Any) -> int:
        s = engine.state
        return (s.iteration - 1) % self._epoch_length + 1 if self._epoch_length else s.iteration

    def run_eta(self, engine: Any) -> float:
        """Seconds left in the whole run, from the wall time per iteration so far (NaN when unknown)."""
        if not self._total:
            return float("nan")
        done = engine.state.iteration - self._start_iteration
        left = self._total - engine.state.iteration
        elapsed = time.monotonic() - self._run_start
        return elapsed / done * left if done > 0 else float("nan")

    def _extras(self, engine: Any) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in self._postfix(engine.state.output).items())

    # ---- events ------------------------------------------------------------------------------------------------
    def _iteration(self, engine: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        _emit(logger, self._status(engine, now))

    def _status(self, engine: Any, now: float) -> str:
        i, n = self._in_epoch(engine), self._epoch_length
        elapsed = now - self._epoch_start
        parts = [f"{self._epoch_label(engine)}, " + _line("iteration", i, n or None, elapsed).split(": ", 1)[1]]
        if (engine.state.max_epochs or 1) > 1:
            parts.append(f"run ETA {format_seconds(self.run_eta(engine))}")
        extras = self._extras(engine)
        if extras:
            parts.append(extras)
        return " | ".join(parts)

    def _epoch_completed(self, engine: Any) -> None:
        if self.mode == "bar":
            if (engine.state.max_epochs or 1) > 1:
                _emit(logger, f"{self._epoch_label(engine)} done, run ETA {format_seconds(self.run_eta(engine))}")
            return
        took = time.monotonic() - self._epoch_start
        line = f"{self._epoch_label(engine)} done in {format_seconds(took)}"
        if (engine.state.max_epochs or 1) > 1:
            line += f", run ETA {format_seconds(self.run_eta(engine))}"
        _emit(logger, line)

    def _close(self, engine: Any) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def _loss_of(output: Any) -> dict:
    if isinstance(output, dict) and "loss" in output:
        return {"loss": float(output["loss"])}
    if isinstance(output, list) and output and isinstance(output[0], dict) and "loss" in output[0]:
        return {"loss": float(output[0]["loss"])}
    return {}
