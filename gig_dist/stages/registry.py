"""The registry: every pipeline stage, in the order the pipeline runs them.

Adding a stage is its module plus one line here (or, from outside the package, one
:func:`register` call). The CLI's stage names, ``--until`` choices and help, the config's schema
(a registered stage's own section), the checks before any work, the keep/redo plan, the plan's
sizes, ``inspect``'s summaries, the report's panels and the store's progress all come from this
list.
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


def register(stage: type[Stage], after: str | None = None) -> type[Stage]:
    """Add ``stage`` to the pipeline, after the stage named ``after`` (default: last), with its
    config section (``stage.config_model`` under ``stage.config_section``). Registration holds for
    this process: a stage run by Ray workers must be importable there (a package of your own)."""
    from gig_dist.sections import add_section

    if stage.name in stage_names():
        raise ValueError(f"a stage named {stage.name!r} is registered already")
    missing = [name for name in stage.reads if name not in stage_names()]
    if missing:
        raise ValueError(f"stage {stage.name!r} reads {', '.join(missing)}, which no registered stage is")
    if stage.config_model is not None:
        if not stage.config_section:
            raise ValueError(f"stage {stage.name!r} brings a config_model but no config_section to put it under")
        add_section(stage.config_section, stage.config_model)
    at = len(STAGES) if after is None else stage_names().index(by_name(after).name) + 1
    STAGES.insert(at, stage)
    return stage


def unregister(name: str) -> None:
    """Take a stage added by :func:`register` out again (and its config section)."""
    from gig_dist.sections import remove_section

    stage = by_name(name)
    STAGES.remove(stage)
    if stage.config_model is not None and stage.config_section:
        remove_section(stage.config_section)


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
