"""``gig-dist plan``: what a run will take, before it runs.

For every stage of the pipeline: its work units, each array it writes (raw bytes from the
stage's own array specs, compressed bytes from a calibration's measured ratio or, without one,
taken as raw), the peak memory of a worker and of the driver, the dense matrices it holds, and a
projected time. The projection is calibrated by running the real pipeline on a small subset
(``calibrate`` units of every stage) and scaled to the planned images and workers. The plan runs
every check ``run`` runs and prints their proposals; it warns where an array, a matrix or a
worker's peak exceeds a worker's memory, or the store exceeds the disk free at ``--out``.

A dataset that is not on this machine can be planned with ``images``: the facts come from the
model (taps, shapes, outputs), and a calibration then renders toy-world images at the model's
input size in its place (its compressed ratios and times are those of such images, and of
random weights where named weights are not cached here: both are said in the plan).

Sizes that depend on data (an image's active concepts, which set the width of GIG's per-image
arrays; the atlas's crops per unit) come from the calibration; without one they are bounds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gig_dist.config import Config
from gig_dist.formatting import fmt_bytes, fmt_seconds
from gig_dist.settings import ConfigError
from gig_dist.stages.base import Footprint, Sizes, Stage, level_of
from gig_dist.stages.coding import concept_count
from gig_dist.stages.registry import stages_until
from gig_dist.stages.sizes import PlanSizes
from gig_dist.store import ArraySpec, AtlasSection, CodesSection, Facts, RunStore
from gig_dist.store.meta import extraction_specs

GiB = 1024**3


# -- facts without the data ----------------------------------------------------------------------


def plan_facts(config: Config, images: int | None) -> tuple[Facts, str]:
    """The run's facts, and where its image count comes from. With ``images``, the dataset need
    not exist: the model gives the taps and outputs (architecture only, no weights loaded)."""
    from gig_dist.kernels.taps import probe, resolve_taps
    from gig_dist.models.loading import build_model, output_names, resolve_transform
    from gig_dist.pipeline import collect_facts

    if images is None:
        facts, _, _ = collect_facts(config)
        return facts, "the dataset"
    model = build_model(config.model.model_copy(update={"weights": None}))
    taps = resolve_taps(model, config.taps)
    transform = resolve_transform(config)
    shapes, num_outputs, layouts = probe(model, taps, (transform.crop, transform.crop),
                                               config.model.prefix_tokens)
    names = output_names(config.model, num_outputs, model) or []
    facts = Facts(
        num_images=images, images_per_unit=config.store.images_per_unit,
        images_per_chunk=config.store.images_per_chunk, zstd_level=config.store.zstd_level,
        taps={tap: (s.channels, s.height, s.width) for tap, s in shapes.items()}, num_outputs=num_outputs,
        layouts={tap: layout.to_json() for tap, layout in layouts.items() if layout.kind != "nchw"},
        class_names=list(names), input_size=transform.crop, part_masks=config.dataset.kind == "toy", model=model,
    )
    return facts, "--images"


# -- sizes -----------------------------------------------------------------------------------------


# -- memory ------------------------------------------------------------------------------------------


def footprint(stage: Stage, facts: Facts, sizes: Sizes, baseline: int = 0) -> Footprint:
    """The stage's own estimate (:meth:`Stage.footprint`) plus ``baseline``, a process with torch
    and gig-dist loaded (measured by a calibration); a calibration measures the real peak beside it."""
    found = stage.footprint(facts, sizes)
    return Footprint(int(found.worker + baseline), int(found.driver + baseline), list(found.dense))


# -- the plan ------------------------------------------------------------------------------------------


@dataclass
class ArrayPlan:
    path: str
    shape: tuple[int, ...]
    dtype: str
    raw: int
    compressed: int
    ratio_from: str  # "calibration" or "raw (no calibration)"
    data_dependent: bool = False
    #: Deleted by a later stage once consumed: in the run's peak, not in the store it leaves.
    transient: bool = False


@dataclass
class StagePlan:
    key: str
    units: int
    arrays: list[ArrayPlan]
    footprint: Footprint
    seconds: float | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    #: The GPU model's wall time on the plan's workers (``gig_dist.cost``), and what bounds it.
    modelled_seconds: float | None = None
    bound_by: str = ""

    @property
    def raw(self) -> int:
        """Raw bytes of the arrays the finished store keeps."""
        return sum(a.raw for a in self.arrays if not a.transient)

    @property
    def compressed(self) -> int:
        return sum(a.compressed for a in self.arrays if not a.transient)

    @property
    def transient(self) -> int:
        """Compressed bytes of the arrays a later stage deletes."""
        return sum(a.compressed for a in self.arrays if a.transient)


@dataclass
class Plan:
    images: int
    images_from: str
    workers: int
    device: str
    stages: list[StagePlan]
    problems: list[str]
    warnings: list[str]
    notes: list[str]
    calibration: dict[str, Any] | None = None
    #: Whether data-dependent widths come from a calibration at the plan's K (else: bounds).
    widths_measured: bool = False
    #: The GPU model's device, and ``modelled`` or ``calibrated on <device>``.
    gpu: str | None = None
    gpu_basis: str = ""
    price_per_gpu_hour: float | None = None
    #: Node types that hold no stage's peak: {node type: [stage keys]} (``--cluster``).
    misfits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def modelled_seconds(self) -> float | None:
        found = [s.modelled_seconds for s in self.stages if s.modelled_seconds is not None]
        return sum(found) if found else None

    @property
    def gpu_hours(self) -> float | None:
        wall = self.modelled_seconds
        return None if wall is None else wall * self.workers / 3600

    @property
    def raw(self) -> int:
        return sum(s.raw for s in self.stages)

    @property
    def compressed(self) -> int:
        return sum(s.compressed for s in self.stages)

    @property
    def peak(self) -> int:
        """Compressed bytes at the run's fullest: every transient array exists until the stage
        that consumes it has finished."""
        return self.compressed + sum(s.transient for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images, "images_from": self.images_from, "workers": self.workers, "device": self.device,
            "raw_bytes": self.raw, "compressed_bytes": self.compressed, "peak_compressed_bytes": self.peak,
            "problems": self.problems,
            "warnings": self.warnings, "notes": self.notes,
            "gpu": self.gpu, "gpu_basis": self.gpu_basis, "modelled_seconds": self.modelled_seconds,
            "gpu_hours": self.gpu_hours,
            "cost": None if self.gpu_hours is None or self.price_per_gpu_hour is None
            else self.gpu_hours * self.price_per_gpu_hour,
            "stages": [{
                "stage": s.key, "units": s.units, "raw_bytes": s.raw, "compressed_bytes": s.compressed,
                "worker_peak_bytes": s.footprint.worker, "driver_peak_bytes": s.footprint.driver,
                "dense": [{"name": n, "shape": list(shape), "dtype": d,
                           "bytes": int(np.prod(shape, dtype=np.int64)) * np.dtype(d).itemsize}
                          for n, shape, d in s.footprint.dense],
                "seconds": s.seconds, "measured": s.measured, "modelled_seconds": s.modelled_seconds,
                "bound_by": s.bound_by,
                "arrays": [{"path": a.path, "shape": list(a.shape), "dtype": a.dtype, "raw_bytes": a.raw,
                            "compressed_bytes": a.compressed, "ratio_from": a.ratio_from,
                            "data_dependent": a.data_dependent, "transient": a.transient} for a in s.arrays],
            } for s in self.stages],
        }


class _Wider(Sizes):
    """The same sizes with the data-dependent ones larger: the arrays whose shape then changes
    are the data-dependent ones."""

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes

    def concepts(self, tap: str) -> int:
        return self.sizes.concepts(tap)

    def max_active(self, tap: str) -> int:
        return self.sizes.max_active(tap) + 7

    def crop_capacity(self) -> int:
        return self.sizes.crop_capacity() + 7


def _generic(path: str, dictionary: str) -> str:
    """The array's name with the dictionary level taken out (calibration ratios match by it)."""
    return path.replace(f"/{dictionary}/", "/")


