"""Errors for people: one line per problem instead of a traceback, for the project's commands and its bundles.

- :func:`cli_errors` wraps a command-line entry point (the converters, volume inference, the split maker): a data
  problem (``ValueError``, which includes `DataError` and checkpoint errors, or ``OSError``) prints
  ``error: <file>: <what is wrong>`` on stderr, one line per problem, and exits with status 2. ``AMVLM_DEBUG=1`` lets
  the exception through with its traceback.
- :func:`bundle_guard` is the first item of every bundle config's ``initialize`` list. Before anything is built it
  refuses command-line overrides that MONAI would drop (``--key None``) or that the workflow does not use (a typo),
  parses and checks every bundle argument against the schema of :mod:`amvlm_monai.utils.args` and writes the parsed
  values back into the config, and checks that the output folders can be written. On a ``python -m monai.bundle``
  command line every user error of the run (here or later: a missing checkpoint, no images, bad data) then ends the
  command with its ``error: <file or key>: <what is wrong>`` line(s) and exit status 2, without a traceback; a bug
  keeps its traceback, with the project's message first (MONAI wraps an error raised while it builds a config
  component in one ``RuntimeError("Failed to instantiate ...")`` per level). ``AMVLM_DEBUG=1`` shows every traceback
  in full.
- :func:`require_file` is a config component that stops a run whose input is missing, naming the command that writes
  it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

_DEBUG_ENV = "AMVLM_DEBUG"


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


def override_keys(argv: Sequence[str]) -> list[str]:
    """The ``--key`` names of a command line (``--key value`` or ``--key=value``), in order."""
    return [a[2:].partition("=")[0] for a in argv if a.startswith("--") and len(a) > 2]


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


_USER_ERRORS = (ValueError, OSError)
_USER_ERROR_NAMES = re.compile(r"^(?:\w*DataError|ValueError|ArgError|CheckpointError|OSError|\w*NotFoundError|"
                               r"PermissionError|IsADirectoryError|NotADirectoryError|FileExistsError)$")


def is_user_error(exc: BaseException) -> bool:
    """Whether the innermost error of ``exc`` is a problem with the input rather than a bug: a ``ValueError``
    (`DataError`, argument and checkpoint errors) or an ``OSError``, also when a DataLoader worker sent it as text."""
    root = root_cause(exc)
    if isinstance(root, _USER_ERRORS):
        return True
    text = str(root)
    if "Original Traceback" in text:
        for line in text.splitlines():
            m = _EXC_LINE.match(line.strip())
            if m:
                return bool(_USER_ERROR_NAMES.match(m.group(1)))
    return False


def exit_on_user_error(exc: BaseException) -> None:
    """For a user error (:func:`is_user_error`): its ``error:`` lines on stderr and ``SystemExit(2)``; otherwise (a
    bug, or ``AMVLM_DEBUG`` set) nothing, so that the caller re-raises it with its traceback."""
    if os.environ.get(_DEBUG_ENV) or not is_user_error(exc):
        return
    sys.stdout.flush()
    print("\n".join(error_lines(root_cause(exc))), file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def _excepthook(previous):
    """A bug's report, message first: its ``error:`` line, the innermost traceback, the errors MONAI wrapped it in
    (one line each) and the ``error:`` line again; a user error that got here: its ``error:`` lines only."""
    def hook(exc_type, exc, tb):
        if exc is None or os.environ.get(_DEBUG_ENV) or isinstance(exc, KeyboardInterrupt):
            return previous(exc_type, exc, tb)
        root = root_cause(exc)
        out = sys.stderr
        if is_user_error(exc):
            out.write("\n".join(error_lines(root)) + "\n")
            out.flush()
            return
        if root is exc:
            return previous(exc_type, exc, tb)
        out.write("\n".join(error_lines(root)) + "\n\n")
        out.write("".join(traceback.format_exception(type(root), root, root.__traceback__, chain=False)))
        wrappers, e = [], exc
        while e is not None and e is not root:
            first = (str(e).splitlines() or [""])[0]
            wrappers.append(f"  {type(e).__name__}: {first[:160]}")
            e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        out.write("raised inside MONAI's config workflow:\n" + "\n".join(reversed(wrappers))
                  + f"\n(the full chained traceback: {_DEBUG_ENV}=1)\n")
        out.write("\n".join(error_lines(root)) + "\n")
        out.flush()

    hook.amvlm = True  # type: ignore[attr-defined]
    return hook


def _caller(cls: type) -> Any:
    """The ``self`` of the innermost calling frame that is a ``cls`` (MONAI gives a config component no handle on
    the parser or the workflow that builds it), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, cls):
            return obj
        frame = frame.f_back
    return None


