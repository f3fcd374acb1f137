"""Extraction into the store: values, shard alignment, concurrent writers, crash safety, resume."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from gig_dist import open_run, pipeline
from gig_dist.config import ConfigError
from gig_dist.data.sources import ImageLoader
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.plan import make_plan
from gig_dist.stages.driver import execute_unit, open_stage
from gig_dist.stages.extract import ExtractStage
from gig_dist.stages.forward import PFVSource
from gig_dist.stages.sample import SampleStage
from gig_dist.store import (
    FORMAT_VERSION,
    AtlasSection,
    MetaSection,
    RunStore,
    StoreError,
)
from tests.conftest import GIG_LIGHT_CLI, assert_stores_equal, toy_config, zgroup

CLI = [sys.executable, "-m", "gig_dist.cli"]
SMALL = ["-o", "dataset.toy.num_images=40", "-o", "store.images_per_unit=8", "-o", "store.images_per_chunk=4",
         "-o", "extract.batch_size=4", "-o", "runtime.progress=false", "-o", "runtime.device=cpu",
         "-o", "concepts.k_multiplier=0.25", *GIG_LIGHT_CLI]
SMALL_CONFIG = [s for s in SMALL if s != "-o"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the SMALL config, to compare interrupted ones against."""
    out = tmp_path_factory.mktemp("reference") / "run.zarr"
    pipeline.run(toy_config(*SMALL_CONFIG), out)
    return str(out)


def test_recomputed_pfvs_give_the_stored_runs_results_without_storing_them(reference, tmp_path):
    """extract.pfvs = recompute stores no PFVs: sample, decompose and attribute run the
    extraction's forward pass again per unit, in its batches, and every array they write is
    bitwise the stored run's; open_run recomputes them too. A forward pass that no longer gives
    the stored logits (another model, changed images) is refused, not used."""
    url = tmp_path / "recompute.zarr"
    config = toy_config(*SMALL_CONFIG, "extract.pfvs=recompute")
    pipeline.run(config, url)
    assert not [p for p, _ in zgroup(url).members(max_depth=None) if p.startswith("pfv")]
    assert_stores_equal(reference, str(url), ignore=("pfv",))  # samples, codes, GIG, atlas, graphs
    for image in (0, 13):
        assert np.array_equal(open_run(str(url)).pfvs("layer2.1", image).values,
                              open_run(reference).pfvs("layer2.1", image).values)
    store = RunStore.open(str(url), mode="r+")
    unit = store.units()[1]
    logits = store.family(MetaSection).read_logits(unit)
    store.array("meta/logits")[unit.start : unit.stop] = logits * 1.01  # as if the model had changed
    source = PFVSource(config, store, torch.device("cpu"), ["layer2.1"])
    assert np.array_equal(source.read("layer2.1", store.units()[0]), zgroup(reference)["pfv/layer2.1/value"][:8])
    with pytest.raises(RuntimeError, match="changed since extraction"):
        source.read("layer2.1", unit)
    # the plan says what storing them costs, and what recomputing saves
    stored_note = " ".join(make_plan(toy_config(*SMALL_CONFIG)).notes)
    assert "with -o extract.pfvs=recompute none are stored" in stored_note
    recompute = make_plan(config)
    assert "PFVs recomputed" in " ".join(recompute.notes)
    extract = next(s for s in recompute.stages if s.key == "extract")
    assert not [a for a in extract.arrays if a.path.startswith("pfv/")]


