"""The pipeline: collect the run's facts, ask every stage to check, create or reopen the store,
decide what each stage keeps or redoes, run the stages.

Every check that can fail (config values, model name and weights, taps, dataset path, every
stage's own checks, the store at ``out``) runs in :func:`prepare` before any unit of work starts.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from gig_dist.config import Config, ConfigError
from gig_dist.data.sources import (
    DatasetIndex,
    apply_label_map,
    build_index,
    dataset_groups,
    with_labels,
)
from gig_dist.formatting import fmt_bytes
from gig_dist.kernels.taps import probe, resolve_taps
from gig_dist.models.loading import build_model, output_names, resolve_transform
from gig_dist.runtime.address import check_reachable
from gig_dist.runtime.local import LocalRuntime, StageReport
from gig_dist.stages.base import Stage, level_of
from gig_dist.stages.driver import consumed_by
from gig_dist.stages.registry import by_name, fingerprints, stages_until
from gig_dist.stages.sizes import PlanSizes
from gig_dist.store import Facts, Manifest, MetaSection, RunStore, StoreError
from gig_dist.store.lease import Lease
from gig_dist.store.location import refuse_unsafe, store_url

#: Keys that fix the store's layout: a store cannot be resumed with other values.
LAYOUT_KEYS = ("images_per_unit", "images_per_chunk", "zstd_level")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("gig-dist", "torch", "torchvision", "zarr", "numpy", "ray", "faiss-cpu", "scikit-learn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def collect_facts(config: Config) -> tuple[Facts, DatasetIndex, Any]:
    """The model, its taps and their shapes, the dataset: everything checks and plans need."""
    model = build_model(config.model)
    taps = resolve_taps(model, config.taps)
    transform = resolve_transform(config)
    index = build_index(config.dataset)
    shapes, num_outputs, layouts = probe(model, taps, (transform.crop, transform.crop),
                                               config.model.prefix_tokens)
    mapped = apply_label_map(index, config.dataset.label_map, num_outputs, output_names(config.model, num_outputs, model))
    if mapped.warning:
        warnings.warn(f"dataset.label_map: {mapped.warning}", stacklevel=2)
    index = with_labels(index, mapped)
    facts = Facts(
        num_images=len(index.paths), images_per_unit=config.store.images_per_unit,
        images_per_chunk=config.store.images_per_chunk, zstd_level=config.store.zstd_level,
        taps={tap: (s.channels, s.height, s.width) for tap, s in shapes.items()},  # forward order
        layouts={tap: layout.to_json() for tap, layout in layouts.items() if layout.kind != "nchw"},
        num_outputs=num_outputs, class_names=list(index.class_names), input_size=transform.crop,
        label_source=index.label_source, dataset_classes=list(index.dataset_classes),
        part_masks=config.dataset.kind == "toy", pfv_groups=True, model=model,
    )
    return facts, index, transform


def worker_memory(config: Config) -> int | None:
    """Bytes one worker may use: ``runtime.worker_memory_gib``, else (local runs) this machine's
    memory or its cgroup's limit, whichever is less; None where unknown (Ray without the key)."""
    if config.runtime.worker_memory_gib is not None:
        return int(config.runtime.worker_memory_gib * 2**30)
    if config.runtime.kind != "local":
        return None
    try:
        found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found = min(found, int(limit))
    except OSError:
        pass
    return found


def memory_errors(config: Config, facts: Facts, stages: list[type[Stage]]) -> list[str]:
    """Every stage whose planned peak memory (its footprint) exceeds a worker's memory, with the
    numbers and the settings it grows with. A footprint that rests on a bound of the data (an
    image's active concepts before any ran) only warns: ``gig-dist plan --calibrate`` measures it."""
    available = worker_memory(config)
    if available is None:
        return []
    where = ("runtime.worker_memory_gib" if config.runtime.worker_memory_gib is not None else "this machine's memory")
    sizes, errors = PlanSizes(config, facts), []
    for stage_type in stages:
        stage = stage_type(config, "")
        sizes.bounded = False
        found = stage.footprint(facts, sizes)
        for who, need in (("a worker", found.worker), ("the driver", found.driver)):
            if need <= available:
                continue
            text = (f"{stage.progress_key}: {who}'s planned peak memory is {fmt_bytes(need)}, more than {where} "
                    f"({fmt_bytes(available)})" + (f"; it grows with {found.why}" if found.why else ""))
            if sizes.bounded:
                warnings.warn(text + " (planned at a bound of the data; gig-dist plan --calibrate measures it)",
                              stacklevel=3)
            else:
                errors.append(text)
    return errors


