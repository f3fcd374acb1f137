"""gig-dist: mechanistic interpretability of image models at dataset scale (GIG, arXiv 2409.01610)."""

from importlib import metadata

try:
    __version__ = metadata.version("gig-dist")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
