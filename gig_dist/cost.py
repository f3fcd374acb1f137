"""A time and cost model for a run on GPUs, before any GPU has run: each stage's work per image
(floating-point operations by kind, and bytes) over a device's peak rates and efficiency factors.

* **Work.** Counted, not guessed, where torch can count it: torch's FLOP counter runs the
  model's forward pass, its backward (grad x act, gradient iERFs), SRD's decomposition and each
  GIG pair's sub-network on one image. The numpy and float64 kernels are counted from their
  formulas: bisecting k-means from the samples, channels, K and its iterations; the Lasso coder
  from the PFVs, K and C and its correlation passes. Bytes are what a stage reads and writes of
  the store per image, through a worker's storage bandwidth. Images are decoded on the worker's
  CPUs.
* **Devices.** :data:`DEVICES`: peak dense float32, TF32, float64 FLOP/s and memory bandwidth of
  the usual cloud GPUs (the vendors' data sheets); ``cpu`` entries are measured on the machine
  (:func:`measure_cpu`).
* **Efficiency.** The share of a peak a kind of work reaches (:data:`EFFICIENCY`), modelled until
  ``jobs/gpu_check.py`` measures it on a real device (``--efficiency FILE``); a plan then says
  *calibrated on <device>* instead of *modelled*.

A stage's time on ``W`` workers: its covered images times the per-image time, over ``W``, plus
its start-up (workers built, models loaded). GPU-hours count every worker for the stage's time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Kinds of work, each with its own peak and efficiency: ``network`` (a model's convolutions,
#: attention and matmuls in float32, TF32 on tensor cores as cuDNN allows by default), ``fp32``
#: (k-means), ``fp64`` (the Lasso coder, float64 for its KKT tolerance), ``memory`` (bytes
#: written and read again through the device's memory by elementwise work: SRD's sharing
#: ratios), ``storage`` (bytes to and from the store), ``decode`` (images decoded on the CPUs).
KINDS = ("network", "fp32", "fp64", "memory", "storage", "decode")


@dataclass(frozen=True)
class Device:
    """Peak rates of one accelerator: FLOP/s by precision, memory bandwidth (B/s), memory (GiB)."""

    name: str
    fp32: float
    tf32: float
    fp64: float
    bandwidth: float
    memory_gib: float

    def peak(self, kind: str) -> float:
        return {"network": self.tf32, "fp32": self.fp32, "fp64": self.fp64, "memory": self.bandwidth}[kind]


#: Dense (not sparse) peaks from the data sheets: A10G (AWS g5), L4 (GCP g2, AWS g6), A100 80 GB
#: SXM, H100 SXM, H200 SXM.
DEVICES: dict[str, Device] = {
    "a10g": Device("NVIDIA A10G", 31.2e12, 62.5e12, 0.98e12, 600e9, 24),
    "l4": Device("NVIDIA L4", 30.3e12, 60e12, 0.47e12, 300e9, 24),
    "a100": Device("NVIDIA A100 80GB", 19.5e12, 156e12, 19.5e12, 2039e9, 80),
    "h100": Device("NVIDIA H100 SXM", 67e12, 494.7e12, 67e12, 3350e9, 80),
    "h200": Device("NVIDIA H200 SXM", 67e12, 494.7e12, 67e12, 4800e9, 141),
}

#: Modelled efficiency: the share of a kind's peak a stage's work reaches. The network's work
#: runs in batches of images (extraction, SRD) or of integration steps (GIG); k-means and the
#: Lasso coder are memory-bound products of tall matrices.
EFFICIENCY: dict[str, float] = {"network": 0.35, "fp32": 0.25, "fp64": 0.25, "memory": 0.5}
#: Modelled rates a worker reaches outside its accelerator: the store (B/s, object storage or a
#: shared disk) and image decoding (images/s per CPU core, a 500 x 375 JPEG resized).
STORAGE_BYTES_S = 400e6
DECODE_IMAGES_S_PER_CORE = 120.0
#: A stage's start-up on a worker: the process, the model on its device, the store opened.
STARTUP_S = 15.0
#: The Lasso coder's memory traffic per PFV and concept: its active-set steps keep arrays of K
#: float64 per PFV (correlations, Gram rows of the candidates) through some 20 to 30 steps.
#: Measured with :func:`allocated_bytes` on EfficientNet-Lite0's real PFVs (K = 10, 28, 80 at
#: ``lambda_rel`` 0.05): 1,300 to 2,000 bytes produced per concept, each written and read again.
CODER_BYTES_PER_CONCEPT = 2 * 2000
#: Bisecting k-means, per split: a 2-means on the cluster's members, its bookkeeping and copies
#: (measured on the numpy backend: 1.7 ms a split for clusters of a few hundred samples).
SPLIT_S = 2e-3
#: Small tables a unit reads and writes (reduce, members) and the class graphs' per-class work.
UNIT_S = 0.05
GRAPH_CLASS_S = 3e-3


@dataclass
class Work:
    """One image's work in a stage (or a stage's whole work, for ``per_stage``)."""

    network: float = 0.0
    fp32: float = 0.0
    fp64: float = 0.0
    memory: float = 0.0  # bytes
    storage: float = 0.0  # bytes
    decode: float = 0.0  # images
    #: Seconds of bookkeeping that no peak shortens (k-means' splits, a unit's small tables).
    fixed: float = 0.0
    #: The stage it is: an efficiency measured for it (``network:attribute``) comes first.
    stage: str = ""
    #: Work that does not grow with the images (a stage's final step on the driver, k-means).
    per_stage: bool = False

    def seconds(self, device: Device, efficiency: dict[str, float], cores: float = 1.0) -> float:
        """Time of this work on one worker: each kind at its peak times its efficiency; the
        kinds overlap within a unit (the GPU computes while the loader decodes and the store
        writes), so the slowest decides."""
        parts = [getattr(self, kind) / (device.peak(kind) * efficiency.get(
            f"{kind}:{self.stage}", efficiency.get(kind, EFFICIENCY[kind]))) for kind in ("network", "fp32", "fp64", "memory")]
        parts.append(self.storage / STORAGE_BYTES_S)
        parts.append(self.decode / (DECODE_IMAGES_S_PER_CORE * max(cores, 1.0)))
        return max(parts) + self.fixed


@dataclass
class Calibration:
    """Efficiency factors measured on a device by ``jobs/gpu_check.py``."""

    device: str
    efficiency: dict[str, float]
    measured: dict[str, Any] = field(default_factory=dict)
    date: str = ""

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            from gig_dist.settings import ConfigError

            raise ConfigError(f"--calibration {path}: not a calibration of jobs/gpu_check.py ({exc})") from None


def device_key(name: str) -> str | None:
    """The table's key for a device name as CUDA reports it (``NVIDIA H100 80GB HBM3``)."""
    lowered = name.lower().replace(" ", "")
    for key in ("h200", "h100", "a100", "a10g", "l4"):
        if key in lowered:
            return key
    return None


