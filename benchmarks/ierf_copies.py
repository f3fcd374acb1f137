"""Gradient iERFs: peak memory and time against the image copies per backward pass
(``atlas.ierf_copies``), each setting in a fresh process (peak resident memory only grows).

    python benchmarks/ierf_copies.py [--pfvs 64] [--copies 4 8 16 32 64]

The model is EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``, random weights: the cost does
not depend on them) at 224 px, where SRD has no rules, so the atlas takes gradient iERFs; the
PFVs are ``--pfvs`` positions of its ``blocks.4`` tap on 8 images.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def one(copies: int, pfvs: int) -> dict[str, float]:
    import torch

    from gig_dist.config import load_config
    from gig_dist.kernels.ierf import gradient_ierf
    from gig_dist.models.loading import build_model

    torch.set_num_threads(2)
    model = build_model(load_config(None, ["model.name=timm:tf_efficientnet_lite0", "model.weights=none"]).model)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    positions = torch.randint(0, 196, (8, pfvs // 8), generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    maps = gradient_ierf(model, images, "blocks.4", positions, chunk=copies)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert maps.shape == (8, pfvs // 8, 224, 224)
    return {"copies": copies, "seconds": seconds, "peak_gib": peak / 2**20, "model_gib": before / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pfvs", type=int, default=64)
    parser.add_argument("--copies", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.pfvs)))
        return
    print(f"gradient iERFs of {args.pfvs} PFVs, tf_efficientnet_lite0 blocks.4 at 224 px, 2 threads; "
          f"{platform.node()}, {time.strftime('%Y-%m-%d')}")
    print(f"{'copies':>6} {'seconds':>8} {'peak GiB':>9} {'before GiB':>10}")
    for copies in args.copies:
        done = subprocess.run([sys.executable, __file__, "--pfvs", str(args.pfvs), "--one", str(copies)],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{row['copies']:>6} {row['seconds']:>8.1f} {row['peak_gib']:>9.2f} {row['model_gib']:>10.2f}")


if __name__ == "__main__":
    main()
