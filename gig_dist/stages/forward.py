"""The forward pass every stage that reads PFVs shares, below the stages (no stage imports another):
the device, a unit's model forward (:class:`UnitForward`), the PFVs of a unit read from the store
or recomputed (:class:`PFVSource`), and what a forward pass costs in memory."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from gig_dist.data.files import shown
from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.taps import as_feature_map, capture, pfvs, stored_layout
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.stages.base import (
    Progress,
    model_bytes,
    tap_values,
)
from gig_dist.store import PROCESSED, SKIPPED, Facts, ImageRange, MetaSection, RunStore

if TYPE_CHECKING:
    from gig_dist.config import Config

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device = 'cuda' but no CUDA device is visible to this process")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def forward_bytes(config: Config, facts: Facts) -> int:
    """A unit's forward pass (:class:`UnitForward`): the model, the unit's PFVs in the store
    dtype, a batch's activations in float32 twice, the unit's decoded inputs in float32, and each
    loader thread's image resized to ``transform.resize`` on its short side (4:3, in uint8)."""
    values, item = tap_values(facts), np.dtype(config.extract.dtype).itemsize
    transform = resolve_transform(config)
    resized = config.dataset.loader_threads * transform.resize * math.ceil(transform.resize * 4 / 3) * 3
    inputs = facts.images_per_unit * 3 * transform.crop**2 * 4
    return (model_bytes(facts) + facts.images_per_unit * values * item + 2 * config.extract.batch_size * values * 4
            + inputs + resized)


def forward_why(config: Config) -> str:
    """The settings a forward pass's memory grows with, for a refusal's message."""
    transform = resolve_transform(config)
    return (f"transform.resize = {transform.resize} and crop {transform.crop}, dataset.loader_threads = "
            f"{config.dataset.loader_threads}, extract.batch_size = {config.extract.batch_size}, "
            f"store.images_per_unit = {config.store.images_per_unit}")


class UnitForward:
    """The extraction's forward pass over one unit of images: decode on a thread pool, run the
    model channels-last in batches of ``extract.batch_size``, copy each tap to the store dtype
    inside its hook. With ``processed`` (a recomputation) it runs on the images extraction
    processed, in the batches extraction ran them in, so that it gives the same values."""

    def __init__(self, config: Config, store: RunStore, device: torch.device, taps: list[str]) -> None:
        self.store = store
        self.device = device
        self.model = build_model(config.model).to(device, memory_format=torch.channels_last)
        self.taps = taps
        self.dtype = getattr(torch, config.extract.dtype)
        self.dtype_np = np.dtype(config.extract.dtype)
        self.batch_size = config.extract.batch_size
        self.loader = ImageLoader(
            resolve_transform(config), config.dataset.max_image_pixels, config.dataset.loader_threads
        )
        self.num_outputs = store.facts.num_outputs

    def compute(self, r: ImageRange, progress: Progress | None = None, processed: np.ndarray | None = None):
        """PFVs {tap: (n, H*W, C)} (NaN where skipped), logits, status, skip reasons and part masks of images ``r``."""
        paths, _ = self.store.family(MetaSection).read_index(r)
        n = len(paths)
        outputs = {tap: np.full((n, h * w, c), np.nan, dtype=self.dtype_np)
                   for tap, (c, h, w) in self.store.taps.items() if tap in self.taps}
        logits = np.full((n, self.num_outputs), np.nan, dtype=np.float32)
        status = np.full(n, SKIPPED, dtype=np.uint8)
        reasons = [""] * n
        masks = None

        wanted = range(n) if processed is None else [int(row) for row in processed]
        loading = dict(zip(wanted, self.loader.submit_all([paths[row] for row in wanted])))
        for first in range(0, n, self.batch_size):
            rows, inputs = [], []
            for row in range(first, min(first + self.batch_size, n)):
                if row not in loading:
                    continue
                loaded = loading[row].result()
                if loaded.image is None:
                    if processed is not None:
                        raise RuntimeError(f"extract.pfvs = recompute: an image that extraction read can no longer "
                                           f"be read ({shown(paths[row])}): {loaded.reason}")
                    reasons[row] = loaded.reason
                    log.warning("skipping %s: %s", shown(paths[row]), loaded.reason)
                    continue
                if loaded.part_mask is not None:
                    if masks is None:
                        masks = np.zeros((n, *loaded.part_mask.shape), dtype=np.uint8)
                    masks[row] = loaded.part_mask
                rows.append(row)
                inputs.append(loaded.image)
            if inputs:
                batch_logits, batch_pfvs = self._forward(torch.stack(inputs))
                logits[rows] = batch_logits
                status[rows] = PROCESSED
                for tap, values in batch_pfvs.items():
                    outputs[tap][rows] = values
            if progress is not None:
                progress(min(self.batch_size, n - first))

        return outputs, logits, status, reasons, masks

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        # Copy each tap to the store dtype inside its hook, before later in-place ops can touch it.
        with capture(self.model, self.taps, convert=lambda t: t.detach().to(self.dtype, copy=True)) as taps:
            logits = self.model(x).float().reshape(len(x), -1)
        layouts = self.store.facts.layouts
        return logits.cpu().numpy(), {tap: pfvs(as_feature_map(tap, taps[tap], stored_layout(layouts, tap))).cpu().numpy()
                                      for tap in self.taps}

    def close(self) -> None:
        self.loader.close()


