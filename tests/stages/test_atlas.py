"""The concept atlas: each concept's top members over the decomposed images."""

import numpy as np
import pytest

from gig_dist import pipeline
from gig_dist.kernels.examples import (
    HISTOGRAM_BINS,
    HISTOGRAM_EDGES,
    example_hash,
    percentile,
    quantile_picks,
    quantile_values,
    top_share,
)
from gig_dist.kernels.topk import top_per_group
from gig_dist.store import PROCESSED, AtlasSection, ConceptsSection, RunStore
from gig_dist.store.atlas import CROPS_PER_CHUNK
from tests.conftest import toy_config, zgroup


@pytest.mark.fast
def test_top_per_group_orders_by_value_then_ties():
    groups = np.array([0, 0, 0, 1, 1, 2, 0])
    values = np.array([1.0, 3.0, 3.0, 2.0, 5.0, 1.0, 0.5])
    image = np.array([5, 9, 2, 0, 0, 1, 1])
    entry = top_per_group(groups, values, (image,), 4, 2)
    assert entry.tolist() == [[2, 1], [4, 3], [5, -1], [-1, -1]]


@pytest.mark.fast
def test_random_examples_merge_and_histograms_read_percentiles():
    """Two halves' samples (the smallest hashes of each) merged give the sample of the whole;
    percentiles and quantiles come from the bins."""
    from gig_dist.kernels.examples import sample_strength

    rng = np.random.default_rng(0)
    concept, image, position = rng.integers(0, 3, 400), rng.integers(0, 50, 400), rng.integers(0, 64, 400)
    keep = np.unique(np.stack([concept, image, position], 1), axis=0)  # each use once
    concept, image, position = keep.T
    whole = top_per_group(concept, sample_strength(concept, image, position), (image, position), 3, 5)
    halves = []
    for part in (image < 25, image >= 25):
        entry = top_per_group(concept[part], sample_strength(concept[part], image[part], position[part]),
                              (image[part], position[part]), 3, 5)
        halves.append(np.flatnonzero(part)[entry[entry >= 0]])
    both = np.concatenate(halves)
    merged = top_per_group(concept[both], sample_strength(concept[both], image[both], position[both]),
                           (image[both], position[both]), 3, 5)
    assert both[merged].tolist() == whole.tolist()
    # the sample is spread: its images are not the smallest ones, as a sorted cut would give
    assert image[whole[0]].max() > 25
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    np.add.at(counts, np.searchsorted(HISTOGRAM_EDGES, [0.5, 1.5, 1.6, 20.0], side="right"), 1)
    assert percentile(counts, 1.55) == pytest.approx((1 + 1) / 4)  # one below, its own bin of 2 counts half
    assert top_share(counts, 1.55) == pytest.approx(3 / 4) and top_share(counts, 30.0) == pytest.approx(1 / 4)
    assert quantile_values(counts, (0.1, 0.9)) == pytest.approx([np.sqrt(10 ** -0.5 * 10 ** -0.25),
                                                                 np.sqrt(10 ** 1.25 * 10 ** 1.5)])
    assert quantile_picks(np.array([20.0, 0.5, 1.5]), counts, (0.1, 0.5, 0.9)) == [1, 2, 0]


@pytest.mark.fast
def test_distinct_members_are_each_images_strongest_entry_then_the_strongest_images():
    """``atlas.distinct_images=false`` keeps the plain top entries (several of one image)."""
    from gig_dist.kernels.topk import top_per_group
    from gig_dist.stages.members import _top_distinct

    concept = np.array([0, 0, 0, 0, 1, 1, 0])
    strength = np.array([9.0, 8.0, 7.0, 5.0, 3.0, 3.0, 8.0])
    image = np.array([1, 1, 2, 3, 4, 4, 0])
    position = np.array([0, 1, 0, 0, 5, 2, 9])
    # concept 0: image 1 gives 9 (its 8 is dropped), then image 0's 8, image 2's 7, image 3's 5;
    # concept 1: image 4 twice at 3, the smaller position kept
    assert _top_distinct(concept, strength, image, position, 2, 3).tolist() == [[0, 6, 2], [5, -1, -1]]
    assert top_per_group(concept, strength, (image, position), 2, 3).tolist() == [[0, 6, 1], [5, 4, -1]]
    assert _top_distinct(concept[:0], strength[:0], image[:0], position[:0], 2, 3).tolist() == [[-1] * 3] * 2


