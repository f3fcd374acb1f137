"""``gig.max_gap`` on a model of real size: ResNet50 at 224 px (random weights, random
BatchNorm statistics and biases so that blocks are not positively homogeneous), one random
image, concepts from k-means of its own PFVs and the non-negative Lasso. Class targets: the
half of ``--targets`` that change most and the half that barely change, where a relative gap
cannot fall under max_gap. Per pair, with the relative test alone (atol 0) and beside
``gig.atol``: the gaps at ``--steps``, after refinement, the steps the targets used, and the
time of each.

    python benchmarks/refinement.py [--steps 32 --max-gap 0.01 --max-steps 256 --targets 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from gig_dist.config import load_config
from gig_dist.models.loading import build_model


def bench_gaps(args: argparse.Namespace) -> None:
    """``gig.max_gap`` on a model of real size: ResNet50 at 224 px (random weights, random
    BatchNorm statistics and biases so that blocks are not positively homogeneous), one random
    image, concepts from k-means of its own PFVs and the non-negative Lasso. Class targets: the
    half of ``--targets`` that change most and the half that barely change, where a relative gap
    cannot fall under max_gap. Per pair, with the relative test alone (atol 0) and beside
    ``gig.atol``: the gaps at ``--steps``, after refinement, the steps the targets used, and the
    time of each."""
    import numpy as np
    from torch import nn

    from gig_dist.kernels.gig import GIG, LOGITS, reconstruct, refine
    from gig_dist.kernels.lasso import NonNegativeLassoCoder
    from gig_dist.kernels.metrics import completeness_gap
    from gig_dist.kernels.taps import capture

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-gap", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=256)
    parser.add_argument("--atol", type=float, default=1e-3, help="gig.atol, beside the relative test")
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--bn", type=float, default=0.5, help="std of the random BatchNorm biases and means")
    bench_gaps(parser.parse_args(argv))


if __name__ == "__main__":
    main()
