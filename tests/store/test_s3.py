"""Object storage for real: images read from an S3 bucket and the store written to one, on moto's
S3 server on loopback (the API s3fs speaks to AWS): kills and resumes, foreign objects, two
drivers, and another process reading the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gig_dist import pipeline
from gig_dist.store import MetaSection, RunStore, StoreError
from gig_dist.toy.world import CLASS_NAMES, render
from tests.conftest import GIG_LIGHT_CLI, assert_stores_equal

CLI = [sys.executable, "-m", "gig_dist.cli"]
RUN = ["-o", "dataset.kind=imagefolder", "-o", "store.images_per_unit=8", "-o", "store.images_per_chunk=4",
       "-o", "extract.batch_size=4", "-o", "concepts.k_multiplier=0.25", "-o", "runtime.progress=false",
       "-o", "runtime.torch_threads=1", "-o", "sample.per_image=24", *GIG_LIGHT_CLI]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """24 toy-world scenes as PNG files in class folders, as a user's ImageFolder holds them."""
    root = tmp_path_factory.mktemp("s3data") / "images"
    for index in range(24):
        image, _, label = render(7, index, 64)
        (root / CLASS_NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(root / CLASS_NAMES[label] / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def bucket(s3_server, photo_folder) -> str:
    """A bucket holding the images under ``images/``."""
    import s3fs

    # A new bucket each time the module's fixtures are set up (xdist may interleave modules).
    name = f"gig-dist-e2e-{uuid.uuid4().hex[:8]}"
    url = s3_server.bucket(name)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key="testing", secret="testing")
    fs.put(str(photo_folder), f"{name}/images", recursive=True)
    return url


def _cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs)


@pytest.mark.timeout(900)
def test_a_run_from_a_bucket_into_a_bucket_killed_twice_resumes_to_the_local_runs_arrays(
        s3_server, bucket, photo_folder, tmp_path):
    local = _cli("run", "--out", str(tmp_path / "local.zarr"), "-o", f"dataset.path={photo_folder}", *RUN)
    assert local.returncode == 0, local.stderr[-2000:]
    url = f"{bucket}/runs/r.zarr"
    args = ("run", "--out", url, "-o", f"dataset.path={bucket}/images", *RUN)
    for failpoint in ("extract.before_commit:2", "attribute.before_commit:1"):  # killed in two stages
        killed = _cli(*args, env={"GIG_DIST_FAILPOINT": failpoint, **s3_server.env})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = _cli(*args, env=s3_server.env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "extract                      keep" in done.stdout and "bisecting_kmeans/attribute   resume" in done.stdout
    import fsspec

    mirror = tmp_path / "mirror.zarr"  # the bucket's store, copied down to compare array by array
    fsspec.filesystem("s3").get(url.removeprefix("s3://"), str(mirror), recursive=True)
    assert_stores_equal(str(tmp_path / "local.zarr"), str(mirror), ignore=("meta/path",))
    paths = [str(p) for p in RunStore.open(url).family(MetaSection).read_index(RunStore.open(url).units()[0])[0]]
    assert all(p.startswith(f"{bucket}/images/") for p in paths)

    # Another process reads the bucket's run: inspect, the report and open_run.
    summary = json.loads(_cli("inspect", url, "--json", env=s3_server.env).stdout)
    assert all(stage["complete"] for stage in summary["stages"].values()) and summary["images"]["processed"] == 24
    report = _cli("report", url, "--out", str(tmp_path / "site"), env=s3_server.env)
    assert report.returncode == 0 and (tmp_path / "site" / "index.html").is_file(), report.stderr[-2000:]
    code = ("from gig_dist import open_run; r = open_run(%r); print(r.num_images, tuple(r.image(3).shape), "
            "r.code_maps('layer3.1', 0).shape[1:])" % url)
    read = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **s3_server.env})
    assert read.stdout.strip() == "24 (64, 64, 3) (8, 8)", read.stderr[-2000:]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_bucket_prefix_holding_a_foreign_object_is_refused_and_nothing_is_deleted(s3_server, bucket, overwrite):
    import fsspec

    from tests.conftest import toy_config

    fs = fsspec.filesystem("s3")
    prefix = f"{bucket.removeprefix('s3://')}/foreign-{overwrite}"
    fs.pipe(f"{prefix}/results.csv", b"keep,me\n")
    with pytest.raises(StoreError, match=r"not a gig-dist run store \(results.csv\)"):
        pipeline.run(toy_config("dataset.toy.num_images=4"), f"s3://{prefix}", overwrite=overwrite, until="extract")
    fs.invalidate_cache()
    assert fs.find(prefix) == [f"{prefix}/results.csv"] and fs.cat_file(f"{prefix}/results.csv") == b"keep,me\n"


def test_a_second_driver_on_a_bucket_store_refuses_naming_the_first(s3_server, bucket):
    from gig_dist.store.lease import Lease

    url = f"{bucket}/leased.zarr"
    with Lease.acquire(url):
        with pytest.raises(StoreError, match=f"in use by another gig-dist run: pid {os.getpid()} on host"):
            Lease.acquire(url)


def test_a_missing_filesystem_package_is_one_line_naming_the_extra(tmp_path):
    done = _cli("inspect", "gs://some-bucket/run.zarr")
    assert done.returncode == 2 and done.stderr.strip() == (
        "gig-dist: error: gs://some-bucket/run.zarr: gs:// needs gcsfs: pip install 'gig-dist[gcs]'"), done.stderr
