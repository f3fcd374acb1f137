"""extraction throughput against the bare forward pass

    python benchmarks/extract.py [--images 4096] [--model toy] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from _common import bare_forward, config_for, extraction


def bench_extract(args: argparse.Namespace) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cores = os.cpu_count()
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base = config_for(args, args.images)
        forward, forward_cores = bare_forward(base)
        rows.append((f"bare forward ({torch.get_num_threads()} threads)", forward, forward_cores, "1.00 x forward"))
        local, local_cores, _ = extraction(base, root / "local.zarr")
        rows.append(("extract in-process", local, local_cores, f"{local / forward:.2f} x forward (target >= 0.85)"))
        # extract.pfvs=recompute: the logits only; sample, decompose and attribute pay a forward each
        kept, kept_cores, _ = extraction(config_for(args, args.images, "extract.pfvs=recompute"), root / "recompute.zarr")
        rows.append(("extract, pfvs=recompute", kept, kept_cores, f"{kept / forward:.2f} x forward (no PFVs written)"))

        import ray

        from gig_dist.runtime.ray_runtime import connect

        connect(None)
        on_ray = ("runtime.kind=ray",)
        ray1, ray1_cores, _ = extraction(config_for(args, args.images, *on_ray, "runtime.num_workers=1"), root / "r1.zarr")
        rows.append(("extract on Ray, 1 worker", ray1, ray1_cores, f"{ray1 / forward:.2f} x forward"))
        ray2, ray2_cores, peak_full = extraction(
            config_for(args, args.images, *on_ray, "runtime.num_workers=2"), root / "r2.zarr", trace_driver=True
        )
        rows.append(("extract on Ray, 2 workers", ray2, ray2_cores, f"{ray2 / ray1:.2f} x 1 worker (target >= 1.7)"))
        _, _, peak_quarter = extraction(
            config_for(args, args.images // 4, *on_ray, "runtime.num_workers=2"), root / "r3.zarr", trace_driver=True
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--model", default="toy", help="toy, or a torchvision name (random weights) with --data")
    parser.add_argument("--data", help="an ImageFolder tree for torchvision models (default: toy images at 224 px)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    bench_extract(parser.parse_args(argv))


if __name__ == "__main__":
    main()
