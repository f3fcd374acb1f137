"""Pipeline stages, one module each; :mod:`gig_dist.stages.registry` lists them in data-flow order."""

from gig_dist.stages.attribute import AttributeStage
from gig_dist.stages.base import Stage, StageWorker, UnitReport, WorkUnit, execute_unit
from gig_dist.stages.concepts import ConceptsStage
from gig_dist.stages.decompose import DecomposeStage
from gig_dist.stages.extract import ExtractStage
from gig_dist.stages.graphs import GraphStage
from gig_dist.stages.reduce import ReduceStage
from gig_dist.stages.registry import STAGES
from gig_dist.stages.sample import SampleStage

__all__ = ["STAGES", "AttributeStage", "ConceptsStage", "DecomposeStage", "ExtractStage", "GraphStage",
           "ReduceStage", "SampleStage", "Stage", "StageWorker", "UnitReport", "WorkUnit", "execute_unit"]
