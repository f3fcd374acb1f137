"""The command line as a new user types it."""

import json
import subprocess
import sys

import pytest

from tests.conftest import GIG_LIGHT_CLI

CLI = [sys.executable, "-m", "gig_dist.cli"]


def run_cli(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.timeout(1800)  # 8-9 minutes alone on 2 cores; beside the other xdist worker, longer
def test_embedded_default_end_to_end(tmp_path):
    """`gig-dist run` with no arguments, then `gig-dist inspect`: the README's first steps."""
    done = run_cli("run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for stage in ("extract", "sample", "decompose"):
        line = next(line for line in lines if line.startswith(f"{stage}: "))
        assert line.startswith(f"{stage}: 16/16 units run in") and "1024 images (0 skipped" in line, line
    assert "toy world defaults: sample.per_image=24, decompose.lambda_rel=0.05, gig.images=64" in done.stdout
    assert "bisecting_kmeans/concepts    new     5 units" in done.stdout  # the plan, before any work
    assert any(line.startswith("concepts: 5/5 units run") for line in lines)
    # 5 pairs x the first unit of 64 images; 5 pairs x 1 reduce block
    assert any(line.startswith("attribute: 5/5 units run") for line in lines)
    assert any(line.startswith("reduce: 5/5 units run") for line in lines)
    assert "warning" not in done.stderr  # the toy defaults give every concept enough members
    # The run ends with its report, beside the store.
    assert any(line.startswith(f"report: {tmp_path / 'gig-dist-run.report' / 'index.html'}") for line in lines)
    assert "graphs: dot" in done.stdout and (tmp_path / "gig-dist-run.report" / "class" / "0.html").is_file()
    summary = json.loads(run_cli("inspect", str(tmp_path / "gig-dist-run.zarr"), "--json").stdout)
    assert all(stage["complete"] and not stage["stale"] for stage in summary["stages"].values()), summary["stages"]
    d = "bisecting_kmeans"
    assert list(summary["stages"]) == ["extract", "sample", *(f"{d}/{name}" for name in (
        "concepts", "decompose", "attribute", "reduce", "graphs", "members", "atlas"))]
    summary.update(summary["dictionaries"][d])
    # GIG on the first 64 images (the toy default), 5 pairs, 32 midpoint steps: completeness holds
    # to under 1 % on average for every pair.
    assert {tuple(g["pair"]) for g in summary["gig"].values()} == {
        ("layer1.0", "layer2.1"), ("layer2.1", "layer3.1"), ("layer1.0", "logits"), ("layer2.1", "logits"),
        ("layer3.1", "logits")}
    for key, g in summary["gig"].items():
        assert g["images"] == 64 and g["steps"] == 32 and g["mean_gap"] < 0.01, (key, g)
    assert summary["arrays"]["samples/layer3.1/vector"]["shape"] == [1024, 24, 256]
    # K = 8 x C from 24 samples per image: at least 10 members per concept on average, every tap.
    for tap, fit in summary["concepts"].items():
        assert fit["k"] == 8 * summary["taps"][tap][0] and fit["mean_members"] >= 10, (tap, fit)
    # The bar for the lambda default: R^2 >= 0.9 at a few percent l0 ratio, every tap.
    for tap, codes in summary["codes"].items():
        assert codes["pfvs"] == 1024 * summary["taps"][tap][1] * summary["taps"][tap][2]
        assert codes["r2"] >= 0.9 and 0 < codes["l0_ratio"] <= 0.05 and codes["truncated"] == 0, (tap, codes)
    assert summary["images"] == {"total": 1024, "processed": 1024, "skipped": 0, "pending": 0}
    assert summary["arrays"]["pfv/layer3.1/value"] == {
        **summary["arrays"]["pfv/layer3.1/value"], "shape": [1024, 64, 256], "dtype": "float16"
    }
    assert {p for p in summary["arrays"] if p.startswith("pfv/")} == {
        f"pfv/{t}/value" for t in ("layer1.0", "layer2.0", "layer2.1", "layer3.0", "layer3.1")
    }
    text = run_cli("inspect", str(tmp_path / "gig-dist-run.zarr")).stdout
    assert "extract                      complete" in text and "pfv/layer1.0/value" in text
    assert "R^2 0.9" in text and "K 2048   from 24576 samples (12.0 per concept" in text
    assert "layer2.1 -> layer3.1   matrix (1024, 2048)" in text
    graph = run_cli("graph", str(tmp_path / "gig-dist-run.zarr"), "--class", "0")
    assert graph.returncode == 0 and graph.stdout.startswith("class 0") and "layer3.1:" in graph.stdout
    # Readable by the ecosystem: xarray opens the whole run from its consolidated metadata.
    import warnings

    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # xarray warns when consolidated metadata is missing
        tree = xr.open_datatree(str(tmp_path / "gig-dist-run.zarr"), engine="zarr")
    assert tree["pfv/layer3.1/value"].dims == ("image", "position", "channel")
    assert tree[f"gig/{d}/layer3.1__logits/matrix"].dims == ("source_concept", "class")
    assert tree[f"codes/{d}/layer3.1/index"].sizes == {"image": 1024, "position": 64, "slot": 32}


def test_config_errors_exit_2_before_work(tmp_path):
    done = run_cli("run", "--out", str(tmp_path / "x.zarr"), "-o", "dataset.stride=0")
    assert done.returncode == 2
    assert "dataset.stride = 0" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_unknown_tap_exits_2_listing_valid_taps(tmp_path):
    done = run_cli("run", "--out", str(tmp_path / "x.zarr"), "-o", "taps=[layer9.9]")
    assert done.returncode == 2
    assert "unknown tap 'layer9.9'" in done.stderr and "layer1.0, layer2.0, layer2.1, layer3.0, layer3.1" in done.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_inspect_piped_into_head_stops_quietly(tmp_path):
    assert run_cli("run", "--out", str(tmp_path / "r.zarr"), "-o", "dataset.toy.num_images=4",
                   "--until", "sample").returncode == 0  # a store to inspect; its stages do not matter here
    done = subprocess.run(f"{sys.executable} -m gig_dist.cli inspect {tmp_path / 'r.zarr'} | head -n 1",
                          shell=True, capture_output=True, text=True)
    assert done.stdout.startswith("store") and "Traceback" not in done.stderr


def test_inspect_of_a_missing_store(tmp_path):
    done = run_cli("inspect", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "no run store at" in done.stderr


def test_taps_lists_resnet50_blocks_without_weights_or_data():
    done = run_cli("taps", "-o", "model.name=resnet50", "-o", "model.weights=none")
    assert done.returncode == 0, done.stderr
    assert "layer1.0                 256 x 56 x 56  (3136)" in done.stdout
    assert "layer4.2                 2048 x 7 x 7  (49)" in done.stdout


def test_config_prints_every_default():
    import yaml

    from gig_dist.config import load_config

    done = run_cli("config", "-o", "dataset.limit=5")
    assert done.returncode == 0
    printed = yaml.safe_load(done.stdout)
    expected = load_config(None, ["dataset.limit=5"]).to_dict()
    assert printed == expected  # every section and key, with its default (and the one override)
    assert printed["dataset"]["limit"] == 5 and printed["store"]["images_per_unit"] == 64
    assert printed["concepts"]["method"] == "bisecting_kmeans" and printed["gig"]["steps"] == 32


def test_errors_a_user_can_act_on_are_one_line_without_a_traceback(tmp_path):
    """A read-only or impossible --out, an unreachable Ray address and an empty weights file each
    used to print a traceback (or an empty reason); the store is never created."""
    import socket

    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    small = ["-o", "dataset.toy.num_images=4", "--until", "extract"]
    cases = [
        (["--out", "/proc/gig-dist-run.zarr"], "--out /proc/gig-dist-run.zarr: cannot write the run store there"),
        (["--out", str(tmp_path / "a_file" / "run.zarr")], "cannot write the run store there (Not a directory)"),
        (["--out", str(tmp_path / "r.zarr"), "--ray-address", f"127.0.0.1:{closed}"],
         f"runtime.address = 127.0.0.1:{closed}: no Ray cluster answers there (Connection refused)"),
        (["--out", str(tmp_path / "r.zarr"), "-o", f"model.weights={tmp_path / 'empty.pt'}"],
         "is empty (0 bytes); was its download or copy interrupted?"),
    ]
    for args, message in cases:
        done = run_cli("run", *args, *small)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r.zarr").exists()


def test_a_second_driver_on_a_live_run_refuses_naming_the_first(tmp_path):
    """Two `gig-dist run` on one --out both did all the work, and --overwrite wiped a live run."""
    import time

    out = str(tmp_path / "run.zarr")
    # 64 images keep the first run busy while the second starts twice; GIG light (the lease is what matters)
    args = ["run", "--out", out, "-o", "dataset.toy.num_images=64", "-o", "concepts.k_multiplier=0.25",
            *GIG_LIGHT_CLI, "-o", "runtime.progress=false"]
    first = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run.zarr" / "gig-dist.lease").exists():
            assert time.time() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        for extra in ([], ["--overwrite"]):
            second = run_cli(*args, *extra)
            assert second.returncode == 2, second.stderr
            assert f"in use by another gig-dist run: pid {first.pid} on host" in second.stderr, second.stderr
        stdout, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    records = sorted((tmp_path / "run.zarr" / "gig-dist.lease").iterdir())
    assert [json.loads(r.read_text())["released"] for r in records] == [True]  # given back at the end
    assert "graphs: 1/1 units run" in stdout


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_paused_driver_whose_lease_was_taken_over_stops_without_writing(tmp_path):
    """Driver A stops (as under Ctrl-Z) between a unit's data and its commit; B, with another
    sampling seed, takes the stale lease over and finishes; A, continued, must write nothing more
    and say so in one line, and the store must be exactly B's uninterrupted run."""
    import os
    import signal
    import time

    from tests.conftest import assert_stores_equal

    args = ["-o", "dataset.toy.num_images=32", "-o", "store.images_per_unit=16", "-o", "concepts.k_multiplier=0.25",
            *GIG_LIGHT_CLI, "-o", "runtime.progress=false", "-o", "store.lease_timeout_s=3"]
    out = tmp_path / "run.zarr"
    a = subprocess.Popen([*CLI, "run", "--out", str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "GIG_DIST_FAILPOINT": "sample.before_commit:2:stop"})
    try:
        deadline = time.time() + 300
        while open(f"/proc/{a.pid}/stat").read().split(") ")[1][0] != "T":  # A stopped itself
            assert time.time() < deadline and a.poll() is None, a.communicate()
            time.sleep(0.1)
        time.sleep(3.5)  # A's heartbeat is now older than its lease timeout
        b = run_cli("run", "--out", str(out), *args, "-o", "sample.seed=1")
        assert b.returncode == 0, b.stderr
        assert "taking over the lease of pid" in b.stderr and f"pid {a.pid}" in b.stderr, b.stderr
        before = _files(out)
        os.kill(a.pid, signal.SIGCONT)
        _, stderr = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 2, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"gig-dist: error: {out}: this run lost its lease "
                                                      "(generation 1; the store's is now 2"), stderr
    assert "Traceback" not in stderr
    assert _files(out) == before  # A wrote nothing after it was continued
    reference = run_cli("run", "--out", str(tmp_path / "b.zarr"), *args, "-o", "sample.seed=1")
    assert reference.returncode == 0, reference.stderr
    assert_stores_equal(str(tmp_path / "b.zarr"), str(out))


@pytest.mark.parametrize(("out", "message"), [
    ("/", "--out /: cannot write the run store there: / is the filesystem's root"),
    ("~", "is your home folder"),
    ("/usr", "--out /usr: cannot write the run store there: /usr is a system folder"),
    ("root-link", "--out /: cannot write the run store there: / is the filesystem's root"),  # checked resolved
    ("memory://", "names no bucket or folder"),
])
def test_an_out_that_is_a_root_home_or_system_folder_is_refused_before_anything_is_written(tmp_path, out, message):
    """``--out /`` from an empty folder wrote zarr.json, meta, pfv and progress into /."""
    import os

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    os.symlink("/", work / "root-link")
    before = sorted(os.listdir("/"))
    done = subprocess.run([*CLI, "run", "-o", "dataset.toy.num_images=4", "--until", "extract", "--out", out],
                          capture_output=True, text=True, cwd=work, env={**os.environ, "HOME": str(home)})
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(os.listdir("/")) == before and os.listdir(home) == [] and os.listdir(work) == ["root-link"]


@pytest.mark.parametrize(("model", "first", "layout"), [
    ("timm:tf_efficientnet_lite0", "blocks.0                 16 x 112 x 112  (12544)  nchw", "nchw"),
    ("timm:vit_small_patch16_224", "blocks.0                 384 x 14 x 14  (196)  tokens, 1 prefix", "tokens"),
])
def test_taps_lists_the_blocks_of_timm_models(model, first, layout):
    done = run_cli("taps", "-o", f"model.name={model}", "-o", "model.weights=none")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].strip() == first.strip() and all(line.strip().startswith("blocks.") for line in lines[1:])
    assert len(lines) - 1 == (7 if "efficientnet" in model else 12)


def test_taps_of_a_model_without_blocks_says_why_and_fails():
    done = run_cli("taps", "-o", "model.name=vgg11", "-o", "model.weights=none")
    assert done.returncode == 1
    assert "VGG has no residual blocks that gig-dist recognises and no trunk of blocks" in done.stderr
    assert "features                 512 x 7 x 7  (49)  nchw" in done.stderr
    every = run_cli("taps", "--all", "-o", "model.name=vit_b_16", "-o", "model.weights=none")
    assert any(line.split() == ["encoder.layers.encoder_layer_0.self_attention", "-", "(outputs", "a", "tuple,",
                                "not", "a", "tensor)"] for line in every.stdout.splitlines())
