"""Stage ``decompose``: every PFV of the chosen taps as a sparse non-negative combination of its
tap's concept vectors (method.md section 5), one unit per store shard.

A unit reads its images' PFVs, solves the non-negative Lasso for all of them in batches (torch,
on the worker's device), and writes fixed-width codes (``decompose.max_nonzero`` slots of index
and value, by decreasing value) and the unit's statistics: PFV count, sum of l0, reconstruction
error of the *stored* codes, and the sums needed for R^2. Skipped images keep empty codes.
"""

from __future__ import annotations

import numpy as np
import torch

from gig_dist.kernels.lasso import NonNegativeLassoCoder
from gig_dist.stages.base import Progress, Stage, StageWorker, UnitReport, WorkUnit
from gig_dist.stages.extract import resolve_device
from gig_dist.store import CODE_STATS, PROCESSED, ImageRange, RunStore


def decompose_taps(config, taps: list[str]) -> list[str]:
    return list(config.decompose.taps) if config.decompose.taps is not None else list(taps)


class DecomposeStage(Stage):
    name = "decompose"

    def plan(self, store: RunStore) -> list[WorkUnit]:
        limit = self.config.decompose.images
        return [unit for unit in super().plan(store) if limit is None or unit.start < limit]

    def open_worker(self, device: str) -> DecomposeWorker:
        return DecomposeWorker(self, resolve_device(device))


class DecomposeWorker(StageWorker):
    def __init__(self, stage: DecomposeStage, device: torch.device) -> None:
        options = stage.config.decompose
        self.store = RunStore.open(stage.store_url, mode="r+")
        self.width = self.store.code_width
        self.coders = {
            tap: NonNegativeLassoCoder(
                self.store.read_concepts(tap), lambda_rel=options.lambda_for(tap), lam=options.lam,
                tol=options.tol, batch_size=options.batch_size, device=str(device),
            )
            for tap in self.store.code_taps
        }

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.read_status(r)
        rows = np.flatnonzero(status == PROCESSED)
        for tap, coder in self.coders.items():
            pfvs = self.store.read_pfvs(tap, r)  # (n, H*W, C)
            n, positions, channels = pfvs.shape
            x = pfvs[rows].reshape(-1, channels).astype(np.float32)
            index = np.full((n, positions, self.width), -1, dtype=np.int32)
            value = np.zeros((n, positions, self.width), dtype=np.float32)
            stats = np.zeros(len(CODE_STATS))
            if len(x):
                if not np.isfinite(x).all():
                    bad = np.flatnonzero(~np.isfinite(x.reshape(len(rows), -1)).all(1))
                    raise ValueError(
                        f"tap {tap}: PFVs of images {[r.start + int(rows[b]) for b in bad[:5]]} hold NaN or "
                        "infinite values (the model produced them, or the store is damaged); rerun extraction"
                    )
                found_index, found_value = coder.encode(x)
                l0 = (found_index >= 0).sum(1)
                kept_index = found_index[:, : self.width]
                kept_value = found_value[:, : self.width]
                # The error of the codes as stored (cut to `width` slots), in float64, slot by slot.
                dictionary = coder.dictionary.astype(np.float64)
                residual = x.astype(np.float64)
                for slot in range(kept_index.shape[1]):
                    residual -= kept_value[:, slot, None] * dictionary[np.maximum(kept_index[:, slot], 0)]
                per_image = kept_index.reshape(len(rows), -1)
                active = max(len(np.unique(row[row >= 0])) for row in per_image)
                stats[:] = (len(x), l0.sum(), np.einsum("nc,nc->", residual, residual),
                            np.einsum("nc,nc->", x, x, dtype=np.float64), (l0 > self.width).sum(), l0.max(), active)
                pad = self.width - kept_index.shape[1]
                index[rows] = np.pad(kept_index, ((0, 0), (0, pad)), constant_values=-1).reshape(len(rows), positions, -1)
                value[rows] = np.pad(kept_value, ((0, 0), (0, pad))).reshape(len(rows), positions, -1)
            self.store.write_codes(r, tap, index, value, stats, x.sum(axis=0, dtype=np.float64))
        if progress is not None:
            progress(len(r))
        return UnitReport(unit.index, len(r), int(len(r) - rows.size))