def test_members_are_the_strongest_codes_over_the_decomposed_images(tmp_path):
    # Brute force over every code of every processed image of the decomposed units gives the
    # same members, in the same order (two store units: the merge is exercised). With distinct
    # images (the default), each image gives a concept at most its strongest position.
    distinct = True
    config = toy_config("atlas.members=5", "atlas.examples=6", "decompose.images=32")
    store = RunStore.open(pipeline.run(config, tmp_path / "run.zarr", until="members").url)
    g = zgroup(store)
    status = g["meta/status"][...]
    atlas = store.family(AtlasSection, "bisecting_kmeans")
    for tap in store.taps:
        index = g[f"codes/bisecting_kmeans/{tap}/index"][:32]
        value = g[f"codes/bisecting_kmeans/{tap}/value"][:32]
        k = store.family(ConceptsSection, "bisecting_kmeans").count(tap)
        candidates: list[list[tuple]] = [[] for _ in range(k)]
        for i in np.flatnonzero(status[:32] == PROCESSED):
            for p, s in zip(*np.nonzero(index[i] >= 0)):
                candidates[index[i, p, s]].append((-float(value[i, p, s]), int(i), int(p)))
        members = atlas.members(tap)
        usage = atlas.usage(tap)
        shown_distinct = 0
        for c in range(k):
            ranked = sorted(candidates[c])
            if distinct:  # the first (strongest, then smallest position) of each image
                ranked = [b for j, b in enumerate(ranked) if b[1] not in {a[1] for a in ranked[:j]}]
            best = ranked[:5]
            shown_distinct += len({b[1] for b in best}) == len(best)
            assert members["image"][c][: len(best)].tolist() == [b[1] for b in best], (tap, c)
            assert members["position"][c][: len(best)].tolist() == [b[2] for b in best]
            np.testing.assert_array_equal(members["value"][c][: len(best)], [-b[0] for b in best])
            assert (members["image"][c][len(best):] == -1).all()
            assert usage[c] == len(candidates[c])
            # random examples: the uses with the smallest hash of (concept, image, position), in
            # that order; the histogram counts every use's code on the fixed bins
            sample, counts = atlas.examples(tap, c)
            uses = np.asarray([(b[1], b[2]) for b in candidates[c]], dtype=np.int64).reshape(-1, 2)
            hashes = example_hash(np.full(len(uses), c), uses[:, 0], uses[:, 1])
            first = uses[np.argsort(hashes, kind="stable")[:6]]
            chosen = sample["image"] >= 0
            assert chosen.sum() == min(6, len(uses))
            assert sample["image"][chosen].tolist() == first[:, 0].tolist(), (tap, c)
            assert sample["position"][chosen].tolist() == first[:, 1].tolist()
            by_use = {(b[1], b[2]): -b[0] for b in candidates[c]}
            assert sample["value"][chosen].tolist() == [by_use[(i, p)] for i, p in first.tolist()]
            values = np.asarray([-b[0] for b in candidates[c]])
            bins = np.searchsorted(HISTOGRAM_EDGES, values, side="right")
            assert counts.tolist() == np.bincount(bins, minlength=HISTOGRAM_BINS).tolist()
        if distinct:
            assert shown_distinct == k


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory):
    config = toy_config("atlas.members=4", "atlas.crop=24", "decompose.images=32")
    return RunStore.open(pipeline.run(config, tmp_path_factory.mktemp("atlas") / "run.zarr", until="atlas").url)


