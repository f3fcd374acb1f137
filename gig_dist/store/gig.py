"""Section ``gig``: GIG attributions of each dictionary, per tap pair, and the class graphs.

``gig/<dict>/<a>__<b>/`` holds the pair from tap a's concepts to tap b's (b = ``logits``: to the
classes). Written by the attribute stage:

    source  (image, source_slot)     int32 each image's active source concepts (-1 pad)
    target  (image, target_slot)     int32 its targets (top code mass at b, or predicted and true class)
    delta   (image, target_slot)     float64 S(F(X~)) - S(F(0))
    delta_real (image, target_slot)  float64 S(F(X)) - S(F(0)) of the stored (real) PFVs
    partial (step_chunk, image, target_slot, source_slot) float64 per-step-range sums of GIG

by the reduce stage:

    total, gap      (image, target_slot)        sum_k GIG and the relative completeness gap
    kept            (image, target_slot)        the share of the real change the reconstruction keeps
    edges/source, edges/value (image, target_slot, edge)  the strongest sources per target
    block_matrix    (block, source_concept, <target>)  each reduce block's sum, in image order
    block_count     (block, <target>)           images per column in each block
    matrix          (source_concept, <target>)  the dataset Gamma, blocks added in block order
    count           (<target>,)                 its images per column; attributes: completeness

``<target>`` is ``target_concept`` or ``class``. ``gig/<dict>/graphs (class,)`` holds one JSON
class graph per class (method.md section 6), written by the graphs stage.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gig_dist.store.core import ArraySpec, Facts, ImageRange, RunStore, StoreError

LOGITS = "logits"
Pair = tuple[str, str]


def pair_key(source: str, target: str) -> str:
    return f"{source}__{target}"


def _target_dim(target: str) -> str:
    return "class" if target == LOGITS else "target_concept"


def attribution_specs(facts: Facts, dictionary: str, pair: Pair, *, targets: int, target_chunk: int, width: int,
                      step_chunks: int) -> list[ArraySpec]:
    base, n, unit = f"gig/{dictionary}/{pair_key(*pair)}", facts.num_images, facts.images_per_unit
    return [
        ArraySpec(f"{base}/source", (n, width), "int32", ("image", "source_slot"), (unit, width), fill_value=-1,
                  growable=True),
        ArraySpec(f"{base}/target", (n, targets), "int32", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=-1),
        ArraySpec(f"{base}/delta", (n, targets), "float64", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=np.nan),
        ArraySpec(f"{base}/delta_real", (n, targets), "float64", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=np.nan),
        ArraySpec(f"{base}/partial", (step_chunks, n, targets, width), "float64",
                  ("step_chunk", "image", "target_slot", "source_slot"), (1, unit, target_chunk, width),
                  fill_value=0.0, growable=True),
    ]


def reduction_specs(facts: Facts, dictionary: str, pair: Pair, *, targets: int, edges: int, blocks: int,
                    matrix_shape: tuple[int, int]) -> list[ArraySpec]:
    base, n, unit = f"gig/{dictionary}/{pair_key(*pair)}", facts.num_images, facts.images_per_unit
    k_a, columns = matrix_shape
    dims = ("source_concept", _target_dim(pair[1]))
    return [
        ArraySpec(f"{base}/total", (n, targets), "float64", ("image", "target_slot"), (unit, targets), fill_value=np.nan),
        ArraySpec(f"{base}/gap", (n, targets), "float64", ("image", "target_slot"), (unit, targets), fill_value=np.nan),
        ArraySpec(f"{base}/kept", (n, targets), "float64", ("image", "target_slot"), (unit, targets), fill_value=np.nan),
        ArraySpec(f"{base}/edges/source", (n, targets, edges), "int32", ("image", "target_slot", "edge"),
                  (unit, targets, edges), fill_value=-1),
        ArraySpec(f"{base}/edges/value", (n, targets, edges), "float32", ("image", "target_slot", "edge"),
                  (unit, targets, edges), fill_value=0.0),
        ArraySpec(f"{base}/block_matrix", (blocks, k_a, columns), "float64", ("block", *dims), (1, k_a, columns),
                  fill_value=0.0),
        ArraySpec(f"{base}/block_count", (blocks, columns), "int64", ("block", dims[1]), (1, columns), fill_value=0),
        ArraySpec(f"{base}/matrix", (k_a, columns), "float64", dims, (k_a, columns), fill_value=0.0),
        ArraySpec(f"{base}/count", (columns,), "int64", (dims[1],), (columns,), fill_value=0),
    ]


def graph_specs(facts: Facts, dictionary: str) -> list[ArraySpec]:
    classes = facts.num_outputs
    return [ArraySpec(f"gig/{dictionary}/graphs", (classes,), "str", ("class",), (max(classes, 1),), fill_value="")]


class GIGSection:
    def __init__(self, store: RunStore, dictionary: str) -> None:
        self.store = store
        self.dictionary = dictionary

    def _path(self, pair: Pair, name: str) -> str:
        return f"gig/{self.dictionary}/{pair_key(*pair)}/{name}"

    def width(self, pair: Pair) -> int:
        """Source slots per image of the pair's arrays."""
        return int(self.store.array(self._path(pair, "source")).shape[1])

    # -- attribute ---------------------------------------------------------------------------------

    def write_unit(self, pair: Pair, r: ImageRange, *, step_chunk: int, targets: tuple[int, int],
                   partial: np.ndarray, sources: np.ndarray | None, chosen: np.ndarray | None,
                   delta: np.ndarray | None, delta_real: np.ndarray | None) -> None:
        """One attribution unit: its chunk of partial sums (step range ``step_chunk``, images
        ``r``, target slots ``targets``); the unit of the first step range also writes the chosen
        targets and the completeness endpoints, and with the first target slots the sources."""
        sl = self.store.unit_slice(r)
        t = slice(*targets)
        self.store.array(self._path(pair, "partial"))[step_chunk, sl, t, : partial.shape[-1]] = partial
        if chosen is not None:
            self.store.array(self._path(pair, "target"))[sl, t] = chosen
            self.store.array(self._path(pair, "delta"))[sl, t] = delta
            self.store.array(self._path(pair, "delta_real"))[sl, t] = delta_real
        if sources is not None:
            self.store.array(self._path(pair, "source"))[sl, : sources.shape[1]] = sources

    def read_unit(self, pair: Pair, r: ImageRange) -> dict[str, np.ndarray]:
        """Partial sums (S, n, T, W), sources, targets and deltas of images ``r``."""
        return {"partial": self.store.array(self._path(pair, "partial"))[:, r.start : r.stop],
                **{name: self.store.array(self._path(pair, name))[r.start : r.stop]
                   for name in ("source", "target", "delta", "delta_real")}}

    # -- reduce --------------------------------------------------------------------------------------

    def write_reduced(self, pair: Pair, r: ImageRange, *, total: np.ndarray, gap: np.ndarray, kept: np.ndarray,
                      edge_source: np.ndarray, edge_value: np.ndarray) -> None:
        sl = self.store.unit_slice(r)
        self.store.array(self._path(pair, "total"))[sl] = total
        self.store.array(self._path(pair, "gap"))[sl] = gap
        self.store.array(self._path(pair, "kept"))[sl] = kept
        self.store.array(self._path(pair, "edges/source"))[sl] = edge_source
        self.store.array(self._path(pair, "edges/value"))[sl] = edge_value

    def read_reduced(self, pair: Pair, r: ImageRange) -> dict[str, np.ndarray]:
        return {name: self.store.array(self._path(pair, name))[r.start : r.stop]
                for name in ("total", "gap", "kept", "edges/source", "edges/value", "target", "source", "delta",
                             "delta_real")}

    def write_block(self, pair: Pair, block: int, matrix: np.ndarray, count: np.ndarray) -> None:
        self.store.array(self._path(pair, "block_matrix"))[block] = matrix
        self.store.array(self._path(pair, "block_count"))[block] = count

    def read_block(self, pair: Pair, block: int) -> tuple[np.ndarray, np.ndarray]:
        return self.store.array(self._path(pair, "block_matrix"))[block], \
            self.store.array(self._path(pair, "block_count"))[block]

    def matrix_shape(self, pair: Pair) -> tuple[int, int]:
        return tuple(self.store.array(self._path(pair, "matrix")).shape)

    def write_matrix(self, pair: Pair, matrix: np.ndarray, count: np.ndarray, stats: dict[str, Any]) -> None:
        self.store.array(self._path(pair, "matrix"))[...] = matrix
        self.store.array(self._path(pair, "count"))[...] = count
        self.store.set_attrs(f"gig/{self.dictionary}/{pair_key(*pair)}", pair=list(pair), completeness=stats)

    def has_matrix(self, pair: Pair) -> bool:
        base = f"gig/{self.dictionary}/{pair_key(*pair)}"
        return self.store.has(base) and "completeness" in self.store.attrs(base)

    def read_matrix(self, pair: Pair) -> np.ndarray:
        if not self.has_matrix(pair):
            raise StoreError(f"{self.store.url} has no reduced GIG matrix for {pair[0]} -> {pair[1]}")
        return self.store.array(self._path(pair, "matrix"))[...]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per reduced pair: the matrix shape and the completeness statistics."""
        found: dict[str, dict[str, Any]] = {}
        base = f"gig/{self.dictionary}"
        if not self.store.has(base):
            return found
        for key, node in self.store.members(base):
            if hasattr(node, "shape") or "completeness" not in node.attrs:
                continue
            found[key] = {"pair": list(node.attrs["pair"]), "matrix": list(node["matrix"].shape),
                          **dict(node.attrs["completeness"])}
        return found

    # -- graphs -----------------------------------------------------------------------------------------

    def write_graphs(self, graphs: list[dict[str, Any]]) -> None:
        self.store.array(f"gig/{self.dictionary}/graphs")[...] = np.asarray([json.dumps(g) for g in graphs], dtype=str)

    def has_graphs(self) -> bool:
        return self.store.has(f"gig/{self.dictionary}/graphs")

    def read_graph(self, class_index: int) -> dict[str, Any]:
        if not self.has_graphs():
            raise StoreError(f"{self.store.url} has no class graphs yet; run the pipeline to the end")
        graphs = self.store.array(f"gig/{self.dictionary}/graphs")
        if not 0 <= class_index < graphs.shape[0]:
            raise StoreError(f"class {class_index} out of range: the model has {graphs.shape[0]} classes")
        text = str(graphs[class_index])
        if not text:
            raise StoreError(f"{self.store.url}: the class graphs are not built yet; run the pipeline to the end")
        return json.loads(text)
