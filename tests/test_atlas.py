"""The concept atlas: each concept's top members over the decomposed images."""

import numpy as np
import pytest

from gig_dist import pipeline
from gig_dist.kernels.topk import top_per_group
from gig_dist.store import PROCESSED, RunStore
from tests.conftest import toy_config, zgroup


@pytest.mark.fast
def test_top_per_group_orders_by_value_then_ties():
    groups = np.array([0, 0, 0, 1, 1, 2, 0])
    values = np.array([1.0, 3.0, 3.0, 2.0, 5.0, 1.0, 0.5])
    image = np.array([5, 9, 2, 0, 0, 1, 1])
    entry = top_per_group(groups, values, (image,), 4, 2)
    assert entry.tolist() == [[2, 1], [4, 3], [5, -1], [-1, -1]]


def test_members_are_the_strongest_codes_over_the_decomposed_images(tmp_path):
    # Brute force over every code of every processed image of the decomposed units gives the
    # same members, in the same order (two store units: the merge is exercised).
    config = toy_config("atlas.members=5", "decompose.images=32")
    store = RunStore.open(pipeline.run(config, tmp_path / "run.zarr", until="members").url)
    g = zgroup(store)
    status = g["meta/status"][...]
    atlas = store.atlas("bisecting_kmeans")
    for tap in store.taps:
        index = g[f"codes/bisecting_kmeans/{tap}/index"][:32]
        value = g[f"codes/bisecting_kmeans/{tap}/value"][:32]
        k = store.concepts("bisecting_kmeans").count(tap)
        candidates: list[list[tuple]] = [[] for _ in range(k)]
        for i in np.flatnonzero(status[:32] == PROCESSED):
            for p, s in zip(*np.nonzero(index[i] >= 0)):
                candidates[index[i, p, s]].append((-float(value[i, p, s]), int(i), int(p)))
        members = atlas.members(tap)
        usage = atlas.usage(tap)
        for c in range(k):
            best = sorted(candidates[c])[:5]
            assert members["image"][c][: len(best)].tolist() == [b[1] for b in best], (tap, c)
            assert members["position"][c][: len(best)].tolist() == [b[2] for b in best]
            np.testing.assert_array_equal(members["value"][c][: len(best)], [-b[0] for b in best])
            assert (members["image"][c][len(best):] == -1).all()
            assert usage[c] == len(candidates[c])
