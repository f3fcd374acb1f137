"""Benchmarks, measured side by side in one run on this machine, printed as a table with ratios.

    python -m jobs.benchmark extract [--images 4096] [--model toy] [--batch-size 32]
    python -m jobs.benchmark ierf [--pfvs 64]
    python -m jobs.benchmark concepts [--points 200000 --channels 256 --clusters 1024 --pfvs 2000 --atoms 2048]
    python -m jobs.benchmark gig [--images 3 --targets 32 --steps 32]
    python -m jobs.benchmark graphs STORE [--top 3]
    python -m jobs.benchmark gaps [--steps 32 --max-gap 0.01 --max-steps 256 --targets 8]
    python -m jobs.benchmark rehearsal [--images 64 --unit 16 --calibrate 2 --targets 4 --steps 8]
    python -m jobs.benchmark pfvs [--images 32 --unit 16 --targets 4 --steps 8]

extract: bare forward-pass throughput of the model on images already in memory (channels-last,
as extraction runs it), against extraction into a store (decoding, forward, float16 copies,
compression, writes) in-process and on Ray with 1 and 2 workers; the machine's busy cores during
each (from /proc/stat), which shows how much of the machine a configuration can use; and the
driver's Python memory during Ray stages of two dataset sizes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from gig_dist import pipeline
from gig_dist.config import Config, load_config
from gig_dist.data.sources import ImageLoader, build_index
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.stages import ExtractStage


def _config(args: argparse.Namespace, images: int, *extra: str) -> Config:
    overrides = [
        f"model.name={args.model}",
        f"extract.batch_size={args.batch_size}",
        "runtime.progress=false",
        "runtime.device=cpu",
        *args.set,
        *extra,
    ]
    if args.model != "toy":
        overrides += ["model.weights=none"]
        # the photos given, else toy-world images rendered at the model's 224 px
        overrides += (["dataset.kind=imagefolder", f"dataset.path={args.data}"] if args.data else
                      ["dataset.toy.image_size=224"])
    overrides += [f"dataset.toy.num_images={images}", f"dataset.limit={images}"]
    return load_config(None, overrides)


class BusyCores:
    """Average number of busy cores of the whole machine between enter and exit (Linux)."""

    @staticmethod
    def _ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def __enter__(self) -> BusyCores:
        self.start = self._ticks()
        return self

    def __exit__(self, *exc) -> None:
        busy, total = (b - a for a, b in zip(self.start, self._ticks()))
        self.cores = (os.cpu_count() or 1) * busy / max(total, 1)


@torch.no_grad()
def bare_forward(config: Config, repeats: int = 2) -> tuple[float, float]:
    """Images/s of model(x) alone, on inputs decoded beforehand, with every core; busy cores."""
    model = build_model(config.model).to(memory_format=torch.channels_last)
    loader = ImageLoader(resolve_transform(config), config.dataset.max_image_pixels, config.dataset.loader_threads)
    index = build_index(config.dataset)
    inputs = [f.result().image for f in loader.submit_all(index.paths)]
    inputs = torch.stack([x for x in inputs if x is not None]).contiguous(memory_format=torch.channels_last)
    loader.close()
    batch = config.extract.batch_size
    model(inputs[:batch])  # warm-up
    best, cores = float("inf"), 0.0
    for _ in range(repeats):
        with BusyCores() as busy:
            started = time.perf_counter()
            for first in range(0, len(inputs), batch):
                model(inputs[first : first + batch])
            elapsed = time.perf_counter() - started
        if elapsed < best:
            best, cores = elapsed, busy.cores
    return len(inputs) / best, cores


def extraction(config: Config, out: Path, trace_driver: bool = False) -> tuple[float, float, float]:
    """Images/s of the extraction stage (store prepared beforehand), busy cores, and (Ray only,
    where no work runs in this process) the driver's peak Python allocation in MiB."""
    # extraction's own checks only: a small photo folder need not satisfy the concept settings
    prepared = pipeline.prepare(config, out, overwrite=True, until="extract")
    prepared.lease.release()
    store = prepared.store
    runtime = pipeline.make_runtime(config)
    if trace_driver:
        tracemalloc.start()
    with BusyCores() as busy:
        report = runtime.run(ExtractStage(config, store.url))
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace_driver else float("nan")
    tracemalloc.stop()
    return report.images / report.seconds, busy.cores, peak


