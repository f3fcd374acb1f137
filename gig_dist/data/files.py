"""Files as a dataset meets them: special files named as such, and names that are not UTF-8.

A file name on Linux is bytes; Python hands undecodable bytes over as lone surrogates, which
cannot be written as UTF-8 (to a store, a terminal, a page). :func:`shown` is the name a person
reads (undecodable bytes as U+FFFD), :func:`name_bytes` the exact bytes (fingerprints).
"""

from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when it is not a regular file (None: it is one)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` (links followed) cannot be read as a regular file, or None when it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    kind = special_kind(mode)
    return f"is {kind}, not a regular file" if kind else None


def name_bytes(path: str) -> bytes:
    """The exact bytes of a file name (undecodable ones included)."""
    return os.fsencode(path)


def shown(path: str) -> str:
    """A file name as a person reads it: undecodable bytes become U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
