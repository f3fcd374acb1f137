"""The lease: one driver per run, taken with an atomic create, with a fencing generation that stops
a driver (and its workers) once another took the store over. On local disk, on ``memory://`` and
on a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from gig_dist.store import ArraySpec, LeaseLost, RunStore, StoreError
from gig_dist.store.lease import LEASE_DIR, Fence, Lease
from tests.store.test_store import make_store


def _plant(url: str, generation: int = 1, **fields) -> str:
    """A lease record of another driver, as that driver would have written it."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(f"{root}/{LEASE_DIR}", exist_ok=True)
    record = {"host": "elsewhere", "pid": 4242, "token": "t", "started": time.time(), "heartbeat": time.time(),
              "timeout_s": 60.0, "generation": generation, "released": False, **fields}
    path = f"{root}/{LEASE_DIR}/{generation:012d}"
    fs.pipe_file(path, json.dumps(record).encode())
    return path


def _records(url: str) -> dict[int, dict]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(f"{root}/{LEASE_DIR}")
    if not fs.isdir(f"{root}/{LEASE_DIR}"):
        return {}
    return {int(p.rsplit("/", 1)[-1]): json.loads(fs.cat_file(p)) for p in fs.ls(f"{root}/{LEASE_DIR}", detail=False)
            if p.rsplit("/", 1)[-1].isdigit()}


@pytest.mark.fast
@pytest.mark.parametrize("where", ["memory://bucket/leased", "local"])
def test_a_live_lease_of_another_driver_is_refused_naming_it(tmp_path, where):
    url = str(tmp_path / "run.zarr") if where == "local" else where
    _plant(url)
    with pytest.raises(StoreError, match=r"in use by another gig-dist run: pid 4242 on host elsewhere"):
        Lease.acquire(url)
    assert list(_records(url)) == [1] and _records(url)[1]["pid"] == 4242  # untouched, no generation 2


@pytest.mark.fast
def test_a_stale_lease_is_taken_over_with_the_next_generation_saying_so(tmp_path):
    url = str(tmp_path / "run.zarr")
    _plant(url, heartbeat=time.time() - 10, timeout_s=5.0)
    with pytest.warns(UserWarning, match=r"taking over the lease of pid 4242 on host elsewhere .*generation 1\): its "
                                         r"last heartbeat was 10 s ago"):
        lease = Lease.acquire(url, timeout_s=0.3)
    assert lease.generation == 2 and lease.read()["token"] == lease.record["token"]
    lease.release()
    assert _records(url)[2]["released"] is True and _records(url)[1]["pid"] == 4242


@pytest.mark.fast
def test_a_released_lease_is_taken_without_a_word_and_generations_only_grow(tmp_path):
    url = str(tmp_path / "run.zarr")
    generations = []
    for _ in range(4):
        with Lease.acquire(url) as lease:
            generations.append(lease.generation)
    assert generations == [1, 2, 3, 4]
    assert sorted(_records(url)) == [3, 4] and all(r["released"] for r in _records(url).values())  # older pruned


@pytest.mark.fast
def test_a_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    url = str(tmp_path / "run.zarr")
    _plant(url, host=socket.gethostname(), pid=int(done.stdout))  # a process that has exited
    with pytest.warns(UserWarning, match="its process is gone"):
        Lease.acquire(url).release()


@pytest.mark.fast
def test_an_unreadable_record_counts_as_live_until_its_timeout(tmp_path):
    url = str(tmp_path / "run.zarr")
    path = (tmp_path / "run.zarr" / LEASE_DIR / f"{1:012d}")
    path.parent.mkdir(parents=True)
    path.write_text("{ torn")
    with pytest.raises(StoreError, match="an unknown driver"):
        Lease.acquire(url, timeout_s=0.3)
    os.utime(path, (time.time() - 1, time.time() - 1))
    with pytest.warns(UserWarning, match="it cannot be read"):
        Lease.acquire(url, timeout_s=0.3).release()


@pytest.mark.fast
def test_the_lease_file_of_gig_dist_before_generations_is_refused_while_live_and_replaced_once_stale(tmp_path):
    """A store a driver of the earlier gig-dist holds (or was killed holding) has one file,
    ``gig-dist.lease``, where the records' folder goes."""
    url = str(tmp_path / "run.zarr")
    (tmp_path / "run.zarr").mkdir()
    legacy = tmp_path / "run.zarr" / LEASE_DIR
    legacy.write_text(json.dumps({"host": "elsewhere", "pid": 7, "token": "x", "heartbeat": time.time()}))
    with pytest.raises(StoreError, match="pid 7 on host elsewhere"):
        Lease.acquire(url)
    legacy.write_text(json.dumps({"host": "elsewhere", "pid": 7, "token": "x", "heartbeat": time.time() - 600}))
    with pytest.warns(UserWarning, match="pid 7 on host elsewhere .*last heartbeat was 600 s ago"):
        lease = Lease.acquire(url)
    assert lease.generation == 1 and legacy.is_dir()
    lease.release()