def make_plan(config: Config, *, images: int | None = None, workers: int = 1, device: str = "cpu",
              calibrate: int = 0, out: str | None = None, worker_memory: int | None = None,
              until: str | None = None, calibration: dict[str, Any] | None = None, gpu: str | None = None,
              efficiency: str | None = None, price_per_gpu_hour: float | None = None,
              cluster: str | None = None) -> Plan:
    """Plan ``config`` on ``images`` (default: the dataset's) over ``workers`` workers; with
    ``calibration`` (an earlier :func:`calibrate_run`'s result), from that instead of a new one.
    On ``device="cuda"``, the GPU model (``gig_dist.cost``) times each stage on ``gpu`` (a key of
    ``cost.DEVICES``), with the efficiency factors ``jobs/gpu_check.py`` measured (``efficiency``,
    a file) or modelled ones; ``cluster`` (a cluster launcher config or a RayJob) names the node
    types whose memory every stage's peak must fit."""
    facts, images_from = plan_facts(config, images)
    stage_types = stages_until(until)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        problems = [error for stage in stage_types for error in stage.check(config, facts)]
    caught += [str(w.message) for w in found]
    notes: list[str] = []
    if calibration is not None:
        notes += calibration["notes"] + [f"calibration reused from an earlier run of {calibration['images']} images"]
    elif calibrate:
        if problems:
            notes.append("no calibration: the checks below must pass first")
        else:
            calibration = calibrate_run(config, calibrate, device, stand_in=images_from == "--images", until=until,
                                        facts=facts)
            notes += calibration["notes"]
    sizes = PlanSizes(config, facts, calibration)
    k_scale: dict[str, float] = {}
    slowdown = 1.0
    if calibration is not None:
        # K each tap was calibrated at against the K planned: the widths a calibration measured
        # hold only at its own K (an image uses more distinct concepts of a larger dictionary)
        k_scale = {tap: sizes.concepts(tap) / k for tap, k in calibration.get("k", {}).items()
                   if tap in facts.taps and k and sizes.concepts(tap) != k}
        if k_scale:  # the dictionary's own arrays too: the plan counts the concept vectors then
            calibration = {key: value for key, value in calibration.items() if key not in ("max_active", "crop_capacity")}
            calibration["dictionary_arrays"] = None
            sizes = PlanSizes(config, facts, calibration)
            notes.append("the calibration's K differs from the plan's at " + ", ".join(sorted(k_scale))
                         + ": the widths that depend on the data are planned at their bounds (<=)")
        if device == "cpu" and calibration.get("threads"):
            threads = config.runtime.torch_threads or max(1, int(config.runtime.cpus_per_worker))
            slowdown = max(1.0, calibration["threads"] / threads)
            if slowdown > 1:
                notes.append(f"a CPU worker has {threads} thread(s) against the calibration's {calibration['threads']}: "
                             f"its units are taken as {slowdown:g}x slower")
    stages = []
    for stage_type in stage_types:
        stage = stage_type(config, "memory://plan")
        specs = stage.specs(facts, sizes)
        specs += [spec for spec in _unspecified(stage, facts, sizes, calibration)
                  if spec.path not in {known.path for known in specs}]
        wider = {spec.path: spec.shape for spec in stage.specs(facts, _Wider(sizes))}
        arrays = []
        units = stage.covered_units(facts)
        coverage = stage.covered_images(facts) / facts.num_images
        for spec in specs:
            ratio = (calibration or {}).get("ratios", {}).get(_generic(spec.path, stage.dictionary))
            raw = spec.nbytes
            written = raw * (coverage if _per_unit(spec.dims) else 1.0)  # chunks never written take no bytes
            arrays.append(ArrayPlan(spec.path, spec.shape, spec.dtype, raw,
                                    int(round(written * ratio)) if ratio is not None else raw,
                                    "calibration" if ratio is not None else "raw (no calibration)",
                                    wider.get(spec.path, spec.shape) != spec.shape, spec.transient))
        plan = StagePlan(stage.progress_key, len(units), arrays,
                         footprint(stage, facts, sizes, (calibration or {}).get("baseline_rss", 0)))
        if calibration is not None and stage.progress_key in calibration["stages"]:
            measured = calibration["stages"][stage.progress_key]
            plan.measured = measured
            plan.seconds = project_seconds(stage, measured, len(units), facts, calibration["images"], workers,
                                           slowdown)
            if k_scale and stage.name in ("concepts", "decompose"):  # both linear in K (assignments, correlations)
                plan.seconds *= float(np.mean([k_scale.get(tap, 1.0) for tap in facts.taps]))
        stages.append(plan)
    plan = Plan(facts.num_images, images_from, workers, device, stages, problems, caught, notes, calibration,
                widths_measured=calibration is not None and not k_scale, price_per_gpu_hour=price_per_gpu_hour)
    if device == "cuda" and not problems:
        _model_gpu(plan, config, facts, sizes, stage_types, gpu or "a10g", efficiency)
    if cluster is not None:
        plan.misfits = cluster_misfits(plan, cluster)
        plan.warnings += [f"node type {node}: {', '.join(stages)} peak above its memory"
                          for node, stages in plan.misfits.items() if stages]
    plan.warnings += _limits(plan, out, worker_memory)
    plan.notes += pfv_tradeoff(config, facts, stages)
    if device == "cuda" and calibration is not None and calibration["device"] != "cuda":
        plan.notes.append(f"calibrated on {calibration['device']}: the times are this machine's, not a GPU's")
    return plan