def test_pfvs_equal_a_direct_forward_pass(reference):
    store = RunStore.open(reference)
    config = toy_config(*SMALL_CONFIG)
    model = build_model(config.model)
    loader = ImageLoader(resolve_transform(config), 10**8, 1)
    paths = [str(p) for p in zgroup(store)["meta/path"][:5]]
    x = torch.stack([loader.load(p).image for p in paths])
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        layer1 = model.layer1(stem)
        layer2_0 = model.layer2[0](layer1)
        logits = model(x)
    stored = zgroup(store)["pfv/layer2.0/value"][:5].astype(np.float32)  # (N, H*W, C)
    expected = layer2_0.permute(0, 2, 3, 1).reshape(5, 16 * 16, 128).numpy()
    # Extraction runs channels-last, which sums in another order: equal up to float16 rounding.
    assert np.allclose(stored, expected, rtol=2**-10, atol=1e-3)
    assert (stored > 0).mean() > 0.05  # post-ReLU PFVs, not all zero
    assert np.allclose(zgroup(store)["meta/logits"][:5], logits.numpy(), atol=1e-5)
    assert (zgroup(store)["meta/prediction"][:5] == logits.argmax(1).numpy()).all()
    # The toy model classifies its world; the part masks are stored in input coordinates.
    assert (zgroup(store)["meta/prediction"][:] == zgroup(store)["meta/label"][:]).mean() > 0.95
    masks = zgroup(store)["meta/part_mask"][:5]
    assert masks.shape == (5, 64, 64) and (masks > 0).any(axis=(1, 2)).all()


def test_units_are_exactly_the_shards_of_every_array(reference):
    store = RunStore.open(reference)
    units = store.units()
    assert [(u.start, u.stop) for u in units] == [(s, s + 8) for s in range(0, 40, 8)]
    arrays = [p for p, n in zgroup(store).members(max_depth=None) if isinstance(n, zarr.Array)]
    # per-unit stats, dataset matrices and their per-block sums, per step range, class graphs
    whole = ("/unit_", "/matrix", "/count", "/graphs")
    arrays = [p for p in arrays if "/block_" not in p and "/block/" not in p]
    per_image = [p for p in arrays if not p.startswith(("progress/", "concepts/", "atlas/"))
                 and not p.endswith(whole) and "/unit_" not in p and "/class_" not in p]
    assert "gig/bisecting_kmeans/layer1.0__layer2.1/edges/source" in per_image
    assert {"pfv/layer1.0/value", "meta/status", "codes/bisecting_kmeans/layer1.0/index", "samples/layer1.0/vector"} <= set(per_image)
    for path in per_image:
        # Each unit covers exactly one shard (or chunk) of every array: one writer per shard.
        assert store.shard_ranges(path) == units, path
    # Per-unit statistics: one chunk per unit. Concepts are written whole by their tap's unit.
    for path in [p for p in arrays if "/unit_" in p]:
        assert zgroup(store)[path].shape[0] == len(units) and zgroup(store)[path].chunks[0] == 1, path
    # The atlas's crops: rows grouped by store unit, one shard of `capacity` rows per unit.
    crops = zgroup(store)["atlas/bisecting_kmeans/crops/crop"]
    capacity = store.family(AtlasSection, "bisecting_kmeans").capacity()
    assert crops.shape[0] == capacity * len(units) and crops.shards[0] == capacity
    stage = ExtractStage(toy_config(*SMALL_CONFIG), reference)
    assert [(u.start, u.stop) for u in stage.plan(store.facts)] == [(u.start, u.stop) for u in units]


def test_writes_that_are_not_one_whole_unit_are_refused(reference, tmp_path):
    out = tmp_path / "copy.zarr"
    pipeline.prepare(toy_config(*SMALL_CONFIG), out).store
    store = RunStore.open(str(out), mode="r+")
    from gig_dist.store import ImageRange

    with pytest.raises(ValueError, match="not a work unit"):
        store.family(MetaSection).write_extraction(ImageRange(4, 12), pfvs={}, logits=np.zeros((8, 8)), status=np.zeros(8),
                               skip_reasons=[""] * 8, part_masks=None)


def _run_units(url: str, indices: list[int]) -> None:
    """Every stage, for this process's units only (a unit's sampling reads only its own shard)."""
    config = toy_config(*SMALL_CONFIG)
    store = RunStore.open(url, mode="r+")
    for stage in (ExtractStage(config, url), SampleStage(config, url)):
        worker = stage.open_worker("cpu")
        units = stage.plan(store.facts)
        for i in indices:
            execute_unit(worker, store, units[i])
        worker.close()


