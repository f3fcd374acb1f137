"""Section ``gig``: GIG attributions of each dictionary, per tap pair, and the class graphs.

``gig/<dict>/<a>__<b>/`` holds the pair from tap a's concepts to tap b's (b = ``logits``: to the
classes). Written by the attribute stage:

    source  (image, source_slot)     int32 each image's active source concepts (-1 pad)
    target  (image, target_slot)     int32 its targets (top code mass at b, or predicted and true class)
    sum     (image, target_slot)     float64 sum_k GIG before the float32 rounding of ``attribution``
    delta   (image, target_slot)     float64 S(F(X~)) - S(F(0))
    delta_real (image, target_slot)  float64 S(F(X)) - S(F(0)) of the stored (real) PFVs
    attribution (image, target_slot, source_slot) float32  each image's GIG per source slot,
                                     summed over the steps (written here when ``gig.step_chunks``
                                     is 1, by the reduce stage from ``partial`` otherwise)
    partial (step_chunk, image, target_slot, source_slot) float64 per-step-range sums of GIG,
                                     only when ``gig.step_chunks`` > 1
    steps, gap_first (image, target_slot)  with ``gig.max_gap`` only: the steps each target's
                                     integral used, and its relative gap at ``gig.steps``

by the reduce stage:

    total, gap      (image, target_slot)        sum_k GIG and the relative completeness gap
    kept            (image, target_slot)        the share of the real change the reconstruction keeps
    edges/source, edges/value (image, target_slot, edge)  the strongest sources per target
    block/key, block/value (block, entry)  each reduce block's sum, sparse (key = source *
                                    columns + column, sorted; int32 while they fit), images
                                    added in image order
    block/size      (block,)                    its entries
    block/stop      (block,)                    the image its sums stop at (``gig.images`` may end
                                                inside a block; -1: not reduced)
    block_count     (block, <target>)           images per column in each block
    matrix          (source_concept, <target>)  the dataset Gamma, blocks added in block order,
                                    while K_a x columns x 8 B is at most ``gig.dense_matrix_mib``;
    matrix_row, matrix_column, matrix_value  above it, the same matrix sparse (CSR): its non-zero
                                    entries sorted by source then column, ``matrix_row`` (K_a + 1)
                                    where each source's entries start
    count           (<target>,)                 its images per column; attributes: completeness

and, for pairs between concepts, the class-conditional Gamma^(a->b) of each class c (the mean
over the images of class c only), reduced per class:

    class_block/key, class_block/value  (block, entry)  each block's per-class sums, sparse:
                                        key = source * K_b + target, sorted within a class;
                                        float32 values (the sums of float32 GIG values, rounded
                                        once: they only rank each class's strongest sources)
    class_block/offsets (block, class + 1)  where each class's entries start in its block
    class_top/source, class_top/value (class, target_concept, edge)  per class and target
                                        concept its strongest sources (value: the class mean)
    class_count     (class,)            the images of each class the means are over

``<target>`` is ``target_concept`` or ``class``.

Once the reduce stage has a block of images in its sums, their ``partial`` and (unless
``gig.keep_image_attributions``) ``attribution`` and ``sum`` are deleted: what stays per image
is its targets, sources, totals, gaps and top edges (:meth:`GIGSection.compact`). ``gig/<dict>/graphs (class,)`` holds one JSON
class graph per class (docs/method.md section 6), written by the graphs stage.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.sparse import csr_array

from gig_dist.store.errors import StoreError
from gig_dist.store.types import ArraySpec, Facts, ImageRange

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore

LOGITS = "logits"
Pair = tuple[str, str]


def pair_key(source: str, target: str) -> str:
    return f"{source}__{target}"


def _target_dim(target: str) -> str:
    return "class" if target == LOGITS else "target_concept"


def attribution_specs(facts: Facts, dictionary: str, pair: Pair, *, targets: int, target_chunk: int, width: int,
                      step_chunks: int, refine: bool = False, keep: bool = False) -> list[ArraySpec]:
    """A pair's attribution arrays; the per-source ones are transient (deleted once reduced),
    ``partial`` always, ``attribution`` and ``sum`` unless ``keep``."""
    base, n, unit = f"gig/{dictionary}/{pair_key(*pair)}", facts.num_images, facts.images_per_unit
    refined = [
        ArraySpec(f"{base}/steps", (n, targets), "int32", ("image", "target_slot"), (unit, target_chunk), fill_value=0),
        ArraySpec(f"{base}/gap_first", (n, targets), "float64", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=np.nan),
    ] if refine else []
    per_source = [
        ArraySpec(f"{base}/attribution", (n, targets, width), "float32", ("image", "target_slot", "source_slot"),
                  (unit, target_chunk, width), fill_value=0.0, growable=True, transient=not keep),
        ArraySpec(f"{base}/sum", (n, targets), "float64", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=np.nan, transient=not keep),
    ]
    if step_chunks > 1:
        per_source.append(ArraySpec(f"{base}/partial", (step_chunks, n, targets, width), "float64",
                                    ("step_chunk", "image", "target_slot", "source_slot"),
                                    (1, unit, target_chunk, width), fill_value=0.0, growable=True, transient=True))
    return refined + per_source + [
        ArraySpec(f"{base}/source", (n, width), "int32", ("image", "source_slot"), (unit, width), fill_value=-1,
                  growable=True),
        ArraySpec(f"{base}/target", (n, targets), "int32", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=-1),
        ArraySpec(f"{base}/delta", (n, targets), "float64", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=np.nan),
        ArraySpec(f"{base}/delta_real", (n, targets), "float64", ("image", "target_slot"), (unit, target_chunk),
                  fill_value=np.nan),
    ]


#: Entries per chunk of the sparse block sums.
ENTRY_CHUNK = 1 << 16


def key_dtype(span: int) -> str:
    """The narrowest integer that holds every key ``source * columns + column`` below ``span``."""
    return "int32" if span <= np.iinfo(np.int32).max else "int64"


def reduction_specs(facts: Facts, dictionary: str, pair: Pair, *, targets: int, edges: int, blocks: int,
                    matrix_shape: tuple[int, int], capacity: int, dense: bool = True) -> list[ArraySpec]:
    """The per-image results, and each block's matrix sum, sparse: ``capacity`` bounds one
    block's entries (images x source slots x target slots that count); only the entries a block
    has are ever written. The dataset matrix is dense, or (``dense`` False) sparse, bounded by
    the blocks' entries together."""
    base, n, unit = f"gig/{dictionary}/{pair_key(*pair)}", facts.num_images, facts.images_per_unit
    k_a, columns = matrix_shape
    capacity = max(capacity, 1)
    chunk = min(ENTRY_CHUNK, capacity)
    dims = ("source_concept", _target_dim(pair[1]))
    return [
        ArraySpec(f"{base}/total", (n, targets), "float64", ("image", "target_slot"), (unit, targets), fill_value=np.nan),
        ArraySpec(f"{base}/gap", (n, targets), "float64", ("image", "target_slot"), (unit, targets), fill_value=np.nan),
        ArraySpec(f"{base}/kept", (n, targets), "float64", ("image", "target_slot"), (unit, targets), fill_value=np.nan),
        ArraySpec(f"{base}/edges/source", (n, targets, edges), "int32", ("image", "target_slot", "edge"),
                  (unit, targets, edges), fill_value=-1),
        ArraySpec(f"{base}/edges/value", (n, targets, edges), "float32", ("image", "target_slot", "edge"),
                  (unit, targets, edges), fill_value=0.0),
        ArraySpec(f"{base}/block/key", (blocks, capacity), key_dtype(k_a * columns), ("block", "entry"), (1, chunk),
                  fill_value=-1),
        ArraySpec(f"{base}/block/value", (blocks, capacity), "float64", ("block", "entry"), (1, chunk), fill_value=0.0),
        ArraySpec(f"{base}/block/size", (blocks,), "int64", ("block",), (1,), fill_value=0),
        ArraySpec(f"{base}/block/stop", (blocks,), "int64", ("block",), (1,), fill_value=-1),
        ArraySpec(f"{base}/block_count", (blocks, columns), "int64", ("block", dims[1]), (1, columns), fill_value=0),
        *([ArraySpec(f"{base}/matrix", (k_a, columns), "float64", dims, (k_a, columns), fill_value=0.0)] if dense
          else sparse_matrix_specs(base, k_a, columns, min(k_a * columns, blocks * capacity))),
        ArraySpec(f"{base}/count", (columns,), "int64", (dims[1],), (columns,), fill_value=0),
    ]


