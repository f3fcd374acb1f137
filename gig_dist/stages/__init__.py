"""Pipeline stages, in data-flow order."""

from gig_dist.stages.base import Stage, StageWorker, UnitReport, WorkUnit, execute_unit
from gig_dist.stages.extract import ExtractStage

#: Every stage, in the order the pipeline runs them.
STAGES: tuple[type[Stage], ...] = (ExtractStage,)

__all__ = ["STAGES", "ExtractStage", "Stage", "StageWorker", "UnitReport", "WorkUnit", "execute_unit"]
