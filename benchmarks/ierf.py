"""iERFs/s batched (one decomposition per image, all PFVs in one pass) against one at a time
(a decomposition per PFV, as a per-PFV tool would do), and one SRD decomposition against one
forward pass, for the toy model and ResNet50 (random weights).

    python benchmarks/ierf.py [--pfvs 64]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pfvs", type=int, default=64, help="PFVs per image in the batched pass")
    bench_ierf(parser.parse_args(argv))


if __name__ == "__main__":
    main()
