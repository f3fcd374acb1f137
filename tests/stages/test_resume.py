"""Resume by fingerprint: a rerun keeps the stages whose config keys and inputs are unchanged,
redoes exactly the others and what follows them, and extends a stage when more images are asked
for. (A stage added from outside: test_added_stage.py.)"""

from __future__ import annotations

import re
import shutil

import pytest

from gig_dist import pipeline
from gig_dist.stages import registry
from gig_dist.stages.base import (
    WorkUnit,
)
from gig_dist.store import (
    RunStore,
)
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


def test_inspect_says_what_its_unit_and_target_counts_count(first_run, capsys):
    """"attribute complete 2/4 units" read as half done, and "16 targets" as per image: the
    counts now say what they count."""
    from gig_dist.cli import main

    assert main(["inspect", str(first_run)]) == 0
    shown = capsys.readouterr().out
    # 2 pairs (GIG_LIGHT's default pairs) x 2 units of 16 images planned; gig.images = 16 asks for the first
    assert f"{D}/attribute" in shown
    line = next(line for line in shown.splitlines() if f"{D}/attribute " in line)
    assert "complete" in line and "units done (gig.images = 16 asks for" in line, line
    assert "image-target pairs (4 per image)" in shown  # GIG_LIGHT: 4 targets per image
    extract = next(line for line in shown.splitlines() if line.strip().startswith("extract "))
    assert "2 of 2 units done" in extract and "asks for" not in extract, extract


def test_attribution_projects_its_time_once_its_first_image_pair_is_done(first_run, tmp_path, capsys):
    """GIG on a real model runs for hours; the run said nothing of it until it ended."""
    run = tmp_path / "copy.zarr"
    shutil.copytree(first_run, run)
    pipeline.run(toy_config(*BASE[:1], "gig.images=32"), run, until="attribute")
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attribute: the first")]
    assert len(said) == 1, said
    # 5 pairs x the second unit of 16 images: 80 image-pairs, the first one timed
    assert re.fullmatch(r"attribute: the first 1 image-pairs took [0-9.]+ (ms|s); the 79 left project to about [0-9.]+ "
                        r"(ms|s|min) in this process \(gig.images, gig.targets, gig.steps and gig.pairs shrink it\)",
                        said[0]), said[0]
