"""The Ray runtime: same arrays as in-process, exactly-once units when actors die, Ray jobs,
a simulated 2-node cluster, and the cluster launcher config."""

import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import ray
import yaml

from gig_dist import pipeline
from gig_dist.stages.attribute import AttributeStage
from gig_dist.stages.base import UnitFailed
from gig_dist.stages.extract import ExtractStage
from gig_dist.store import GIGSection, RunStore
from tests.conftest import GIG_LIGHT, REPO, assert_stores_equal, toy_config, zgroup

# One torch thread in every worker, in-process and on Ray: thread count changes float summation
# order, so bitwise equality across runtimes needs the same count (see runtime.torch_threads).
BASE = ("concepts.k_multiplier=0.25", *GIG_LIGHT, "dataset.toy.num_images=40", "store.images_per_unit=8",
        "store.images_per_chunk=4", "extract.batch_size=4", "runtime.torch_threads=1")


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    return pipeline.run(toy_config(*BASE), tmp_path_factory.mktemp("local") / "run.zarr").url


@pytest.fixture(scope="module")
def in_process_extract(tmp_path_factory):
    """The same run stopped after extraction: the tests that kill or spread extraction compare
    with it (the later stages have their own Ray tests; stopping there saves minutes of CI)."""
    return pipeline.run(toy_config(*BASE), tmp_path_factory.mktemp("local") / "run.zarr", until="extract").url


def ray_config(*extra):
    return toy_config(*BASE, "runtime.kind=ray", "runtime.num_workers=2", *extra)


def test_ray_equals_in_process(ray_head, in_process, tmp_path, capsys):
    report = pipeline.run(ray_config(), tmp_path / "ray.zarr")
    # Two worker processes serve all nine stages (a process per stage cost half a minute each).
    assert [s.workers_started for s in report.stages] == [2] + [0] * 8
    # GIG's projection from its first unit, on Ray too
    assert "attribute: the first unit's" in capsys.readouterr().err
    # the hosts ended (ray.kill is asynchronous: their CPUs come back within moments)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU") != ray.cluster_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")
    assert [(s.stage, s.units_run, s.images, s.retries) for s in report.stages][:8] == [
        ("extract", 5, 40, 0), ("sample", 5, 40, 0), ("concepts", 5, 0, 0), ("decompose", 5, 40, 0),
        ("attribute", 5, 40, 0), ("reduce", 5, 40, 0), ("graphs", 1, 0, 0), ("members", 5, 40, 0)]
    # the atlas: one unit per store unit, over the images that hold members
    assert [(s.stage, s.units_run, s.retries) for s in report.stages[8:]] == [("atlas", 5, 0)]
    assert_stores_equal(in_process, report.url)


def test_recomputed_pfvs_on_ray_equal_the_stored_run_in_process(ray_head, in_process, tmp_path):
    """extract.pfvs = recompute on 2 Ray workers: every stage that reads PFVs runs the forward
    pass again in its own actor, and every array is bitwise the in-process run's that stored
    them (one thread everywhere)."""
    report = pipeline.run(ray_config("extract.pfvs=recompute"), tmp_path / "ray.zarr")
    assert not [p for p, _ in zgroup(report.url).members(max_depth=None) if p.startswith("pfv")]
    assert_stores_equal(in_process, report.url, ignore=("pfv",))


def test_default_threads_agree_within_float16_rounding(ray_head, tmp_path):
    # In-process takes every core, a Ray actor one: the same values up to summation order.
    default = [kv for kv in BASE if not kv.startswith("runtime.torch_threads")]
    # Up to sampling: concepts fit to PFVs that differ by one ulp may legitimately differ.
    local = pipeline.run(toy_config(*default), tmp_path / "local.zarr", until="sample").url
    on_ray = pipeline.run(toy_config(*default, "runtime.kind=ray", "runtime.num_workers=2"), tmp_path / "ray.zarr",
                          until="sample").url
    assert_stores_equal(local, on_ray, float_rtol=2**-10)  # one float16 ulp


