"""Ray runtime: a stage's units on Ray actors. The only module that imports Ray.

Each actor builds the stage's worker once (the model on its GPU, the image loader, a store
handle) and then runs units, reading and writing the store itself: only unit descriptors and
small reports travel through Ray, so the driver's memory does not grow with the dataset.

The driver keeps every actor busy from one queue. When an actor dies (node lost, OOM kill,
preemption), its in-flight units go back on the queue (unless the store shows them committed)
and a fresh actor takes its place; a unit lands once because it is committed by a marker written
after its data, and rerunning it rewrites the same bytes into the same shards.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter, deque

import ray
import torch
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    WorkerCrashedError,
)
from tqdm.auto import tqdm

from gig_dist.config import RuntimeConfig
from gig_dist.formatting import fmt_seconds
from gig_dist.runtime.local import StageReport
from gig_dist.stages.base import Stage, UnitFailed, UnitReport, WorkUnit
from gig_dist.stages.driver import close_stage, execute_unit, open_stage
from gig_dist.store import LeaseLost, RunStore

log = logging.getLogger(__name__)

#: Errors that mean the worker (process or node) is gone, not that the unit's code failed.
WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


def connect(address: str | None, py_modules: list[str] | None = None) -> None:
    """Join the cluster at ``address`` (or a job's ``RAY_ADDRESS``), else start a Ray of this
    run's own (``address="local"``): a bare ``ray.init()`` would join any cluster that a
    ``ray start`` left on the machine. A new local Ray binds to loopback: nothing on the network
    can reach it. ``py_modules``: local packages the workers import (a model factory's), shipped
    with this driver's job; on a cluster of another job, ``ray job submit --working-dir`` or an
    installed package brings them.
    """
    if ray.is_initialized():
        return
    runtime_env = {"py_modules": py_modules} if py_modules else None
    if address is None and "RAY_ADDRESS" not in os.environ:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)


#: Units one host runs at once at most; a stage asks for its ``worker_concurrency`` (at most this).
HOST_SLOTS = 4


@ray.remote(max_restarts=0, max_task_retries=0)
class WorkerHost:
    """One worker process, kept for every stage of a run: starting a process and importing torch
    cost seconds per actor (half a minute per stage on a loaded 2-core machine), paid once per run
    instead of once per stage. It holds one stage's worker at a time."""

    def __init__(self, torch_threads: int) -> None:
        self.threads = torch_threads
        self.worker = self.store = self.token = None
        self.lock = threading.Lock()
        self.node = ray.get_runtime_context().get_node_id()

    def run(self, token: str, stage: Stage, device: str, unit: WorkUnit) -> tuple[UnitReport, str]:
        """Run ``unit`` of the stage that ``token`` names, first building that stage's worker if
        this host holds another's (the first of a stage's concurrent units builds it, the others
        wait for it)."""
        with self.lock:
            if self.token != token:
                self.close()
                torch.set_num_threads(self.threads)
                self.worker, self.store, self.token = stage.open_worker(device), stage.open_store(), token
        return execute_unit(self.worker, self.store, unit), self.node

    def close(self) -> None:
        """Drop the stage's worker (its model, its loaders, its buffers)."""
        worker, self.worker, self.store, self.token = self.worker, None, None, None
        if worker is not None:
            worker.close()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def factory_modules(model_name: str) -> list[str]:
    """The local package of a ``package.module:callable`` model factory, for Ray to ship to its
    workers (``py_modules``): a package installed in site-packages, or on a node already, needs
    nothing. Empty for every other model."""
    if ":" not in model_name or model_name.startswith("timm:"):
        return []
    top = model_name.split(":", 1)[0].split(".", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None and not spec.submodule_search_locations:
        return []
    where = list(spec.submodule_search_locations or [spec.origin])[0]
    if "site-packages" in where or "dist-packages" in where:
        return []
    return [where]


class RayRuntime:
    """Runs each stage's units on the run's worker hosts: started for the first stage that needs
    them, kept for the next ones, replaced when one dies, and ended by ``close``."""

    def __init__(self, config: RuntimeConfig, model_name: str = "toy") -> None:
        self.config = config
        #: The run's model.name: a factory's package travels to the workers.
        self.model_name = model_name
        self.hosts: list = []

    def _actor_options(self) -> tuple[dict, int, str]:
        """Resources per actor, how many actors, and the device they should use."""
        c = self.config
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = c.device == "cuda" or (c.device == "auto" and cluster_gpus > 0)
        if use_gpu:
            options = {"num_gpus": c.gpus_per_worker, "num_cpus": c.cpus_per_worker}
            capacity = int(cluster_gpus // c.gpus_per_worker)
            device = "cuda"
        else:
            options = {"num_cpus": c.cpus_per_worker}
            capacity = int(ray.cluster_resources().get("CPU", 1) // c.cpus_per_worker)
            device = "cpu"
        if c.env:
            options["runtime_env"] = {"env_vars": dict(c.env)}
        return options, c.num_workers or max(1, capacity), device

    def close(self) -> None:
        """End the run's worker hosts (their resources go back to the cluster)."""
        hosts, self.hosts = self.hosts, []
        for host in hosts:
            ray.kill(host, no_restart=True)

    def __enter__(self) -> RayRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, stage: Stage) -> StageReport:
        connect(self.config.address, factory_modules(self.model_name))
        store = RunStore.open(stage.store_url, mode="r+", fence=stage.fence)
        open_stage(stage, store)
        units_total = len(stage.covered_units(store.facts))
        pending = deque(stage.pending(store))
        started = time.perf_counter()
        if not pending:
            close_stage(stage, store)
            return StageReport(stage.name, units_total, 0, 0, 0, time.perf_counter() - started)

        options, num_workers, device = self._actor_options()
        num_workers = min(num_workers, len(pending))
        stage_ref = ray.put(stage)
        token = f"{stage.progress_key}/{uuid.uuid4().hex}"  # this stage, this run: hosts rebuild their worker
        threads = self.config.torch_threads or max(1, int(self.config.cpus_per_worker))
        slots_per_actor = min(stage.worker_concurrency, HOST_SLOTS)  # units in flight per host (writes overlap compute)

        started_here = 0

        def new_host():
            nonlocal started_here
            started_here += 1
            return WorkerHost.options(**options, max_concurrency=HOST_SLOTS).remote(threads)

        while len(self.hosts) < num_workers:
            self.hosts.append(new_host())
        # One entry per free slot; a host appears once for each unit it may take now.
        idle = [host for host in self.hosts[:num_workers] for _ in range(slots_per_actor)]
        in_flight: dict[ray.ObjectRef, tuple[WorkUnit, object]] = {}
        dead: set[object] = set()
        attempts: Counter[int] = Counter()
        placement: Counter[str] = Counter()
        images = skipped = units_run = retries = worker_peak = 0
        unit_seconds = 0.0
        methods: dict[str, str] = {}
        total = sum(stage.work(u, store.facts) for u in pending)
        bar = tqdm(total=total, unit=stage.unit_noun, desc=f"{stage.name} x{num_workers}",
                   disable=not self.config.progress, dynamic_ncols=True)
        try:
            while pending or in_flight:
                while pending and idle:
                    unit, host = pending.popleft(), idle.pop()
                    attempts[unit.index] += 1
                    in_flight[host.run.remote(token, stage_ref, device, unit)] = (unit, host)
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                unit, host = in_flight.pop(done)
                try:
                    report, node = ray.get(done)
                except WORKER_LOST as exc:
                    retries += 1
                    if attempts[unit.index] >= self.config.max_unit_attempts:
                        raise UnitFailed(
                            f"{unit.describe()} lost its worker "
                            f"{attempts[unit.index]} times; last: {exc}"
                        ) from exc
                    log.warning("%s unit %d lost its worker; running it again", stage.name, unit.index)
                    if not store.is_unit_done(unit.stage, unit.index):
                        pending.appendleft(unit)
                    else:  # committed just before the worker died: nothing to redo
                        bar.update(stage.work(unit, store.facts))
                    if host not in dead:  # its other in-flight units fail the same way
                        dead.add(host)
                        ray.kill(host, no_restart=True)
                        idle = [h for h in idle if h is not host]
                        replacement = new_host()
                        self.hosts[self.hosts.index(host)] = replacement
                        idle += [replacement] * slots_per_actor
                    continue
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, LeaseLost):
                        raise exc.cause from None
                    raise UnitFailed(
                        f"{unit.describe()} failed: {exc.cause!r}"
                    ) from exc.cause
                idle.append(host)
                if not units_run and stage.projection_hint is not None and len(pending) + len(in_flight):
                    _project(stage, report, stage.work(unit, store.facts), total, num_workers)
                units_run += 1
                images += report.images
                skipped += report.skipped
                worker_peak = max(worker_peak, report.peak_rss)
                unit_seconds += report.seconds
                methods.update(report.methods)
                placement[node] += 1
                bar.update(stage.work(unit, store.facts))
        except BaseException:
            self.close()  # units still running on a failed stage must not go on writing
            raise
        finally:
            bar.close()
        close_stage(stage, store, methods)
        return StageReport(stage.name, units_total, units_run, images, skipped, time.perf_counter() - started,
                           retries=retries, placement=dict(placement), worker_peak_rss=worker_peak,
                           unit_seconds=unit_seconds, methods=methods, workers_started=started_here)


def _project(stage: Stage, report: UnitReport, work: int, total: int, workers: int) -> None:
    """Once a long stage's first unit is done: the time its other units project to, from that
    unit's own seconds (the host's start not counted), spread over the stage's workers."""
    left = total - work
    per_piece = report.seconds / max(work, 1)
    print(f"{stage.name}: the first unit's {work} {stage.unit_noun} took {fmt_seconds(report.seconds)}; the {left} left "
          f"project to about {fmt_seconds(per_piece * left / workers)} on {workers} worker{'s' * (workers > 1)} "
          f"({stage.projection_hint})", file=sys.stderr, flush=True)
