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

import importlib.util
import logging
import os
import time
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


@ray.remote(max_restarts=0, max_task_retries=0)
class StageActor:
    def __init__(self, stage: Stage, device: str, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.worker = stage.open_worker(device)
        self.store = stage.open_store()
        self.node = ray.get_runtime_context().get_node_id()

    def run(self, unit: WorkUnit) -> tuple[UnitReport, str]:
        return execute_unit(self.worker, self.store, unit), self.node


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
    def __init__(self, config: RuntimeConfig, model_name: str = "toy") -> None:
        self.config = config
        #: The run's model.name: a factory's package travels to the workers.
        self.model_name = model_name

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
        threads = self.config.torch_threads or max(1, int(self.config.cpus_per_worker))
        slots_per_actor = stage.worker_concurrency  # units in flight per actor (writes overlap compute)

        def new_actor():
            return StageActor.options(**options, max_concurrency=slots_per_actor).remote(stage_ref, device, threads)

        # One entry per free slot; an actor appears once for each unit it may take now.
        idle = [actor for actor in (new_actor() for _ in range(num_workers)) for _ in range(slots_per_actor)]
        in_flight: dict[ray.ObjectRef, tuple[WorkUnit, object]] = {}
        dead: set[object] = set()
        attempts: Counter[int] = Counter()
        placement: Counter[str] = Counter()
        images = skipped = units_run = retries = worker_peak = 0
        unit_seconds = 0.0
        methods: dict[str, str] = {}
        bar = tqdm(total=sum(stage.work(u, store.facts) for u in pending), unit=stage.unit_noun, desc=f"{stage.name} x{num_workers}",
                   disable=not self.config.progress, dynamic_ncols=True)
        try:
            while pending or in_flight:
                while pending and idle:
                    unit, actor = pending.popleft(), idle.pop()
                    attempts[unit.index] += 1
                    in_flight[actor.run.remote(unit)] = (unit, actor)
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                unit, actor = in_flight.pop(done)
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
                    if actor not in dead:  # its other in-flight units fail the same way
                        dead.add(actor)
                        ray.kill(actor, no_restart=True)
                        idle = [a for a in idle if a is not actor]
                        replacement = new_actor()
                        idle += [replacement] * slots_per_actor
                    continue
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, LeaseLost):
                        raise exc.cause from None
                    raise UnitFailed(
                        f"{unit.describe()} failed: {exc.cause!r}"
                    ) from exc.cause
                idle.append(actor)
                units_run += 1
                images += report.images
                skipped += report.skipped
                worker_peak = max(worker_peak, report.peak_rss)
                unit_seconds += report.seconds
                methods.update(report.methods)
                placement[node] += 1
                bar.update(stage.work(unit, store.facts))
        finally:
            bar.close()
            for actor in {id(a): a for a in idle + [a for _, a in in_flight.values()]}.values():
                ray.kill(actor, no_restart=True)
        close_stage(stage, store, methods)
        return StageReport(stage.name, units_total, units_run, images, skipped, time.perf_counter() - started,
                           retries=retries, placement=dict(placement), worker_peak_rss=worker_peak,
                           unit_seconds=unit_seconds, methods=methods)
