"""Stage ``extract``: images -> PFVs of every tap, logits, predictions, skip records.

One unit is one shard of images. Images are decoded on a thread pool while earlier batches run
through the model, tap outputs are copied to the store dtype inside the forward hooks, and the
unit's arrays are written shard by shard at the end, while the next unit computes: a worker runs
two units at once, their compute serialised by a lock and their writes outside it.

The model runs in channels-last memory format: convolutions are faster on CPU and GPU, and a
channels-last (N, C, H, W) tap is already laid out as PFVs (N, H*W, C), so no transpose is copied.
"""

from __future__ import annotations

import logging
import threading
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.taps import as_feature_map, capture, pfvs
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.settings import Section
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
    model_bytes,
    tap_values,
)
from gig_dist.store import PROCESSED, SKIPPED, ArraySpec, Facts, ImageRange, RunStore
from gig_dist.store.meta import extraction_specs

log = logging.getLogger(__name__)


class ExtractConfig(Section):
    batch_size: int = Field(default=32, ge=1)
    dtype: Literal["float16", "float32"] = "float16"


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device = 'cuda' but no CUDA device is visible to this process")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


class ExtractStage(Stage):
    name = "extract"
    # What decides the PFVs: the model, the images and how they are read, the taps, the dtype.
    # (The batch size too: convolution results may differ in the last bits between batch sizes.)
    result_keys = ("model.", "dataset.kind", "dataset.path", "dataset.toy.", "dataset.stride", "dataset.limit",
                   "dataset.max_image_pixels", "transform.", "taps", "extract.")
    worker_concurrency = 2

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return extraction_specs(facts, self.config.extract.dtype)

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        """The unit's PFVs in memory, a batch's activations in float32 twice."""
        values, item = tap_values(facts), np.dtype(self.config.extract.dtype).itemsize
        return Footprint(model_bytes(facts) + facts.images_per_unit * values * item
                         + 2 * self.config.extract.batch_size * values * 4)

    def open_worker(self, device: str) -> ExtractWorker:
        return ExtractWorker(self, resolve_device(device))


class ExtractWorker(StageWorker):
    def __init__(self, stage: ExtractStage, device: torch.device) -> None:
        config = stage.config
        self.store = RunStore.open(stage.store_url, mode="r+")
        self.device = device
        self.model = build_model(config.model).to(device, memory_format=torch.channels_last)
        self.compute_lock = threading.Lock()
        self.taps = list(self.store.taps)
        self.meta = self.store.meta
        self.dtype = getattr(torch, config.extract.dtype)
        self.dtype_np = np.dtype(config.extract.dtype)
        self.batch_size = config.extract.batch_size
        self.loader = ImageLoader(
            resolve_transform(config), config.dataset.max_image_pixels, config.dataset.loader_threads
        )
        self.num_outputs = self.store.facts.num_outputs

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        with self.compute_lock:
            pfv, logits, status, reasons, masks = self._compute(r, progress)
        self.meta.write_extraction(r, pfvs=pfv, logits=logits, status=status, skip_reasons=reasons, part_masks=masks)
        return UnitReport(unit.index, len(r), int((status == SKIPPED).sum()))

    def _compute(self, r: ImageRange, progress: Progress | None):
        paths, _ = self.meta.read_index(r)
        n = len(paths)
        outputs = {
            tap: np.full((n, h * w, c), np.nan, dtype=self.dtype_np) for tap, (c, h, w) in self.store.taps.items()
        }
        logits = np.full((n, self.num_outputs), np.nan, dtype=np.float32)
        status = np.full(n, SKIPPED, dtype=np.uint8)
        reasons = [""] * n
        masks = None

        loading = self.loader.submit_all(paths)
        for first in range(0, n, self.batch_size):
            rows, inputs = [], []
            for row in range(first, min(first + self.batch_size, n)):
                loaded = loading[row].result()
                if loaded.image is None:
                    reasons[row] = loaded.reason
                    log.warning("skipping %s: %s", paths[row], loaded.reason)
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
        return logits.cpu().numpy(), {tap: pfvs(as_feature_map(tap, taps[tap])).cpu().numpy() for tap in self.taps}

    def close(self) -> None:
        self.loader.close()
