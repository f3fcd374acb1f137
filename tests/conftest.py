"""Shared fixtures. Tests run on tiny toy-world configs; nothing is downloaded."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gig_dist.config import Config, load_config

# Ray binds to loopback on these machines only with this set. Token auth is explicit for the
# test head and every client (this process, the CLI and `ray job submit` in subprocesses), which
# read the token from ~/.ray/auth_token; Ray reads the mode once, at import, so it is set here.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# `ray start` with token auth refuses to start without a token, and a fresh machine (CI) has no
# ~/.ray/auth_token: give this test session a random one of its own, which every subprocess inherits.
if "RAY_AUTH_TOKEN" not in os.environ and not (Path.home() / ".ray" / "auth_token").exists():
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


#: GIG on the first unit only, 4 target concepts, 8 steps: a few seconds instead of minutes.
GIG_LIGHT = ("gig.images=1", "gig.targets=4", "gig.steps=8",
             "atlas.members=2",  # the atlas's own tests ask for more
             "report.enabled=false")  # the report's own tests build one
GIG_LIGHT_CLI = [arg for kv in GIG_LIGHT for arg in ("-o", kv)]


def toy_config(*overrides: str) -> Config:
    """A small, quiet toy-world run; overrides as on the command line."""
    return load_config(None, [*TOY_BASE, *overrides])


TOY_BASE = (
    "dataset.toy.num_images=40",
    "store.images_per_unit=16",
    "store.images_per_chunk=4",
    "extract.batch_size=8",
    "runtime.progress=false",
    "runtime.device=cpu",
    "concepts.k_multiplier=0.25",  # K = C / 4: 16-64 concepts from 960 samples
    *GIG_LIGHT,
)


def zgroup(store_or_url, mode: str = "r"):
    """The run's Zarr group as plain zarr sees it (tests read the layout as a user of zarr would,
    and damage it on purpose with ``mode="r+"``)."""
    import zarr

    url = store_or_url if isinstance(store_or_url, (str, os.PathLike)) else store_or_url.url
    return zarr.open_group(str(url), mode=mode, use_consolidated=False)


def assert_stores_equal(url_a: str, url_b: str, float_rtol: float = 0.0, ignore: tuple[str, ...] = ()) -> None:
    """Every array of two run stores holds the same values (NaN equal to NaN); floats bitwise,
    or within ``float_rtol`` relative (plus the same absolute amount near zero). Arrays under
    the ``ignore`` prefixes are left out."""
    import zarr

    a, b = zgroup(url_a), zgroup(url_b)
    arrays_a = {p: n for p, n in a.members(max_depth=None) if isinstance(n, zarr.Array) and not p.startswith(ignore)}
    arrays_b = {p: n for p, n in b.members(max_depth=None) if isinstance(n, zarr.Array) and not p.startswith(ignore)}
    assert sorted(arrays_a) == sorted(arrays_b)
    for path, array in arrays_a.items():
        left, right = array[...], arrays_b[path][...]
        assert left.dtype == right.dtype, path
        if left.dtype.kind == "f" and float_rtol:
            assert np.allclose(left, right, rtol=float_rtol, atol=float_rtol, equal_nan=True), f"{path} differs"
        elif left.dtype.kind == "f":
            assert np.array_equal(left, right, equal_nan=True), f"{path} differs"
        else:
            assert (left == right).all(), f"{path} differs"


@pytest.fixture
def small_config() -> Config:
    return toy_config()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass(frozen=True)
class RayHead:
    address: str  # for ray.init / --ray-address
    dashboard: str  # for ray job submit


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One local Ray head for the whole test session, on loopback, with the job server; the test
    process is connected to it as a driver."""
    import ray

    gcs_port, dashboard_port = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", f"--port={gcs_port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        _wait_for_port(gcs_port, 60)
        _wait_for_port(dashboard_port, 60)
        ray.init(address=f"127.0.0.1:{gcs_port}", logging_level="WARNING")
        yield RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class S3Server:
    """An S3-compatible server (moto's) on loopback, and the environment a subprocess needs to
    reach it through ``s3://`` URLs."""

    endpoint: str
    env: dict[str, str]

    def bucket(self, name: str) -> str:
        """A new, empty bucket: its ``s3://`` URL."""
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing")
        fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port for the whole test session. Every ``s3://`` URL of
    this process and of its subprocesses (through the environment) reaches it."""
    import fsspec

    port = _free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "w")
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    saved = {key: os.environ.get(key) for key in env}
    try:
        _wait_for_port(port, 60)
        os.environ.update(env)
        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]
        yield S3Server(env["FSSPEC_S3_ENDPOINT_URL"], env)
    finally:
        fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Every test of the session's Ray head runs on one xdist worker (``--dist loadgroup``): a
    second head on the machine would be joined by a bare ``ray.init()`` and stopped by ``ray stop``."""
    for item in items:
        if "ray_head" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))
    # The longest tests start first, so that no worker is left with one of them at the end.
    items.sort(key=lambda item: item.name not in LONGEST)


#: The tests that run for minutes (the embedded default end to end, the S3 run killed twice).
LONGEST = {"test_embedded_default_end_to_end", "test_a_run_from_a_bucket_into_a_bucket_killed_twice_resumes_to_the_local_runs_arrays"}
