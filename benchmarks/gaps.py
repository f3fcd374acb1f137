"""Completeness gaps of GIG at 8, 16, 32 and 64 midpoint steps: their distribution per pair,
relative (``|sum_k GIG - delta| / |delta|``) and absolute against the target's magnitude at the
path's ends (what ``gig.atol`` bounds), on two models; and ``gig.max_gap`` refining a case where
a target barely changes.

    python benchmarks/gaps.py [--images 4 --targets 8]

Models: EfficientNet-Lite0 with its real ImageNet weights (``jobs.examples.efficientnet_lite0``) on
the photos scikit-image ships, and ResNet50 with random weights and random BatchNorm statistics
and biases (blocks not positively homogeneous) on random images, both at 224 px. Concepts: 64
per tap, from the tap's own PFVs (sampled, jittered, unit length), codes by the non-negative Lasso;
targets: the first concepts of the target tap, or the image's top classes.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch import nn

STEPS = (8, 16, 32, 64)


def _dictionary(pfvs: np.ndarray, rng: np.random.Generator, k: int = 64) -> np.ndarray:
    V = pfvs[rng.choice(len(pfvs), k, replace=len(pfvs) < k)] + 0.05 * np.abs(rng.normal(size=(k, pfvs.shape[1])))
    return (V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def gaps(model: nn.Module, images: torch.Tensor, pairs: list[tuple[str, str]], targets: int, name: str) -> None:
    from gig_dist.kernels.gig import GIG, LOGITS
    from gig_dist.kernels.lasso import NonNegativeLassoCoder
    from gig_dist.kernels.taps import capture, probe

    taps = sorted({t for pair in pairs for t in pair if t != LOGITS})
    _, _, layouts = probe(model, taps, (224, 224))
    rng = np.random.default_rng(0)
    with capture(model, taps) as found, torch.no_grad():
        logits = model(images)
    dictionaries = {tap: _dictionary(found[tap].transpose(1, 0).flatten(1).T.numpy(), rng) for tap in taps}
    print(f"\n{name}: {len(images)} images, {targets} targets per image and pair")
    print(f"  {'pair':<26}{'steps':>6}  {'relative gap: median':>21}{'q90':>9}{'max':>9}  "
          f"{'absolute / scale: median':>25}{'q90':>9}{'max':>9}")
    for source, target in pairs:
        V = dictionaries[source]
        W = None if target == LOGITS else torch.from_numpy(dictionaries[target])
        rows = {steps: ([], []) for steps in STEPS}
        for i in range(len(images)):
            act = found[source][i]
            index, value = NonNegativeLassoCoder(V, lambda_rel=0.05).encode(act.flatten(1).T.numpy())
            goal = torch.arange(targets) if target != LOGITS else logits[i].topk(targets).indices
            for steps in STEPS:
                kernel = GIG(model, source, target, torch.from_numpy(V), tuple(act.shape), W, steps=steps,
                             layouts=(layouts[source], layouts.get(target)))
                result = kernel.attribute(torch.from_numpy(index).long(), torch.from_numpy(value), goal,
                                          endpoints=True, image=images[i])
                error = (result.total - result.delta).abs()
                rows[steps][0].extend(result.gap.tolist())
                rows[steps][1].extend((error / result.scale.clamp_min(1e-12)).tolist())
        for steps, (relative, absolute) in rows.items():
            r, a = np.asarray(relative), np.asarray(absolute)
            r = r[np.isfinite(r)]
            print(f"  {source + ' -> ' + target:<26}{steps:>6}  {np.median(r):>21.2e}{np.quantile(r, 0.9):>9.2e}"
                  f"{r.max():>9.2e}  {np.median(a):>25.2e}{np.quantile(a, 0.9):>9.2e}{a.max():>9.2e}")


def main(argv: list[str] | None = None) -> None:
    from gig_dist.config import load_config
    from gig_dist.data.sources import ImageLoader
    from gig_dist.kernels.gig import LOGITS
    from gig_dist.models.loading import build_model, resolve_transform
    from jobs.examples import efficientnet_lite0, photos

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--targets", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(f"GIG completeness gaps at {', '.join(map(str, STEPS))} midpoint steps; {platform.node()}, "
          f"{time.strftime('%Y-%m-%d')}")

    lite0 = efficientnet_lite0.model().eval()
    for p in lite0.parameters():
        p.requires_grad_(False)
    config = load_config("jobs/configs/photos-efficientnet-lite0.yaml")
    loader = ImageLoader(resolve_transform(config), 10**9, 1)
    from PIL import Image

    pictures = [image for subject in photos.photos().values() for image in subject.values()][: args.images]
    images = torch.stack([loader.transform(Image.fromarray(np.asarray(p)).convert("RGB")) for p in pictures])
    gaps(lite0, images, [("blocks.2", "blocks.4"), ("blocks.4", "blocks.6"), ("blocks.4", LOGITS),
                         ("blocks.6", LOGITS)], args.targets, "EfficientNet-Lite0, ImageNet weights, real photos")

    resnet = build_model(load_config(None, ["model.name=resnet50", "model.weights=none"]).model).eval()
    g = torch.Generator().manual_seed(0)
    for m in resnet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.5
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.5
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    for p in resnet.parameters():
        p.requires_grad_(False)
    gaps(resnet, torch.randn(max(2, args.images // 2), 3, 224, 224, generator=g),
         [("layer2.3", "layer3.5"), ("layer3.5", "layer4.2"), ("layer3.5", LOGITS)], args.targets,
         "ResNet50, random weights and BatchNorm statistics, random images")


if __name__ == "__main__":
    main()