def sparse_matrix_specs(base: str, k_a: int, columns: int, capacity: int) -> list[ArraySpec]:
    """A dataset Gamma as CSR: row offsets, and up to ``capacity`` (column, value) entries."""
    capacity = max(capacity, 1)
    chunk = min(ENTRY_CHUNK * 16, capacity)
    return [
        ArraySpec(f"{base}/matrix_row", (k_a + 1,), "int64", ("source_concept_edge",), (k_a + 1,), fill_value=0),
        ArraySpec(f"{base}/matrix_column", (capacity,), "int32", ("entry",), (chunk,), fill_value=-1),
        ArraySpec(f"{base}/matrix_value", (capacity,), "float64", ("entry",), (chunk,), fill_value=0.0),
    ]


def class_specs(facts: Facts, dictionary: str, pair: Pair, *, blocks: int, capacity: int, k_a: int, k_b: int,
                edges: int, classes: int) -> list[ArraySpec]:
    """The class-conditional Gamma of a pair, per graph class (``classes`` of them; see
    ``gig.graph_classes``): ``capacity`` bounds one block's entries (images x source slots x
    targets); only the entries a block has are ever written. To the logits (graphs of the
    dataset's classes) it has one target: each image's own class."""
    base = f"gig/{dictionary}/{pair_key(*pair)}"
    chunk = min(ENTRY_CHUNK, max(capacity, 1))
    return [
        ArraySpec(f"{base}/class_block/key", (blocks, capacity), key_dtype(k_a * k_b), ("block", "entry"), (1, chunk),
                  fill_value=-1),
        ArraySpec(f"{base}/class_block/value", (blocks, capacity), "float32", ("block", "entry"), (1, chunk),
                  fill_value=0.0),
        ArraySpec(f"{base}/class_block/offsets", (blocks, classes + 1), "int64", ("block", "class_edge"),
                  (1, classes + 1), fill_value=0),
        ArraySpec(f"{base}/class_top/source", (classes, k_b, edges), "int32", ("class", "target_concept", "edge"),
                  (1, k_b, edges), fill_value=-1),
        ArraySpec(f"{base}/class_top/value", (classes, k_b, edges), "float32", ("class", "target_concept", "edge"),
                  (1, k_b, edges), fill_value=0.0),
        ArraySpec(f"{base}/class_count", (classes,), "int64", ("class",), (classes,), fill_value=0),
    ]