def measure_cpu(seconds: float = 1.0) -> Device:
    """This machine's CPU as a device: its float32 and float64 matmul FLOP/s (torch, with its
    threads) and its memory bandwidth as torch's elementwise work reaches it (a product of two
    large tensors: two read, one written), each the best of a few tries."""
    import torch

    def flops(dtype: torch.dtype) -> float:
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best, started = 0.0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        return best

    a, b = torch.randn(16 * 2**20), torch.randn(16 * 2**20)
    best, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        torch.mul(a, b)
        best = max(best, 3 * a.nbytes / (time.perf_counter() - t))
    fp32 = flops(torch.float32)
    return Device(f"CPU ({torch.get_num_threads()} threads, measured)", fp32, fp32, flops(torch.float64), best,
                  0.0)


# -- work per stage ------------------------------------------------------------------------------


def counted_flops(fn) -> float:
    """FLOPs torch's counter sees while ``fn()`` runs (matmuls, convolutions, their backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def allocated_bytes(fn) -> float:
    """Bytes of every new tensor torch's operators produce while ``fn()`` runs (not views, not
    in-place results): each is written once and read again at least once, so about half the
    memory traffic."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Produced(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:  # new tensors only: not views, not written in place
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                    Produced.total += tensor.numel() * tensor.element_size()
            return out

    with Produced():
        fn()
    return float(Produced.total)


def _blank(crop: int):
    import torch

    return torch.zeros(1, 3, crop, crop)


def stage_work(stage, config, facts, sizes) -> Work:
    """One image's work in ``stage`` (for a per-tap or per-stage stage, its whole work with
    ``per_stage``), counted on the model of ``facts``."""
    work = _stage_work(stage, config, facts, sizes)
    work.stage = stage.name
    return work


