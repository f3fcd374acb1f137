"""gig-dist: mechanistic interpretability of image models at dataset scale (GIG, arXiv 2409.01610)."""

from importlib import metadata

try:
    __version__ = metadata.version("gig-dist")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"


def open_run(url: str, dictionary: str | None = None):
    """Open a run store for reading: see :mod:`gig_dist.read`."""
    from gig_dist.read import open_run as _open_run

    return _open_run(url, dictionary)
