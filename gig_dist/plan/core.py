"""The plan itself: sizes, memory and time of every stage (``calibration`` measures, ``render`` prints).

``gig-dist plan``: what a run will take, before it runs.

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

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gig_dist.config import Config
from gig_dist.formatting import fmt_bytes, fmt_seconds
from gig_dist.plan.calibration import _generic, _per_unit, calibrate_run
from gig_dist.settings import ConfigError
from gig_dist.stages.base import Footprint, Sizes, Stage
from gig_dist.stages.registry import stages_until
from gig_dist.stages.sizes import PlanSizes
from gig_dist.store import (
    Facts,
    MetaSection,
)
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
        class_names=list(names), input_size=transform.crop, part_masks=config.dataset.kind == "toy", pfv_groups=True,
        model=model,
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
        specs += [spec for spec in stage.whole_arrays(facts, sizes, calibration)
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
            if k_scale and stage.linear_in_k:
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
    raw = sum(spec.nbytes for spec in extraction_specs(facts, config.extract.dtype) if MetaSection.is_pfv_path(spec.path))
    if config.extract.pfvs == "recompute":
        return [f"PFVs recomputed (extract.pfvs = recompute): {fmt_bytes(raw)} (raw) not stored; "
                f"{', '.join(readers)} each run the forward pass again"
                + (" (in their calibrated times)" if extract.seconds is not None else "")]
    stored = sum(a.compressed for a in extract.arrays if MetaSection.is_pfv_path(a.path))
    cost = (f", at most {fmt_seconds(extract.seconds)} each (the extraction's time, which includes writing them)"
            if extract.seconds is not None else "")
    return [f"PFVs take {fmt_bytes(stored)} of the store ({fmt_bytes(raw)} raw); with -o extract.pfvs=recompute "
            f"none are stored and {', '.join(readers)} each run the forward pass again{cost}"]



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
    if units <= 1 and not stage.units_per_tap:
        return startup + work
    covered = measured.get("images") or calibrated_images
    scaled = work * stage.covered_images(facts) / max(1, covered)
    parallel = min(workers, done if stage.units_per_tap else units)
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