def _model_gpu(plan: Plan, config: Config, facts: Facts, sizes: Sizes, stage_types, gpu: str,
               efficiency_file: str | None) -> None:
    """Each stage's modelled wall time on the plan's workers, each on one ``gpu``."""
    from gig_dist.cost import (
        DEVICES,
        EFFICIENCY,
        Calibration,
        modelled_stage_seconds,
        stage_work,
    )

    if gpu not in DEVICES:
        raise ConfigError(f"--gpu {gpu}: the device table has {', '.join(DEVICES)}")
    device, efficiency = DEVICES[gpu], dict(EFFICIENCY)
    plan.gpu, plan.gpu_basis = device.name, "modelled"
    if efficiency_file is not None:
        measured = Calibration.load(efficiency_file)
        efficiency.update(measured.efficiency)
        plan.gpu_basis = f"calibrated on {measured.device}"
        if measured.device != device.name:
            plan.notes.append(f"the efficiency factors were measured on {measured.device}, applied to {device.name}")
    cores = config.runtime.cpus_per_worker
    for stage_plan, stage_type in zip(plan.stages, stage_types):
        stage = stage_type(config, "memory://plan")
        work = stage_work(stage, config, facts, sizes)
        images = stage.covered_images(facts)
        stage_plan.modelled_seconds = modelled_stage_seconds(work, images, min(plan.workers, max(stage_plan.units, 1)),
                                                             device, efficiency, cores)
        parts = {kind: type(work)(**{kind: getattr(work, kind)}).seconds(device, efficiency, cores)
                 for kind in ("network", "fp32", "fp64", "memory", "storage", "decode", "fixed")}
        stage_plan.bound_by = max(parts, key=parts.get) if any(parts.values()) else "start-up"


