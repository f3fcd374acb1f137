"""The stage contract (:func:`check_stages`): what the pipeline relies on from every stage.

* **The fingerprint is stable**: the same config gives the same fingerprints, so does the config
  read back from the store's manifest, and so do changed execution settings (progress bars,
  loader threads, the store's path), which decide nothing about results.
* **The specs are what is written**: every array the stage's ``specs`` names is in the store
  after it ran, with that shape, dtype, dimension names and chunks, and the stage owns no
  array its specs (and its declared arrays) do not name.
* **A rerun keeps it**: run again with the same config, it is ``keep`` and runs no unit.
* **SIGKILL resume is bitwise**: a process killed just before it commits the stage's 2nd unit
  (its 1st where it has one), then resumed, leaves every array of the stage equal, bit for bit,
  to those of an uninterrupted run.

The kill runs in a child process (``python -c``), which sees the built-in registry; a stage
registered in the parent is registered in the child from ``register`` (``"module:Class"``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _child() -> None:
    """Run in the child: register the stages named, run the pipeline until a stage (with the
    failpoint the parent set in the environment)."""
    import importlib

    from gig_dist import pipeline
    from gig_dist.config import config_from_tree
    from gig_dist.stages import registry

    args = json.loads(sys.argv[1])
    for name, after in args["register"]:
        module, _, attr = name.partition(":")
        registry.register(getattr(importlib.import_module(module), attr), after=after)
    pipeline.run(config_from_tree(args["config"]), args["out"], until=args["until"])


def _arrays(url: str, paths: list[str]) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(url, mode="r", use_consolidated=False)
    return {path: group[path][...] for path in paths}


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":  # bit for bit (NaN payloads and signed zeros included)
        return bool(np.array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}")))
    return bool(np.array_equal(a, b))


def check_stages(config, workdir: str | os.PathLike[str] | None = None, stages: list[str] | None = None,
                 register: tuple[str, ...] = (), kill: bool = True) -> dict[str, dict[str, Any]]:
    """Assert the stage contract for every registered stage (or those named in ``stages``, with
    the ones they need run before them) on ``config`` (a small run: every stage runs twice).
    Returns what was checked per stage; raises ``AssertionError`` naming the stage and the rule."""
    from gig_dist import pipeline
    from gig_dist.config import config_from_tree
    from gig_dist.stages import registry
    from gig_dist.stages.base import StoreSizes
    from gig_dist.store import RunStore

    workdir = Path(workdir or tempfile.mkdtemp(prefix="gig-dist-contract-"))
    whole, killed = str(workdir / "whole.zarr"), str(workdir / "killed.zarr")
    wanted = stages or [stage.name for stage in registry.STAGES]
    last = max(registry.stage_names().index(name) for name in wanted)
    order = registry.STAGES[: last + 1]
    registered = []  # (entry, the stage it comes after), as the child registers it
    for entry in register:
        index = registry.stage_names().index(_stage_name(entry))
        registered.append((entry, registry.STAGES[index - 1].name))

    first = registry.fingerprints(config)
    quiet = config_from_tree(config.to_dict(), ["runtime.progress=false", "dataset.loader_threads=1",
                                                "store.path=elsewhere.zarr"])
    assert registry.fingerprints(config) == first, "the fingerprints differ between two calls on one config"
    assert registry.fingerprints(quiet) == first, "execution settings (progress, loader threads, store.path) changed a fingerprint"

    found: dict[str, dict[str, Any]] = {}
    for stage_type in order:
        name = stage_type.name
        pipeline.run(config, whole, until=name)
        store = RunStore.open(whole)
        key = stage_type.key(config)
        stored = config_from_tree(store.manifest.config)
        assert registry.fingerprints(stored)[key][0] == first[key][0], \
            f"{name}: the config read back from the manifest gives another fingerprint"
        assert store.record(key).fingerprint == first[key][0], f"{name}: the store records another fingerprint"
        if name not in wanted:
            if kill:
                pipeline.run(config, killed, until=name)
            continue
        stage = stage_type(config, whole)
        specs = stage.specs(store.facts, StoreSizes(store, stage.dictionary))
        owned = store.owned_arrays(key)
        checked = []
        for spec in specs:
            if spec.transient and not store.has(spec.path):
                continue  # consumed already
            assert store.has(spec.path), f"{name}: its spec names {spec.path}, which it did not write"
            array = store.array(spec.path)
            assert tuple(array.shape) == tuple(spec.shape), f"{name}: {spec.path} is {array.shape}, its spec {spec.shape}"
            same = array.dtype.kind in "OTU" if spec.dtype == "str" else array.dtype == np.dtype(spec.dtype)
            assert same, f"{name}: {spec.path} is {array.dtype}, its spec {spec.dtype}"
            assert tuple(array.metadata.dimension_names or ()) == tuple(spec.dims), \
                f"{name}: {spec.path} has dimensions {array.metadata.dimension_names}, its spec {spec.dims}"
            written = tuple(array.shards or array.chunks)
            assert written == tuple(spec.shards or spec.chunks), \
                f"{name}: {spec.path} is chunked {written}, its spec {spec.shards or spec.chunks}"
            checked.append(spec.path)
        declared = set(stage.declared_arrays(store)) | {spec.path for spec in specs}
        unnamed = [path for path in owned if path not in declared and not RunStore.is_progress(path)]
        assert not unnamed, f"{name}: it owns {unnamed}, which neither its specs nor its declared arrays name"

        again = pipeline.run(config, whole, until=name)
        decision = next(d for d in again.decisions if d.key == key)
        assert decision.action == "keep", f"{name}: an unchanged rerun is {decision.action!r} ({decision.reason})"
        assert all(report.units_run == 0 for report in again.stages), f"{name}: an unchanged rerun ran units"

        result: dict[str, Any] = {"specs": len(checked), "owned": len(owned)}
        if kill:
            units = len(stage.covered_units(store.facts))
            at = 2 if units >= 2 else 1
            env = dict(os.environ, GIG_DIST_FAILPOINT=f"{name}.before_commit:{at}",
                       PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            args = json.dumps({"config": config.to_dict(), "out": killed, "until": name, "register": registered})
            child = subprocess.run([sys.executable, "-c", "from gig_dist.testing.stages import _child; _child()", args],
                                   env=env, capture_output=True, text=True)
            assert child.returncode == -signal.SIGKILL, \
                f"{name}: the child was to die at its unit {at} commit, but exited {child.returncode}:\n{child.stderr[-2000:]}"
            resumed = pipeline.run(config, killed, until=name)
            run = next(r for r in resumed.stages if r.stage == name)
            assert run.units_run == units - (at - 1), \
                f"{name}: the resumed run ran {run.units_run} units, not the {units - (at - 1)} left"
            paths = RunStore.open(whole).owned_arrays(key)
            assert RunStore.open(killed).owned_arrays(key) == paths, f"{name}: the resumed run owns other arrays"
            a, b = _arrays(whole, paths), _arrays(killed, paths)
            differ = [path for path in paths if not _equal(a[path], b[path])]
            assert not differ, f"{name}: after a SIGKILL and a resume, {differ} differ from an uninterrupted run"
            result.update(killed_at_unit=at, units=units, compared=len(paths))
        found[name] = result
    return found


def _stage_name(entry: str) -> str:
    import importlib

    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr).name