def _monai_parameters() -> set[str]:
    """Names MONAI's ``run`` command line takes for itself (not config overrides)."""
    import inspect

    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    names = set()
    for fn in (run, create_workflow, ConfigWorkflow.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names - {"self"}


def unused_overrides(config: dict, argv: Sequence[str], run_ids: Iterable[str]) -> list[str]:
    """The overrides of a ``python -m monai.bundle run`` command line (``argv`` without the program) that the workflow
    of ``run_ids`` does not use (:func:`~amvlm_monai.utils.args.used_keys`; the part of a key before ``#``), leaving
    out MONAI's own parameters and ``bundle_root``. MONAI would add such a key and run without it."""
    from amvlm_monai.utils.args import used_keys

    used = used_keys(config, run_ids) | _monai_parameters() | {"bundle_root"}  # MONAI's tools pass it to any bundle
    return [k for k in dict.fromkeys(override_keys(argv)) if k.split("#", 1)[0] not in used]


def check_config(parser: Any, argv: Sequence[str] | None = None, run_ids: Iterable[str] = ()) -> dict[str, Any]:
    """Check a MONAI ``ConfigParser``'s bundle arguments (:func:`~amvlm_monai.utils.args.check_bundle_args`) and write
    the parsed values back into it (config and resolver), so that what the config uses is what was meant (``--use_text
    false`` arrives as the truthy string ``"false"``). With ``argv`` (a bundle command line) and the workflow's
    ``run_ids`` (init, run, final), an override that the workflow does not use (:func:`unused_overrides`) is refused
    when it is no bundle argument (a typo) and named in a ``warning:`` line when it is another workflow's.

    Returns:
        the parsed values.

    Raises:
        ArgError: a wrong value or an unused override, naming the key.
    """
    from amvlm_monai.utils.args import BUNDLE_ARGS, ArgError, check_bundle_args, suggest, used_keys

    config = parser.config
    run_ids = list(run_ids)
    if argv is not None and run_ids:
        for key in unused_overrides(config, argv, run_ids):
            top = key.split("#", 1)[0]
            if top in BUNDLE_ARGS:  # a setting of another workflow (e.g. stage 1's --preset given to training)
                name = run_ids[1] if len(run_ids) > 1 else run_ids[0]  # (init, run, final): the run id
                print(f"warning: --{key}: the {name} workflow does not use it; it changes nothing", file=sys.stderr,
                      flush=True)
                continue
            known = (used_keys(config, run_ids) | set(BUNDLE_ARGS)) - {top}
            raise ArgError(key, "not a key of this workflow's configs, so it would change nothing" + suggest(top, known))
    values = check_bundle_args(config, resolve=parser.get_parsed_content)
    resolver = parser.ref_resolver
    for key, value in values.items():
        if config[key] is value:
            continue
        config[key] = value
        item = resolver.items.get(key)
        if item is not None:
            item.update_config(value)
        if key in resolver.resolved_content:
            resolver.resolved_content[key] = value
    return values


def _guard_workflow(workflow: Any) -> None:
    """Make a command-line workflow end a user error in its ``run``/``finalize`` with ``error:`` lines and exit
    status 2 (:func:`exit_on_user_error`)."""
    import functools

    if getattr(workflow, "_amvlm_guarded", False):
        return
    for name in ("run", "finalize"):
        method = getattr(workflow, name)

        @functools.wraps(method)
        def guarded(*args, _method=method, **kwargs):
            try:
                return _method(*args, **kwargs)
            except Exception as e:
                exit_on_user_error(e)
                raise

        setattr(workflow, name, guarded)
    workflow._amvlm_guarded = True


def bundle_guard(writable: Sequence[str | os.PathLike] = (), argv: Sequence[str] | None = None) -> bool:
    """Checks and error reporting for a bundle run; the first item of each config's ``initialize`` list::

        {"_target_": "amvlm_monai.utils.errors.bundle_guard", "writable": ["@ckpt_dir"]}

    Before anything is built: on a ``python -m monai.bundle`` command line, refuses ``--key None`` (MONAI's command
    line would drop it without a word) and an override the workflow does not use (a typo; another workflow's setting
    only gets a ``warning:`` line); parses and checks every bundle argument of the config that is building it
    (:func:`check_config`, :data:`~amvlm_monai.utils.args.BUNDLE_ARGS`) and writes the parsed values back; checks
    that the output folders can be written.

    On a ``python -m monai.bundle`` command line a user error (a wrong value, bad data, a missing file; here or later
    in the run) ends the command with its ``error: <file or key>: <what is wrong>`` line(s) and exit status 2, no
    traceback (``AMVLM_DEBUG=1`` shows it); a bug keeps its traceback, its message first. Called from Python (e.g.
    ``monai.bundle.run``), the errors are raised.

    Args:
        writable: output folders the run will write to; each is created and checked (`check_writable`).
        argv: the command line (default ``sys.argv``); its overrides are checked only when it is
            ``python -m monai.bundle ...``.

    Returns:
        True (a value for MONAI's list).

    Raises:
        ArgError: a wrong or unused override (a ``ValueError``).
        OSError: an output folder that cannot be written, naming it.
    """
    from monai.bundle import BundleWorkflow, ConfigParser

    argv = sys.argv if argv is None else argv
    cli = _is_bundle_cli(argv)
    if cli and not getattr(sys.excepthook, "amvlm", False):
        sys.excepthook = _excepthook(sys.excepthook)
    workflow = _caller(BundleWorkflow)
    try:
        if cli:
            dropped = dropped_overrides(argv[1:])
            if dropped:
                keys = ", ".join(f"--{k} None" for k in dropped)
                raise ValueError(f"{keys}: MONAI's command line drops overrides whose value is None, so the config's "
                                 "own value would be used without a word; give another value, or put the null in a "
                                 "config file added to --config_file (a file keeps it).")
        parser = _caller(ConfigParser)
        if parser is not None:
            run_ids = [getattr(workflow, k, None) for k in ("init_id", "run_id", "final_id")]
            check_config(parser, argv[1:] if cli else None, [r for r in run_ids if r])
        for folder in writable:
            if folder not in (None, ""):
                check_writable(folder)
    except Exception as e:
        if cli:
            exit_on_user_error(e)
        raise
    if cli and workflow is not None:
        _guard_workflow(workflow)
    return True


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> str:
    """``path`` when it is a file; else ``FileNotFoundError``: ``<path>: <what> not found; <hint>`` (e.g. which
    command writes it). A config component, so that a missing input stops a run before anything is built."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"{what} not found" + (f"; {hint}" if hint else ""), path)
    return path


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
