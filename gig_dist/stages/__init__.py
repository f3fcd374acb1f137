"""Pipeline stages, in data-flow order."""

from gig_dist.stages.attribute import AttributeStage, GraphStage, ReduceStage
from gig_dist.stages.base import Stage, StageWorker, UnitReport, WorkUnit, execute_unit
from gig_dist.stages.concepts import ConceptsStage
from gig_dist.stages.decompose import DecomposeStage
from gig_dist.stages.extract import ExtractStage
from gig_dist.stages.sample import SampleStage

#: Every stage, in the order the pipeline runs them.
STAGES: tuple[type[Stage], ...] = (
    ExtractStage, SampleStage, ConceptsStage, DecomposeStage, AttributeStage, ReduceStage, GraphStage,
)

__all__ = ["STAGES", "AttributeStage", "ConceptsStage", "GraphStage", "ReduceStage", "DecomposeStage", "ExtractStage", "SampleStage", "Stage", "StageWorker", "UnitReport", "WorkUnit", "execute_unit"]
