"""Files as a dataset meets them: special files named as such, and names that are not UTF-8.

A file name on Linux is bytes; Python hands undecodable bytes over as lone surrogates, which
cannot be written as UTF-8 (to a store, a terminal, a page). :func:`shown` is the name a person
reads (undecodable bytes as U+FFFD), :func:`name_bytes` the exact bytes (fingerprints).
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from gig_dist.settings import ConfigError

#: fsspec protocols whose filesystem comes with an extra of gig-dist.
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
#: Tries of a read of one object before it counts as unreadable, with the waits between them.
READ_TRIES = 3
READ_BACKOFF_S = 0.5

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


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://bucket/key``), not a local path."""
    return "://" in path and not path.startswith("file://")


def url_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path in it; a protocol whose package is missing
    is one line naming the extra that brings it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        protocol = url.split("://", 1)[0]
        package, extra = EXTRAS.get(protocol, (f"the fsspec package for {protocol}://", None))
        hint = f"pip install 'gig-dist[{extra}]'" if extra else "see fsspec's list of implementations"
        raise ConfigError(f"{url}: {protocol}:// needs {package}: {hint}") from None
    except ValueError as exc:  # an unknown protocol
        raise ConfigError(f"{url}: {exc}") from None


def read_object(url: str, tries: int = READ_TRIES, backoff_s: float = READ_BACKOFF_S) -> bytes:
    """The bytes of one object, tried ``tries`` times with a growing wait: object stores fail
    now and then. A missing object raises FileNotFoundError at once."""
    fs, path = url_filesystem(url)
    for attempt in range(tries):
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise
        except OSError:
            if attempt + 1 == tries:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")
