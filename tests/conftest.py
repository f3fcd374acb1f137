"""Shared fixtures. Tests run on tiny toy-world configs; nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gig_dist.config import Config, load_config

# Ray (later tests) must bind to loopback on these machines.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def toy_config(*overrides: str) -> Config:
    """A small, quiet toy-world run; overrides as on the command line."""
    base = (
        "dataset.toy.num_images=40",
        "store.images_per_unit=16",
        "store.images_per_chunk=4",
        "extract.batch_size=8",
        "runtime.progress=false",
        "runtime.device=cpu",
    )
    return load_config(None, [*base, *overrides])


def assert_stores_equal(url_a: str, url_b: str) -> None:
    """Every array of two run stores holds the same values (NaN equal to NaN)."""
    import zarr

    a, b = zarr.open_group(url_a, mode="r"), zarr.open_group(url_b, mode="r")
    arrays_a = {p: n for p, n in a.members(max_depth=None) if isinstance(n, zarr.Array)}
    arrays_b = {p: n for p, n in b.members(max_depth=None) if isinstance(n, zarr.Array)}
    assert sorted(arrays_a) == sorted(arrays_b)
    for path, array in arrays_a.items():
        left, right = array[...], arrays_b[path][...]
        assert left.dtype == right.dtype, path
        if left.dtype.kind == "f":
            assert np.array_equal(left, right, equal_nan=True), f"{path} differs"
        else:
            assert (left == right).all(), f"{path} differs"


@pytest.fixture
def small_config() -> Config:
    return toy_config()
