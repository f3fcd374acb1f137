"""Stage ``decompose``: every PFV of the chosen taps as a sparse code over its tap's concepts
(docs/method.md section 5: the non-negative Lasso for the paper's dictionary), one unit per shard.

A unit reads its images' PFVs, encodes all of them with the run's dictionary (on the worker's
device), and writes fixed-width codes (``decompose.max_nonzero`` slots of index and value, by
decreasing value) and the unit's statistics (``kernels.metrics.reconstruction_stats``).
Skipped images keep empty codes. ``decompose.images`` limits the images decomposed: raising it
later decomposes only the new ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from gig_dist.kernels.dictionaries import DICTIONARIES
from gig_dist.kernels.metrics import reconstruction_stats
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.stages.coding import (
    decompose_taps,
    encode_params,
)
from gig_dist.stages.forward import PFVSource, forward_bytes, resolve_device
from gig_dist.store import (
    PROCESSED,
    ArraySpec,
    CodesSection,
    ConceptsSection,
    Facts,
    ImageRange,
    MetaSection,
)
from gig_dist.store.codes import code_specs

if TYPE_CHECKING:
    from gig_dist.config import Config


class DecomposeStage(Stage):
    name = "decompose"
    config_section = "decompose"
    linear_in_k = True
    family = CodesSection
    reads = ("concepts",)
    result_keys = ("decompose.taps", "decompose.lambda_rel", "decompose.lam", "decompose.max_nonzero", "decompose.value_dtype",
                   "decompose.tol", "decompose.batch_size")
    coverage_key = "decompose.images"
    later_keys = {"decompose.value_dtype": "float32"}
    per_dictionary = True

    @classmethod
    def check(cls, config: Config, facts: Facts) -> list[str]:
        errors = []
        lambdas = config.decompose.lambda_rel if isinstance(config.decompose.lambda_rel, dict) else {}
        for key, named in (("decompose.taps", config.decompose.taps or []), ("decompose.lambda_rel", lambdas)):
            unknown = [tap for tap in named if tap not in facts.taps]
            if unknown:
                errors.append(f"{key} names taps that are not in this run: {unknown}; the run's taps are "
                              f"{list(facts.taps)}")
        return errors

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return code_specs(facts, self.dictionary, {tap: sizes.concepts(tap) for tap in self.taps(facts)},
                          self.config.decompose.max_nonzero, self.config.decompose.value_dtype)

    def taps(self, facts: Facts) -> list[str]:
        return decompose_taps(self.config, list(facts.taps))

    def covers(self, unit: WorkUnit) -> bool:
        limit = self.config.decompose.images
        return limit is None or unit.start < limit

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        """A unit's PFVs of a tap in float32, its codes, the coder's Gram matrix and a batch's
        correlations."""
        worker, dense, width = 0, [], self.config.decompose.max_nonzero
        item = np.dtype(self.config.extract.dtype).itemsize
        unit = facts.images_per_unit
        for tap in self.taps(facts):
            c, h, w = facts.taps[tap]
            k = sizes.concepts(tap)
            batch = min(self.config.decompose.batch_size, unit * h * w)
            worker = max(worker, unit * h * w * (c * (4 + item) + width * 8) + k * k * 8 + k * c * 12
                         + 3 * batch * k * 8)
            dense.append((f"{tap} Gram matrix V V^T", (k, k), "float64"))
        if self.config.extract.pfvs == "recompute":  # the unit's forward pass, all its taps kept
            worker += forward_bytes(self.config, facts)
        return Footprint(worker, dense=dense)

    def open_worker(self, device: str) -> DecomposeWorker:
        return DecomposeWorker(self, resolve_device(device))


class DecomposeWorker(StageWorker):
    def __init__(self, stage: DecomposeStage, device: torch.device) -> None:
        self.store = stage.open_store()
        self.codes = self.store.family(CodesSection, stage.dictionary)
        concepts = self.store.family(ConceptsSection, stage.dictionary)
        kind = DICTIONARIES[stage.method]
        self.width = stage.config.decompose.max_nonzero
        self.pfvs = PFVSource(stage.config, self.store, device, stage.taps(self.store.facts))
        self.dictionaries = {
            tap: kind.from_arrays(concepts.arrays(tap), **encode_params(stage.config, tap, str(device)))
            for tap in stage.taps(self.store.facts)
        }

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.family(MetaSection).read_status(r)
        rows = np.flatnonzero(status == PROCESSED)
        for tap, dictionary in self.dictionaries.items():
            pfvs = self.pfvs.read(tap, r)  # (n, H*W, C)
            n, positions, channels = pfvs.shape
            x = pfvs[rows].reshape(-1, channels).astype(np.float32)
            index = np.full((n, positions, self.width), -1, dtype=np.int32)
            value = np.zeros((n, positions, self.width), dtype=np.float32)
            if len(x) and not np.isfinite(x).all():
                bad = np.flatnonzero(~np.isfinite(x.reshape(len(rows), -1)).all(1))
                raise ValueError(
                    f"tap {tap}: PFVs of images {[r.start + int(rows[b]) for b in bad[:5]]} hold NaN or "
                    "infinite values (the model produced them, or the store is damaged); rerun extraction")
            kept_index = np.zeros((0, self.width), dtype=np.int32)
            kept_value = np.zeros((0, self.width), dtype=np.float32)
            l0 = np.zeros(0, dtype=np.int64)
            if len(x):
                found_index, found_value = dictionary.encode(x)
                l0 = (found_index >= 0).sum(1)
                kept_index = found_index[:, : self.width]
                kept_value = found_value[:, : self.width]
                pad = self.width - kept_index.shape[1]
                index[rows] = np.pad(kept_index, ((0, 0), (0, pad)), constant_values=-1).reshape(len(rows), positions, -1)
                value[rows] = np.pad(kept_value, ((0, 0), (0, pad))).reshape(len(rows), positions, -1)
            stats, pfv_sum = reconstruction_stats(x, kept_index, kept_value, dictionary.dictionary_, l0, self.width,
                                                  len(rows))
            self.codes.write(r, tap, index, value, stats, pfv_sum if len(x) else np.zeros(channels))
        if progress is not None:
            progress(len(r))
        return UnitReport(unit.index, len(r), int(len(r) - rows.size))

    def close(self) -> None:
        self.pfvs.close()
