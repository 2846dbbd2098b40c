"""Errors for people: one line per problem instead of a traceback, for the project's commands and its bundles.

- :func:`cli_errors` wraps a command-line entry point (the converters, volume inference, the split maker): a data
  problem (``ValueError``, which includes `DataError` and checkpoint errors, or ``OSError``) prints
  ``error: <file>: <what is wrong>`` on stderr, one line per problem, and exits with status 2. ``AMVLM_DEBUG=1`` lets
  the exception through with its traceback.
- :func:`bundle_guard` is the first item of every bundle config's ``initialize`` list. It makes MONAI's runs print
  the project's message first (MONAI wraps an error raised while it builds a config component in one
  ``RuntimeError("Failed to instantiate ...")`` per level, 80-130 lines before the message); it refuses command-line
  overrides that MONAI would drop without a word (``--key None``); and it checks that the output folders can be
  written before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

_DEBUG_ENV = "AMVLM_DEBUG"


_FULL_ENV = "AMVLM_FULL_TRACEBACK"


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)): (.+)$")


def _worker_message(text: str) -> str | None:
    """The innermost error of a traceback a DataLoader worker sent as text ("Caught X in DataLoader worker process
    N. Original Traceback ..."): Python prints a chain cause first, so the first exception line."""
    if "Original Traceback" not in text:
        return None
    for line in text.splitlines():
        m = _EXC_LINE.match(line.strip())
        if m:
            return m.group(2)
    return None


def error_lines(exc: BaseException) -> list[str]:
    """``error: ...`` lines for an exception: one per problem of a `DataError`; an ``OSError`` as
    ``<file>: <reason>``; an error raised in a DataLoader worker as its original message; any other exception's
    message, its first line prefixed."""
    worker = _worker_message(str(exc))
    if worker is not None:
        return [f"error: {worker}"]
    problems = getattr(exc, "problems", None)
    if isinstance(problems, list) and problems and all(isinstance(p, str) for p in problems):
        return [f"error: {p}" for p in problems]
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return [f"error: {exc.filename}: {exc.strerror}"]
    text = str(exc) or type(exc).__name__
    first, *rest = text.splitlines() or [text]
    return [f"error: {first}"] + rest


@contextlib.contextmanager
def cli_errors(errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> Iterator[None]:
    """Turn a data error of the wrapped block into ``error:`` lines on stderr and exit status 2.

    Example:
        >>> def main(argv=None):
        ...     with cli_errors():
        ...         convert(...)
    """
    try:
        yield
    except errors as e:
        if os.environ.get(_DEBUG_ENV):
            raise
        sys.stdout.flush()
        print("\n".join(error_lines(e)), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it (the test file is removed).

    Raises:
        PermissionError / OSError: naming ``folder`` (read-only file system, missing permission, a file in the way).
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write_test_", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        err = type(e)(e.errno, f"{what} cannot be written ({e.strerror or e}); nothing was started")
        err.filename = str(path)
        raise err from None
    return path


def dropped_overrides(argv: Sequence[str]) -> list[str]:
    """The ``--key None`` (or ``--key=None``) overrides of a ``python -m monai.bundle`` command line: MONAI's
    command line drops every override whose value is None, so the config's value would be used without a word."""
    dropped = []
    args = list(argv)
    for i, arg in enumerate(args):
        if not arg.startswith("--") or len(arg) < 3:
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if value.strip() == "None":
            dropped.append(key)
    return dropped


def _is_bundle_cli(argv: Sequence[str]) -> bool:
    return bool(argv) and Path(argv[0]).as_posix().endswith("monai/bundle/__main__.py")


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (``__cause__``, else an unsuppressed ``__context__``): what Python's
    traceback shows first."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        root = root_cause(exc) if exc is not None else None
        if root is None or root is exc or os.environ.get(_FULL_ENV) or isinstance(root, KeyboardInterrupt):
            return previous(exc_type, exc, tb)
        out = sys.stderr
        out.write("\n".join(error_lines(root)) + "\n\n")
        out.write("".join(traceback.format_exception(type(root), root, root.__traceback__, chain=False)))
        wrappers, e = [], exc
        while e is not None and e is not root:
            first = (str(e).splitlines() or [""])[0]
            wrappers.append(f"  {type(e).__name__}: {first[:160]}")
            e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        out.write("raised inside MONAI's config workflow:\n" + "\n".join(reversed(wrappers))
                  + f"\n(the full chained traceback: {_FULL_ENV}=1)\n")
        out.write("\n".join(error_lines(root)) + "\n")
        out.flush()

    hook.amvlm = True  # type: ignore[attr-defined]
    return hook


def bundle_guard(writable: Sequence[str | os.PathLike] = (), argv: Sequence[str] | None = None) -> bool:
    """Checks and error reporting for a bundle run; the first item of each config's ``initialize`` list::

        {"_target_": "amvlm_monai.utils.errors.bundle_guard", "writable": ["@ckpt_dir"]}

    Args:
        writable: output folders the run will write to; each is created and checked (`check_writable`).
        argv: the command line (default ``sys.argv``); checked for dropped ``None`` overrides only when it is
            ``python -m monai.bundle ...``.

    Returns:
        True (a value for MONAI's list).

    Raises:
        ValueError: ``--key None`` on the command line (MONAI would drop it silently).
        OSError: an output folder that cannot be written, naming it.
    """
    if not getattr(sys.excepthook, "amvlm", False):
        sys.excepthook = _excepthook(sys.excepthook)
    argv = sys.argv if argv is None else argv
    if _is_bundle_cli(argv):
        dropped = dropped_overrides(argv[1:])
        if dropped:
            keys = ", ".join(f"--{k} None" for k in dropped)
            raise ValueError(f"{keys}: MONAI's command line drops overrides whose value is None, so the config's own "
                             "value would be used without a word; give another value, or put the null in a config "
                             "file added to --config_file (a file keeps it).")
    for folder in writable:
        if folder not in (None, ""):
            check_writable(folder)
    return True


class DataError(ValueError):
    """A problem with input data: a missing or corrupt file, a bad spreadsheet, an empty split.

    The message names the offending file(s). When a check finds several problems, all of them are collected and
    raised at once: ``problems`` holds one line per problem (``[message]`` when raised with a single message).

    Args:
        message: a one-line summary (or the whole message when ``problems`` is empty).
        problems: the individual problems; each is listed on its own line under the summary.

    Example:
        >>> raise DataError("2 problems in /data/QaTa", ["missing image: a.png", "corrupt PNG: b.png"])
    """

    def __init__(self, message: str, problems: Iterable[str] | None = None):
        self.problems = list(problems) if problems else [message]
        text = message
        if problems:
            text = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


def raise_if_problems(problems: list[str], what: str) -> None:
    """Raise one `DataError` listing every entry of ``problems`` (no-op when empty).

    Args:
        problems: messages, each naming its file.
        what: what was being checked, e.g. the source folder; used in the summary line.
    """
    if problems:
        n = len(problems)
        raise DataError(f"{n} problem{'s' if n > 1 else ''} in {what}:", problems)
