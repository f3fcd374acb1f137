"""The node types of a cluster, for ``gig-dist plan --cluster``: from a Ray cluster launcher config
(``cluster.yaml``: ``available_node_types``, memory from ``resources.memory`` or the AWS
instance type) or a KubeRay ``RayJob`` (its head and worker groups' container limits)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gig_dist.settings import ConfigError

#: Memory (GiB) of the AWS instance types a cluster.yaml is likely to name.
AWS_MEMORY_GIB = {
    "m6i.xlarge": 16, "m6i.2xlarge": 32, "m6i.4xlarge": 64, "m6i.8xlarge": 128,
    "r6i.xlarge": 32, "r6i.2xlarge": 64, "r6i.4xlarge": 128, "r6i.8xlarge": 256,
    "g5.xlarge": 16, "g5.2xlarge": 32, "g5.4xlarge": 64, "g5.8xlarge": 128, "g5.12xlarge": 192, "g5.16xlarge": 256,
    "g6.xlarge": 16, "g6.2xlarge": 32, "g6.4xlarge": 64, "g6.8xlarge": 128, "g6.12xlarge": 192,
    "p4d.24xlarge": 1152, "p5.48xlarge": 2048,
}
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "": 1}


@dataclass(frozen=True)
class NodeType:
    name: str
    memory_gib: float
    gpus: float
    head: bool = False


def _quantity(text: str | int | float) -> float:
    """Bytes of a Kubernetes quantity (``32Gi``, ``64G``, ``1024``)."""
    found = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(text).strip())
    if not found:
        raise ConfigError(f"{text!r} is not a Kubernetes memory quantity")
    return float(found[1]) * _UNITS[found[2] or ""]


def _group(name: str, spec: dict, head: bool) -> NodeType:
    containers = (((spec.get("template") or {}).get("spec") or {}).get("containers")) or []
    limits = ((containers[0].get("resources") or {}).get("limits") or {}) if containers else {}
    if "memory" not in limits:
        raise ConfigError(f"RayJob group {name}: its ray container sets no memory limit; set resources.limits.memory")
    return NodeType(name, _quantity(limits["memory"]) / 2**30, float(limits.get("nvidia.com/gpu", 0)), head)


def node_types(path: str | Path) -> list[NodeType]:
    """Every node type of a cluster launcher config or a RayJob, the head's marked."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--cluster {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--cluster {path}: not a cluster launcher config or a RayJob")
    if data.get("kind") == "RayJob":
        cluster = (data.get("spec") or {}).get("rayClusterSpec") or {}
        nodes = [_group("head", cluster.get("headGroupSpec") or {}, True)]
        nodes += [_group(group.get("groupName", "workers"), group, False) for group in cluster.get("workerGroupSpecs") or []]
        return nodes
    if "available_node_types" not in data:
        raise ConfigError(f"--cluster {path}: neither available_node_types (cluster launcher) nor kind: RayJob")
    nodes = []
    for name, node in data["available_node_types"].items():
        resources = node.get("resources") or {}
        instance = (node.get("node_config") or {}).get("InstanceType")
        if "memory" in resources:
            memory = float(resources["memory"]) / 2**30
        elif instance in AWS_MEMORY_GIB:
            memory = AWS_MEMORY_GIB[instance]
        else:
            raise ConfigError(f"--cluster {path}: node type {name} ({instance}): its memory is unknown here; give "
                              "resources.memory in bytes")
        nodes.append(NodeType(name, memory, float(resources.get("GPU", 0)), name == data.get("head_node_type")))
    return nodes