def bench_extract(args: argparse.Namespace) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cores = os.cpu_count()
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base = _config(args, args.images)
        forward, forward_cores = bare_forward(base)
        rows.append((f"bare forward ({torch.get_num_threads()} threads)", forward, forward_cores, "1.00 x forward"))
        local, local_cores, _ = extraction(base, root / "local.zarr")
        rows.append(("extract in-process", local, local_cores, f"{local / forward:.2f} x forward (target >= 0.85)"))
        # extract.pfvs=recompute: the logits only; sample, decompose and attribute pay a forward each
        kept, kept_cores, _ = extraction(_config(args, args.images, "extract.pfvs=recompute"), root / "recompute.zarr")
        rows.append(("extract, pfvs=recompute", kept, kept_cores, f"{kept / forward:.2f} x forward (no PFVs written)"))

        import ray

        from gig_dist.runtime.ray_runtime import connect

        connect(None)
        on_ray = ("runtime.kind=ray",)
        ray1, ray1_cores, _ = extraction(_config(args, args.images, *on_ray, "runtime.num_workers=1"), root / "r1.zarr")
        rows.append(("extract on Ray, 1 worker", ray1, ray1_cores, f"{ray1 / forward:.2f} x forward"))
        ray2, ray2_cores, peak_full = extraction(
            _config(args, args.images, *on_ray, "runtime.num_workers=2"), root / "r2.zarr", trace_driver=True
        )
        rows.append(("extract on Ray, 2 workers", ray2, ray2_cores, f"{ray2 / ray1:.2f} x 1 worker (target >= 1.7)"))
        _, _, peak_quarter = extraction(
            _config(args, args.images // 4, *on_ray, "runtime.num_workers=2"), root / "r3.zarr", trace_driver=True
        )
        ray.shutdown()

    print(f"\nextract benchmark: model {args.model}, {args.images} images, batch {args.batch_size}, {cores} cores\n")
    print(f"{'measurement':<30} {'images/s':>10} {'busy cores':>11}   ratio")
    for name, rate, busy, ratio in rows:
        print(f"{name:<30} {rate:>10.1f} {busy:>11.2f}   {ratio}")
    print(
        f"\ndriver peak Python memory during the Ray stage: {peak_quarter:.2f} MiB at {args.images // 4} images, "
        f"{peak_full:.2f} MiB at {args.images} images"
    )


def bench_ierf(args: argparse.Namespace) -> None:
    """iERFs/s batched (one decomposition per image, all PFVs in one pass) against one at a time
    (a decomposition per PFV, as a per-PFV tool would do), and one SRD decomposition against one
    forward pass, for the toy model and ResNet50 (random weights)."""
    import torchvision

    from gig_dist.kernels.srd import SRD
    from gig_dist.toy.model import load_toy_model

    torch.manual_seed(0)
    rows = []
    for name, model, size, images in (
        ("toy", load_toy_model(), 64, 8),
        ("resnet50", torchvision.models.resnet50(weights=None).eval(), 224, 2),
    ):
        x = torch.randn(images, 3, size, size)
        srd = SRD(model)
        tap = srd.taps[len(srd.taps) // 2]
        with torch.no_grad():
            model(x)
            started = time.perf_counter()
            model(x)
            forward = (time.perf_counter() - started) / images
        srd.decompose(x[:1])
        started = time.perf_counter()
        decomposition = srd.decompose(x)
        decompose = (time.perf_counter() - started) / images
        h, w = decomposition.outputs[tap].shape[-2:]
        pfvs = min(args.pfvs, h * w)
        positions = torch.stack([torch.randperm(h * w)[:pfvs] for _ in range(images)])
        started = time.perf_counter()
        batched = srd.decompose(x).ierf(tap, positions)
        batched_rate = images * pfvs / (time.perf_counter() - started)
        single_count = min(4, pfvs)
        started = time.perf_counter()
        for k in range(single_count):
            single = srd.decompose(x[:1]).ierf(tap, positions[:1, k : k + 1])
            assert torch.allclose(single[0, 0], batched[0, k], atol=1e-5)
        single_rate = single_count / (time.perf_counter() - started)
        rows.append((name, size, tap, pfvs, batched_rate, single_rate, decompose / forward))
    print(f"\niERF benchmark ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)\n")
    print(f"{'model':<9} {'input':>5} {'tap':<9} {'PFVs/img':>8} {'batched iERF/s':>15} {'one-at-a-time':>14} {'speed-up':>9} {'SRD / forward':>14}")
    for name, size, tap, pfvs, batched_rate, single_rate, cost in rows:
        print(f"{name:<9} {size:>5} {tap:<9} {pfvs:>8} {batched_rate:>15.1f} {single_rate:>14.2f} "
              f"{batched_rate / single_rate:>8.1f}x {cost:>13.1f}x")


def bench_concepts(args: argparse.Namespace) -> None:
    """Bisecting k-means against scikit-learn's BisectingKMeans (same data, K), and the Lasso coder
    against SparseCoder(lasso_cd, positive_code=True) at its defaults and given enough iterations
    to reach our objective, on post-ReLU, PFV-like data."""
    import warnings

    import numpy as np
    from sklearn.cluster import BisectingKMeans as SklearnBisectingKMeans
    from sklearn.decomposition import SparseCoder

    from gig_dist.kernels.kmeans import BisectingKMeans, concept_vectors
    from gig_dist.kernels.lasso import NonNegativeLassoCoder, objective

    def pfv_like(n: int, channels: int, modes: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        centres = np.maximum(rng.normal(size=(modes, channels)), 0) * rng.uniform(0.5, 3, size=(modes, 1))
        labels = rng.integers(modes, size=n)
        return np.maximum(centres[labels] + rng.normal(scale=0.5, size=(n, channels)), 0).astype(np.float32)

    def blobs(n: int, channels: int, centres: int, seed: int) -> np.ndarray:
        """Post-ReLU Gaussian blobs with heavy overlap (noise 0.8 around unit-normal centres)."""
        rng = np.random.default_rng(seed)
        means = rng.normal(size=(centres, channels))
        return np.maximum(means[rng.integers(centres, size=n)] + rng.normal(scale=0.8, size=(n, channels)),
                          0).astype(np.float32)

    early = {"refine_iter": 8}  # Lloyd stopped early (concepts.refine_iter; see the kernel)
    for data_name, X in (("pfv_like", pfv_like(args.points, args.channels, args.clusters // 2, 0)),
                         ("blobs", blobs(args.points, args.channels, 2 * args.clusters, 0))):
        timed = {}
        for name, make in (
            ("gig-dist (numpy)", lambda: BisectingKMeans(args.clusters, seed=0, backend="numpy")),
            ("gig-dist early", lambda: BisectingKMeans(args.clusters, seed=0, backend="numpy", **early)),
            ("gig-dist (FAISS)", lambda: BisectingKMeans(args.clusters, seed=0, backend="faiss")),
            ("scikit-learn", lambda: SklearnBisectingKMeans(args.clusters, random_state=0,
                                                            bisecting_strategy="biggest_inertia")),
        ):
            started = time.perf_counter()
            model = make().fit(X)
            timed[name] = (time.perf_counter() - started, model.inertia_)
        their_time, their_inertia = timed["scikit-learn"]
        print(f"\nbisecting k-means on {data_name}, {args.points} x {args.channels}, K = {args.clusters}:")
        for name, (seconds, inertia) in timed.items():
            print(f"  {name:<17} {seconds:8.2f} s   inertia {inertia:.6g}   speed-up {their_time / seconds:5.2f}x   "
                  f"inertia ratio {inertia / their_inertia:.4f}")
    print(f"  (early: {early}; target: speed-up >= 3x at inertia ratio <= 1.01 on both)")

    train = pfv_like(max(20 * args.atoms, 20_000), args.channels, args.atoms // 4, 1)
    V, _ = concept_vectors(BisectingKMeans(args.atoms, seed=0).fit(train).cluster_centers_)
    pfvs = pfv_like(args.pfvs, args.channels, args.atoms // 4, 2)
    lam = float(0.1 * np.median((pfvs @ V.T).max(1)))
    started = time.perf_counter()
    codes = NonNegativeLassoCoder(V, lam=lam).transform(pfvs)
    ours_time = time.perf_counter() - started
    ours_objective = objective(pfvs, V, codes, lam).sum()
    print(f"\nnon-negative Lasso, {args.pfvs} PFVs of width {args.channels}, {args.atoms} atoms, lambda {lam:.3g}:")
    print(f"  gig-dist                {ours_time:8.2f} s   objective {ours_objective:.8g}   l0 {(codes > 0).sum(1).mean():.1f}")
    warnings.simplefilter("ignore")  # scikit-learn warns when it stops before converging
    for max_iter in (1000, 10_000):
        started = time.perf_counter()
        sk = SparseCoder(V, transform_algorithm="lasso_cd", transform_alpha=lam / args.channels,
                         positive_code=True, transform_max_iter=max_iter).transform(pfvs)
        their_time = time.perf_counter() - started
        gap = (objective(pfvs, V, sk, lam).sum() - ours_objective) / ours_objective
        print(f"  scikit-learn max_iter={max_iter:<6} {their_time:8.2f} s   objective {ours_objective * (1 + gap):.8g} "
              f"({gap:+.1e} relative to ours)   speed-up {their_time / ours_time:.1f}x")
    # SparseCoder stops at its own tolerance (a dual gap of 1e-4 of ||a||^2): tighten it, through
    # Lasso itself, until it reaches our objective, on a subset of the PFVs.
    from sklearn.linear_model import Lasso

    subset = pfvs[: args.pfvs // 10]
    ours_subset = objective(subset, V, codes[: len(subset)], lam).sum()
    started = time.perf_counter()
    tight = np.stack([
        Lasso(alpha=lam / args.channels, fit_intercept=False, positive=True, tol=1e-10, max_iter=100_000)
        .fit(V.T.astype(np.float64), x.astype(np.float64)).coef_ for x in subset
    ])
    tight_time = (time.perf_counter() - started) * len(pfvs) / len(subset)
    gap = (objective(subset, V, tight, lam).sum() - ours_subset) / ours_subset
    print(f"  scikit-learn Lasso tol=1e-10  {tight_time:8.2f} s   (timed on {len(subset)} PFVs, scaled)   objective "
          f"{gap:+.1e} relative to ours   speed-up {tight_time / ours_time:.1f}x at equal objective")
    print("  (SparseCoder's lasso_cd stops at its own tolerance above our objective; the last line compares at\n"
          "   equal objective; target >= 10x)")


def bench_gig(args: argparse.Namespace) -> None:
    """GIG for all targets of one image: the batched kernel against one Captum
    LayerIntegratedGradients call per target (on the codes, through the same sub-network), same
    steps and rule; the values are compared too."""
    import numpy as np
    import torch
    from captum.attr import LayerIntegratedGradients
    from torch import nn

    from gig_dist.config import load_config
    from gig_dist.kernels.gig import GIG
    from gig_dist.kernels.lasso import NonNegativeLassoCoder
    from gig_dist.kernels.taps import capture
    from gig_dist.models.loading import build_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(load_config(None).model)
    source, target, channels, positions = "layer2.1", "layer3.1", 128, 256
    V = np.abs(rng.normal(size=(8 * channels, channels))).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    W = np.abs(rng.normal(size=(8 * 256, 256))).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    kernel = GIG(model, source, target, torch.from_numpy(V), (channels, 16, 16), torch.from_numpy(W),
                 steps=args.steps)

    class Codes(nn.Module):
        """Captum's forward function: dense codes -> reconstruction -> F_ab -> S (all targets)."""

        def __init__(self) -> None:
            super().__init__()
            self.codes = nn.Identity()

        def forward(self, u):
            x = (self.codes(u) @ kernel.V).transpose(1, 2).reshape(len(u), channels, 16, 16)
            return kernel.subnet(x).sum(dim=(2, 3)) @ kernel.W.T

    head = Codes()
    lig = LayerIntegratedGradients(head, head.codes)
    rows = []
    for image in range(args.images):
        with capture(model, [source]) as found, torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        pfvs = found[source][0].reshape(channels, -1).T.numpy()
        index, value = NonNegativeLassoCoder(V, lambda_rel=0.05).encode(pfvs)
        index, value = torch.from_numpy(index).long(), torch.from_numpy(value)
        targets = torch.arange(args.targets) * 7 % len(W)
        started = time.perf_counter()
        ours = kernel.attribute(index, value, targets).attribution.numpy()
        ours_time = time.perf_counter() - started
        dense = torch.zeros(positions, len(V))
        dense.scatter_(1, index.clamp_min(0), value * (index >= 0))
        started = time.perf_counter()
        theirs = np.stack([
            lig.attribute(dense[None], baselines=torch.zeros_like(dense[None]), target=int(t), n_steps=args.steps,
                          method="riemann_middle")[0].sum(0).double().numpy()
            for t in targets
        ])
        their_time = time.perf_counter() - started
        difference = np.abs(ours - theirs).max() / np.abs(theirs).max()
        rows.append((ours_time, their_time, difference))
    ours_time, their_time, difference = (np.mean([r[i] for r in rows]) for i in range(3))
    print(f"\nGIG {source} -> {target}, {args.targets} target concepts per image, {args.steps} midpoint steps, "
          f"K_a = {len(V)}, {args.images} images (mean per image):")
    print(f"  gig-dist batched kernel     {ours_time:8.3f} s   {args.targets / ours_time:8.1f} targets/s")
    print(f"  Captum LIG, one per target  {their_time:8.3f} s   {args.targets / their_time:8.1f} targets/s")
    print(f"  speed-up {their_time / ours_time:.1f}x (target >= 10); largest difference {difference:.1e} "
          "of the largest attribution")


def bench_gaps(args: argparse.Namespace) -> None:
    """``gig.max_gap`` on a model of real size: ResNet50 at 224 px (random weights, random
    BatchNorm statistics and biases so that blocks are not positively homogeneous), one random
    image, concepts from k-means of its own PFVs and the non-negative Lasso. Class targets: the
    half of ``--targets`` that change most and the half that barely change, where a relative gap
    cannot fall under max_gap. Per pair, with the relative test alone (atol 0) and beside
    ``gig.atol``: the gaps at ``--steps``, after refinement, the steps the targets used, and the
    time of each."""
    import numpy as np
    import torch
    from torch import nn

    from gig_dist.config import load_config
    from gig_dist.kernels.gig import GIG, LOGITS, reconstruct, refine
    from gig_dist.kernels.lasso import NonNegativeLassoCoder
    from gig_dist.kernels.metrics import completeness_gap
    from gig_dist.kernels.taps import capture
    from gig_dist.models.loading import build_model

    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.name=resnet50", "model.weights=none"]).model).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data = torch.randn(m.num_features, generator=g) * args.bn
            m.running_mean = torch.randn(m.num_features, generator=g) * args.bn
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    for p in model.parameters():
        p.requires_grad_(False)
    taps = ["layer2.3", "layer3.5", "layer4.2"]
    with capture(model, taps) as found, torch.no_grad():
        model(torch.randn(1, 3, 224, 224, generator=g))
    rng = np.random.default_rng(0)

    def dictionary(tap: str, k: int = 64) -> np.ndarray:
        pfvs = found[tap][0].flatten(1).T.numpy()
        V = pfvs[rng.choice(len(pfvs), k, replace=len(pfvs) < k)] + 0.05 * np.abs(rng.normal(size=(k, pfvs.shape[1])))
        return (V / np.linalg.norm(V, axis=1, keepdims=True)).astype(np.float32)

    print(f"\nResNet50 224 px, random weights, BatchNorm biases and means ~ N(0, {args.bn}^2), one image; {args.steps} midpoint steps, refined while "
          f"the relative gap > {args.max_gap}, up to {args.max_steps} steps")
    print(f"  {'pair':<24}{'targets':>8}{'atol':>8}  {'mean gap before':>16}{'max before':>12}  {'mean after':>12}"
          f"{'max after':>12}  {'steps used':<28}{'time':>8}{'refine':>8}")
    for source, target in (("layer2.3", "layer3.5"), ("layer3.5", "layer4.2"), ("layer3.5", LOGITS)):
        act = found[source][0]
        V = dictionary(source)
        index, value = NonNegativeLassoCoder(V, lambda_rel=0.05).encode(act.flatten(1).T.numpy())
        index, value = torch.from_numpy(index).long(), torch.from_numpy(value)
        W = None if target == LOGITS else torch.from_numpy(dictionary(target))
        kernels: dict[int, GIG] = {}

        def kernel(steps: int, source=source, target=target, V=V, W=W, shape=tuple(act.shape),
                   kernels=kernels) -> GIG:
            if steps not in kernels:
                kernels[steps] = GIG(model, source, target, torch.from_numpy(V), shape, W, steps=steps)
            return kernels[steps]

        if target != LOGITS:
            targets = torch.arange(args.targets)
        else:  # the classes that change most, and those that barely change (where the relative gap breaks down)
            x_full = reconstruct(index, value, torch.from_numpy(V)).T.reshape(act.shape)
            change = kernel(args.steps).change(x_full, torch.arange(1000)).abs()
            order = torch.argsort(change, descending=True)
            targets = torch.cat([order[: args.targets // 2], order[-(args.targets - args.targets // 2):]])
        started = time.perf_counter()
        result = kernel(args.steps).attribute(index, value, targets, endpoints=True)
        first_time = time.perf_counter() - started
        if target == LOGITS:
            error = (result.total - result.delta).abs()
            print(f"  {'':<24}changes {np.array2string(result.delta.numpy(), precision=4)}, absolute gaps "
                  f"{np.array2string(error.numpy(), precision=1)}, scales {np.array2string(result.scale.numpy(), precision=3)}")
        for atol in (0.0, args.atol):  # the relative test alone, then with the absolute one beside it
            started = time.perf_counter()
            refined, used, before = refine(kernel, result, index, value, targets, None, args.steps, args.max_gap,
                                           args.max_steps, atol=atol)
            refine_time = time.perf_counter() - started
            after = completeness_gap(refined.total.numpy(), refined.delta.numpy())
            steps, counts = np.unique(used, return_counts=True)
            told = ", ".join(f"{c}x{s}" for s, c in zip(steps, counts))
            print(f"  {source + ' -> ' + target:<24}{len(targets):>8}{atol:>8g}  {np.nanmean(before):>16.2e}"
                  f"{np.nanmax(before):>12.2e}  {np.nanmean(after):>12.2e}{np.nanmax(after):>12.2e}  {told:<28}"
                  f"{first_time:>7.1f}s{refine_time:>7.1f}s")


def bench_graphs(args: argparse.Namespace) -> None:
    """Class graphs from the class-conditional Gamma_c against the dataset-wide Gamma, on a
    finished run: how much the node sets agree (Jaccard per tap), the share of nodes marked
    shared, and, on a held-out split, how much of a class's own attribution the chosen edges
    keep. Each class's attributed images are split in two by their order; both kinds of graph
    are built from half A (Gamma_c from A's images of class c, Gamma from all of A), and each
    chosen lower-level edge k -> m is scored on half B: the sum of Gamma_c^B over the chosen
    edges, over the positive Gamma_c^B into the same upper nodes. Per-class dense matrices are
    held in memory: a measurement for runs of the toy world's size."""
    import numpy as np

    from gig_dist.config import Config
    from gig_dist.kernels.gig import LOGITS
    from gig_dist.kernels.graphs import class_graph, dense_sources
    from gig_dist.stages.graphs import build_graphs, chain_to_class
    from gig_dist.stages.pairs import gig_pairs
    from gig_dist.stages.reduce import image_class
    from gig_dist.store import PROCESSED, RunStore

    store = RunStore.open(args.store)
    config = Config.model_validate(store.manifest.config)
    dictionary = config.concepts.method
    gig = store.gig(dictionary)
    pairs = gig_pairs(config, list(store.taps))
    chain = chain_to_class(pairs, list(store.taps))
    links = [(lower, upper) for upper, lower in zip(chain, chain[1:])]
    classes = store.facts.num_outputs
    by_mode = {mode: build_graphs(store, dictionary, pairs, args.top, mode) for mode in ("class", "dataset")}

    print(f"\nclass graphs of {store.url}: top {args.top} per level, chain {' <- '.join(chain)}, "
          f"{int(gig.read_count((chain[0], LOGITS)).sum())} attributed images")
    print(f"  {'tap':<12} {'Jaccard(class, dataset)':>24} {'shared, class':>14} {'shared, dataset':>16}")
    for tap in chain:
        scores, shared = [], {"class": [], "dataset": []}
        for c in range(classes):
            sets = {m: {n["concept"] for n in by_mode[m][c]["nodes"] if n["tap"] == tap} for m in by_mode}
            union = sets["class"] | sets["dataset"]
            if union:
                scores.append(len(sets["class"] & sets["dataset"]) / len(union))
            for m in by_mode:
                shared[m] += [n["shared"] for n in by_mode[m][c]["nodes"] if n["tap"] == tap]
        print(f"  {tap:<12} {np.mean(scores):>24.2f} {np.mean(shared['class']):>14.2f} {np.mean(shared['dataset']):>16.2f}")

    # Held-out: per-image sums into dense per-class matrices for halves A and B.
    halves = {link: np.zeros((2, classes, *gig.matrix_shape(link))) for link in links}
    count = np.zeros((2, classes))
    seen = np.zeros(classes, dtype=int)
    limit = config.gig.images
    for r in store.units():
        if limit is not None and r.start >= limit:
            break
        status, prediction = store.meta.read_status(r)
        _, labels = store.meta.read_index(r)
        cls = image_class(labels, prediction)
        parts = {link: {**gig.read_unit(link, r), "vectors": gig.read_vectors(link, r)[0]} for link in links}
        for row in np.flatnonzero((status == PROCESSED) & (cls >= 0)):
            c = cls[row]
            half = seen[c] % 2
            seen[c] += 1
            count[half, c] += 1
            for link, part in parts.items():
                summed = part["vectors"][row]
                for slot, m in enumerate(part["target"][row]):
                    used = part["source"][row] >= 0
                    if m >= 0:
                        np.add.at(halves[link][half, c, :, m], part["source"][row][used], summed[slot][used])
    class_matrix = gig.read_matrix((chain[0], LOGITS))
    kept = {"class": [[] for _ in links], "dataset": [[] for _ in links]}
    for c in range(classes):
        if count[0, c] == 0 or count[1, c] == 0:
            continue
        A = {link: halves[link][0, c] / count[0, c] for link in links}
        B = {link: halves[link][1, c] / count[1, c] for link in links}
        everyone = {link: halves[link][0].sum(0) / count[0].sum() for link in links}
        for mode, matrices in (("class", A), ("dataset", everyone)):
            graph = class_graph(class_matrix, chain, dense_sources(matrices), c, args.top)
            for number, link in enumerate(links, start=1):
                edges = [e for e in graph["edges"] if e["level"] == number]
                uppers = sorted({e["source"][1] for e in graph["edges"] if e["level"] == number - 1})
                possible = np.clip(B[link][:, uppers], 0, None).sum()
                if possible > 0:
                    kept[mode][number - 1].append(sum(B[link][e["source"][1], e["target"][1]] for e in edges) / possible)
    print(f"  held-out share of a class's positive GIG into a graph's nodes that its chosen edges keep "
          f"(mean over classes, {int(count[0].sum())}/{int(count[1].sum())} images in halves A/B):")
    for number, link in enumerate(links):
        c_share, d_share = np.mean(kept["class"][number]), np.mean(kept["dataset"][number])
        print(f"    {link[0]} -> {link[1]:<10} class Gamma_c {c_share:.3f}   dataset Gamma {d_share:.3f}   "
              f"ratio {c_share / d_share:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="which", required=True)
    extract = sub.add_parser("extract", help="extraction throughput against the bare forward pass")
    extract.add_argument("--images", type=int, default=4096)
    extract.add_argument("--model", default="toy", help="toy, or a torchvision name (random weights) with --data")
    extract.add_argument("--data", help="an ImageFolder tree for torchvision models (default: toy images at 224 px)")
    extract.add_argument("--batch-size", type=int, default=32)
    extract.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ierf = sub.add_parser("ierf", help="iERFs per second, batched against one at a time; SRD cost against forward")
    ierf.add_argument("--pfvs", type=int, default=64, help="PFVs per image in the batched pass")
    gig = sub.add_parser("gig", help="GIG for all targets of an image against one Captum call per target")
    gig.add_argument("--images", type=int, default=3)
    gig.add_argument("--targets", type=int, default=32)
    gig.add_argument("--steps", type=int, default=32)
    concepts = sub.add_parser("concepts", help="bisecting k-means and the Lasso coder against scikit-learn")
    concepts.add_argument("--points", type=int, default=200_000)
    concepts.add_argument("--channels", type=int, default=256)
    concepts.add_argument("--clusters", type=int, default=1024)
    concepts.add_argument("--pfvs", type=int, default=2000)
    concepts.add_argument("--atoms", type=int, default=2048)
    graphs = sub.add_parser("graphs", help="class graphs from Gamma_c against the dataset Gamma, on a finished run")
    graphs.add_argument("store", help="a finished run store that kept its per-image GIG "
                                      "(gig-dist run -o gig.images=256 -o gig.keep_image_attributions=true)")
    graphs.add_argument("--top", type=int, default=3)
    gaps = sub.add_parser("gaps", help="gig.max_gap: completeness gaps before and after refinement on ResNet50")
    gaps.add_argument("--steps", type=int, default=32)
    gaps.add_argument("--max-gap", type=float, default=0.01)
    gaps.add_argument("--max-steps", type=int, default=256)
    gaps.add_argument("--atol", type=float, default=1e-3, help="gig.atol, beside the relative test")
    gaps.add_argument("--targets", type=int, default=8)
    gaps.add_argument("--bn", type=float, default=0.5, help="std of the random BatchNorm biases and means")
    rehearsal = sub.add_parser("rehearsal", help="ResNet50 at 224 px, every stage on Ray with 2 workers, against the plan")
    rehearsal.add_argument("--images", type=int, default=64)
    rehearsal.add_argument("--unit", type=int, default=16, help="images per store unit")
    rehearsal.add_argument("--calibrate", type=int, default=2, help="units the plan is calibrated on")
    rehearsal.add_argument("--targets", type=int, default=4)
    rehearsal.add_argument("--steps", type=int, default=8)
    rehearsal.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    pfvs = sub.add_parser("pfvs", help="extract.pfvs: stored PFVs against recomputed ones, ResNet50, in-process")
    pfvs.add_argument("--images", type=int, default=32)
    pfvs.add_argument("--unit", type=int, default=16, help="images per store unit")
    pfvs.add_argument("--targets", type=int, default=4)
    pfvs.add_argument("--steps", type=int, default=8)
    pfvs.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    {"pfvs": bench_pfvs, "rehearsal": bench_rehearsal, "gaps": bench_gaps, "extract": bench_extract, "ierf": bench_ierf, "concepts": bench_concepts, "gig": bench_gig,
     "graphs": bench_graphs}[args.which](args)



def _rehearsal_setup(args: argparse.Namespace) -> tuple[Path, str, list[str]]:
    """The rehearsal's world: ResNet50 with random weights and random BatchNorm statistics, saved
    as a state-dict file (as a user's weights would be), on toy-world images at 224 px."""
    from jobs.gpu_check import _random_bn

    root = Path(tempfile.mkdtemp(prefix="gig-dist-rehearsal-"))
    weights = root / "resnet50-random-bn.pt"
    model = _random_bn(build_model(load_config(None, ["model.name=resnet50", "model.weights=none"]).model))
    torch.save(model.state_dict(), weights)
    return root, "jobs/configs/imagenet-resnet50.yaml", [
        f"model.weights={weights}", "dataset.kind=toy", "dataset.path=none", f"dataset.toy.num_images={args.images}",
        "dataset.toy.image_size=224", f"store.images_per_unit={args.unit}", "store.images_per_chunk=8",
        "extract.batch_size=16", "sample.per_image=16", "concepts.k_multiplier=0.0625", f"gig.images={args.images}",
        f"gig.targets={args.targets}", f"gig.steps={args.steps}", "gig.pairs=[[layer3.5,layer4.2],[layer4.2,logits]]",
        "atlas.members=4", "report.enabled=false", "runtime.progress=false", "runtime.device=cpu", *args.set,
    ]


def bench_pfvs(args: argparse.Namespace) -> None:
    """extract.pfvs: stored PFVs against PFVs recomputed by the stages that read them, on the
    rehearsal's ResNet50 at 224 px, in-process, side by side: each stage's seconds and the store's
    bytes, from extraction to the attribution."""
    import shutil

    import numpy as np

    from gig_dist.formatting import fmt_bytes
    from gig_dist.pipeline import make_runtime, prepare
    from gig_dist.stages.registry import stages_until
    from gig_dist.store import RunStore

    root, config_file, overrides = _rehearsal_setup(args)
    print(f"extract.pfvs on ResNet50 (random weights, random BatchNorm statistics) at 224 px, four stage outputs, "
          f"{args.images} toy-world images in units of {args.unit}, in-process on {torch.get_num_threads()} thread(s); "
          f"GIG {args.targets} targets x {args.steps} steps on 2 pairs")
    seconds: dict[str, dict[str, float]] = {}
    stored: dict[str, int] = {}
    for mode in ("store", "recompute"):
        config = load_config(config_file, [*overrides, f"extract.pfvs={mode}"])
        prepared = prepare(config, root / f"{mode}.zarr")
        seconds[mode] = {}
        try:
            runtime = make_runtime(config)
            for stage_type in stages_until("attribute"):
                stage = stage_type(config, prepared.store.url, fence=prepared.lease.fence)
                seconds[mode][stage.progress_key] = runtime.run(stage).seconds
        finally:
            prepared.lease.release()
        arrays = RunStore.open(prepared.store.url).describe_arrays()
        stored[mode] = sum(a["stored_bytes"] for a in arrays.values())
        stored[f"{mode}/pfv"] = sum(a["stored_bytes"] for path, a in arrays.items() if path.startswith("pfv/"))
    print(f"\n{'stage':<26} {'store':>9} {'recompute':>10} {'ratio':>7}")
    for key in seconds["store"]:
        a, b = seconds["store"][key], seconds["recompute"][key]
        print(f"{key:<26} {a:>8.1f}s {b:>9.1f}s {b / a:>7.2f}")
    total = {mode: float(np.sum(list(seconds[mode].values()))) for mode in seconds}
    print(f"{'total':<26} {total['store']:>8.1f}s {total['recompute']:>9.1f}s {total['recompute'] / total['store']:>7.2f}")
    n = args.images
    print(f"\nstore per image: {fmt_bytes(stored['store'] / n)} with PFVs ({fmt_bytes(stored['store/pfv'] / n)} of them), "
          f"{fmt_bytes(stored['recompute'] / n)} recomputing them ({fmt_bytes(stored['recompute/pfv'] / n)} of PFVs)")
    shutil.rmtree(root, ignore_errors=True)


def bench_rehearsal(args: argparse.Namespace) -> None:
    """An ImageNet-shaped rehearsal: ResNet50 at 224 px (random weights with randomised BatchNorm
    statistics, loaded from a state-dict file as a user's would be) on toy-world images rendered at
    224 px, the four stage outputs, every stage, on Ray with 2 workers. `gig-dist plan` is
    calibrated on the first units here, projected to the whole run, and printed beside the
    measured figures; then the same calibration projects the ImageNet config to 50,000 images."""
    import numpy as np

    from gig_dist.pipeline import make_runtime, prepare
    from gig_dist.plan import (
        PeakRSS,
        calibrate_run,
        fmt_bytes,
        fmt_seconds,
        make_plan,
        plan_facts,
        render,
    )
    from gig_dist.stages.registry import stages_until
    from gig_dist.store import RunStore

    root, config_file, overrides = _rehearsal_setup(args)
    config = load_config(config_file, overrides)
    print(f"rehearsal: ResNet50 (random weights, random BatchNorm statistics) at 224 px, taps {', '.join(config.taps)}, "
          f"{args.images} toy-world images in units of {args.unit}; GIG {args.targets} targets x {args.steps} steps on "
          f"2 pairs; plan calibrated on the first {args.calibrate} unit(s) in-process, the run on Ray with 2 workers")
    started = time.perf_counter()
    calibration = calibrate_run(config, args.calibrate, "cpu", stand_in=False, facts=plan_facts(config, None)[0])
    print(f"calibration: {calibration['images']} images in {time.perf_counter() - started:.0f} s")
    plan = make_plan(config, workers=2, calibration=calibration)
    planned = {s.key: s for s in plan.stages}

    ray_config = load_config(config_file, [*overrides, "runtime.kind=ray", "runtime.num_workers=2",
                                           "runtime.cpus_per_worker=1"])
    prepared = prepare(ray_config, root / "rehearsal.zarr")
    measured = {}
    try:
        runtime = make_runtime(ray_config)
        for stage_type in stages_until(None):
            stage = stage_type(ray_config, prepared.store.url, fence=prepared.lease.fence)
            with PeakRSS() as driver:
                report = runtime.run(stage)
            measured[stage.progress_key] = (report, driver.peak)
    finally:
        prepared.lease.release()
    store = RunStore.open(prepared.store.url)
    arrays = store.describe_arrays()
    n = store.num_images

    print(f"\nper stage, measured on Ray (2 workers, {n} images) against the plan's projection from "
          f"{calibration['images']} images (time error = projected / measured - 1):")
    print(f"{'stage':<26} {'units':>5} {'img/s':>7} {'measured':>9} {'projected':>9} {'error':>7} "
          f"{'B/img stored':>12} {'projected':>10} {'error':>7} {'worker peak':>11} {'formula':>10} {'driver peak':>11}")
    for key, (report, driver_peak) in measured.items():
        p = planned[key]
        owned = [path for path in store.owned_arrays(key) if path in arrays]
        stored = sum(arrays[path]["stored_bytes"] for path in owned) / n
        projected = p.compressed / n
        error = f"{p.seconds / report.seconds - 1:+.0%}" if p.seconds and report.seconds else "-"
        b_error = f"{projected / stored - 1:+.0%}" if stored else "-"
        print(f"{key:<26} {report.units_run:>5} {report.images_per_second:>7.2f} {fmt_seconds(report.seconds):>9} "
              f"{fmt_seconds(p.seconds):>9} {error:>7} {fmt_bytes(stored):>12} {fmt_bytes(projected):>10} {b_error:>7} "
              f"{fmt_bytes(report.worker_peak_rss):>11} {fmt_bytes(p.footprint.worker):>10} {fmt_bytes(driver_peak):>11}")
    print("\nbytes per image of every array (stored, compressed; raw in brackets):")
    for path, a in arrays.items():
        if "str" in a["dtype"].lower() or path.startswith("progress/"):
            continue
        raw = int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize
        print(f"  {path:<56} {a['dtype']:<8} {fmt_bytes(a['stored_bytes'] / n):>10}  ({fmt_bytes(raw / n)})")

    full = load_config(config_file, [])
    imagenet = make_plan(full, images=50_000, workers=8, device="cuda", calibration=calibration)
    print("\nthe ImageNet config projected to 50,000 images on 8 workers from this calibration (its compression "
          "ratios and widths; its times are this CPU's at the rehearsal's K and GIG settings, not a GPU's):")
    print(render(imagenet, arrays=False))
    import shutil

    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
