"""In-process runtime: one worker in this process runs every pending unit in order."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gig_dist.formatting import fmt_seconds
from gig_dist.stages.base import Stage, UnitFailed
from gig_dist.stages.driver import close_stage, execute_unit, open_stage
from gig_dist.store import LeaseLost, RunStore


@dataclass(frozen=True)
class StageReport:
    stage: str
    units_total: int
    units_run: int
    images: int
    skipped: int
    seconds: float
    #: Units rerun because their worker died.
    retries: int = 0
    #: Units run per worker node (Ray node id; ``local`` in-process).
    placement: dict[str, int] = field(default_factory=dict)
    #: The largest peak resident memory of a process that ran its units (its lifetime peak: a Ray
    #: worker host's over the run's stages so far; in-process, the driver's whole run so far).
    worker_peak_rss: int = 0
    #: The units' own seconds, added up (the rest of ``seconds`` is starting workers and the
    #: stage's final step).
    unit_seconds: float = 0.0
    #: Which method ran where the config leaves the choice to the model, as the units said.
    methods: dict[str, str] = field(default_factory=dict)
    #: Worker processes this stage started (Ray: a run's hosts serve all its stages, so the
    #: first stage starts them and later ones only replace hosts that died).
    workers_started: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _projecting(stage: Stage, update, total: int, began: float, out=None):
    """``update`` of the progress bar, which also prints, once the first piece of a long stage's
    work is done, the time the rest projects to (the stage declares ``projection_hint``)."""
    if stage.projection_hint is None:
        return update
    lock, told = threading.Lock(), threading.Event()  # units run in threads: one line, whichever reports first

    def counted(n: int) -> None:
        update(n)
        with lock:
            if told.is_set():
                return
            told.set()
            took = time.perf_counter() - began
            left = total - n
            print(f"{stage.name}: the first {n} {stage.unit_noun} took {fmt_seconds(took)}; the {left} left project to "
                  f"about {fmt_seconds(took / max(n, 1) * left)} in this process ({stage.projection_hint})",
                  file=out or sys.stderr, flush=True)

    return counted


class LocalRuntime:
    def __init__(self, device: str = "auto", progress: bool = True, torch_threads: int | None = None) -> None:
        self.device = device
        self.progress = progress
        self.torch_threads = torch_threads

    def close(self) -> None:
        """Nothing to end: every unit ran in this process."""

    def __enter__(self) -> LocalRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, stage: Stage) -> StageReport:
        store = RunStore.open(stage.store_url, mode="r+", fence=stage.fence)
        open_stage(stage, store)
        units_total = len(stage.covered_units(store.facts))
        pending = stage.pending(store)
        started = time.perf_counter()
        images = skipped = worker_peak = 0
        unit_seconds = 0.0
        methods: dict[str, str] = {}
        threads_before = torch.get_num_threads()  # the caller's, given back after the stage
        if pending:
            if self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            try:
                worker = stage.open_worker(self.device)
            except BaseException:
                torch.set_num_threads(threads_before)
                raise
            total = sum(stage.work(u, store.facts) for u in pending)
            bar = tqdm(total=total, unit=stage.unit_noun, desc=stage.name, disable=not self.progress,
                       dynamic_ncols=True)
            update = _projecting(stage, bar.update, total, time.perf_counter())
            # Up to `worker_concurrency` units at once, so one unit's writes overlap the next one's compute.
            concurrency = stage.worker_concurrency
            pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"gig-dist-{stage.name}")
            queue, in_flight, units = list(reversed(pending)), set(), {}
            try:
                while queue or in_flight:
                    while queue and len(in_flight) < concurrency:
                        unit = queue.pop()
                        future = pool.submit(execute_unit, worker, store, unit, update)
                        units[future] = unit
                        in_flight.add(future)
                    finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in finished:
                        try:
                            report = future.result()
                        except LeaseLost:
                            raise  # another driver holds the store now: one line, nothing more written
                        except Exception as exc:
                            raise UnitFailed(f"{units[future].describe()} failed: {exc}") from exc
                        images += report.images
                        skipped += report.skipped
                        worker_peak = max(worker_peak, report.peak_rss)
                        unit_seconds += report.seconds
                        methods.update(report.methods)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                bar.close()
                worker.close()
                torch.set_num_threads(threads_before)
        close_stage(stage, store, methods)
        return StageReport(stage.name, units_total, len(pending), images, skipped, time.perf_counter() - started,
                           placement={"local": len(pending)} if pending else {}, worker_peak_rss=worker_peak,
                           unit_seconds=unit_seconds, methods=methods)
