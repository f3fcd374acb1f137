"""In-process runtime: one worker in this process runs every pending unit in order."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from gig_dist.stages.base import Stage, execute_unit
from gig_dist.store import RunStore


@dataclass(frozen=True)
class StageReport:
    stage: str
    units_total: int
    units_run: int
    images: int
    skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class LocalRuntime:
    def __init__(self, device: str = "auto", progress: bool = True) -> None:
        self.device = device
        self.progress = progress

    def run(self, stage: Stage) -> StageReport:
        store = RunStore.open(stage.store_url, mode="r+")
        units_total = len(stage.plan(store))
        pending = stage.pending(store)
        started = time.perf_counter()
        images = skipped = 0
        if pending:
            worker = stage.open_worker(self.device)
            bar = tqdm(
                total=sum(u.size for u in pending), unit="img", desc=stage.name, disable=not self.progress,
                dynamic_ncols=True,
            )
            try:
                for unit in pending:
                    report = execute_unit(worker, store, unit, bar.update)
                    images += report.images
                    skipped += report.skipped
            finally:
                bar.close()
                worker.close()
        return StageReport(stage.name, units_total, len(pending), images, skipped, time.perf_counter() - started)