def cluster_misfits(plan: Plan, path: str) -> dict[str, list[str]]:
    """{node type: the stages whose worker (or, on the head, driver) peak exceeds its memory}."""
    from gig_dist.cluster import node_types

    found = {}
    for node in node_types(path):
        key = "driver" if node.head else "worker"
        found[f"{node.name} ({node.memory_gib:g} GiB{', head' if node.head else ''})"] = [
            s.key for s in plan.stages if getattr(s.footprint, key) > node.memory_gib * GiB]
    return found


def pfv_tradeoff(config: Config, facts: Facts, stages: list[StagePlan]) -> list[str]:
    """What storing the PFVs costs against recomputing them (``extract.pfvs``)."""
    extract = next((s for s in stages if s.key == "extract"), None)
    readers = [s.key for s in stages if s.key.split("/")[-1] in ("sample", "decompose", "attribute")]
    if extract is None or not readers:
        return []
    raw = sum(spec.nbytes for spec in extraction_specs(facts, config.extract.dtype) if spec.path.startswith("pfv/"))
    if config.extract.pfvs == "recompute":
        return [f"PFVs recomputed (extract.pfvs = recompute): {fmt_bytes(raw)} (raw) not stored; "
                f"{', '.join(readers)} each run the forward pass again"
                + (" (in their calibrated times)" if extract.seconds is not None else "")]
    stored = sum(a.compressed for a in extract.arrays if a.path.startswith("pfv/"))
    cost = (f", at most {fmt_seconds(extract.seconds)} each (the extraction's time, which includes writing them)"
            if extract.seconds is not None else "")
    return [f"PFVs take {fmt_bytes(stored)} of the store ({fmt_bytes(raw)} raw); with -o extract.pfvs=recompute "
            f"none are stored and {', '.join(readers)} each run the forward pass again{cost}"]


def _per_unit(dims: tuple[str, ...]) -> bool:
    """Whether an array is written unit by unit (so only the covered units' chunks exist)."""
    return any(d in ("image", "unit", "block", "row") for d in dims)