def _stage_work(stage, config, facts, sizes) -> Work:

    from gig_dist.stages.base import tap_values

    model, crop, name = facts.model, facts.input_size, stage.name
    item = 2 if config.extract.dtype == "float16" else 4
    pfv_bytes = tap_values(facts) * item
    if model is None:
        return Work()
    forward = _forward_flops(model, crop)
    if name == "extract":
        return Work(network=forward, storage=pfv_bytes, decode=1)
    if name == "sample":
        if config.sample.method == "uniform":
            return Work(storage=pfv_bytes)
        from gig_dist.kernels.srd import srd_problem

        taps = list(facts.taps)
        if config.sample.method == "srd" and srd_problem(model, taps) is None:
            flops, traffic = _srd_work(model, crop, relevance=True)
            return Work(network=flops, memory=traffic, storage=pfv_bytes, decode=1)
        return Work(network=_backward_flops(model, crop), storage=pfv_bytes, decode=1)  # a forward and a backward
    if name == "concepts":
        fp32, traffic, splits = 0.0, 0.0, 0
        iterations = config.concepts.refine_iter or 20
        for tap, (c, h, w) in facts.taps.items():
            samples = facts.num_images * min(config.sample.per_image, h * w)
            k = sizes.concepts(tap)
            # each level of the tree splits every sample's cluster by 2-means: 2 distances of C
            passes = samples * iterations * max(1, math.ceil(math.log2(max(k, 2))))
            fp32 += 2 * 2 * c * passes
            traffic += 2 * 4 * c * passes  # each pass reads every member's PFV and writes its distances
            splits += k - 1
        return Work(fp32=fp32, memory=traffic, fixed=splits * SPLIT_S, per_stage=True)
    if name == "decompose":
        from gig_dist.stages.coding import decompose_taps

        fp64 = traffic = 0.0
        for tap in decompose_taps(config, list(facts.taps)):
            c, h, w = facts.taps[tap]
            k = sizes.concepts(tap)
            # the correlations with every concept, and about two full KKT checks through the residual
            fp64 += h * w * 3 * 2 * k * c
            traffic += h * w * k * CODER_BYTES_PER_CONCEPT
        return Work(fp64=fp64, memory=traffic, storage=pfv_bytes)
    if name == "attribute":
        return Work(network=_gig_flops(stage, config, facts, sizes, model))
    if name == "atlas":
        from gig_dist.kernels.ierf import ierf_kinds

        taps = stage.taps(facts)
        crops = config.atlas.members * sum(sizes.concepts(t) for t in taps) / max(facts.num_images, 1)
        kinds = ierf_kinds(model, taps, config.atlas.ierf)
        flops = traffic = 0.0
        if any(kind == "srd" for kind, _ in kinds.values()):
            # one decomposition of every image holding members (at most all), one relevance pass per iERF
            flops, traffic = _srd_work(model, crop, relevance=False)
            with_pass = _srd_work(model, crop, relevance=True)
            passes = max(0.0, crops - 1)
            flops += passes * (with_pass[0] - flops)
            traffic += passes * (with_pass[1] - traffic)
        gradient = sum(1 for kind, _ in kinds.values() if kind == "gradient") / max(len(kinds), 1)
        return Work(network=flops + crops * gradient * _backward_flops(model, crop), memory=traffic,
                    decode=crops / len(taps))
    if name == "graphs":
        return Work(fixed=facts.num_outputs * GRAPH_CLASS_S, per_stage=True)
    return Work(fixed=UNIT_S / max(facts.images_per_unit, 1))  # reduce, members: small tables of the store


_CACHE: dict[tuple[int, int, str], float] = {}


def forward_flops(model, crop: int) -> float:
    """FLOPs of one image's forward pass at ``crop`` px (counted once per model)."""
    return _forward_flops(model, crop)


def _forward_flops(model, crop: int) -> float:
    import torch

    key = (id(model), crop, "forward")
    if key not in _CACHE:
        with torch.no_grad():
            _CACHE[key] = counted_flops(lambda: model(_blank(crop)))
    return _CACHE[key]


def _backward_flops(model, crop: int) -> float:
    import torch

    key = (id(model), crop, "backward")
    if key not in _CACHE:
        def run():
            x = _blank(crop).requires_grad_(True)
            with torch.enable_grad():
                model(x).sum().backward()
        _CACHE[key] = counted_flops(run)
        model.zero_grad(set_to_none=True)
    return _CACHE[key]


def srd_work(model, crop: int, relevance: bool) -> tuple[float, float]:
    """SRD's FLOPs and memory traffic for one image (see :func:`_srd_work`)."""
    return _srd_work(model, crop, relevance)


def _srd_work(model, crop: int, relevance: bool) -> tuple[float, float]:
    """SRD's FLOPs and memory traffic for one image (its decomposition, and the relevance of a
    class or not)."""
    import torch

    from gig_dist.kernels.srd import SRD

    key = (id(model), crop, f"srd-{relevance}")
    if key not in _CACHE:
        srd = SRD(model)

        def run():
            decomposition = srd.decompose(_blank(crop))
            if relevance:
                decomposition.relevance(torch.zeros(1, dtype=torch.long))

        _CACHE[key] = (counted_flops(run), 2 * allocated_bytes(run))
    return _CACHE[key]


def _gig_flops(stage, config, facts, sizes, model) -> float:
    """Per image: for every pair, the steps times the sub-network's forward pass and a
    backward pass per target (about twice a forward each)."""
    import torch

    from gig_dist.kernels.gig import LOGITS, SubNetwork
    from gig_dist.kernels.taps import stored_layout
    from gig_dist.stages.pairs import num_targets

    total = 0.0
    for source, target in stage.pairs(facts):
        c, h, w = facts.taps[source]
        layouts = (stored_layout(facts.layouts, source), None if target == LOGITS else stored_layout(facts.layouts, target))
        subnet = SubNetwork(model, source, target, *layouts)
        x = torch.zeros(1, c, h, w)
        with torch.no_grad():
            forward = counted_flops(lambda: subnet(x, _blank(facts.input_size)))
        steps = config.gig.steps
        total += steps * forward * (1 + 2 * num_targets(config, target))
    return total


def modelled_stage_seconds(work: Work, images: int, workers: int, device: Device, efficiency: dict[str, float],
                           cores: float) -> float:
    """A stage's wall time on ``workers``: its images' work spread over them, plus start-up."""
    if work.per_stage:
        return work.seconds(device, efficiency, cores) + STARTUP_S
    return images * work.seconds(device, efficiency, cores) / max(workers, 1) + STARTUP_S
