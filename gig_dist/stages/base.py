"""The stage contract every pipeline stage follows, and the one way a unit is committed.

A stage plans its work as units, each a range of images aligned to the store's shards; a
*worker* (one per process, GPU or CPU slot) holds the heavy state such as the model and runs
units; :func:`execute_unit` runs a unit and then commits it. Runtimes (in-process, Ray) only
decide where units run: they never touch the store layout, and a stage never knows which
runtime drives it.

Exactly-once: a unit's data is written before its completion marker, and a unit whose marker is
missing is run again, writing the same bytes to the same shards. So a unit interrupted anywhere
lands once, whichever worker reruns it.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from gig_dist._failpoints import failpoint
from gig_dist.config import Config
from gig_dist.store import RunStore

Progress = Callable[[int], None]


class UnitFailed(RuntimeError):
    """A unit failed in its own code, or kept losing its workers; names the unit and its images."""


@dataclass(frozen=True)
class WorkUnit:
    """Unit ``index`` of ``stage``: images ``start:stop``, exactly one shard of each array it
    writes; or, for per-tap stages, the tap ``tap`` (and no images)."""

    stage: str
    index: int
    start: int
    stop: int
    tap: str | None = None
    #: Attribution units only: the range of integration steps and of target slots they cover.
    steps: tuple[int, int] | None = None
    targets: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        parts = [f"tap {self.tap}"] if self.tap else []
        if self.size or not self.tap:
            parts.append(f"images {self.start}:{self.stop}")
        if self.steps:
            parts.append(f"steps {self.steps[0]}:{self.steps[1]}")
        if self.targets:
            parts.append(f"targets {self.targets[0]}:{self.targets[1]}")
        return f"{self.stage} unit {self.index} ({', '.join(parts)})"


@dataclass(frozen=True)
class UnitReport:
    """What a unit returns to the runtime: small, so it can travel through Ray's object store."""

    unit: int
    images: int
    skipped: int
    seconds: float = 0.0  # filled in by execute_unit


class StageWorker(ABC):
    """Per-process state of a stage (model, loader, store handle); runs many units, up to the
    stage's ``worker_concurrency`` at once, in threads."""

    @abstractmethod
    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        """Compute the unit and write its outputs to the store (not its completion marker)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads or devices."""


class Stage(ABC):
    name: ClassVar[str]
    #: Units in flight per worker, in threads. A worker that serialises its compute internally
    #: and writes outside that lock overlaps one unit's writes with the next unit's compute.
    worker_concurrency: ClassVar[int] = 1

    def __init__(self, config: Config, store_url: str) -> None:
        self.config = config
        self.store_url = store_url

    @classmethod
    def progress_size(cls, config: Config, num_units: int, taps: dict[str, tuple[int, int, int]]) -> int:
        """Length of the stage's progress array: its largest possible number of units."""
        return num_units

    def setup(self, store: RunStore) -> None:  # noqa: B027 - optional hook
        """Run once on the driver before the stage's units: create arrays whose shape depends on
        earlier stages' results. Must be idempotent."""

    def plan(self, store: RunStore) -> list[WorkUnit]:
        """All units of the stage, in order. Default: one unit per image shard."""
        return [WorkUnit(self.name, i, r.start, r.stop) for i, r in enumerate(store.units())]

    def pending(self, store: RunStore) -> list[WorkUnit]:
        done = store.done_units(self.name)
        return [unit for unit in self.plan(store) if not done[unit.index]]

    @abstractmethod
    def open_worker(self, device: str) -> StageWorker:
        """Build the per-process state; called once per worker, never on the driver's hot path."""


def execute_unit(worker: StageWorker, store: RunStore, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
    """Run ``unit`` and commit it: its data first, then its completion marker."""
    started = time.perf_counter()
    report = worker.run(unit, progress)
    failpoint(f"{unit.stage}.before_commit")
    store.mark_unit_done(unit.stage, unit.index)
    failpoint(f"{unit.stage}.after_commit")
    return dataclasses.replace(report, seconds=time.perf_counter() - started)
