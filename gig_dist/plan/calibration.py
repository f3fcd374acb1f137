"""The plan's calibration: the real pipeline on a few store units in a temporary store, for each
stage its seconds, peak memory and the compressed ratio of every array it writes."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gig_dist.config import Config
from gig_dist.settings import ConfigError
from gig_dist.stages.base import level_of
from gig_dist.stages.coding import concept_count
from gig_dist.stages.registry import stages_until
from gig_dist.store import (
    AtlasSection,
    CodesSection,
    ConceptsSection,
    Facts,
    RunStore,
)


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
            with make_runtime(config) as runtime:
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
        level = ConceptsSection.level_path(dictionary) + "/"
        dictionary_arrays = {path[len(level):]: (found["shape"], found["dtype"]) for path, found in described.items()
                             if path.startswith(level) and "str" not in found["dtype"].lower()}
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


def _generic(path: str, dictionary: str) -> str:
    """The array's name with the dictionary level taken out (calibration ratios match by it)."""
    return path.replace(f"/{dictionary}/", "/")


def _per_unit(dims: tuple[str, ...]) -> bool:
    """Whether an array is written unit by unit (so only the covered units' chunks exist)."""
    return any(d in ("image", "unit", "block", "row") for d in dims)
