"""Where a store lives: ``--out`` resolved to what the user named, and refused where a store
must never be written (a filesystem root, a home folder, the system's own folders).

A local path becomes an absolute path with its links resolved (workers may run in other
directories), and every safety check runs on that path; fsspec URLs (``s3://``, ``gs://``,
``memory://``) pass through.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec

from gig_dist.data.files import url_filesystem
from gig_dist.settings import ConfigError
from gig_dist.store.errors import StoreError

#: Folders a store may never be, nor (for the virtual filesystems) lie under.
SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
                  "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var")
VIRTUAL_FOLDERS = ("/dev", "/proc", "/sys")


def store_url(out: str | os.PathLike[str]) -> str:
    """A local path (or ``file://`` URL) as an absolute path with links resolved; other fsspec
    URLs as given (without a trailing slash)."""
    text = os.fspath(out).removeprefix("file://")
    if "://" in text:
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{rest.rstrip('/')}"
    return str(Path(text).expanduser().resolve())


def refuse_unsafe(url: str) -> None:
    """Raise :class:`StoreError` where a store must never be written."""
    if "://" in url:
        scheme, _, rest = url.partition("://")
        if not rest.strip("/"):
            raise StoreError(f"--out {url} names no bucket or folder; give one, e.g. {scheme}://bucket/run.zarr")
        return
    path = os.path.realpath(url)
    home = os.path.realpath(os.path.expanduser("~"))
    why = None
    if path == "/":
        why = "/ is the filesystem's root"
    elif path == home or home.startswith(path.rstrip("/") + "/"):
        why = f"{path} is your home folder (or holds it)"
    elif path in SYSTEM_FOLDERS:
        why = f"{path} is a system folder"
    elif any(path.startswith(folder + "/") for folder in VIRTUAL_FOLDERS):
        why = f"{path} is in {path.split('/')[1] and '/' + path.split('/')[1]}, a kernel filesystem"
    if why:
        raise StoreError(f"--out {url}: cannot write the run store there: {why}; a run store needs a folder of its "
                         "own, e.g. --out runs/r.zarr")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url`` and the store's root path in it (never empty: fsspec reads an
    empty local path as the working directory). A protocol whose package is missing is one
    line naming the extra that brings it."""
    try:
        fs, root = url_filesystem(url)
    except ConfigError as exc:
        raise StoreError(str(exc)) from None
    stripped = root.rstrip("/")
    return fs, stripped if stripped else root or "/"
