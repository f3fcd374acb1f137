"""GIG for all targets of one image: the batched kernel against one Captum
LayerIntegratedGradients call per target (on the codes, through the same sub-network), same
steps and rule; the values are compared too.

    python benchmarks/gig.py [--images 3 --targets 32 --steps 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from gig_dist.config import load_config
from gig_dist.models.loading import build_model


def bench_gig(args: argparse.Namespace) -> None:
    """GIG for all targets of one image: the batched kernel against one Captum
    LayerIntegratedGradients call per target (on the codes, through the same sub-network), same
    steps and rule; the values are compared too."""
    import numpy as np
    from captum.attr import LayerIntegratedGradients
    from torch import nn

    from gig_dist.kernels.gig import GIG
    from gig_dist.kernels.lasso import NonNegativeLassoCoder
    from gig_dist.kernels.taps import capture

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    bench_gig(parser.parse_args(argv))


if __name__ == "__main__":
    main()