#: Largest difference of recomputed logits from the stored ones, relative to their scale, that
#: still counts as the same forward pass (thread counts may reorder a convolution's sums).
RECOMPUTE_LOGIT_TOLERANCE = 1e-3


class PFVSource:
    """A unit's PFVs of some taps: read from the store, or, where extraction did not store them
    (``extract.pfvs = recompute``), computed again by its forward pass, one unit at a time
    (the last unit's are kept for the next tap asked)."""

    def __init__(self, config: Config, store: RunStore, device: torch.device, taps: list[str]) -> None:
        self.store = store
        self.taps = [tap for tap in store.taps if tap in taps]
        self.stored = all(store.family(MetaSection).has_pfvs(tap) for tap in self.taps)
        self.config, self.device = config, device
        self._forward: UnitForward | None = None
        self._unit: tuple[ImageRange | None, dict[str, np.ndarray]] = (None, {})

    def read(self, tap: str, r: ImageRange) -> np.ndarray:
        """PFVs (images, positions, channels) of ``tap`` for images ``r``, in the store dtype."""
        if self.stored:
            return self.store.family(MetaSection).read_pfvs(tap, r)
        if self._unit[0] != r:
            self._unit = (r, self._compute(r))
        return self._unit[1][tap]

    def _compute(self, r: ImageRange) -> dict[str, np.ndarray]:
        if self._forward is None:
            self._forward = UnitForward(self.config, self.store, self.device, self.taps)
        status, _ = self.store.family(MetaSection).read_status(r)
        processed = np.flatnonzero(status == PROCESSED)
        outputs, logits, *_ = self._forward.compute(r, processed=processed)
        stored = self.store.family(MetaSection).read_logits(r)[processed]
        scale = max(float(np.abs(stored).max()) if stored.size else 0.0, 1e-12)
        worst = float(np.abs(logits[processed] - stored).max()) / scale if stored.size else 0.0
        if not worst <= RECOMPUTE_LOGIT_TOLERANCE:
            raise RuntimeError(f"extract.pfvs = recompute: the forward pass of images {r.start}:{r.stop} gives logits "
                               f"{worst:.2g} (relative) away from those extraction stored; the model or the images "
                               "changed since extraction, so its PFVs would not be the run's. Rerun extraction")
        return outputs

    def close(self) -> None:
        if self._forward is not None:
            self._forward.close()
