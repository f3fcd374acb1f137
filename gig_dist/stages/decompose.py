"""Stage ``decompose``: every PFV of the chosen taps as a sparse code over its tap's concepts
(method.md section 5: the non-negative Lasso for the paper's dictionary), one unit per shard.

A unit reads its images' PFVs, encodes all of them with the run's dictionary (on the worker's
device), and writes fixed-width codes (``decompose.max_nonzero`` slots of index and value, by
decreasing value) and the unit's statistics (``kernels.metrics.reconstruction_stats``).
Skipped images keep empty codes. ``decompose.images`` limits the images decomposed: raising it
later decomposes only the new ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from gig_dist.kernels.dictionary import DICTIONARIES
from gig_dist.kernels.metrics import reconstruction_stats
from gig_dist.settings import Section
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.stages.extract import PFVSource, forward_bytes, resolve_device
from gig_dist.store import PROCESSED, ArraySpec, Facts, ImageRange
from gig_dist.store.codes import code_specs

if TYPE_CHECKING:
    from gig_dist.config import Config


class DecomposeConfig(Section):
    """Every PFV as a sparse non-negative combination of its tap's concepts (method.md section 5)."""

    #: Taps to decompose. ``None``: every tap.
    taps: tuple[str, ...] | None = None
    #: Decompose only the first N images (rounded up to whole store units). ``None``: all.
    images: int | None = Field(default=None, ge=1)
    #: ``lambda = lambda_rel * max_k <v_k, a>`` per PFV; one value, or one per tap
    #: (``{layer1.0: 0.05, layer4.2: 0.1}``; taps not listed take 0.1). 0.1 is gig-dist's choice
    #: (the paper states none); the toy world's default is 0.05 (``TOY_LAMBDA_REL``).
    lambda_rel: float | dict[str, float] = 0.1
    #: An absolute lambda for every PFV instead (``None``: use lambda_rel).
    lam: float | None = Field(default=None, ge=0)
    #: Code slots stored per PFV. A PFV whose support is larger keeps its largest coefficients;
    #: how many PFVs were cut is counted per tap and shown by ``gig-dist inspect``.
    max_nonzero: int = Field(default=32, ge=1)
    #: How code values are stored: float32, or float16 (half the bytes; relative rounding 5e-4,
    #: and every reader, GIG included, then works from the rounded codes).
    value_dtype: Literal["float32", "float16"] = "float32"
    #: KKT tolerance of the solver, relative to the PFV's norm.
    tol: float = Field(default=1e-6, gt=0)
    #: PFVs per batched solve.
    batch_size: int = Field(default=4096, ge=1)

    @model_validator(mode="after")
    def _lambda_non_negative(self) -> DecomposeConfig:
        values = self.lambda_rel.values() if isinstance(self.lambda_rel, dict) else [self.lambda_rel]
        if any(v < 0 for v in values):
            raise ValueError(f"decompose.lambda_rel must be non-negative, got {self.lambda_rel}")
        if self.taps is not None and len(self.taps) == 0:
            raise ValueError("decompose.taps is empty; leave it unset to decompose every tap")
        return self

    def lambda_for(self, tap: str) -> float:
        if isinstance(self.lambda_rel, dict):
            return self.lambda_rel.get(tap, 0.1)
        return self.lambda_rel


def decompose_taps(config: Config, taps: list[str]) -> list[str]:
    return list(config.decompose.taps) if config.decompose.taps is not None else list(taps)


def encode_params(config: Config, tap: str, device: str) -> dict:
    """How a fitted dictionary encodes: the Lasso's lambda and tolerance; a top-k SAE's k."""
    options = config.decompose
    params = {"lambda_rel": options.lambda_for(tap), "lam": options.lam, "tol": options.tol,
              "batch_size": options.batch_size, "device": device}
    if config.concepts.method == "sae":
        params["top_k"] = config.concepts.sae_top_k
    return params


def sparsity_of(coder, X: np.ndarray, metric: str) -> float:
    """The mean l0 (``metric`` ``l0``) or R^2 (``r2``) of ``coder``'s codes of ``X`` (n, C)."""
    index, value = coder.encode(X)
    if metric == "l0":
        return float(((index >= 0) & (value != 0)).sum(1).mean())
    X64 = X.astype(np.float64)
    variance = float(((X64 - X64.mean(0)) ** 2).sum())
    error = float(((X64 - coder.decode(index, value)) ** 2).sum())
    return 1 - error / variance if variance > 0 else 1.0


def matched_lambda(coder_for, pfvs: np.ndarray, metric: str, target: float, low: float = 1e-4,
                   high: float = 0.95, iterations: int = 16, tolerance: float = 0.02) -> tuple[float, float]:
    """The ``lambda_rel`` whose codes of ``pfvs`` (n, C) reach ``target`` mean l0 (``metric``
    ``l0``) or R^2 (``r2``). Both fall as lambda grows, so a bisection on log lambda finds it;
    it stops within ``tolerance`` (relative) of the target. ``coder_for(lambda_rel)`` is a fitted
    dictionary that encodes at that lambda. Returns the lambda and the value it reached."""
    X = np.ascontiguousarray(pfvs, dtype=np.float32)
    lo, hi = np.log(low), np.log(high)
    best: tuple[float, float] | None = None
    for _ in range(iterations):
        lam = float(np.exp((lo + hi) / 2))
        value = sparsity_of(coder_for(lam), X, metric)
        if best is None or abs(value - target) < abs(best[1] - target):
            best = (lam, value)
        if abs(value - target) <= tolerance * abs(target):
            break
        if value > target:  # too dense (or too faithful): raise lambda
            lo = np.log(lam)
        else:
            hi = np.log(lam)
    return best


def matched_top_k(fit_for, pfvs: np.ndarray, target: float, largest: int) -> tuple[int, float]:
    """The smallest top-k in 1..``largest`` whose top-k SAE (``fit_for(k)``, fitted) reconstructs
    ``pfvs`` to R^2 >= ``target`` (else ``largest``): R^2 grows with k, so a bisection over k, a
    fit per step. Returns k and the R^2 it reached."""
    X = np.ascontiguousarray(pfvs, dtype=np.float32)
    lo, hi, reached = 1, largest, {}
    while lo < hi:
        k = (lo + hi) // 2
        reached[k] = sparsity_of(fit_for(k), X, "r2")
        if reached[k] >= target:
            hi = k
        else:
            lo = k + 1
    if lo not in reached:
        reached[lo] = sparsity_of(fit_for(lo), X, "r2")
    return lo, reached[lo]


class DecomposeStage(Stage):
    name = "decompose"
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
        self.codes = self.store.codes(stage.dictionary)
        concepts = self.store.concepts(stage.dictionary)
        kind = DICTIONARIES[stage.method]
        self.width = stage.config.decompose.max_nonzero
        self.pfvs = PFVSource(stage.config, self.store, device, stage.taps(self.store.facts))
        self.dictionaries = {
            tap: kind.from_arrays(concepts.arrays(tap), **encode_params(stage.config, tap, str(device)))
            for tap in stage.taps(self.store.facts)
        }

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.meta.read_status(r)
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
