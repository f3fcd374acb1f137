"""Class graphs from the dataset GIG matrices (method.md section 6).

A class graph is built top-down: the ``top`` concepts of the last tap with the largest
``Gamma^(last -> class)[:, c]``, then for each of them the ``top`` sources in the previous tap by
``Gamma^(prev -> last)``, and so on down the chain of taps. Only positive attributions are
followed. A concept reached from two or more classes is *shared* between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def class_graph(class_matrix: np.ndarray, chain: Sequence[str], matrices: Mapping[tuple[str, str], np.ndarray],
                cls: int, top: int = 3) -> dict[str, Any]:
    """The graph of class ``cls``. ``class_matrix`` is ``Gamma^(chain[0] -> class)`` (K, classes);
    ``chain`` lists taps from the last to the first; ``matrices[(prev, tap)]`` is
    ``Gamma^(prev -> tap)`` (K_prev, K_tap) for consecutive taps of the chain."""
    if not 0 <= cls < class_matrix.shape[1]:
        raise ValueError(f"class {cls} out of range: the matrix has {class_matrix.shape[1]} classes")
    nodes: dict[tuple[str, int], dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []

    def strongest(scores: np.ndarray) -> list[int]:
        order = np.argsort(-scores, kind="stable")[:top]
        return [int(k) for k in order if scores[k] > 0]

    frontier = []
    for k in strongest(class_matrix[:, cls]):
        nodes[(chain[0], k)] = {"tap": chain[0], "concept": k}
        edges.append({"source": [chain[0], k], "target": ["class", cls], "weight": float(class_matrix[k, cls])})
        frontier.append(k)
    for upper, lower in zip(chain, chain[1:]):
        matrix = matrices[(lower, upper)]
        next_frontier: list[int] = []
        for m in frontier:
            for k in strongest(matrix[:, m]):
                nodes.setdefault((lower, k), {"tap": lower, "concept": k})
                edges.append({"source": [lower, k], "target": [upper, m], "weight": float(matrix[k, m])})
                if k not in next_frontier:
                    next_frontier.append(k)
        frontier = next_frontier
    return {"class": cls, "taps": list(chain), "nodes": list(nodes.values()), "edges": edges}


def mark_shared(graphs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add to every node the other classes whose graphs reach the same concept."""
    reached: dict[tuple[str, int], list[int]] = {}
    for graph in graphs:
        for node in graph["nodes"]:
            reached.setdefault((node["tap"], node["concept"]), []).append(graph["class"])
    for graph in graphs:
        for node in graph["nodes"]:
            others = [c for c in reached[(node["tap"], node["concept"])] if c != graph["class"]]
            node["shared_with"] = others
            node["shared"] = bool(others)
    return graphs
