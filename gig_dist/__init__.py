"""gig-dist: mechanistic interpretability of image models at dataset scale (GIG, arXiv 2409.01610)."""

from gig_dist._version import __version__

__all__ = ["__version__", "open_run"]


def open_run(url: str, dictionary: str | None = None):
    """Open a run store for reading: see :mod:`gig_dist.read`."""
    from gig_dist.read import open_run as _open_run

    return _open_run(url, dictionary)