def test_atlas_crops_every_member_and_only_members(atlas_run):
    store, atlas = atlas_run, atlas_run.family(AtlasSection, "bisecting_kmeans")
    seen_rows = []
    for tap in store.taps:
        members, rows = atlas.members(tap), atlas.rows(tap)
        assert ((rows >= 0) == (members["image"] >= 0)).all()
        seen_rows += rows[rows >= 0].tolist()
        valid = rows[rows >= 0]
        crops, boxes, kinds = (atlas.read_crops(name, valid) for name in ("crop", "box", "kind"))
        assert crops.shape[1:] == (24, 24, 3) and (crops.reshape(len(valid), -1).max(1) > 0).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (boxes >= 0).all(1)).all()
        assert ((boxes[:, 2] - boxes[:, 0]) == (boxes[:, 3] - boxes[:, 1])).all()  # square
        assert set(kinds.tolist()) == {"srd"}  # the toy model's taps are residual block outputs
        # A thumbnail is the mean of its concept's crops; the toy part masses are iERF mass (1 each).
        c = int(np.flatnonzero((rows >= 0).all(1))[0])
        mine = atlas.read_crops("crop", rows[c]).astype(np.float64)
        np.testing.assert_array_equal(atlas.thumbs(tap, c), np.round(mine.mean(0)).astype(np.uint8))
        mass = atlas.part_mass(tap)
        np.testing.assert_allclose(mass.sum(1), (rows >= 0).sum(1), rtol=1e-4)
    # Rows are each used once, and each unit's rows lie in its own shard.
    assert len(seen_rows) == len(set(seen_rows))
    # Each unit's shard holds whole inner chunks of CROPS_PER_CHUNK crops (a shard of one-crop
    # chunks wrote and read scattered rows about 10x slower).
    crop = store.array("atlas/bisecting_kmeans/crops/crop")
    assert atlas.capacity() % CROPS_PER_CHUNK == 0 and crop.chunks[0] == CROPS_PER_CHUNK


def test_a_crop_shows_its_members_ierf(atlas_run):
    """One member recomputed by hand: the iERF of its PFV by SRD, the crop around it."""
    import torch

    from gig_dist import open_run
    from gig_dist.config import Config
    from gig_dist.kernels.crops import member_crop
    from gig_dist.kernels.ierf import ierf
    from gig_dist.models.loading import build_model

    store, atlas = atlas_run, atlas_run.family(AtlasSection, "bisecting_kmeans")
    config = Config.model_validate(store.manifest.config)
    tap = "layer2.1"
    members, rows = atlas.members(tap), atlas.rows(tap)
    image, position, row = int(members["image"][3, 0]), int(members["position"][3, 0]), int(rows[3, 0])
    run = open_run(store.url)
    picture = run.image(image)
    x = torch.from_numpy(((picture.transpose(2, 0, 1) - np.asarray(run.store.manifest.transform["mean"])[:, None, None])
                          / np.asarray(run.store.manifest.transform["std"])[:, None, None]).astype(np.float32))
    maps, kind = ierf(build_model(config.model), x[None], tap, torch.tensor([[position]]))
    expected, box = member_crop(picture, maps[0, 0].numpy(), 24, 8)
    assert kind == "srd" and tuple(atlas.read_crops("box", [row])[0]) == box
    assert np.abs(atlas.read_crops("crop", [row])[0].astype(int) - expected.astype(int)).max() <= 2
    # the heat map: the iERF's positive mass over the whole input, area-averaged to 32 x 32
    mass = np.clip(maps[0, 0].numpy(), 0, None)
    side = mass.shape[0] // 32
    blocks = mass.reshape(32, side, 32, side).mean((1, 3))
    heat = atlas.read_crops("heat", [row])[0].astype(float)
    assert heat.max() == 255 and np.abs(heat - 255 * blocks / blocks.max()).max() <= 1.0


@pytest.mark.slow  # a resume check of about half a minute, beside the run-wide ones; `pytest -m slow` runs it
def test_sigkill_during_the_atlas_then_resume_gives_the_same_store(tmp_path):
    """The atlas's units are killed after writing their shard but before committing it; the
    rerun redoes exactly those and the store equals the uninterrupted one, byte for byte."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import TOY_BASE, assert_stores_equal

    out = tmp_path / "killed.zarr"
    args = [sys.executable, "-m", "gig_dist.cli", "run", "--out", str(out), "--until", "atlas"]
    for kv in (*TOY_BASE, "atlas.members=4", "atlas.crop=24", "decompose.images=32", "runtime.torch_threads=2"):
        args += ["-o", kv]
    killed = subprocess.run(args, env=dict(os.environ, GIG_DIST_FAILPOINT="atlas.before_commit:2"),
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "bisecting_kmeans/atlas       resume" in resumed.stdout
    reference = pipeline.run(toy_config("atlas.members=4", "atlas.crop=24", "decompose.images=32",
                                        "runtime.torch_threads=2"), tmp_path / "clean.zarr", until="atlas").url
    assert_stores_equal(reference, str(out))