def test_actor_killed_mid_stage_its_unit_runs_again_and_lands_once(ray_head, in_process_extract, tmp_path):
    token = tmp_path / "killed-once"
    # The first actor to reach its 2nd unit's commit SIGKILLs itself after writing the unit's data.
    failpoint = f"runtime.env={{GIG_DIST_FAILPOINT: 'extract.before_commit:2@{token}'}}"
    report = pipeline.run(ray_config(failpoint), tmp_path / "ray.zarr", until="extract")
    assert token.exists(), "the actor was not killed"
    stage = report.stages[0]
    # The dead actor's units in flight (up to its two slots) ran again on its replacement.
    assert 1 <= stage.retries <= ExtractStage.worker_concurrency
    assert stage.units_run == 5 and stage.images == 40
    store = RunStore.open(report.url)
    assert store.done_units("extract").all()
    assert_stores_equal(in_process_extract, report.url)


def test_gig_split_by_steps_on_two_workers_with_one_killed_gives_the_same_matrices(ray_head, in_process, tmp_path):
    token = tmp_path / "killed-once"
    failpoint = f"runtime.env={{GIG_DIST_FAILPOINT: 'attribute.before_commit:2@{token}'}}"
    report = pipeline.run(ray_config(failpoint, "gig.step_chunks=2", "gig.targets_per_unit=2"), tmp_path / "ray.zarr")
    assert token.exists(), "the actor was not killed"
    attribute = next(s for s in report.stages if s.stage == "attribute")
    # 2 concept pairs x 2 step ranges x 2 target chunks, 3 class pairs x 2 step ranges; one image unit.
    assert attribute.retries >= 1 and attribute.units_run == 2 * 2 * 2 + 3 * 2
    local, on_ray = RunStore.open(in_process), RunStore.open(report.url)
    for key in local.family(GIGSection, "bisecting_kmeans").summary():
        left, right = zgroup(local)[f"gig/bisecting_kmeans/{key}/matrix"][...], zgroup(on_ray)[f"gig/bisecting_kmeans/{key}/matrix"][...]
        assert np.abs(left - right).max() <= 1e-6 * np.abs(left).max(), key


def test_a_unit_that_keeps_killing_its_workers_fails_the_stage_with_its_name(ray_head, tmp_path):
    config = ray_config("runtime.num_workers=1", "runtime.max_unit_attempts=2",
                        "runtime.env={GIG_DIST_FAILPOINT: 'extract.before_commit:1'}")
    # Every actor dies at its first commit, so one of the first two units (an actor's two slots)
    # is the first to use up its attempts.
    with pytest.raises(UnitFailed, match=r"extract unit [01] \(images (0:8|8:16)\) lost its worker 2 times"):
        pipeline.run(config, tmp_path / "ray.zarr")
    # Nothing was committed, and a rerun without the fault completes the same store.
    url = str(tmp_path / "ray.zarr")
    assert not RunStore.open(url).done_units("extract").any()
    assert pipeline.run(ray_config(), url, until="extract").stages[0].units_run == 5


