"""iERFs of given PFVs, stored: what the concept atlas calls for the few PFVs it shows.

Not a unit-sharded stage: the PFVs a report shows are few. Requests are grouped by image, so
all requested PFVs of one image share one SRD decomposition.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.ierf import Method, ierf
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.stages.forward import resolve_device
from gig_dist.store import RunStore

if TYPE_CHECKING:
    from gig_dist.config import Config


def compute_ierfs(config: Config, store_url: str, requests: list[tuple[int, str, int]], name: str = "requested",
                  method: Method = "auto") -> tuple[np.ndarray, list[str]]:
    """iERFs of the PFVs ``(image index, tap, position)``, written to ``ierf/<name>``.

    Returns the maps (M, H, W), in request order, and each map's kind (``srd`` or ``gradient``).
    """
    store = RunStore.open(store_url, mode="r+")
    taps = list(store.taps)
    for image, tap, position in requests:
        if tap not in store.taps:
            raise ValueError(f"tap {tap!r} is not in this store; its taps: {', '.join(taps)}")
        c, h, w = store.taps[tap]
        if not 0 <= position < h * w:
            raise ValueError(f"position {position} is outside {tap} ({h}x{w})")
        if not 0 <= image < store.num_images:
            raise ValueError(f"image {image} is outside the dataset (0..{store.num_images - 1})")
    device = resolve_device(config.runtime.device)
    model = build_model(config.model).to(device)
    transform = resolve_transform(config)
    loader = ImageLoader(transform, config.dataset.max_image_pixels, config.dataset.loader_threads)
    by_image: dict[int, list[int]] = defaultdict(list)
    for k, (image, _, _) in enumerate(requests):
        by_image[image].append(k)
    maps = np.zeros((len(requests), transform.crop, transform.crop), dtype=np.float32)
    kinds = [""] * len(requests)
    try:
        for image, indices in by_image.items():
            path = store.meta.path(image)
            loaded = loader.load(str(path))
            if loaded.image is None:
                raise ValueError(f"image {image} ({path}) cannot be read: {loaded.reason}")
            x = loaded.image[None].to(device)
            by_tap: dict[str, list[int]] = defaultdict(list)
            for k in indices:
                by_tap[requests[k][1]].append(k)
            for tap, ks in by_tap.items():
                positions = torch.tensor([[requests[k][2] for k in ks]], device=device)
                found, kind = ierf(model, x, tap, positions, method)
                maps[ks] = found[0].cpu().numpy()
                for k in ks:
                    kinds[k] = kind
    finally:
        loader.close()
    table = np.array([(image, taps.index(tap), position) for image, tap, position in requests], dtype=np.int64)
    store.meta.write_ierfs(name, table.reshape(-1, 3), maps, kinds)
    return maps, kinds
