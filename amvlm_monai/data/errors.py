"""Errors raised by the data layer (datalists, splits, converters)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["DataError", "raise_if_problems"]


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