@pytest.mark.fast
def test_the_lease_does_not_make_a_prefix_foreign_and_survives_overwrite(tmp_path):
    url = str(tmp_path / "run.zarr")
    lease = Lease.acquire(url)
    assert RunStore.inspect_prefix(url) == ("empty", [])
    make_store(url)
    assert RunStore.inspect_prefix(url) == ("ours", [])
    assert RunStore.claim(url, overwrite=True, fence=lease.fence) is False
    assert lease.read()["token"] == lease.record["token"] and RunStore.inspect_prefix(url) == ("empty", [])
    lease.release()


@pytest.mark.fast
def test_release_stops_the_heartbeat_before_it_marks_the_record(tmp_path):
    """A heartbeat racing release() wrote the lease back after it was removed (1 of 22 resumes
    left one behind): release now joins the heartbeat thread first."""
    url = str(tmp_path / "run.zarr")
    for _ in range(30):
        lease = Lease.acquire(url, timeout_s=0.012)  # a heartbeat every 2 ms
        time.sleep(0.005)
        lease.release()
        assert not lease._thread.is_alive() and lease.read()["released"] is True


@pytest.mark.fast
def test_a_taken_over_driver_and_its_workers_write_nothing_more(tmp_path):
    url = str(tmp_path / "run.zarr")
    first = Lease.acquire(url, timeout_s=0.3)
    store = make_store(url)
    store = RunStore.open(url, mode="r+", fence=first.fence)
    store.ensure_arrays("s", [ArraySpec("s/x", (10,), "int8", ("image",), (4,))])
    worker = RunStore.open(url, mode="r+", fence=Fence(url, first.generation, 0.1), role="worker")
    first._stop.set()  # the driver stalls: no more heartbeats (as under SIGSTOP)
    first._thread.join()
    time.sleep(0.35)
    with pytest.warns(UserWarning, match="last heartbeat"):
        second = Lease.acquire(url, timeout_s=0.3)
    assert second.generation == first.generation + 1
    before = {p: (tmp_path / "run.zarr" / p).read_bytes() for p in ("zarr.json", "s/x/zarr.json")}
    for write in (lambda: store.section("s").write("x", store.units()[0], np.ones(4, dtype=np.int8)),
                  lambda: worker.section("s").write("x", worker.units()[0], np.ones(4, dtype=np.int8)),
                  store.save_manifest, lambda: store.mark_unit_done("s", 0), lambda: store.delete("s/x", "s"),
                  lambda: RunStore.claim(url, overwrite=True, fence=first.fence)):
        with pytest.raises(LeaseLost, match=rf"lost its lease \(generation {first.generation}; the store's is now "
                                            rf"{second.generation}, held by pid {os.getpid()}"):
            write()
    assert not (tmp_path / "run.zarr" / "s" / "x" / "c").exists()
    assert before == {p: (tmp_path / "run.zarr" / p).read_bytes() for p in before}
    first.release()  # gives back nothing: the lease is not its own
    assert _records(url)[second.generation]["released"] is False
    second.release()


def _acquire_at(args: tuple[str, float, dict]) -> tuple[int, str]:
    """In a separate process: wait for a common start time, then try to take the lease."""
    url, start, env = args
    os.environ.update(env)
    if env.get("FSSPEC_S3_ENDPOINT_URL"):
        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]
    fs = fsspec.core.url_to_fs(url)[0]
    fs.invalidate_cache()
    time.sleep(max(0.0, start - time.time()))
    try:
        lease = Lease.acquire(url)
    except StoreError as exc:
        return 0, str(exc)
    time.sleep(0.2)  # hold it while the others try
    lease.release()
    return 1, f"generation {lease.generation}"


def _simultaneous_starts(urls: list[str], env: dict[str, str], drivers: int = 4) -> list[int]:
    with multiprocessing.get_context("spawn").Pool(drivers) as pool:
        pool.map(_acquire_at, [(f"{urls[0]}-warmup-{i}", 0.0, env) for i in range(drivers)])  # imports done
        holders = []
        for url in urls:
            start = time.time() + 0.3
            results = pool.map(_acquire_at, [(url, start, env)] * drivers)
            holders.append(sum(held for held, _ in results))
            assert all(held or "in use by another gig-dist run" in why for held, why in results), results
    return holders


@pytest.mark.timeout(300)
def test_simultaneous_starts_on_local_disk_give_one_holder_every_time(tmp_path):
    holders = _simultaneous_starts([str(tmp_path / f"run-{trial}.zarr") for trial in range(20)], {})
    assert holders == [1] * 20


@pytest.mark.timeout(300)
def test_simultaneous_starts_on_s3_give_one_holder_every_time(s3_server):
    bucket = s3_server.bucket("simultaneous")
    holders = _simultaneous_starts([f"{bucket}/run-{trial}.zarr" for trial in range(20)], s3_server.env)
    assert holders == [1] * 20
