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

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


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


def as_bool(value: Any, name: str) -> bool:
    """A command-line switch as bool: True/False, 1/0, or the strings true/false/yes/no/1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"--{name} must be true or false, got {value!r}.")