@dataclass(frozen=True)
class Decision:
    """What a rerun does with a stage: ``new`` (never run), ``keep`` (all done, unchanged),
    ``resume`` (unchanged, units left: interrupted, or more images asked for) or ``redo``."""

    key: str
    action: str
    reason: str
    units_done: int
    units_todo: int

    def describe(self) -> str:
        return f"{self.key:<28} {self.action:<7} {self.reason}"


def _changed(before: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:4])


def decide(store: RunStore, config: Config, stages: list[type[Stage]]) -> list[Decision]:
    """Keep or redo, stage by stage, and why; a stage whose input is redone is redone."""
    prints = fingerprints(config)
    decisions: dict[str, Decision] = {}
    for stage_type in stages:
        stage = stage_type(config, store.url)
        key = stage.progress_key
        fingerprint, upstream = prints[key]
        covered = stage.covered_units(store.facts)
        record = store.record(key)
        redone_inputs = [k for k in upstream if k in decisions and decisions[k].action in ("redo", "new")]
        if record is None:
            decisions[key] = Decision(key, "new", f"{len(covered)} units", 0, len(covered))
            continue
        consumer = consumed_by(store, config, record)
        if record.fingerprint != fingerprint or redone_inputs or consumer:
            if consumer and record.fingerprint == fingerprint:
                why = f"{consumer} must read again the per-image results it deleted once it had them"
            elif redone_inputs:
                why = f"its input {', '.join(redone_inputs)} is recomputed"
            elif record.fingerprint is None:
                why = "an earlier redo of it was interrupted"
            else:
                why = _changed(record.keys, stage.key_values(config)) or "its inputs changed"
            decisions[key] = Decision(key, "redo", why, 0, len(covered))
            continue
        todo = len(stage.pending(store))
        finished = len(covered) - todo
        if todo == 0 and not stage.final_is_current(store):
            why = f"{finished} units done; its final step again"
            if stage.coverage_key:
                why += f" ({stage.coverage_key} = {stage.coverage_value(config)})"
            decisions[key] = Decision(key, "resume", why, finished, 0)
        elif todo == 0:
            decisions[key] = Decision(key, "keep", f"{finished} units done", finished, 0)
        else:
            why = f"{finished} of {len(covered)} units done, {todo} to run"
            if stage.coverage_key:
                why += f" ({stage.coverage_key} = {stage.coverage_value(config)})"
            decisions[key] = Decision(key, "resume", why, finished, todo)
    return [decisions[stage_type.key(config)] for stage_type in stages]


@dataclass(frozen=True)
class Prepared:
    store: RunStore
    decisions: list[Decision]
    #: This driver's lease on the store; :func:`run` gives it back when it ends.
    lease: Lease | None = None


def prepare(config: Config, out: str | os.PathLike[str] | None = None, overwrite: bool = False,
            until: str | None = None) -> Prepared:
    """Check the run against the model and the data, every stage's own checks included (all
    errors together), then create its store (at ``out``, else ``store.path``) or reopen it, and
    decide what each stage keeps or redoes. With ``until``, only the stages up to it are checked."""
    if config.runtime.kind == "ray":
        check_reachable(config.runtime.address)
    facts, index, transform = collect_facts(config)
    run_stages = stages_until(until)
    errors = [error for stage in run_stages for error in stage.check(config, facts)]
    errors = errors or memory_errors(config, facts, run_stages)  # footprints need settings that pass
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"the run cannot start ({len(errors)} problems):\n  " + "\n  ".join(errors))
    url = store_url(out if out is not None else config.store.path)
    refuse_unsafe(url)
    lease = None
    try:
        RunStore.refuse_foreign(url)  # before the lease is written there
        lease = Lease.acquire(url, config.store.lease_timeout_s)  # before anything is deleted: never under a live run
        if RunStore.claim(url, overwrite, lease.fence):
            store = RunStore.open(url, mode="r+", fence=lease.fence)
            _check_resumable(store, config, facts, index, url)
        else:
            store = RunStore.create(url, Manifest(0, "creating", config=config.to_dict(), versions=versions(),
                                                  dataset_fingerprint=index.fingerprint(), transform=vars(transform)),
                                    facts, index.paths, index.labels, dataset_groups(index), fence=lease.fence)
        if any(stage.per_dictionary for stage in run_stages):  # this dictionary's level is made with this config
            store.manifest.dictionaries[level_of(config)] = config.to_dict()
            store.save_manifest()
        return Prepared(store, decide(store, config, run_stages), lease)
    except BaseException as exc:
        if lease is not None:
            lease.release()
        if isinstance(exc, OSError):  # a read-only or missing location, a file in the way, no permission
            raise StoreError(f"--out {url}: cannot write the run store there ({exc.strerror or exc})") from None
        raise