def _unspecified(stage: Stage, facts: Facts, sizes: Sizes, calibration: dict[str, Any] | None) -> list[ArraySpec]:
    """Arrays written whole rather than from specs: the image index (with the store) and each
    tap's fitted dictionary. A dictionary's arrays depend on its method and on K alone, so a
    calibration (same K) gives their shapes; without one, only the concept vectors are counted."""
    from gig_dist.store.meta import index_specs

    if stage.name == "extract":
        return [spec for spec in index_specs(facts) if spec.dtype != "str"]
    if stage.name != "concepts":
        return []
    base = f"concepts/{stage.dictionary}"
    if calibration is not None and calibration["dictionary_arrays"] is not None:
        return [ArraySpec(f"{base}/{path[len('concepts/'):]}", tuple(shape), dtype, ("i",) * len(shape),
                          tuple(shape)) for path, (shape, dtype) in calibration["dictionary_arrays"].items()]
    return [ArraySpec(f"{base}/{tap}/vector", (sizes.concepts(tap), c), "float32", ("concept", "channel"),
                      (sizes.concepts(tap), c)) for tap, (c, _, _) in facts.taps.items()]


def project_seconds(stage: Stage, measured: dict[str, Any], units: int, facts: Facts, calibrated_images: int,
                    workers: int, slowdown: float = 1.0) -> float:
    """Scale a calibration's seconds: its start-up (workers built, the final step) once; its
    units' own seconds by the images the stage covers (units of any size), times ``slowdown``
    (a worker with fewer threads than the calibration had), over the workers it can keep busy.
    A stage with one unit per tap (concepts) scales by its samples (linear in the images), its
    taps spread over the workers; a one-unit stage (graphs) does not scale."""
    done = max(1, measured["units"])
    startup = measured.get("startup", 0.0)
    work = measured.get("unit_seconds", measured["seconds"]) * slowdown
    if units <= 1 and stage.name != "concepts":
        return startup + work
    covered = measured.get("images") or calibrated_images
    scaled = work * stage.covered_images(facts) / max(1, covered)
    parallel = min(workers, done if stage.name == "concepts" else units)
    return startup + scaled / parallel


def _limits(plan: Plan, out: str | None, worker_memory: int | None) -> list[str]:
    found = []
    if worker_memory:
        for s in plan.stages:
            if s.footprint.worker > worker_memory:
                found.append(f"{s.key}: a worker's estimated peak {fmt_bytes(s.footprint.worker)} exceeds the "
                             f"worker memory {fmt_bytes(worker_memory)}")
            for name, shape, dtype in s.footprint.dense:
                nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                if nbytes > worker_memory:
                    found.append(f"{s.key}: the dense {name} {shape} {dtype} is {fmt_bytes(nbytes)}, more than a "
                                 f"worker's memory {fmt_bytes(worker_memory)}")
    if out is not None and "://" not in out:
        where = Path(out).resolve()
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        if plan.peak > free:
            found.append(f"the store needs about {fmt_bytes(plan.peak)} at its fullest but {where} has "
                         f"{fmt_bytes(free)} free")
    return found


# -- calibration ------------------------------------------------------------------------------------


