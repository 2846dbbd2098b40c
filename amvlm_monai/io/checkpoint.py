"""Checkpoint files: safe loading and atomic saving.

- :func:`load_checkpoint` is the one way the project reads a ``.pt`` file: ``torch.load(weights_only=True)``, so a
  crafted file cannot run code, and one :class:`CheckpointError` naming the file when it is unsafe, truncated or
  corrupt.
- :func:`atomic_save` writes to a temporary file and renames it, so a kill during a save leaves the previous file
  intact; :func:`clean_stale_tmp` removes what a killed writer left."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


_TMP_SUFFIX = ".tmp"


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unsafe (holds code), truncated, corrupt, or of the wrong layout."""


# ---- loading --------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error naming the file.

    Only tensors and plain containers (dict, list, tuple, str, numbers, None) are unpickled: a file that would build
    any other Python object (the way a crafted checkpoint runs code) is refused without running anything.

    Args:
        path: the ``.pt`` file.
        map_location: as for ``torch.load``.
        mmap: memory-map the tensors instead of reading them (``torch.load(mmap=True)``; new-format files only).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file holds other objects than the safe ones, or is truncated or corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), "")
        if reason:  # the file names a function or class to call: the way a crafted checkpoint runs code
            raise CheckpointError(
                f"{path}: refused to load: the file holds Python objects other than tensors and plain containers "
                f"({reason.rstrip('.')}), and loading them could run code. Only use checkpoints from a source you "
                "trust; this project's own checkpoints never need more."
            ) from None
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip() and "error" not in line), "")
        raise _corrupt(path, RuntimeError(detail or "unreadable pickle")) from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        raise _corrupt(path, e) from None


def _corrupt(path: str, err: BaseException) -> CheckpointError:
    size = os.path.getsize(path)
    detail = str(err).split(". ")[0].strip() or type(err).__name__
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({size} bytes, truncated or corrupt: "
                           f"{detail.rstrip('.')}); copy it again or use an earlier one.")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")


def atomic_save(obj: Any, path: str | os.PathLike, fsync: bool = True) -> Path:
    """``torch.save(obj)`` to a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    A reader sees the old file or the new one, never a partial one, whatever kills the writer. The temporary file is
    ``.<name>.<host>.<pid>.<random>.tmp`` in the same folder (a rename is atomic only within one file system); it is
    removed when the save fails, and by :func:`clean_stale_tmp` when the writer was killed.

    Args:
        obj: what ``torch.save`` accepts (keep it to tensors and plain containers: see :func:`load_checkpoint`).
        path: the target file; its folder is created.
        fsync: flush the file (and the folder entry) to disk before and after the rename, so that a power loss
            cannot leave an empty file under the new name.

    Returns:
        The target path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for torch.save
    _WRITING.add(str(tmp))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    finally:
        _WRITING.discard(str(tmp))
    if fsync:
        _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


_WRITING: set[str] = set()  # this process's saves in progress


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def clean_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that a killed :func:`atomic_save` left in ``folder``; returns what was removed.

    A temporary file is stale when it was written on this host by a process that no longer runs (or by this process's
    pid but not by a save in progress: a restarted container reuses pids); files of other live processes (another
    run saving into the same folder) and of other hosts are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _host()
    removed = []
    for entry in folder.iterdir():
        m = _TMP_RE.match(entry.name)
        if m is None or m["host"] != host or str(entry) in _WRITING:
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _pid_alive(pid):  # our own pid: a killed run's (a container reuses pids)
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    if removed:
        logger.warning(f"removed {len(removed)} partial file(s) of a killed save in {folder}: "
                       f"{', '.join(p.name for p in removed)}")
    return removed


_PLAIN = (type(None), bool, int, float, str)


def plain_config(config: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """A copy of ``config`` with only types that :func:`load_checkpoint` reads back (numbers, str, None, lists,
    tuples, str-keyed dicts; NumPy scalars and ``os.PathLike`` become plain values). Anything else is an error at
    save time, not a checkpoint that later cannot be loaded."""

    def plain(value: Any, key: str) -> Any:
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v, f"{key}[{i}]") for i, v in enumerate(value))
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"{where}: '{key}' has non-string keys; a checkpoint config needs plain values.")
            return {k: plain(v, f"{key}.{k}") for k, v in value.items()}
        raise TypeError(f"{where}: '{key}' is a {type(value).__name__}; a checkpoint config holds only numbers, "
                        "strings, None, lists, tuples and dicts (the safe loader refuses anything else).")

    return {k: plain(v, k) for k, v in config.items()}
