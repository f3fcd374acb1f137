"""A stage's lifecycle on the driver and its workers, above the registry: open (forget stale
results, create arrays, record the fingerprint), run and commit each unit, close. The runtimes
(in-process and Ray) call these; the stages below know nothing of them."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from gig_dist._failpoints import failpoint
from gig_dist.settings import ConfigError
from gig_dist.stages.base import (
    Progress,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
    peak_rss,
)
from gig_dist.stages.registry import by_name, fingerprints
from gig_dist.store import RunStore, StageRecord

if TYPE_CHECKING:
    from gig_dist.config import Config


def execute_unit(worker: StageWorker, store: RunStore, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
    """Run ``unit`` and commit it: its data first, then its completion marker."""
    started = time.perf_counter()
    report = worker.run(unit, progress)
    failpoint(f"{unit.stage.rsplit('/', 1)[-1]}.before_commit")
    store.mark_unit_done(unit.stage, unit.index)
    failpoint(f"{unit.stage.rsplit('/', 1)[-1]}.after_commit")
    return dataclasses.replace(report, seconds=time.perf_counter() - started, peak_rss=peak_rss())


def consumed_by(store: RunStore, config: Config, record: StageRecord | None) -> str | None:
    """The later stage that deleted results of this one once it had them in its own, and must
    now read some of them again: its fingerprint changed (it redoes everything), or one of its
    pending units starts below the images it deleted. Then this stage is redone first. None:
    nothing to redo."""
    if record is None or record.compacted is None:
        return None
    by = record.compacted["by"]
    if fingerprints(config).get(by, (None,))[0] != record.compacted["fingerprint"]:
        return by
    consumer = by_name(by.rsplit("/", 1)[-1])(config, store.url)
    deleted = int(record.compacted.get("images", store.num_images))
    return by if any(unit.start < deleted for unit in consumer.pending(store)) else None


def open_stage(stage: Stage, store: RunStore) -> None:
    """On the driver, before a stage's units: if its fingerprint changed, forget its old results
    (the manifest first); then create its arrays and progress and record the fingerprint."""
    key = stage.progress_key
    errors = stage.check_inputs(store)
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"stage {stage.name} cannot run ({len(errors)} problems):\n  " + "\n  ".join(errors))
    every = fingerprints(stage.config)
    fingerprint, upstream = every[key]
    record = store.record(key)
    # Results a later stage consumed and deleted are kept only while it needs none of them again.
    if record is None or record.fingerprint != fingerprint or consumed_by(store, stage.config, record):
        store.reset_stage(key, store.owned_arrays(key))  # also clears the record's fingerprint
    same = record is not None and record.fingerprint == fingerprint
    kept = same and record.finished
    store.declare(key, arrays=stage.declared_arrays(store))
    store.ensure_arrays(key, stage.arrays(store))
    store.begin_stage(key, StageRecord(fingerprint, dict(upstream), len(stage.plan(store.facts)),
                                       stage.key_values(stage.config),
                                       finished=kept and not stage.pending(store) and stage.final_is_current(store),
                                       seconds=record.seconds if same else 0.0,
                                       compacted=record.compacted if same else None,
                                       methods=record.methods if same else {}))


def close_stage(stage: Stage, store: RunStore, methods: dict[str, str] | None = None) -> None:
    """On the driver, once every unit is done: the stage's final step, then the methods its units
    reported. Consolidated metadata is the run's last step, not each stage's: the next manifest
    write drops it again, and consolidating lists every array in the store (2.8 s a stage in a
    store of 14 dictionary levels)."""
    if store.record(stage.progress_key).finished:
        return
    stage.finish(store)
    store.finish_stage(stage.progress_key, methods)
