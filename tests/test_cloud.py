"""The cloud path: a KubeRay RayJob and the cluster launcher config, the node types the plan
checks, the GPU time and cost model, and the GPU check's calibration of it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from gig_dist.config import load_config
from tests.conftest import REPO

RAYJOB = REPO / "jobs" / "k8s" / "rayjob.yaml"
CLI = [sys.executable, "-m", "gig_dist.cli"]

#: The fields of KubeRay's RayJob (ray.io/v1) that gig-dist relies on, with their types as KubeRay
#: 1.x's CRD declares them (ray-operator/config/crd/bases/ray.io_rayjobs.yaml): the full CRD is
#: not shipped here; ``python -m jobs.k8s.validate CRD MANIFEST`` checks against a downloaded one.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
GROUP = {"type": "object", "required": ["template"], "properties": {
    "rayStartParams": STRING_MAP, "template": {"type": "object", "required": ["spec"]}}}
RAYJOB_FIELDS = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"], "properties": {
            "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
            "rayClusterSpec": {"type": "object", "required": ["headGroupSpec", "workerGroupSpecs"], "properties": {
                "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"const": True},
                "autoscalerOptions": {"type": "object", "properties": {
                    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                    "idleTimeoutSeconds": {"type": "integer"}}},
                "headGroupSpec": GROUP,
                "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                    **GROUP, "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                    "properties": {**GROUP["properties"], "groupName": {"type": "string"},
                                   "replicas": {"type": "integer"}, "minReplicas": {"type": "integer"},
                                   "maxReplicas": {"type": "integer", "minimum": 1}}}}}}}},
    },
}


def test_the_rayjob_holds_the_fields_kuberay_takes_and_valid_pod_templates():
    import jsonschema
    import kubernetes_validate

    manifest = yaml.safe_load(RAYJOB.read_text())
    jsonschema.validate(manifest, RAYJOB_FIELDS)
    cluster = manifest["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # each pod template against Kubernetes' own (strict) schema
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "g"},
                                      "template": group["template"]}, "1.30.0", strict=True)
    assert isinstance(yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]), dict)
    # What gig-dist relies on: a head that schedules no work and holds no GPU, a GPU worker group
    # that scales from zero, every container the same image.
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu = [g for g in cluster["workerGroupSpecs"]
           if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu and gpu[0]["minReplicas"] == 0 and gpu[0]["maxReplicas"] >= 1
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1


def test_a_rayjob_that_breaks_kuberays_types_is_refused():
    import jsonschema

    manifest = yaml.safe_load(RAYJOB.read_text())
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    with pytest.raises(jsonschema.ValidationError, match="'zero' is not of type 'integer'"):
        jsonschema.validate(manifest, RAYJOB_FIELDS)


def test_the_rayjobs_entrypoint_is_a_valid_run_and_its_image_has_the_projects_python():
    from gig_dist.cli import build_parser
    from jobs.pipeline import job_argv

    manifest = yaml.safe_load(RAYJOB.read_text())
    command = manifest["spec"]["entrypoint"].split()
    assert command[:3] == ["python", "-m", "jobs.pipeline"]
    args = build_parser().parse_args(job_argv(command[3:]))
    config = load_config(REPO / args.config, args.overrides)
    assert config.runtime.kind == "ray" and config.runtime.device == "cuda" and args.out.startswith("s3://")
    assert config.dataset.path.startswith("s3://")
    dockerfile = (REPO / "jobs" / "k8s" / "Dockerfile").read_text()
    image = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)[1]
    python = re.search(r"-py3(\d+)", image)
    assert python and int(python[1]) >= 11  # pyproject's requires-python
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert int(re.search(r"-py3(\d+)", cluster["docker"]["image"])[1]) >= 11


@pytest.fixture(scope="module")
def imagenet_plan():
    """The ImageNet plan on 8 A10Gs, as `gig-dist plan ... --device cuda --gpu a10g --workers 8`
    makes it (once: counting ResNet50's work at 224 px takes most of a minute on 2 cores)."""
    from gig_dist.plan import make_plan

    config = load_config(REPO / "jobs/configs/imagenet-resnet50.yaml")
    return make_plan(config, images=50000, workers=8, device="cuda", gpu="a10g", price_per_gpu_hour=1.21)


def test_the_shipped_node_types_hold_every_stages_planned_peak_at_imagenet_scale(imagenet_plan):
    """No stage's worker peak above a worker node's memory, no driver peak above the head's: on
    cluster.yaml and on the RayJob."""
    from gig_dist.plan import cluster_misfits

    for cluster in ("cluster.yaml", "jobs/k8s/rayjob.yaml"):
        found = cluster_misfits(imagenet_plan, str(REPO / cluster))
        assert found and not any(found.values()), (cluster, found)


def test_a_node_type_too_small_for_a_stage_is_flagged(imagenet_plan, tmp_path):
    from gig_dist.cluster import node_types
    from gig_dist.plan import cluster_misfits

    small = yaml.safe_load((REPO / "cluster.yaml").read_text())
    small["available_node_types"]["gpu_worker"]["resources"]["memory"] = 8 * 2**30  # an 8 GiB node
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    assert {n.name: n.memory_gib for n in node_types(tmp_path / "small.yaml")} == {"head": 32, "gpu_worker": 8}
    assert cluster_misfits(imagenet_plan, str(tmp_path / "small.yaml"))["gpu_worker (8 GiB)"] == [
        "bisecting_kmeans/reduce"]


def test_the_imagenet_plan_models_each_stages_gpu_time_gpu_hours_and_cost(imagenet_plan):
    from gig_dist.plan import render

    plan = imagenet_plan.to_json()
    assert plan["gpu"] == "NVIDIA A10G" and plan["gpu_basis"] == "modelled"
    seconds = {s["stage"]: s["modelled_seconds"] for s in plan["stages"]}
    assert all(value > 0 for value in seconds.values()) and len(seconds) == 9
    assert plan["modelled_seconds"] == pytest.approx(sum(seconds.values()))
    assert plan["gpu_hours"] == pytest.approx(plan["modelled_seconds"] * 8 / 3600)
    assert plan["cost"] == pytest.approx(plan["gpu_hours"] * 1.21)
    # GIG dominates ImageNet's GPU time: 32 steps x (1 + 2 x 32 targets) sub-network passes per pair.
    assert max(seconds, key=seconds.get) == "bisecting_kmeans/attribute"
    text = render(imagenet_plan, arrays=False)
    assert "GPU model: 8 x NVIDIA A10G, modelled" in text and re.search(r"GPU total +wall [0-9.]+ (min|h) on 8 GPU", text)
    assert "GPU-hours, " in text and "at 1.21 per GPU-hour" in text


def test_a_gpu_checks_efficiency_file_calibrates_the_plan(tmp_path):
    """jobs/gpu_check.py --efficiency-out (here its CPU dry run) writes the efficiency factors it
    measured; the plan then times the stages with them and says on which device."""
    done = subprocess.run([sys.executable, "-m", "jobs.gpu_check", "--device", "cpu", "--quick", "--only", "extract",
                           "gig", "--efficiency-out", str(tmp_path / "eff.json")], capture_output=True, text=True,
                          cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads((tmp_path / "eff.json").read_text())
    assert set(found["efficiency"]) == {"network:extract", "network:attribute"}
    assert all(0 < value <= 1 for value in found["efficiency"].values()) and found["device"].startswith("CPU")
    plan = json.loads(subprocess.run([*CLI, "plan", "--images", "64", "-o", "concepts.k_multiplier=0.25", "--device",
                                      "cuda", "--gpu", "h100",
                                      "--calibration", str(tmp_path / "eff.json"), "--json"],
                                     capture_output=True, text=True, cwd=REPO).stdout)
    assert plan["gpu_basis"] == f"calibrated on {found['device']}" and plan["gpu"] == "NVIDIA H100 SXM"


def test_the_cost_model_counts_the_work_it_times():
    from gig_dist.cost import Device, Work, forward_flops
    from gig_dist.pipeline import collect_facts
    from gig_dist.stages.extract import ExtractStage
    from gig_dist.stages.sizes import PlanSizes

    config = load_config(None, ["dataset.toy.num_images=8"])
    facts = collect_facts(config)[0]
    from gig_dist.cost import stage_work

    work = stage_work(ExtractStage(config, "memory://x"), config, facts, PlanSizes(config, facts))
    assert work.network == forward_flops(facts.model, 64) > 0 and work.decode == 1
    with torch.no_grad():  # the counter's figure: 2 FLOPs per multiply-add of the toy model's convolutions
        conv = facts.model.conv1
        out = conv(torch.zeros(1, 3, 64, 64))
        assert forward_flops(conv, 64) == 2 * out.numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    device = Device("test", fp32=1e9, tf32=2e9, fp64=5e8, bandwidth=1e9, memory_gib=1)
    assert Work(network=4e9, fixed=0.5).seconds(device, {"network": 0.5}) == pytest.approx(4.5)
    assert Work(network=4e9, stage="attribute").seconds(device, {"network": 0.5, "network:attribute": 1.0}) == 2.0
