"""Class graphs and the class-conditional GIG matrices they are read from (docs/method.md section 6).

A class graph is built top-down: the ``top`` concepts of the last tap with the largest
``Gamma^(last -> class)[:, c]``, then for each of them the ``top`` sources in the previous tap,
and so on down the chain of taps. Only positive attributions are followed. A concept reached
from two or more classes is *shared* between them.

Below the top level, the sources of a node come from one of two matrices:

* ``class`` (the default): ``Gamma_c^(a -> b)``, the mean GIG over the images of class c only;
* ``dataset``: ``Gamma^(a -> b)``, the mean over every attributed image.

The top level, ``Gamma^(a -> class)[:, c]``, is a mean over class c's images in both. Measured on
the toy world (docs/guides/pipeline.md, "Class graphs"), the class-conditional sources keep more of held-out
class images' attribution than the dataset-wide ones, hence the default.

Edge weights keep their GIG values; every edge also has ``relative``: its weight over the
largest weight of its level in that graph, so that each level is on one scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.sparse import issparse

#: ``sources(lower, upper, m, top)``: the strongest sources (concept, weight) of concept ``m`` of
#: tap ``upper`` among the concepts of tap ``lower``, strongest first, positive only.
Sources = Callable[[str, str, int, int], list[tuple[int, float]]]


def strongest(scores: np.ndarray, top: int) -> list[tuple[int, float]]:
    order = np.argsort(-scores, kind="stable")[:top]
    return [(int(k), float(scores[k])) for k in order if scores[k] > 0]


def column(matrix: Any, m: int) -> np.ndarray:
    """Column ``m`` of a dense array or a ``scipy.sparse`` matrix (best as CSC), dense."""
    return matrix[:, [m]].toarray().ravel() if issparse(matrix) else np.asarray(matrix[:, m])


def row(matrix: Any, k: int) -> np.ndarray:
    """Row ``k`` of a dense array or a ``scipy.sparse`` matrix (best as CSR), dense."""
    return matrix[[k], :].toarray().ravel() if issparse(matrix) else np.asarray(matrix[k])


def dense_sources(matrices: Mapping[tuple[str, str], Any]) -> Sources:
    """Sources read from ``Gamma^(lower -> upper)`` matrices (K_lower, K_upper), dense arrays or
    ``scipy.sparse`` matrices (CSC reads a column fastest)."""
    return lambda lower, upper, m, top: strongest(column(matrices[(lower, upper)], m), top)


def top_table_sources(tables: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]) -> Sources:
    """Sources read from per-target tables of strongest sources ((K_upper, E) indices, -1 pad,
    and values, strongest first), as the reduce stage stores them per class."""

    def sources(lower: str, upper: str, m: int, top: int) -> list[tuple[int, float]]:
        index, value = tables[(lower, upper)]
        return [(int(k), float(v)) for k, v in zip(index[m][:top], value[m][:top]) if k >= 0 and v > 0]

    return sources


def class_graph(class_matrix: np.ndarray, chain: Sequence[str], sources: Sources, cls: int,
                top: int = 3) -> dict[str, Any]:
    """The graph of class ``cls``. ``class_matrix`` is ``Gamma^(chain[0] -> class)`` (K, classes);
    ``chain`` lists taps from the last to the first; ``sources`` gives each node's strongest
    sources in the tap below (:func:`dense_sources`, :func:`top_table_sources`)."""
    if not 0 <= cls < class_matrix.shape[1]:
        raise ValueError(f"class {cls} out of range: the matrix has {class_matrix.shape[1]} classes")
    nodes: dict[tuple[str, int], dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []
    frontier = []
    for k, weight in strongest(class_matrix[:, cls], top):
        nodes[(chain[0], k)] = {"tap": chain[0], "concept": k}
        edges.append({"source": [chain[0], k], "target": ["class", cls], "weight": weight, "level": 0})
        frontier.append(k)
    for level, (upper, lower) in enumerate(zip(chain, chain[1:]), start=1):
        next_frontier: list[int] = []
        for m in frontier:
            for k, weight in sources(lower, upper, m, top):
                nodes.setdefault((lower, k), {"tap": lower, "concept": k})
                edges.append({"source": [lower, k], "target": [upper, m], "weight": weight, "level": level})
                if k not in next_frontier:
                    next_frontier.append(k)
        frontier = next_frontier
    levels = [{"source": lower, "target": upper, "scale": 0.0}
              for upper, lower in zip(["class", *chain], chain)]
    for edge in edges:
        levels[edge["level"]]["scale"] = max(levels[edge["level"]]["scale"], edge["weight"])
    for edge in edges:
        edge["relative"] = edge["weight"] / levels[edge["level"]]["scale"]
    return {"class": cls, "taps": list(chain), "nodes": list(nodes.values()), "edges": edges, "levels": levels}


def mark_shared(graphs: list[dict[str, Any]], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Add to every node the other classes whose graphs reach the same concept, by index and
    by name."""
    reached: dict[tuple[str, int], list[int]] = {}
    for graph in graphs:
        for node in graph["nodes"]:
            reached.setdefault((node["tap"], node["concept"]), []).append(graph["class"])
    for graph in graphs:
        for node in graph["nodes"]:
            others = [c for c in reached[(node["tap"], node["concept"])] if c != graph["class"]]
            node["shared_with"] = others
            node["shared_with_names"] = [names[c] if names is not None and c < len(names) else str(c) for c in others]
            node["shared"] = bool(others)
    return graphs


# -- the class-conditional reduction ---------------------------------------------------------------


def sum_entries(classes: np.ndarray, keys: np.ndarray, values: np.ndarray, span: int) -> tuple[np.ndarray, ...]:
    """Add up sparse entries (class, key, value) with equal class and key, in the order given
    (so the sums do not depend on anything but that order). Returns them sorted by class, key."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
    composite = np.asarray(classes, dtype=np.int64) * span + np.asarray(keys, dtype=np.int64)
    unique, inverse = np.unique(composite, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(unique))
    return unique // span, unique % span, sums


def top_sources(keys: np.ndarray, values: np.ndarray, k_target: int, edges: int) -> tuple[np.ndarray, np.ndarray]:
    """Per target concept, its ``edges`` strongest sources from entries ``key = source * K_b +
    target``: ((K_b, edges) sources, -1 pad; their values), strongest first, ties by source."""
    source_out = np.full((k_target, edges), -1, dtype=np.int32)
    value_out = np.zeros((k_target, edges), dtype=np.float32)
    if len(keys) == 0:
        return source_out, value_out
    source, target = keys // k_target, keys % k_target
    order = np.lexsort((source, -values, target))
    target_sorted = target[order]
    rank = np.arange(len(order)) - np.searchsorted(target_sorted, target_sorted)
    keep = rank < edges
    source_out[target_sorted[keep], rank[keep]] = source[order][keep]
    value_out[target_sorted[keep], rank[keep]] = values[order][keep]
    return source_out, value_out


def class_offsets(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Where each class starts in entries sorted by class (``num_classes + 1`` offsets)."""
    return np.searchsorted(classes, np.arange(num_classes + 1)).astype(np.int64)