def test_two_processes_writing_their_own_shards_lose_nothing(reference, tmp_path):
    out = tmp_path / "parallel.zarr"
    config = toy_config(*SMALL_CONFIG)
    prepared = pipeline.prepare(config, out)
    store, url = prepared.store, prepared.store.url
    for stage in (ExtractStage(config, url), SampleStage(config, url)):
        open_stage(stage, store)  # what a runtime does on the driver before handing out units
    prepared.lease.release()  # the run below is another driver
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_run_units, args=(url, part)) for part in ([0, 2, 4], [1, 3])]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    # The later stages, run after the two writers, find extraction complete and go on from it.
    report = pipeline.run(toy_config(*SMALL_CONFIG), url)
    assert report.stages[0].units_run == 0
    assert_stores_equal(reference, url)


def _progress(out) -> np.ndarray:
    return zarr.open_array(str(out / "progress" / "extract"), mode="r")[:]


def test_sigkill_between_data_and_commit_then_resume_equals_uninterrupted(reference, tmp_path):
    out = tmp_path / "killed.zarr"
    env = dict(os.environ, GIG_DIST_FAILPOINT="extract.before_commit:3")
    killed = subprocess.run([*CLI, "run", "--out", str(out), *SMALL], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Two units committed; the third to reach its commit had written its data but died first.
    assert _progress(out).sum() == 2
    resumed = subprocess.run([*CLI, "run", "--out", str(out), *SMALL], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "3/5 units run, 2 already done" in resumed.stdout
    assert_stores_equal(reference, str(out))


def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "killed.zarr"
    # Batch size 1 slows the run so the kill lands while units are still pending. (Batch size
    # changes float rounding, so the reference is an uninterrupted run with the same config.)
    slow = [*SMALL, "-o", "extract.batch_size=1", "-o", "dataset.loader_threads=1"]
    reference = pipeline.run(toy_config(*[s for s in slow if s != "-o"]), tmp_path / "reference.zarr").url
    process = subprocess.Popen([*CLI, "run", "--out", str(out), *slow], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (out / "progress" / "extract").exists() and 0 < _progress(out).sum():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert 0 < _progress(out).sum() < 5, "the kill must land mid-stage"
    resumed = subprocess.run([*CLI, "run", "--out", str(out), *slow], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_stores_equal(reference, str(out))


def test_rerun_of_a_complete_run_does_nothing(reference, tmp_path):
    report = pipeline.run(toy_config(*SMALL_CONFIG), reference)
    # concepts: 5 taps; attribute: 5 pairs x 1 unit (gig.images); reduce: 5 pairs; graphs: 1;
    # members and atlas: 5 store units.
    assert [(s.units_run, s.units_total) for s in report.stages] == [(0, 5)] * 6 + [(0, 1)] + [(0, 5)] * 2


def test_another_layout_is_refused_and_execution_settings_change_nothing(reference, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference, copy)
    with pytest.raises(ConfigError, match=r"other store settings \(store.images_per_unit: 8 -> 16\)"):
        pipeline.run(toy_config(*SMALL_CONFIG, "store.images_per_unit=16"), copy)
    # Execution-only settings may change between a run and its resumption: every stage is kept.
    report = pipeline.run(toy_config(*SMALL_CONFIG, "runtime.progress=true", "dataset.loader_threads=2"), copy)
    assert [d.action for d in report.decisions] == ["keep"] * 9
    assert_stores_equal(reference, str(copy))


def test_a_moved_store_resumes_and_file_urls_are_local_paths(reference, tmp_path):
    import shutil

    moved = tmp_path / "moved.zarr"
    shutil.copytree(reference, moved)
    report = pipeline.run(toy_config(*SMALL_CONFIG, f"store.path={tmp_path / 'elsewhere.zarr'}"), f"file://{moved}")
    assert report.url == str(moved) and report.stages[0].units_run == 0


def test_runs_smaller_than_one_unit_and_fsspec_urls(tmp_path):
    report = pipeline.run(toy_config("dataset.toy.num_images=5"), "memory://tiny.zarr")
    store = RunStore.open(report.url)
    assert report.url == "memory://tiny.zarr" and store.family(MetaSection).image_counts()["processed"] == 5
    assert zgroup(store)["pfv/layer1.0/value"].shards[0] == 16 and zgroup(store)["pfv/layer1.0/value"].chunks[0] == 4


def test_store_path_from_the_config(tmp_path):
    report = pipeline.run(toy_config("dataset.toy.num_images=5", f"store.path={tmp_path / 'cfg.zarr'}"))
    assert report.url == str(tmp_path / "cfg.zarr") and RunStore.open(report.url).done_units("extract").all()


def test_overwrite_discards_the_old_run(reference, tmp_path):
    out = tmp_path / "run.zarr"
    pipeline.run(toy_config(*SMALL_CONFIG), out)
    report = pipeline.run(toy_config(*SMALL_CONFIG, "dataset.limit=16"), out, overwrite=True)
    assert RunStore.open(report.url).num_images == 16


def test_a_foreign_directory_is_never_overwritten(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match=r"not a gig-dist run store \(thesis.tex\); refusing"):
        pipeline.run(toy_config(*SMALL_CONFIG), tmp_path, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_a_store_interrupted_during_creation_is_created_again(tmp_path):
    out = tmp_path / "run.zarr"
    group = zarr.open_group(str(out), mode="w")
    group.attrs["gig_dist"] = {"format_version": FORMAT_VERSION, "state": "creating"}  # the marker comes first
    group.create_array("meta/path", shape=(4,), dtype="uint8")
    with pytest.raises(StoreError, match="creation was interrupted"):
        RunStore.open(str(out))
    report = pipeline.run(toy_config(*SMALL_CONFIG), out)
    assert RunStore.open(report.url).done_units("extract").all()


def test_a_zarr_group_without_the_marker_is_refused_and_kept(tmp_path):
    out = tmp_path / "foreign.zarr"
    zarr.open_group(str(out), mode="w").create_array("r", shape=(4,), dtype="f8")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="without gig-dist's marker"):
            pipeline.run(toy_config(*SMALL_CONFIG), out, overwrite=overwrite)
    assert (out / "r" / "zarr.json").exists()


def test_another_tools_zarr_array_is_not_a_store(tmp_path):
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(3,), dtype="int8")
    with pytest.raises(StoreError, match="Zarr array, not a gig-dist run store"):
        RunStore.open(str(tmp_path / "a.zarr"))


def test_inspect_json(reference):
    done = subprocess.run([*CLI, "inspect", reference, "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    d = "bisecting_kmeans/"
    # GIG_LIGHT attributes the first unit only: 1 of the 5 attribute units, 5 pairs x 1 reduce block.
    assert summary["stages"] == {
        "extract": {"complete": True, "units_done": 5, "units": 5, "stale": []},
        "sample": {"complete": True, "units_done": 5, "units": 5, "stale": []},
        f"{d}concepts": {"complete": True, "units_done": 5, "units": 5, "stale": []},
        f"{d}decompose": {"complete": True, "units_done": 5, "units": 5, "stale": []},
        f"{d}attribute": {"complete": True, "units_done": 5, "units": 25, "stale": [],
                          "coverage_key": "gig.images", "coverage": 1, "units_covered": 5},
        f"{d}reduce": {"complete": True, "units_done": 5, "units": 5, "stale": []},
        f"{d}graphs": {"complete": True, "units_done": 1, "units": 1, "stale": []},
        f"{d}members": {"complete": True, "units_done": 5, "units": 5, "stale": []},
        f"{d}atlas": {"complete": True, "units_done": 5, "units": 5, "stale": []},
    }
    assert summary["arrays"]["pfv/layer1.0/value"]["shape"] == [40, 1024, 64]
    assert summary["arrays"]["pfv/layer1.0/value"]["dtype"] == "float16"
    assert summary["images"] == {"total": 40, "processed": 40, "skipped": 0, "pending": 0}
    assert summary["skipped"] == []
    assert summary["config"]["extract"]["batch_size"] == 4
    assert "torch" in summary["versions"]


def test_a_run_gives_the_callers_torch_thread_count_back(tmp_path):
    """runtime.torch_threads sets torch's threads for the stages only: a notebook (or the next
    run in this process) keeps its own count, so that its results do not change with it."""
    import torch

    before = torch.get_num_threads()
    pipeline.run(toy_config("dataset.toy.num_images=8", f"runtime.torch_threads={max(1, before - 1) if before > 1 else 2}"),
                 tmp_path / "run.zarr", until="extract")
    assert torch.get_num_threads() == before


def test_predictions_that_collapse_onto_one_output_are_warned(tmp_path):
    """The toy model with random weights predicts one class for every image: the run says so
    (it went on silently, and the report wrote a page per class, all but one empty)."""
    import warnings

    with pytest.warns(UserWarning, match=r"predictions collapse: 32 of 32 processed images are predicted as output "
                                         r"\d \(\w+\), while their labels span 8 classes"):
        pipeline.run(toy_config("dataset.toy.num_images=32", "model.weights=none"), tmp_path / "random.zarr",
                     until="extract")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.run(toy_config("dataset.toy.num_images=32"), tmp_path / "trained.zarr", until="extract")
    assert not [w for w in caught if "collapse" in str(w.message)]


@pytest.mark.fast
def test_the_collapse_rule_needs_enough_images_and_diverse_labels():
    from gig_dist.stages.extract import prediction_collapse

    one = np.array([0, 20, 0, 0])
    assert prediction_collapse(one, np.array([5, 5, 5, 5]), ["a", "b", "c", "d"]).startswith(
        "predictions collapse: 20 of 20 processed images are predicted as output 1 (b), while their labels span 4")
    assert prediction_collapse(one, np.zeros(4, dtype=int)) is not None  # no labels: the predictions alone
    assert prediction_collapse(one, np.array([0, 19, 1, 0])) is None  # the labels are as one-sided
    assert prediction_collapse(np.array([0, 8, 0, 0]), np.array([2, 2, 2, 2])) is None  # too few images to say
    assert prediction_collapse(np.array([5, 6, 5, 4]), np.array([5, 5, 5, 5])) is None


def test_a_store_made_with_the_flat_pfv_layout_keeps_it(tmp_path, monkeypatch):
    """Stores made before the per-tap PFV groups have ``pfv/<tap>`` arrays: a later run keeps
    them (and every stage's results) and reads them where they are."""
    import dataclasses

    collect = pipeline.collect_facts
    monkeypatch.setattr(pipeline, "collect_facts",
                        lambda config: (lambda f, i, t: (dataclasses.replace(f, pfv_groups=False), i, t))(*collect(config)))
    config = toy_config("dataset.toy.num_images=20")
    url = pipeline.run(config, tmp_path / "run.zarr", until="sample").url
    monkeypatch.undo()
    flat = zgroup(RunStore.open(url))["pfv/layer2.1"]
    assert flat.metadata.dimension_names == ("image", "position_layer2.1", "channel_layer2.1")
    again = pipeline.run(config, url, until="sample")
    assert [d.action for d in again.decisions] == ["keep", "keep"]
    store = RunStore.open(url)
    assert not store.facts.pfv_groups and not store.has("pfv/layer2.1/value")
    pfvs = open_run(url).pfvs("layer2.1", 3)
    np.testing.assert_array_equal(pfvs.values.reshape(-1, pfvs.shape[-1]), flat[3].astype(np.float32))
    # a new store has a group per tap, with the dimension names every other array uses
    fresh = zgroup(RunStore.open(pipeline.run(config, tmp_path / "new.zarr", until="extract").url))
    assert fresh["pfv/layer2.1/value"].metadata.dimension_names == ("image", "position", "channel")
