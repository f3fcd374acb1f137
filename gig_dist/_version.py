"""The installed package's version (below everything, so any module may print it)."""

from importlib import metadata

try:
    __version__ = metadata.version("gig-dist")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
