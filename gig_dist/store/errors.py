"""The store's errors, below every store module."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store that is missing, not gig-dist's, half-created, or from another run."""


class LeaseLost(StoreError):
    """This run's lease on its store was taken over by another driver: it must write nothing more."""