def graph_specs(facts: Facts, dictionary: str, classes: int) -> list[ArraySpec]:
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
                   delta: np.ndarray | None, delta_real: np.ndarray | None,
                   refined: dict[str, np.ndarray] | None = None) -> None:
        """One attribution unit: its GIG sums (step range ``step_chunk``, images ``r``, target
        slots ``targets``): into ``partial`` when the steps are split, else, whole, into
        ``attribution`` (float32). The unit of the first step range also writes the chosen
        targets and the completeness endpoints, and with the first target slots the sources."""
        sl = self.store.unit_slice(r)
        t = slice(*targets)
        if self.store.has(self._path(pair, "partial")):
            self.store.array(self._path(pair, "partial"))[step_chunk, sl, t, : partial.shape[-1]] = partial
        else:
            self.store.array(self._path(pair, "attribution"))[sl, t, : partial.shape[-1]] = partial.astype(np.float32)
            self.store.array(self._path(pair, "sum"))[sl, t] = partial.sum(axis=-1)
        if chosen is not None:
            self.store.array(self._path(pair, "target"))[sl, t] = chosen
            self.store.array(self._path(pair, "delta"))[sl, t] = delta
            self.store.array(self._path(pair, "delta_real"))[sl, t] = delta_real
        for name, values in (refined or {}).items():  # steps, gap_first
            self.store.array(self._path(pair, name))[sl, t] = values
        if sources is not None:
            self.store.array(self._path(pair, "source"))[sl, : sources.shape[1]] = sources

    def has(self, pair: Pair, name: str) -> bool:
        return self.store.has(self._path(pair, name))

    def has_vectors(self, pair: Pair, r: ImageRange) -> bool:
        """Whether the store holds the whole per-source GIG of images ``r`` (``attribution``, with
        its ``sum``), rather than only step ranges' partial sums, or nothing (compacted)."""
        return self._whole(pair, r, self.store.array(self._path(pair, "target"))[r.start : r.stop])[0]

    def _whole(self, pair: Pair, r: ImageRange, targets: np.ndarray) -> tuple[bool, np.ndarray]:
        sums = self.store.array(self._path(pair, "sum"))[r.start : r.stop]
        return bool(np.isfinite(sums[targets >= 0]).all()), sums

    def read_vectors(self, pair: Pair, r: ImageRange) -> tuple[np.ndarray, np.ndarray, bool]:
        """Each image's GIG per (target slot, source slot) (n, T, W), as the float32 values the
        store keeps, and its sum over the sources before that rounding (n, T), float64: the
        whole sums where written (third value True), else the step ranges' partial sums added in
        step order (False)."""
        targets = self.store.array(self._path(pair, "target"))[r.start : r.stop]
        whole, sums = self._whole(pair, r, targets)
        if whole:
            return self.store.array(self._path(pair, "attribution"))[r.start : r.stop].astype(np.float64), sums, True
        reduced = self.store.has(self._path(pair, "total")) and bool(np.isfinite(
            self.store.array(self._path(pair, "total"))[r.start : r.stop][targets >= 0]).any())
        if reduced or not self.store.has(self._path(pair, "partial")):  # reduced, and no whole sums: deleted
            raise StoreError(f"{self.store.url}: the per-source GIG of {pair[0]} -> {pair[1]}, images "
                             f"{r.start}:{r.stop}, was deleted once reduced; set gig.keep_image_attributions to "
                             "keep it")
        partial = self.store.array(self._path(pair, "partial"))[:, r.start : r.stop]
        summed = partial[0].copy()
        for s in range(1, len(partial)):  # always in step order
            summed += partial[s]
        return summed.astype(np.float32).astype(np.float64), summed.sum(axis=-1), False

    def write_vectors(self, pair: Pair, r: ImageRange, vectors: np.ndarray, sums: np.ndarray) -> None:
        """The whole sums of a unit's images and their sums over sources (the reduce stage, from
        the step ranges' partial sums)."""
        sl = self.store.unit_slice(r)
        self.store.array(self._path(pair, "attribution"))[sl, :, : vectors.shape[-1]] = vectors.astype(np.float32)
        self.store.array(self._path(pair, "sum"))[sl] = sums

    def compact(self, pair: Pair, r: ImageRange, keep_vectors: bool) -> None:
        """Delete the per-source GIG of store units ``r`` that the reduction no longer needs:
        the step ranges' partial sums, and, unless ``keep_vectors``, the whole sums. Writing
        the fill value deletes the chunks (Zarr writes no empty chunks)."""
        sl = slice(r.start, r.stop)
        if self.store.has(self._path(pair, "partial")):
            partial = self.store.array(self._path(pair, "partial"))
            partial[:, sl] = np.zeros((partial.shape[0], len(r), *partial.shape[2:]))
        if not keep_vectors:
            vectors = self.store.array(self._path(pair, "attribution"))
            vectors[sl] = np.zeros((len(r), *vectors.shape[1:]), dtype=np.float32)
            sums = self.store.array(self._path(pair, "sum"))
            sums[sl] = np.full((len(r), *sums.shape[1:]), np.nan)

    def has_refinement(self, pair: Pair) -> bool:
        return self.store.has(self._path(pair, "steps"))

    def read_refinement(self, pair: Pair, r: ImageRange) -> dict[str, np.ndarray]:
        """The steps each target used and its gap at ``gig.steps`` (``gig.max_gap`` runs)."""
        return {name: self.store.array(self._path(pair, name))[r.start : r.stop] for name in ("steps", "gap_first")}

    def read_unit(self, pair: Pair, r: ImageRange) -> dict[str, np.ndarray]:
        """Sources, targets and deltas of images ``r``."""
        return {name: self.store.array(self._path(pair, name))[r.start : r.stop]
                for name in ("source", "target", "delta", "delta_real")}

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

    def write_block(self, pair: Pair, block: int, keys: np.ndarray, values: np.ndarray, count: np.ndarray,
                    stop: int) -> None:
        """One block's matrix sum as entries ``key = source * columns + column`` (sorted, each
        once), its images per column, and the image its sums stop at."""
        self.store.array(self._path(pair, "block/key"))[block, : len(keys)] = keys
        self.store.array(self._path(pair, "block/value"))[block, : len(values)] = values
        self.store.array(self._path(pair, "block/size"))[block] = len(keys)
        self.store.array(self._path(pair, "block_count"))[block] = count
        self.store.array(self._path(pair, "block/stop"))[block] = stop

    def block_stops(self, pair: Pair) -> np.ndarray:
        """Per block, the image its sums stop at (-1: not reduced)."""
        return self.store.array(self._path(pair, "block/stop"))[...]

    def read_block(self, pair: Pair, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A block's entries (keys, values) and its images per column."""
        size = int(self.store.array(self._path(pair, "block/size"))[block])
        count = self.store.array(self._path(pair, "block_count"))[block]
        if size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0), count
        return (self.store.array(self._path(pair, "block/key"))[block, :size].astype(np.int64),
                self.store.array(self._path(pair, "block/value"))[block, :size], count)

    def write_class_block(self, pair: Pair, block: int, keys: np.ndarray, values: np.ndarray,
                          offsets: np.ndarray) -> None:
        """One block's per-class sums: entries sorted by class, then key; ``offsets[c]`` is
        where class c starts."""
        self.store.array(self._path(pair, "class_block/key"))[block, : len(keys)] = keys
        self.store.array(self._path(pair, "class_block/value"))[block, : len(values)] = values.astype(np.float32)
        self.store.array(self._path(pair, "class_block/offsets"))[block] = offsets

    def read_class_block(self, pair: Pair, block: int, first: int, stop: int) -> tuple[np.ndarray, ...]:
        """Classes ``first..stop-1`` of a block's sums: (class, key, value) of each entry."""
        offsets = self.store.array(self._path(pair, "class_block/offsets"))[block]
        lo, hi = int(offsets[first]), int(offsets[stop])
        classes = np.repeat(np.arange(first, stop), np.diff(offsets[first : stop + 1]))
        if hi == lo:
            return classes, np.zeros(0, dtype=np.int64), np.zeros(0)
        return (classes, self.store.array(self._path(pair, "class_block/key"))[block, lo:hi].astype(np.int64),
                self.store.array(self._path(pair, "class_block/value"))[block, lo:hi].astype(np.float64))

    def write_class_top(self, pair: Pair, first: int, source: np.ndarray, value: np.ndarray) -> None:
        stop = first + len(source)
        self.store.array(self._path(pair, "class_top/source"))[first:stop] = source
        self.store.array(self._path(pair, "class_top/value"))[first:stop] = value

    def write_class_count(self, pair: Pair, count: np.ndarray) -> None:
        self.store.array(self._path(pair, "class_count"))[...] = count

    def has_class_gamma(self, pair: Pair) -> bool:
        return self.has_matrix(pair) and self.store.has(self._path(pair, "class_top/source"))

    def read_class_top(self, pair: Pair, cls: int) -> tuple[np.ndarray, np.ndarray]:
        """Class ``cls``'s strongest sources of each target concept: (K_b, E) indices (-1 pad)
        and their class-conditional Gamma, strongest first."""
        if not self.has_class_gamma(pair):
            raise StoreError(f"{self.store.url} has no class-conditional GIG for {pair[0]} -> {pair[1]}; "
                             "rerun the reduce stage")
        return (self.store.array(self._path(pair, "class_top/source"))[cls],
                self.store.array(self._path(pair, "class_top/value"))[cls])

    def read_class_count(self, pair: Pair) -> np.ndarray:
        return self.store.array(self._path(pair, "class_count"))[...]

    def matrix_shape(self, pair: Pair) -> tuple[int, int]:
        if self.store.has(self._path(pair, "matrix")):
            return tuple(self.store.array(self._path(pair, "matrix")).shape)
        return (self.store.array(self._path(pair, "matrix_row")).shape[0] - 1,
                self.store.array(self._path(pair, "count")).shape[0])

    def is_sparse(self, pair: Pair) -> bool:
        """Whether the pair's dataset Gamma is stored sparse (``gig.dense_matrix_mib``)."""
        return self.store.has(self._path(pair, "matrix_row"))

    def write_matrix(self, pair: Pair, matrix: np.ndarray | tuple[np.ndarray, np.ndarray], count: np.ndarray,
                     stats: dict[str, Any]) -> None:
        """The dataset Gamma: a dense array, or, for a sparse layout, its entries (keys ``source
        * columns + column``, sorted, each once; values)."""
        if self.is_sparse(pair):
            keys, values = matrix
            k_a, columns = self.matrix_shape(pair)
            rows = keys // columns
            self.store.array(self._path(pair, "matrix_column"))[: len(keys)] = (keys % columns).astype(np.int32)
            self.store.array(self._path(pair, "matrix_value"))[: len(values)] = values
            self.store.array(self._path(pair, "matrix_row"))[...] = np.searchsorted(rows, np.arange(k_a + 1))
        else:
            self.store.array(self._path(pair, "matrix"))[...] = matrix
        self.store.array(self._path(pair, "count"))[...] = count
        self.store.set_attrs(f"gig/{self.dictionary}/{pair_key(*pair)}", pair=list(pair), completeness=stats)

    def has_matrix(self, pair: Pair) -> bool:
        base = f"gig/{self.dictionary}/{pair_key(*pair)}"
        return self.store.has(base) and "completeness" in self.store.attrs(base)

    def read_matrix(self, pair: Pair, sparse: bool = False) -> Any:
        """The dataset Gamma: a dense (K_a, columns) array, or with ``sparse`` a
        ``scipy.sparse.csr_array``, whichever layout the store keeps. Reading a sparse matrix
        dense needs K_a x columns x 8 bytes of memory."""
        if not self.has_matrix(pair):
            raise StoreError(f"{self.store.url} has no reduced GIG matrix for {pair[0]} -> {pair[1]}")
        if not self.is_sparse(pair):
            matrix = self.store.array(self._path(pair, "matrix"))[...]
            return csr_array(matrix) if sparse else matrix
        row = self.store.array(self._path(pair, "matrix_row"))[...]
        size = int(row[-1])
        column = self.store.array(self._path(pair, "matrix_column"))[:size] if size else np.zeros(0, np.int32)
        value = self.store.array(self._path(pair, "matrix_value"))[:size] if size else np.zeros(0)
        matrix = csr_array((value, column, row), shape=self.matrix_shape(pair))
        return matrix if sparse else matrix.toarray()

    def read_count(self, pair: Pair) -> np.ndarray:
        """Images per column of the pair's matrix (per class for ``logits``)."""
        return self.store.array(self._path(pair, "count"))[...]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per reduced pair: the matrix shape and the completeness statistics."""
        found: dict[str, dict[str, Any]] = {}
        base = f"gig/{self.dictionary}"
        if not self.store.has(base):
            return found
        # in key order: Zarr lists a group's members in the order their metadata arrives, which varies
        for key, node in sorted(self.store.members(base), key=lambda member: member[0]):
            if hasattr(node, "shape") or "completeness" not in node.attrs:
                continue
            pair = tuple(node.attrs["pair"])
            found[key] = {"pair": list(pair), "matrix": list(self.matrix_shape(pair)), "sparse": self.is_sparse(pair),
                          **dict(node.attrs["completeness"])}
        return found

    # -- graphs -----------------------------------------------------------------------------------------

    def reduced_images(self) -> int | None:
        """The images the reduce stage last summed (None: never reduced)."""
        base = f"gig/{self.dictionary}"
        return self.store.attrs(base).get("reduced_images") if self.store.has(base) else None

    def set_reduced_images(self, images: int) -> None:
        self.store.set_attrs(f"gig/{self.dictionary}", reduced_images=int(images))

    def read_gaps(self, pair: Pair, r: ImageRange) -> np.ndarray:
        """The completeness gaps (image, target_slot) of the images ``r``."""
        return self.store.array(self._path(pair, "gap"))[r.start : r.stop]

    def write_graphs(self, graphs: list[dict[str, Any]]) -> None:
        self.store.array(f"gig/{self.dictionary}/graphs")[...] = np.asarray([json.dumps(g) for g in graphs], dtype=str)

    def has_graphs(self) -> bool:
        return self.store.has(f"gig/{self.dictionary}/graphs")

    def read_graph(self, class_index: int) -> dict[str, Any]:
        if not self.has_graphs():
            raise StoreError(f"{self.store.url} has no class graphs yet; run the pipeline to the end")
        graphs = self.store.array(f"gig/{self.dictionary}/graphs")
        if not 0 <= class_index < graphs.shape[0]:
            raise StoreError(f"class {class_index} out of range: the run has {graphs.shape[0]} class graphs")
        text = str(graphs[class_index])
        if not text:
            raise StoreError(f"{self.store.url}: the class graphs are not built yet; run the pipeline to the end")
        return json.loads(text)
