"""Statistics computed once, here, and used by every stage and reader that reports them.

Pure functions of arrays: no store, no Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: |delta| at or below this counts as no change to attribute: the relative gap is undefined there.
GAP_EPSILON = 1e-12


def completeness_gap(total: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """The relative completeness gap ``|total - delta| / |delta|`` of GIG (docs/method.md section 6),
    elementwise; NaN where ``delta`` is NaN or ``|delta| <= GAP_EPSILON`` (nothing to complete)."""
    total, delta = np.asarray(total, dtype=np.float64), np.asarray(delta, dtype=np.float64)
    defined = np.abs(delta) > GAP_EPSILON  # False for NaN as well
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(defined, np.abs(total - delta) / np.where(defined, np.abs(delta), 1.0), np.nan)


def kept_fraction(delta: np.ndarray, delta_real: np.ndarray) -> np.ndarray:
    """The share of the real change the reconstruction keeps, ``[S(F(X~)) - S(F(0))] / [S(F(X)) -
    S(F(0))]`` elementwise; NaN where the real change is NaN or at most ``GAP_EPSILON``."""
    delta, delta_real = np.asarray(delta, dtype=np.float64), np.asarray(delta_real, dtype=np.float64)
    defined = np.abs(delta_real) > GAP_EPSILON
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(defined, delta / np.where(defined, delta_real, 1.0), np.nan)


def kept_summary(kept: np.ndarray) -> dict[str, float | None]:
    """Mean and median of the defined kept fractions."""
    defined = np.asarray(kept, dtype=np.float64)
    defined = defined[~np.isnan(defined)]
    if not defined.size:
        return {"mean_kept": None, "median_kept": None}
    return {"mean_kept": float(defined.mean()), "median_kept": float(np.median(defined))}


def gap_summary(gaps: np.ndarray) -> dict[str, float | int | None]:
    """Count, mean, median and max of the defined (non-NaN) gaps."""
    defined = np.asarray(gaps, dtype=np.float64)
    defined = defined[~np.isnan(defined)]
    if not defined.size:
        return {"targets": 0, "mean_gap": None, "median_gap": None, "max_gap": None}
    return {"targets": int(defined.size), "mean_gap": float(defined.mean()),
            "median_gap": float(np.median(defined)), "max_gap": float(defined.max())}


def refinement_summary(steps: np.ndarray, gap_first: np.ndarray) -> dict[str, Any]:
    """With ``gig.max_gap``: how many targets took how many steps, and the gaps they had at the
    first step count (the ``*_gap`` figures beside them are after refinement)."""
    used, counts = np.unique(np.asarray(steps), return_counts=True)
    before = gap_summary(gap_first)
    return {"steps_used": {str(int(s)): int(c) for s, c in zip(used, counts)},
            "gap_before": {key.removesuffix("_gap"): value for key, value in before.items() if key != "targets"}}


#: Columns of the per-unit reconstruction statistics that :func:`reconstruction_stats` returns
#: and :func:`reconstruction_summary` reduces (they add up over units).
RECONSTRUCTION_STATS = ("pfvs", "l0_sum", "squared_error", "squared_norm", "truncated", "max_l0", "max_active")


def reconstruction_stats(x: np.ndarray, kept_index: np.ndarray, kept_value: np.ndarray, dictionary: np.ndarray,
                         l0: np.ndarray, width: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of one unit's codes as stored: ``x`` (n, C) the PFVs, ``kept_index`` and
    ``kept_value`` (n, L') their codes cut to at most ``width`` slots, ``l0`` (n,) the support
    before the cut, ``images`` how many images the n PFVs come from (in equal, consecutive runs).

    Returns (stats, pfv_sum): stats in the order of :data:`RECONSTRUCTION_STATS` (float64) and the
    PFVs' sum (C,) in float64, the two things R^2 needs once added over units."""
    stats = np.zeros(len(RECONSTRUCTION_STATS))
    if not len(x):
        return stats, np.zeros(x.shape[1] if x.ndim == 2 else 0)
    dictionary = np.asarray(dictionary, dtype=np.float64)
    residual = x.astype(np.float64)
    for slot in range(kept_index.shape[1]):  # slot by slot: never an (n, L, C) temporary
        residual -= kept_value[:, slot, None] * dictionary[np.maximum(kept_index[:, slot], 0)]
    per_image = kept_index.reshape(images, -1)
    active = max(len(np.unique(row[row >= 0])) for row in per_image)
    stats[:] = (len(x), l0.sum(), np.einsum("nc,nc->", residual, residual),
                np.einsum("nc,nc->", x, x, dtype=np.float64), (l0 > width).sum(), l0.max(), active)
    return stats, x.sum(axis=0, dtype=np.float64)


def reconstruction_summary(unit_stats: np.ndarray, unit_sum: np.ndarray, concepts: int) -> dict:
    """Mean l0, l0 ratio and R^2 = 1 - SSE / total variance over the units done (rows without NaN)."""
    done = ~np.isnan(unit_stats).any(axis=1)
    totals = dict(zip(RECONSTRUCTION_STATS, unit_stats[done].sum(axis=0))) if done.any() else \
        dict.fromkeys(RECONSTRUCTION_STATS, 0.0)
    pfvs = totals["pfvs"]
    summary: dict = {"units_done": int(done.sum()), "pfvs": int(pfvs), "k": int(concepts)}
    if pfvs:
        mean = unit_sum[done].sum(axis=0) / pfvs
        total_variance = totals["squared_norm"] - pfvs * float(mean @ mean)
        summary.update(
            mean_l0=totals["l0_sum"] / pfvs,
            l0_ratio=totals["l0_sum"] / pfvs / concepts if concepts else None,
            r2=1 - totals["squared_error"] / total_variance if total_variance > 0 else None,
            max_l0=int(unit_stats[done, RECONSTRUCTION_STATS.index("max_l0")].max()),
            max_active=int(unit_stats[done, RECONSTRUCTION_STATS.index("max_active")].max()),
            truncated=int(totals["truncated"]),
        )
    return summary


def concept_purity(part_mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth (toy world): from each concept's iERF mass per mask value (K, 1 + parts),
    column 0 background, its purity, the share of its mass on its strongest part type (NaN for a
    concept without mass), and that part's index."""
    total = part_mass.sum(1)
    parts = part_mass[:, 1:]
    purity = np.where(total > 0, parts.max(1) / np.maximum(total, 1e-30), np.nan)
    return purity, parts.argmax(1)


def part_recall(found: list[tuple[np.ndarray, np.ndarray]], parts: int, threshold: float = 0.8) -> dict[str, Any]:
    """The share of the ``parts`` part types that some concept covers with purity at least
    ``threshold``, over ``(purity, part)`` pairs of any number of taps."""
    covered: set[int] = set()
    for purity, part in found:
        good = np.isfinite(purity) & (purity >= threshold)
        covered |= set(np.asarray(part)[good].tolist())
    return {"parts": parts, "covered": len(covered), "recall": len(covered) / parts, "names": sorted(covered)}