class PeakRSS:
    """The process's peak resident memory while a block runs, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRSS:
        self.peak = self.now()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _stand_in(config: Config, images: int) -> tuple[Config, list[str]]:
    """The config with toy-world images at the model's input size in place of a dataset that is
    not here, and random weights in place of named weights that are not cached here."""
    from gig_dist.models.loading import is_weights_path, resolve_transform

    notes = []
    crop = resolve_transform(config).crop
    update: dict[str, Any] = {"dataset": config.dataset.model_copy(update={
        "kind": "toy", "path": None, "limit": None, "label_map": "auto",
        "toy": config.dataset.toy.model_copy(update={"num_images": images, "image_size": min(512, max(16, crop))})})}
    notes.append(f"calibrated on {images} toy-world images at {crop} px in place of the dataset (not on this machine)")
    weights = config.model.weights
    if config.model.name != "toy" and weights not in (None, "shipped") and not is_weights_path(weights):
        if not _weights_cached(config):
            update["model"] = config.model.model_copy(update={"weights": None})
            notes.append(f"calibrated with random weights: {config.model.name} weights {weights} are not cached here")
    return config.model_copy(update=update), notes


def _weights_cached(config: Config) -> bool:
    from gig_dist.models.loading import resolve_torchvision_weights

    try:
        url = resolve_torchvision_weights(config.model.name, config.model.weights).url
    except (ConfigError, ValueError):
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).exists()


def calibrate_run(config: Config, units: int, device: str, stand_in: bool, until: str | None = None,
                  facts: Facts | None = None) -> dict[str, Any]:
    """Run every stage on the first ``units`` store units in a temporary store: seconds, peak
    memory, compressed ratio of every array, and the data-dependent sizes. Where a tap's K
    needs more samples than the subset has, the calibration fits K = samples / 4 there instead
    (``k`` records the K each tap was calibrated at)."""
    from gig_dist.pipeline import make_runtime, prepare

    images = units * config.store.images_per_unit
    notes: list[str] = []
    shrunk_taps: list[str] = []
    if facts is not None:
        shrunk = dict(config.concepts.k)
        for tap, (c, h, w) in facts.taps.items():
            k = concept_count(config, tap, c)
            samples = images * min(config.sample.per_image, h * w)
            if k > samples // 4:
                shrunk[tap] = max(2, samples // 4)
                shrunk_taps.append(tap)
        if shrunk_taps:
            config = config.model_copy(update={"concepts": config.concepts.model_copy(update={"k": shrunk})})
            notes.append(f"the calibration's {images} images give too few samples for the planned K: it fit "
                         + ", ".join(f"{tap} K = {shrunk[tap]}" for tap in shrunk_taps)
                         + "; concepts and decompose times are scaled by the planned K over that, the "
                           "dictionaries' bytes are the planned K's concept vectors")
    if stand_in:
        config, notes = _stand_in(config, images)
    else:
        config = config.model_copy(update={"dataset": config.dataset.model_copy(update={"limit": images})})
    if device == "cuda" and not torch.cuda.is_available():
        notes.append("--device cuda, but this machine has no CUDA device: calibrated on the CPU")
        device = "cpu"
    config = config.model_copy(update={
        "runtime": config.runtime.model_copy(update={"kind": "local", "device": device, "progress": False}),
        "report": config.report.model_copy(update={"enabled": False}),
        # kept, so that their compression is measured (a run deletes them once reduced)
        "gig": config.gig.model_copy(update={"keep_image_attributions": True})})
    root = Path(tempfile.mkdtemp(prefix="gig-dist-plan-"))
    measured: dict[str, Any] = {}
    baseline = PeakRSS.now()  # a process with torch and gig-dist loaded, before any stage
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare(config, root / "calibration.zarr", until=until)
        try:
            runtime = make_runtime(config)
            for stage_type in stages_until(until):
                stage = stage_type(config, prepared.store.url, fence=prepared.lease.fence)
                started = time.perf_counter()
                with PeakRSS() as rss, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = runtime.run(stage)
                seconds = time.perf_counter() - started
                measured[stage.progress_key] = {"seconds": seconds, "units": report.units_run, "peak_rss": rss.peak,
                                                "images": stage.covered_images(prepared.store.facts),
                                                # units overlap in stages that run two at once
                                                "unit_seconds": min(report.unit_seconds, seconds),
                                                "startup": seconds - min(report.unit_seconds, seconds)}
        finally:
            prepared.lease.release()
        store = RunStore.open(prepared.store.url)
        dictionary = level_of(config)
        coverage = {}
        for stage_type in stages_until(until):
            stage = stage_type(config, prepared.store.url)
            share = stage.covered_images(store.facts) / store.facts.num_images
            coverage.update({path: share for path in store.owned_arrays(stage.progress_key)})
        described = store.describe_arrays()  # stored bytes of every array: one listing
        ratios = {}  # stored bytes per raw byte written
        for path, found in described.items():
            if "str" in found["dtype"].lower():
                continue
            raw = int(np.prod(found["shape"], dtype=np.int64)) * np.dtype(found["dtype"]).itemsize
            node = store.array(path)
            written = raw * (coverage.get(path, 1.0) if _per_unit(tuple(node.metadata.dimension_names or ())) else 1.0)
            if written:
                ratios[_generic(path, dictionary)] = found["stored_bytes"] / written
        dictionary_arrays = {_generic(path, dictionary): (found["shape"], found["dtype"])
                             for path, found in described.items()
                             if path.startswith(f"concepts/{dictionary}/") and "str" not in found["dtype"].lower()}
        codes = store.family(CodesSection, dictionary)
        max_active = {tap: codes.max_active(tap) for tap in codes.taps()}
        capacity = store.family(AtlasSection, dictionary).capacity()
        result = {"images": store.num_images, "device": device, "stages": measured, "ratios": ratios,
                  "threads": torch.get_num_threads(), "baseline_rss": baseline,
                  "k": {tap: concept_count(config, tap, c) for tap, (c, _, _) in facts.taps.items()} if facts else {},
                  "max_active": max_active, "units": len(store.facts.units), "notes": notes,
                  "dictionary_arrays": dictionary_arrays}
        if capacity is not None:
            result["crop_capacity"] = capacity
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- printing ----------------------------------------------------------------------------------------


def render(plan: Plan, arrays: bool = True) -> str:
    lines = [f"plan: {plan.images:,} images (from {plan.images_from}), {plan.workers} worker(s) on {plan.device}"]
    for note in plan.notes:
        lines.append(f"  note: {note}")
    if plan.problems:
        lines.append(f"checks: {len(plan.problems)} problem(s); `gig-dist run` would refuse:")
        lines += [f"  - {p}" for p in plan.problems]
    else:
        lines.append("checks: every stage's checks pass")
    gpu = plan.modelled_seconds is not None
    header = f"{'stage':<26} {'units':>7} {'raw':>11} {'compressed':>11} {'worker peak':>12} {'driver':>10} {'time':>9}"
    if gpu:
        header += f" {'GPU time':>10}"
        lines.append(f"GPU model: {plan.workers} x {plan.gpu}, {plan.gpu_basis} (gig_dist/cost.py)")
    lines += ["", header, "-" * len(header)]
    for s in plan.stages:
        measured = s.measured.get("peak_rss")
        bound = "<=" if not plan.widths_measured and any(a.data_dependent for a in s.arrays) else ""
        lines.append(f"{s.key:<26} {s.units:>7} {bound + fmt_bytes(s.raw):>11} {bound + fmt_bytes(s.compressed):>11} "
                     f"{fmt_bytes(s.footprint.worker):>12} {fmt_bytes(s.footprint.driver):>10} {fmt_seconds(s.seconds):>9}"
                     + (f" {fmt_seconds(s.modelled_seconds):>10} ({s.bound_by})" if gpu else "")
                     + (f"   (calibration: {s.measured['units']} units in {s.measured['seconds']:.1f} s, "
                        f"peak RSS {fmt_bytes(measured)})" if measured else ""))
        for name, shape, dtype in s.footprint.dense:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            lines.append(f"    dense  {name} {tuple(shape)} {dtype}: {fmt_bytes(nbytes)}")
        if arrays:
            for a in s.arrays:
                flag = (" (data-dependent width)" if a.data_dependent else "") + \
                    (" (deleted once reduced)" if a.transient else "")
                lines.append(f"    {a.path:<48} {str(a.shape):<26} {a.dtype:<8} {fmt_bytes(a.raw):>10} "
                             f"-> {fmt_bytes(a.compressed):>10}{flag}")
    lines.append("-" * len(header))
    total = sum(s.seconds for s in plan.stages if s.seconds is not None) if plan.calibration else None
    lines.append(f"{'total':<26} {'':>7} {fmt_bytes(plan.raw):>11} {fmt_bytes(plan.compressed):>11} "
                 f"{'':>12} {'':>10} {fmt_seconds(total):>9}")
    if gpu:
        cost = (f", {plan.gpu_hours * plan.price_per_gpu_hour:,.2f} at {plan.price_per_gpu_hour:g} per GPU-hour"
                if plan.price_per_gpu_hour is not None else " (--price-per-gpu-hour prices it)")
        lines.append(f"{'GPU total':<26} wall {fmt_seconds(plan.modelled_seconds)} on {plan.workers} GPU(s), "
                     f"{plan.gpu_hours:,.1f} GPU-hours{cost}; {plan.gpu_basis}")
    if plan.peak > plan.compressed:
        lines.append(f"{'at its fullest':<26} {'':>7} {'':>11} {fmt_bytes(plan.peak):>11}   (with the per-source GIG, "
                     "deleted once reduced unless gig.keep_image_attributions)")
    if not plan.calibration:
        lines.append("without --calibrate M (M units of each stage run here first): compressed = raw, no times, and "
                     "<= marks stages whose array widths depend on the data (an image's active concepts, the "
                     "atlas's crops per unit), planned at their bounds")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
