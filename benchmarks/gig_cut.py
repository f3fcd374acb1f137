"""GIG per image, cut against hook, side by side: the sub-network cut out of a model built around
a sequential trunk (only the blocks between the taps run at each step) against the whole model
run at every step with the source tap's output replaced.

    python benchmarks/gig_cut.py [--images 2] [--targets 8] [--steps 32]

Pairs: ViT-S/16 ``blocks.5 -> blocks.9`` (timm's ``vit_small_patch16_224``, the ``power`` rule)
and EfficientNet-Lite0 ``blocks.3 -> blocks.5`` (timm's ``tf_efficientnet_lite0``, midpoint),
random weights, random sparse codes over 256 concepts, at 224 px. Both ways must give the same
attributions; the table prints their largest difference.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

PAIRS = [("timm:vit_small_patch16_224", "blocks.5", "blocks.9", "power"),
         ("timm:tf_efficientnet_lite0", "blocks.3", "blocks.5", "midpoint")]


def main(argv: list[str] | None = None) -> None:
    from gig_dist.config import load_config
    from gig_dist.kernels.gig import GIG
    from gig_dist.kernels.taps import probe
    from gig_dist.models.loading import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(f"GIG per image, {args.targets} targets x {args.steps} steps, 2 threads; {platform.node()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'model':<28} {'pair':<22} {'hook s':>7} {'cut s':>7} {'ratio':>6} {'max |diff|':>11}")
    for name, source, target, rule in PAIRS:
        model = build_model(load_config(None, [f"model.name={name}", "model.weights=none"]).model)
        shapes, _, layouts = probe(model, [source, target], (224, 224))
        generator = torch.Generator().manual_seed(0)
        c, h, w = shapes[source].channels, shapes[source].height, shapes[source].width
        k = 256
        V = torch.nn.functional.normalize(torch.randn(k, c, generator=generator), dim=1)
        W = torch.nn.functional.normalize(torch.randn(k, shapes[target].channels, generator=generator), dim=1)
        images = torch.randn(args.images, 3, 224, 224, generator=generator)
        codes = [(torch.randint(0, k, (h * w, 4), generator=generator), torch.rand(h * w, 4, generator=generator))
                 for _ in range(args.images)]
        targets = torch.arange(args.targets)
        seconds, results = {}, {}
        for cut in (False, True):
            kernel = GIG(model, source, target, V, (c, h, w), W, steps=args.steps, rule=rule,
                         layouts=(layouts[source], layouts[target]), cut=cut)
            started = time.perf_counter()
            results[cut] = [kernel.attribute(i, v, targets, image=image).attribution
                            for (i, v), image in zip(codes, images)]
            seconds[cut] = (time.perf_counter() - started) / args.images
        diff = max(float((a - b).abs().max()) for a, b in zip(results[False], results[True]))
        print(f"{name:<28} {source + ' -> ' + target:<22} {seconds[False]:>7.2f} {seconds[True]:>7.2f} "
              f"{seconds[False] / seconds[True]:>6.2f} {diff:>11.2e}")


if __name__ == "__main__":
    main()
