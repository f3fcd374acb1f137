"""Top-k per group, deterministic: the largest values of each group, ties broken by order keys."""

from __future__ import annotations

import numpy as np


def top_per_group(groups: np.ndarray, values: np.ndarray, ties: tuple[np.ndarray, ...], num_groups: int,
                  k: int) -> np.ndarray:
    """For each group g in ``0..num_groups-1``, the positions (in the input) of its entries with
    the ``k`` largest ``values``, largest first, ties by ``ties`` (smaller first, the first key
    deciding): an array (num_groups, k), -1 where a group has fewer than k entries."""
    entry = np.full((num_groups, k), -1, dtype=np.int64)
    if len(values) == 0:
        return entry
    order = np.lexsort((*reversed(ties), -np.asarray(values, dtype=np.float64), groups))
    sorted_groups = groups[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_groups, sorted_groups)
    keep = rank < k
    entry[sorted_groups[keep], rank[keep]] = order[keep]
    return entry
