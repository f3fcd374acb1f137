"""A concept's examples beyond its top members (pure numpy): a deterministic random sample of its
uses, and the distribution of its code values on fixed log bins.

* **Random examples.** Each use of a concept (a PFV whose code gives it a value) gets a hash of
  (concept, image, position); a concept's sample is its uses with the smallest hashes. That is a
  uniform sample without replacement, the same wherever and in whatever order units run, and two
  units' samples merge into the sample of both (keep the smallest hashes of the union).
* **Histogram.** Code values counted on :data:`HISTOGRAM_EDGES`, the same bins for every concept
  and tap, so units' counts add up. A value's percentile among a concept's uses is read from it
  (:func:`percentile`), to the resolution of a bin.
"""

from __future__ import annotations

import numpy as np

#: Bins per decade, and the decades covered; values below the first edge (and 0) fall into the
#: first bin, values above the last into the last.
BINS_PER_DECADE = 4
FIRST_DECADE, LAST_DECADE = -4, 6
HISTOGRAM_EDGES = 10.0 ** np.arange(FIRST_DECADE, LAST_DECADE + 1e-9, 1 / BINS_PER_DECADE)
HISTOGRAM_BINS = len(HISTOGRAM_EDGES) + 1

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters nearby inputs."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = (x * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = x ^ (x >> np.uint64(27))
        x = (x * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def example_hash(concept: np.ndarray, image: np.ndarray, position: np.ndarray) -> np.ndarray:
    """A uint64 hash of each (concept, image, position)."""
    with np.errstate(over="ignore"):
        key = _mix(np.asarray(image, dtype=np.uint64) * np.uint64(1 << 24) + np.asarray(position, dtype=np.uint64))
        return _mix(key ^ (np.asarray(concept, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) & _MASK))


def sample_strength(concept: np.ndarray, image: np.ndarray, position: np.ndarray) -> np.ndarray:
    """What ``kernels.topk.top_per_group`` ranks to keep the smallest hashes: minus the hash's top
    53 bits, exact in float64 (ties, one in 2^53, go to the smaller image, then position)."""
    return -(example_hash(concept, image, position) >> np.uint64(11)).astype(np.float64)


def histogram(concept: np.ndarray, value: np.ndarray, concepts: int) -> np.ndarray:
    """Counts (concepts, HISTOGRAM_BINS) of each concept's values on the fixed bins."""
    bins = np.searchsorted(HISTOGRAM_EDGES, np.asarray(value, dtype=np.float64), side="right")
    counts = np.bincount(np.asarray(concept, dtype=np.int64) * HISTOGRAM_BINS + bins,
                         minlength=concepts * HISTOGRAM_BINS)
    return counts.reshape(concepts, HISTOGRAM_BINS)


def percentile(counts: np.ndarray, value: float) -> float:
    """The share of a concept's uses (its ``counts``) with a smaller value than ``value``, within
    the bin's resolution: the uses of lower bins plus half those of its own bin."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    b = int(np.searchsorted(HISTOGRAM_EDGES, value, side="right"))
    return float((counts[:b].sum() + counts[b] / 2) / total)


def top_share(counts: np.ndarray, value: float) -> float:
    """The share of a concept's uses whose value lies in ``value``'s bin or above: "in the top
    x %" at the histogram's resolution (a member's rank among all uses is not known to a bin)."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    b = int(np.searchsorted(HISTOGRAM_EDGES, value, side="right"))
    return float(counts[b:].sum() / total)


def bin_range(b: int) -> tuple[float, float]:
    """Bin ``b``'s edges (0 and inf at the ends)."""
    low = 0.0 if b == 0 else float(HISTOGRAM_EDGES[b - 1])
    high = float("inf") if b >= len(HISTOGRAM_EDGES) else float(HISTOGRAM_EDGES[b])
    return low, high


#: The quantiles of a concept's code values its report page shows examples at.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def quantile_values(counts: np.ndarray, quantiles=QUANTILES) -> list[float]:
    """The value at each quantile of a histogram, to a bin: the geometric middle of the bin
    where the cumulative share reaches it (NaN: no uses)."""
    total = counts.sum()
    if total == 0:
        return [float("nan")] * len(quantiles)
    cumulative = np.cumsum(counts) / total
    found = []
    for q in quantiles:
        b = int(np.searchsorted(cumulative, q, side="left"))
        low, high = bin_range(b)
        found.append(high / 2 if low == 0 else low if not np.isfinite(high) else float(np.sqrt(low * high)))
    return found


def quantile_picks(values: np.ndarray, counts: np.ndarray, quantiles=QUANTILES) -> list[int]:
    """Among a sample's ``values``, for each quantile the one whose percentile in ``counts`` is
    nearest it (each sample at most once; -1 where none is left)."""
    ranks = np.asarray([percentile(counts, v) for v in values])
    left = list(range(len(values)))
    picks = []
    for q in quantiles:
        if not left:
            picks.append(-1)
            continue
        best = min(left, key=lambda i: (abs(ranks[i] - q), i))
        picks.append(best)
        left.remove(best)
    return picks