def _check_resumable(store: RunStore, config: Config, facts: Facts, index: DatasetIndex, url: str) -> None:
    """A store may resume under another config, but not another layout or another dataset; the
    facts that may change (the taps, with the model) are updated, and the stages they feed redone."""
    before = store.facts
    facts = dataclasses.replace(facts, pfv_groups=before.pfv_groups)  # its PFVs stay where they were written
    layout = [key for key in LAYOUT_KEYS if getattr(before, key) != getattr(facts, key)]
    if layout:
        details = "; ".join(f"store.{k}: {getattr(before, k)} -> {getattr(facts, k)}" for k in layout)
        raise ConfigError(f"{url} was laid out with other store settings ({details}); rerun with those, write to "
                          "another --out, or pass --overwrite to discard it")
    if store.manifest.dataset_fingerprint != index.fingerprint() or before.num_images != facts.num_images:
        dataset = store.manifest.config.get("dataset", {})
        hints = []
        if dataset.get("order", "listed") != config.dataset.order:
            hints.append(f"it was made with dataset.order = {dataset.get('order', 'listed')} "
                         f"(stores made before that setting existed are listed); rerun with that")
        if dataset.get("label_map", "auto") != config.dataset.label_map or before.label_source != facts.label_source:
            hints.append(f"its labels were {before.label_source} (dataset.label_map = {dataset.get('label_map', 'auto')})")
        raise ConfigError(
            f"the dataset changed since {url} was created (its list of images and labels differs"
            + (f": {'; '.join(hints)}" if hints else "") + "); write to another --out, or pass --overwrite to "
            "discard the old run"
        )
    store.nodes  # noqa: B018 - a store written before the node list gets it now, saved below
    meta = store.family(MetaSection)
    if not meta.has_groups():  # a store made before meta/group: the same index, its dataset classes added
        from gig_dist.store.meta import index_specs

        store.ensure_arrays("index", [spec for spec in index_specs(facts) if spec.path == "meta/group"])
        meta.write_groups(dataset_groups(index))
    store.manifest.config = config.to_dict()
    store.manifest.versions = versions()
    store.manifest.facts = facts.to_json()
    store.save_manifest()
    store.__dict__.pop("facts", None)  # the cached facts follow the manifest


@dataclass(frozen=True)
class PipelineReport:
    url: str
    stages: list[StageReport]
    decisions: list[Decision]


def make_runtime(config: Config):
    if config.runtime.kind == "local":
        return LocalRuntime(config.runtime.device, config.runtime.progress, config.runtime.torch_threads)
    from gig_dist.runtime.ray_runtime import (
        RayRuntime,  # Ray is imported only when asked for
    )

    return RayRuntime(config.runtime, config.model.name)


def run(config: Config, out: str | os.PathLike[str] | None = None, overwrite: bool = False,
        until: str | None = None, on_plan: Callable[[list[Decision]], None] | None = None) -> PipelineReport:
    """Run every stage of the pipeline (or those up to ``until``) into the store at ``out``,
    keeping what an earlier run computed with the same settings. ``on_plan`` sees the keep/redo
    decisions before any work."""
    prepared = prepare(config, out, overwrite, until)
    try:
        if on_plan is not None:
            on_plan(prepared.decisions)
        reports = []
        fence = prepared.lease.fence
        with make_runtime(config) as runtime:  # on Ray, the run's worker hosts serve every stage
            for stage_type in stages_until(until):
                stage = stage_type(config, prepared.store.url, fence=fence)
                reports.append(runtime.run(stage))
                if reports[-1].units_run:
                    RunStore.open(prepared.store.url, mode="r+", fence=fence).add_seconds(stage.progress_key,
                                                                                       reports[-1].seconds)
        prepared.store.consolidate()  # the manifest changed: fresh consolidated metadata for readers
    finally:
        prepared.lease.release()
    return PipelineReport(prepared.store.url, reports, prepared.decisions)


__all__ = ["Decision", "PipelineReport", "Prepared", "by_name", "collect_facts", "decide", "make_runtime",
           "prepare", "run", "store_url", "StoreError"]