def test_cli_with_ray_address(ray_head, in_process, tmp_path):
    out = tmp_path / "cli.zarr"
    args = [a for kv in BASE for a in ("-o", kv)]
    done = subprocess.run(
        [sys.executable, "-m", "gig_dist.cli", "run", "--ray-address", ray_head.address, "--out", str(out),
         *args, "-o", "runtime.progress=false", "-o", "runtime.device=cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "extract: 5/5 units run" in done.stdout
    assert RunStore.open(str(out)).manifest.config["runtime"]["kind"] == "ray"
    assert_stores_equal(in_process, str(out))


def test_without_an_address_a_run_starts_its_own_ray_even_beside_a_ray_start_cluster(ray_head):
    """`ray start` (the session's head) left a cluster on this machine; a bare ray.init() joined it."""
    probe = ("from gig_dist.runtime.ray_runtime import connect; import ray; connect(None); "
             "print(ray.get_runtime_context().gcs_address); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    gcs = done.stdout.strip().splitlines()[-1]
    assert gcs.startswith("127.0.0.1:") and gcs != ray_head.address


def test_ray_job_submit_runs_the_pipeline(ray_head, in_process, tmp_path):
    out = tmp_path / "job.zarr"
    job_id = f"gig-dist-test-{uuid.uuid4().hex[:8]}"
    args = [a for kv in BASE for a in ("-o", kv)]
    submitted = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id,
         "--working-dir", str(REPO), "--", "python", "-m", "jobs.pipeline", "--out", str(out), *args,
         "-o", "runtime.progress=false", "-o", "runtime.device=cpu"],
        capture_output=True, text=True, timeout=420,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    assert_stores_equal(in_process, str(out))


TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from gig_dist import pipeline
from gig_dist.config import load_config

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="WARNING")
config = load_config(None, sys.argv[2:])
report = pipeline.run(config, sys.argv[1], until="extract")
print(json.dumps({"nodes": len(ray.nodes()), "placement": report.stages[0].placement}))
ray.shutdown()
cluster.shutdown()
"""


def test_two_node_cluster_runs_a_stage_on_both_nodes(in_process_extract, tmp_path):
    # A cluster of its own, in its own process: the session's Ray head stays untouched.
    out = tmp_path / "two-nodes.zarr"
    done = subprocess.run(
        [sys.executable, "-c", TWO_NODES, str(out), *BASE, "runtime.kind=ray", "runtime.num_workers=2",
         "runtime.progress=false", "runtime.device=cpu"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2
    assert len(result["placement"]) == 2 and sum(result["placement"].values()) == 5
    assert_stores_equal(in_process_extract, str(out))


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    import importlib.resources

    import jsonschema

    schema = json.loads((importlib.resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    # Autoscaling GPU workers from zero, a CPU head that runs no work, the package installed with its GPU extra.
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert any(w["min_workers"] == 0 and w["max_workers"] >= 1 and w["resources"].get("GPU", 0) >= 1 for w in workers.values())
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    setup = " ".join(config["setup_commands"])
    assert "[gpu]" in setup and "faiss-cpu" in setup


def test_stage_objects_travel_to_actors(ray_head, tmp_path):
    """A stage sent to another Ray process plans the same units and writes to the same store key."""
    import ray

    config = toy_config("dataset.toy.num_images=20")
    store = pipeline.prepare(config, tmp_path / "run.zarr").store
    stage = AttributeStage(config, store.url)

    @ray.remote(num_cpus=0)
    def plan_there(stage, url):
        import os

        from gig_dist.store import RunStore

        return os.getpid(), stage.progress_key, stage.plan(RunStore.open(url).facts), stage.config

    pid, key, units, travelled = ray.get(plan_there.remote(stage, store.url))
    import os

    assert pid != os.getpid() and travelled == config
    assert key == "bisecting_kmeans/attribute" and units == stage.plan(store.facts) and len(units) == 10


def test_a_users_factory_model_on_two_ray_workers_equals_the_in_process_run(ray_head, tmp_path):
    """``model.name = tests.models.test_models:tiny_net``: its package travels to the actors (Ray's
    py_modules), every worker builds the same seeded model, and every array is bitwise the
    in-process run's."""
    from tests.models.test_models import FACTORY

    extra = (*FACTORY, "concepts.k_multiplier=1", "sample.per_image=8")
    local = pipeline.run(toy_config(*BASE, *extra), tmp_path / "local.zarr")
    on_ray = pipeline.run(ray_config(*extra), tmp_path / "ray.zarr")
    assert [s.stage for s in on_ray.stages if len(s.placement) or s.units_run] and on_ray.stages[0].units_run == 5
    assert on_ray.stages[1].methods["relevance"].startswith("grad x act (SRD cannot run: TinyNet has no 'conv1'")
    assert_stores_equal(local.url, on_ray.url)
