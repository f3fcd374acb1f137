"""The GPU check: every CUDA path of gig-dist on small inputs, each compared with the CPU, with
throughputs. A few minutes at most on one GPU.

    python -m jobs.gpu_check                       # on a GPU node: --device cuda (the default)
    python -m jobs.gpu_check --device cpu          # a dry run of the same code on the CPU (CI runs it)
    python -m jobs.gpu_check --ray-address ADDR    # the Ray check on a running cluster (default: a local one)

Checks, each on ``--device`` against the CPU:

* ``extract``  ResNet50 (random weights, random BatchNorm statistics) at 224 px: the four stage
  outputs captured in float16, as extraction stores them; images/s.
* ``srd``      SRD on the toy model: sampling relevance of every tap and a batch of iERFs; images/s.
* ``kmeans``   FAISS k-means on the GPU (faiss-gpu), its inertia against FAISS on the CPU; points/s.
* ``bisect``   bisecting k-means with the torch backend on the device (what a GPU worker runs
  without faiss-gpu), its inertia against the numpy backend; points/s.
* ``lasso``    the non-negative Lasso coder: the per-PFV objective against the CPU's; PFVs/s.
* ``gig``      GIG with all targets of an image (batched cotangents on CUDA, one backward pass per
  target on the CPU): the attributions; targets/s.
* ``ray``      the toy pipeline to the class graphs on Ray, 2 actors with ``runtime.device`` (half a
  GPU each on CUDA), against the same run in-process on the CPU: codes and GIG matrices.

It prints one line per check (``ok``, ``FAILED`` or ``skipped`` with the reason) and exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gig_dist.store import GIGSection

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray binds to loopback


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.5
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.5
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


def check_extract(device: torch.device, images: int) -> tuple[float, float, str]:
    from gig_dist.config import load_config
    from gig_dist.kernels.taps import capture
    from gig_dist.models.loading import build_model

    model = _random_bn(build_model(load_config(None, ["model.name=resnet50", "model.weights=none"]).model))
    taps = ["layer1.2", "layer2.3", "layer3.5", "layer4.2"]
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def pfvs(dev: torch.device) -> dict[str, np.ndarray]:
        net = model.to(dev)
        with torch.no_grad(), capture(net, taps, convert=lambda t: t.to(torch.float16)) as found:
            net(x[:4].to(dev))
        return {tap: found[tap].float().cpu().numpy() for tap in taps}

    reference, found = pfvs(torch.device("cpu")), pfvs(device)
    difference = max(_relative(found[t], reference[t]) for t in taps)
    net = model.to(device).to(memory_format=torch.channels_last)
    batch = x.to(device).to(memory_format=torch.channels_last)
    with torch.no_grad(), capture(net, taps, convert=lambda t: t.to(torch.float16)):
        net(batch[:2])  # warm-up
        _, seconds = _timed(lambda: net(batch), device)
    return difference, images / seconds, "images/s"


def check_srd(device: torch.device, images: int) -> tuple[float, float, str]:
    from gig_dist.kernels.srd import SRD
    from gig_dist.toy.model import load_toy_model

    model = load_toy_model().eval()
    x = torch.randn(images, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    classes = torch.arange(images) % 8
    positions = torch.randint(0, 64, (images, 8), generator=torch.Generator().manual_seed(3))

    def run(dev: torch.device):
        d = SRD(model.to(dev)).decompose(x.to(dev))
        relevance = d.relevance(classes.to(dev))
        maps = d.ierf("layer3.1", positions.to(dev))
        return {tap: r.cpu().numpy() for tap, r in relevance.items()}, maps.cpu().numpy()

    (cpu_relevance, cpu_maps), ((relevance, maps), seconds) = run(torch.device("cpu")), _timed(lambda: run(device), device)
    difference = max([_relative(relevance[t], cpu_relevance[t]) for t in relevance] + [_relative(maps, cpu_maps)])
    return difference, images / seconds, "images/s"


def check_kmeans(device: torch.device, points: int) -> tuple[float, float, str] | str:
    import faiss

    if device.type != "cuda":
        return "the FAISS GPU path needs --device cuda"
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return "faiss sees no GPU (install faiss-gpu: pip install 'gig-dist[gpu]')"
    rng = np.random.default_rng(4)
    X = np.maximum(rng.normal(size=(points, 64)) + rng.normal(size=(64, 64))[rng.integers(64, size=points)], 0)
    X = X.astype(np.float32)

    def fit(gpu: bool):
        km = faiss.Kmeans(64, 256, niter=20, seed=1, gpu=gpu, max_points_per_centroid=points)
        km.train(X)
        _, labels = km.index.search(X, 1)
        return float(((X - km.centroids[labels[:, 0]]) ** 2).sum())

    cpu = fit(False)
    gpu, seconds = _timed(lambda: fit(True), device)
    return abs(gpu - cpu) / cpu, points / seconds, "points/s (20 iterations, K = 256)"


def check_bisecting(device: torch.device, points: int) -> tuple[float, float, str]:
    """Bisecting k-means with the torch backend on ``device`` against the numpy backend: the
    inertia's relative difference (the same algorithm and draws; float32 products summed in
    another order can put a boundary point on the other side, and the trees part ways at about
    the seed-to-seed spread of the inertia, a few per cent)."""
    from gig_dist.kernels.kmeans import BisectingKMeans

    rng = np.random.default_rng(5)
    X = np.maximum(rng.normal(size=(points, 64)) + 2 * rng.normal(size=(256, 64))[rng.integers(256, size=points)], 0)
    X = X.astype(np.float32)
    cpu = BisectingKMeans(128, seed=0, backend="numpy").fit(X).inertia_
    fitted, seconds = _timed(lambda: BisectingKMeans(128, seed=0, backend="torch", device=str(device)).fit(X), device)
    return abs(fitted.inertia_ - cpu) / cpu, points / seconds, "points/s (bisecting, K = 128, torch backend)"


def check_lasso(device: torch.device, pfvs: int) -> tuple[float, float, str]:
    from gig_dist.kernels.lasso import NonNegativeLassoCoder, objective

    rng = np.random.default_rng(5)
    V = np.abs(rng.normal(size=(1024, 128))).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    X = np.maximum(rng.normal(size=(pfvs, 128)) + V[rng.integers(1024, size=pfvs)] * 3, 0).astype(np.float32)

    def solve(dev: str):
        coder = NonNegativeLassoCoder(V, lambda_rel=0.1, device=dev)
        index, value = coder.encode(X)
        U = np.zeros((pfvs, len(V)))
        np.put_along_axis(U, np.maximum(index, 0), np.where(index >= 0, value, 0), 1)
        return objective(X, V, U, coder.penalties(X))

    cpu = solve("cpu")
    found, seconds = _timed(lambda: solve(str(device)), device)
    return float(np.max(np.abs(found - cpu) / np.maximum(cpu, 1e-12))), pfvs / seconds, "PFVs/s"


def check_gig(device: torch.device, targets: int) -> tuple[float, float, str]:
    from gig_dist.kernels.gig import GIG
    from gig_dist.kernels.lasso import NonNegativeLassoCoder
    from gig_dist.kernels.taps import capture
    from gig_dist.toy.model import load_toy_model

    model = load_toy_model().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(6)
    with capture(model, ["layer2.1"]) as found, torch.no_grad():
        model(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7)))
    V = np.abs(rng.normal(size=(1024, 128))).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    W = np.abs(rng.normal(size=(2048, 256))).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    index, value = NonNegativeLassoCoder(V, lambda_rel=0.05).encode(found["layer2.1"][0].flatten(1).T.numpy())
    goals = torch.arange(targets) * 7 % len(W)

    def attribute(dev: torch.device) -> np.ndarray:
        kernel = GIG(model.to(dev), "layer2.1", "layer3.1", torch.from_numpy(V).to(dev), (128, 16, 16),
                     torch.from_numpy(W).to(dev), steps=32)
        return kernel.attribute(torch.from_numpy(index).long().to(dev), torch.from_numpy(value).to(dev),
                                goals.to(dev)).attribution.cpu().numpy()

    cpu = attribute(torch.device("cpu"))
    found_gig, seconds = _timed(lambda: attribute(device), device)
    return _relative(found_gig, cpu), targets / seconds, "targets/s (32 steps, K_a = 1024)"


def check_ray(device: torch.device, address: str | None) -> tuple[float, float, str]:
    from gig_dist import pipeline
    from gig_dist.config import load_config
    from gig_dist.store import RunStore

    settings = ["dataset.toy.num_images=32", "store.images_per_unit=16", "concepts.k_multiplier=0.25",
                "sample.per_image=8", "gig.images=16", "gig.targets=4", "gig.steps=8",
                "gig.pairs=[[layer2.1,layer3.1],[layer3.1,logits]]", "runtime.progress=false", "report.enabled=false"]
    root = Path(tempfile.mkdtemp(prefix="gig-dist-gpu-check-"))
    pipeline.run(load_config(None, [*settings, "runtime.device=cpu"]), root / "cpu.zarr", until="graphs")
    ray = [*settings, "runtime.kind=ray", "runtime.num_workers=2", f"runtime.device={device.type}"]
    if device.type == "cuda":
        ray.append("runtime.gpus_per_worker=0.5")
    if address:
        ray.append(f"runtime.address={address}")
    started = time.perf_counter()
    pipeline.run(load_config(None, ray), root / "ray.zarr", until="graphs")
    seconds = time.perf_counter() - started
    a, b = RunStore.open(str(root / "cpu.zarr")), RunStore.open(str(root / "ray.zarr"))
    difference = 0.0
    gig_a, gig_b = a.family(GIGSection, "bisecting_kmeans"), b.family(GIGSection, "bisecting_kmeans")
    for key, stats in gig_a.summary().items():
        pair = tuple(stats["pair"])
        difference = max(difference, _relative(gig_b.read_matrix(pair), gig_a.read_matrix(pair)))
    return difference, 32 / seconds, "images/s through every stage to the graphs (2 actors, with start-up)"


#: name -> (run, the largest relative difference to the CPU that counts as agreement)
CHECKS: dict[str, tuple[Callable, float]] = {
    "extract": (lambda a: check_extract(a.device, a.images), 2e-2),  # TF32 convolutions on GPUs
    "srd": (lambda a: check_srd(a.device, a.images), 1e-3),
    "kmeans": (lambda a: check_kmeans(a.device, 50_000), 1e-2),
    "bisect": (lambda a: check_bisecting(a.device, 20_000 if a.images <= 4 else 200_000), 3e-2),
    "lasso": (lambda a: check_lasso(a.device, a.pfvs), 1e-4),
    "gig": (lambda a: check_gig(a.device, a.targets), 1e-3),
    "ray": (lambda a: check_ray(a.device, a.ray_address), 1e-3),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=64, help="images per batch of the extract and SRD checks")
    parser.add_argument("--pfvs", type=int, default=4096, help="PFVs of the lasso check")
    parser.add_argument("--targets", type=int, default=32, help="targets of the gig check")
    parser.add_argument("--quick", action="store_true", help="small sizes (--images 4 --pfvs 512 --targets 8): "
                        "the CPU dry run")
    parser.add_argument("--ray-address", help="a running Ray cluster for the ray check (default: a local one)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    parser.add_argument("--efficiency-out", metavar="FILE", help="write the efficiency factors the checks measured "
                        "here, for gig-dist plan --calibration FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.pfvs, args.targets = 4, 512, 8
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: run on a GPU node, or pass --device cpu for a dry run", file=sys.stderr)
        return 2
    args.device = torch.device(args.device)
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "CPU"
    print(f"gig-dist GPU check on {name} (torch {torch.__version__}), each against the CPU")
    print(f"  {'check':<9}{'result':<9}{'max rel. diff':>14}{'limit':>9}   throughput")
    failed = 0
    rates: dict[str, float] = {}
    for check, (run, limit) in CHECKS.items():
        if args.only and check not in args.only:
            continue
        try:
            found = run(args)
        except Exception as exc:  # a check that crashes is a failed check; the others still run
            print(f"  {check:<9}{'FAILED':<9}{'-':>14}{limit:>9.0e}   {type(exc).__name__}: {exc}")
            failed += 1
            continue
        if isinstance(found, str):
            print(f"  {check:<9}{'skipped':<9}{'-':>14}{'':>9}   {found}")
            continue
        difference, rate, unit = found
        rates[check] = rate
        ok = difference <= limit
        failed += not ok
        print(f"  {check:<9}{'ok' if ok else 'FAILED':<9}{difference:>14.1e}{limit:>9.0e}   {rate:,.1f} {unit}",
              flush=True)
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    if args.efficiency_out:
        calibration = efficiency(args, name, rates)
        calibration.save(args.efficiency_out)
        print(f"efficiency on {calibration.device}: " + ", ".join(f"{k} {v:.3f}" for k, v in calibration.efficiency.items())
              + f" -> {args.efficiency_out}")
    return 1 if failed else 0


def efficiency(args: argparse.Namespace, name: str, rates: dict[str, float]):
    """The share of this device's peaks the checks reached (``gig_dist.cost``'s kinds of work):
    the network's from extraction (ResNet50's forward pass) and GIG, memory traffic from SRD and
    the Lasso coder; each is the work the cost model counts for the check over its measured time."""
    from gig_dist.config import load_config
    from gig_dist.cost import (
        CODER_BYTES_PER_CONCEPT,
        DEVICES,
        Calibration,
        device_key,
        forward_flops,
        measure_cpu,
        srd_work,
    )
    from gig_dist.models.loading import build_model
    from gig_dist.toy.model import load_toy_model

    device = DEVICES[device_key(name)] if args.device.type == "cuda" and device_key(name) else measure_cpu()
    found: dict[str, float] = {}
    if "extract" in rates:
        resnet = build_model(load_config(None, ["model.name=resnet50", "model.weights=none"]).model)
        found["network:extract"] = forward_flops(resnet, 224) * rates["extract"] / device.tf32
    if "srd" in rates:
        _, traffic = srd_work(load_toy_model().eval(), 64, relevance=True)
        found["memory:sample"] = found["memory:atlas"] = traffic * rates["srd"] / device.bandwidth
    if "lasso" in rates:
        found["memory:decompose"] = 1024 * CODER_BYTES_PER_CONCEPT * rates["lasso"] / device.bandwidth
    if "gig" in rates:
        from gig_dist.cost import counted_flops
        from gig_dist.kernels.gig import SubNetwork

        model = load_toy_model().eval()
        sub = SubNetwork(model, "layer2.1", "layer3.1")
        with torch.no_grad():
            step = counted_flops(lambda: sub(torch.zeros(1, 128, 16, 16)))
        found["network:attribute"] = 32 * 3 * step * rates["gig"] / device.tf32  # per target: 32 steps, fwd + bwd
    found = {key: round(min(value, 1.0), 4) for key, value in found.items()}
    return Calibration(device.name, found, {"rates": rates, "device": name}, time.strftime("%Y-%m-%d"))


if __name__ == "__main__":
    sys.exit(main())
