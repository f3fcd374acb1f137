"""The registry: every pipeline stage, in the order the pipeline runs them.

Adding a stage is its module plus one line here. The CLI's stage names, ``--until`` choices and
help, the checks before any work, the keep/redo plan and the store's progress all come from
this list.
"""

from __future__ import annotations

from gig_dist.settings import ConfigError
from gig_dist.stages.atlas import AtlasStage
from gig_dist.stages.attribute import AttributeStage
from gig_dist.stages.base import Stage
from gig_dist.stages.concepts import ConceptsStage
from gig_dist.stages.decompose import DecomposeStage
from gig_dist.stages.evaluate import EvaluateStage
from gig_dist.stages.extract import ExtractStage
from gig_dist.stages.graphs import GraphStage
from gig_dist.stages.members import MembersStage
from gig_dist.stages.reduce import ReduceStage
from gig_dist.stages.sample import SampleStage

STAGES: list[type[Stage]] = [
    ExtractStage,
    SampleStage,
    ConceptsStage,
    DecomposeStage,
    AttributeStage,
    ReduceStage,
    GraphStage,
    MembersStage,
    AtlasStage,
    EvaluateStage,
]


def stage_names() -> list[str]:
    return [stage.name for stage in STAGES]


def by_name(name: str) -> type[Stage]:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(stage_names())}")


def stages_until(until: str | None) -> list[type[Stage]]:
    """The stages to run: all, or the first ones up to and including ``until``; a stage that runs
    on demand only when ``until`` names it."""
    if until is None:
        return [stage for stage in STAGES if not stage.on_demand]
    if until not in stage_names():
        raise ConfigError(f"unknown stage {until!r}; the stages are {', '.join(stage_names())}")
    return [stage for stage in STAGES[: stage_names().index(until) + 1] if not stage.on_demand or stage.name == until]


def fingerprints(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Every registered stage's fingerprint under ``config``, by key, with the upstream ones it
    was made from."""
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for stage in STAGES:
        upstream = {}
        for name in stage.reads:
            key = by_name(name).key(config)
            upstream[key] = found[key][0]
        found[stage.key(config)] = (stage.fingerprint(config, upstream), upstream)
    return found
