"""Runtimes decide where a stage's units run. ``local`` runs them in this process; the Ray
runtime (the only code that imports Ray) runs them on actors."""

from gig_dist.runtime.local import LocalRuntime, StageReport

__all__ = ["LocalRuntime", "StageReport"]
