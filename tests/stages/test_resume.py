"""Resume by fingerprint: a rerun keeps the stages whose config keys and inputs are unchanged,
redoes exactly the others and what follows them, and extends a stage when more images are asked
for. Also: a stage added in one module plus the registry runs like the built-in ones."""

from __future__ import annotations

import shutil
from typing import ClassVar

import numpy as np
import pytest

from gig_dist import pipeline
from gig_dist.stages import registry
from gig_dist.stages.base import (
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.store import PROCESSED, ArraySpec, Facts, ImageRange, RunStore
from gig_dist.store.types import per_image_spec
from tests.conftest import assert_stores_equal, toy_config, zgroup

D = "bisecting_kmeans"
# 32 images in 2 units of 16; GIG on 16 images (the first unit) with 4 targets and 8 steps.
BASE = ("dataset.toy.num_images=32", "gig.images=16")


def _chunk_bytes(root, prefixes: tuple[str, ...]) -> dict[str, bytes]:
    """Every file under the given array paths, as bytes: kept means byte-identical on disk."""
    found = {}
    for prefix in prefixes:
        for path in sorted((root / prefix).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    report = pipeline.run(toy_config(*BASE), root / "run.zarr")
    assert [d.action for d in report.decisions] == ["new"] * 9
    return root / "run.zarr"


def test_changed_targets_keep_the_first_four_stages_byte_identical(first_run, tmp_path):
    run = tmp_path / "copy.zarr"
    shutil.copytree(first_run, run)
    kept = ("pfv", "meta", "samples", f"concepts/{D}", f"codes/{D}")
    before = _chunk_bytes(run, kept)
    report = pipeline.run(toy_config(*BASE, "gig.targets=2"), run)
    actions = {d.key: (d.action, d.reason) for d in report.decisions}
    assert [actions[k][0] for k in ("extract", "sample", f"{D}/concepts", f"{D}/decompose")] == ["keep"] * 4
    assert actions[f"{D}/attribute"] == ("redo", "gig.targets 4 -> 2")
    assert actions[f"{D}/reduce"][0] == actions[f"{D}/graphs"][0] == "redo"
    assert "attribute is recomputed" in actions[f"{D}/reduce"][1]
    assert [s.units_run for s in report.stages[:4]] == [0, 0, 0, 0]
    assert _chunk_bytes(run, kept) == before
    # The redone stages equal a fresh run with the new targets.
    fresh = pipeline.run(toy_config(*BASE, "gig.targets=2"), tmp_path / "fresh.zarr").url
    assert_stores_equal(fresh, str(run))
    assert zgroup(run)[f"gig/{D}/layer2.1__layer3.1/target"].shape == (32, 2)


def test_more_images_attribute_only_the_new_ones_and_equal_a_fresh_run(first_run, tmp_path):
    run = tmp_path / "copy.zarr"
    shutil.copytree(first_run, run)
    report = pipeline.run(toy_config(*BASE[:1], "gig.images=32"), run)
    actions = {d.key: d for d in report.decisions}
    attribute = actions[f"{D}/attribute"]
    assert attribute.action == "resume" and (attribute.units_done, attribute.units_todo) == (5, 5)  # 5 pairs
    assert "gig.images = 32" in attribute.reason
    by_stage = {s.stage: s for s in report.stages}
    assert by_stage["attribute"].units_run == 5 and by_stage["attribute"].images == 5 * 16  # 5 pairs x unit 2
    # reduce sums only the blocks whose images changed (the block gig.images ended in, again)
    assert by_stage["decompose"].units_run == 0 and actions[f"{D}/reduce"].action == "resume"
    fresh = pipeline.run(toy_config(*BASE[:1], "gig.images=32"), tmp_path / "fresh.zarr").url
    assert_stores_equal(fresh, str(run))


def test_more_decomposed_images_decompose_only_the_new_ones(tmp_path):
    config = ("dataset.toy.num_images=32", "decompose.images=16", "gig.images=16")
    pipeline.run(toy_config(*config), tmp_path / "run.zarr", until="decompose")
    report = pipeline.run(toy_config(*config[:1], "gig.images=16"), tmp_path / "run.zarr", until="decompose")
    assert [s.units_run for s in report.stages] == [0, 0, 0, 1]
    assert_stores_equal(pipeline.run(toy_config(*config[:1], "gig.images=16"), tmp_path / "fresh.zarr",
                                     until="decompose").url, str(tmp_path / "run.zarr"))


def test_overwrite_starts_afresh(first_run, tmp_path):
    run = tmp_path / "copy.zarr"
    shutil.copytree(first_run, run)
    report = pipeline.run(toy_config(*BASE), run, overwrite=True, until="extract")
    assert [d.action for d in report.decisions] == ["new"] and report.stages[0].units_run == 2
    assert RunStore.open(str(run)).record(f"{D}/concepts") is None


class MeanLogitStage(Stage):
    """A stage as a newcomer would add it: this class and one line in the registry."""

    name = "mean_logit"
    reads = ("extract",)
    result_keys: ClassVar[tuple[str, ...]] = ("extract.dtype",)

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return [per_image_spec(facts, "mean_logit/value", (), "float32", np.nan, ())]

    def open_worker(self, device: str) -> StageWorker:
        return MeanLogitWorker(self.store_url)


class MeanLogitWorker(StageWorker):
    def __init__(self, url: str) -> None:
        self.store = RunStore.open(url, mode="r+")

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.meta.read_status(r)
        means = np.where(status == PROCESSED, np.nanmean(self.store.meta.read_logits(r), axis=1), np.nan)
        self.store.section("mean_logit").write("value", r, means.astype(np.float32))
        return UnitReport(unit.index, len(r), 0)


def test_a_stage_added_in_one_module_and_the_registry_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "STAGES", [*registry.STAGES[:1], MeanLogitStage, *registry.STAGES[1:]])
    config = toy_config("dataset.toy.num_images=20")
    report = pipeline.run(config, tmp_path / "run.zarr", until="mean_logit")
    assert [s.stage for s in report.stages] == ["extract", "mean_logit"]
    logits = zgroup(report.url)["meta/logits"][:]
    assert np.allclose(zgroup(report.url)["mean_logit/value"][:], logits.mean(axis=1))
    assert zgroup(report.url)["mean_logit/value"].metadata.dimension_names == ("image",)
    again = pipeline.run(config, tmp_path / "run.zarr", until="mean_logit")
    assert [d.action for d in again.decisions] == ["keep", "keep"]
    from gig_dist.cli import build_parser

    assert build_parser().parse_args(["run", "--until", "mean_logit"]).until == "mean_logit"
    redo = pipeline.run(toy_config("dataset.toy.num_images=20", "extract.dtype=float32"), tmp_path / "run.zarr",
                        until="mean_logit")
    assert [d.action for d in redo.decisions] == ["redo", "redo"]
    assert zgroup(redo.url)["pfv/layer1.0"].dtype == np.float32


def test_config_fingerprints_ignore_execution_settings():
    base = registry.fingerprints(toy_config())
    assert registry.fingerprints(toy_config("runtime.progress=true", "dataset.loader_threads=1",
                                            "store.path=elsewhere.zarr")) == base
    changed = registry.fingerprints(toy_config("gig.graph_top=5"))
    assert [k for k in base if base[k][0] != changed[k][0]] == [f"{D}/graphs"]


def test_progress_counts_what_the_bar_names(first_run):
    """The bar's total is the sum of each unit's work, and a unit reports exactly its work (the
    graphs stage counted 1 for all of a model's class graphs)."""
    from gig_dist.stages.graphs import GraphStage
    from gig_dist.stages.reduce import ReduceStage

    config = toy_config(*BASE)
    store = RunStore.open(str(first_run))
    for stage_type in (GraphStage, ReduceStage):
        stage = stage_type(config, store.url)
        worker = stage.open_worker("cpu")
        for unit in stage.covered_units(store.facts)[:2]:
            counted: list[int] = []
            worker.run(unit, counted.append)
            assert sum(counted) == stage.work(unit, store.facts), (stage.name, unit)
    assert GraphStage(config, store.url).work(WorkUnit("g", 0), store.facts) == 8  # the toy world's classes


def test_a_per_tap_lambda_is_in_the_fingerprint():
    """decompose.lambda_rel {layer3.1: 0.1} and {layer3.1: 0.5} fingerprinted the same: a rerun
    kept codes made with another lambda, and the manifest said the new one."""
    one = registry.fingerprints(toy_config("decompose.lambda_rel={layer3.1: 0.1}"))
    other = registry.fingerprints(toy_config("decompose.lambda_rel={layer3.1: 0.5}"))
    scalar = registry.fingerprints(toy_config("decompose.lambda_rel=0.1"))
    assert one[f"{D}/decompose"][0] != other[f"{D}/decompose"][0] != scalar[f"{D}/decompose"][0]
    assert one[f"{D}/concepts"] == other[f"{D}/concepts"]  # upstream of the codes: unchanged
    from gig_dist.stages.decompose import DecomposeStage

    assert DecomposeStage.key_values(toy_config("decompose.lambda_rel={layer3.1: 0.3}"))[
        "decompose.lambda_rel.layer3.1"] == 0.3
