"""Bisecting k-means (Steinbach et al. 2000), the concept clustering of docs/method.md section 4.

Start with one cluster; repeatedly split the leaf with the largest inertia (sum of squared
distances to its centroid) by 2-means, until ``n_clusters`` leaves. The split tree is kept: it is
the concept hierarchy users browse.

How a split is computed, and why it is fast without being approximate:

* The points are kept in two float32 copies, permuted so that every leaf's members are
  contiguous; a split gathers its segment's two halves into the other copy (one ``np.take``
  pass). No split ever gathers its members from scattered rows, and each level of the tree moves
  the data once.
* 2-means needs no distance matrix: a point belongs to centre 1 when
  ``<x, c1 - c0> > (|c1|^2 - |c0|^2) / 2``. A Lloyd iteration is one matrix-vector product for
  the assignment; the first also sums centre 1's members (the other centre is the node's sum
  minus it), later ones only move the sum by the members that changed sides (float64), and an
  iteration where none did is the fixed point, returned without another pass.
* Initialisation is k-means++ for two centres, run to convergence on a random subsample of at
  most ``subsample`` members; Lloyd then continues on *all* members until the centres move less
  than ``tol`` (scikit-learn's criterion: ``tol`` times the mean feature variance). The subsample
  only chooses the starting point: the final centres are Lloyd fixed points of the whole cluster.
  FAISS, by contrast, silently trains on ``max_points_per_centroid * k`` points.
* Inertias come from running sums: ``sum |x|^2 - n |mean|^2`` in float64.

Splits are taken strictly in largest-inertia order (scikit-learn's ``biggest_inertia``): no
batching of splits is needed for speed, so the tree is the textbook one.

``backend="faiss"`` runs each 2-means with ``faiss.Kmeans`` instead (k-means++, every member,
``max_points_per_centroid`` raised to the member count), on the GPU when faiss-gpu sees one.
``backend="torch"`` runs the same algorithm as numpy, step for step, on a torch ``device`` (a
GPU worker's own; :mod:`gig_dist.kernels.kmeans_torch`). ``"auto"`` picks FAISS where it sees a
GPU, else torch on a CUDA ``device``, else numpy. On the CPU the numpy backend is faster than
FAISS: FAISS's per-call set-up dominates the thousand small splits of a concept dictionary
(measured in ``benchmarks/``). ``predict`` (the assignment step) always runs on a FAISS
flat index.

The estimator follows scikit-learn's contract: hyper-parameters in ``__init__``, learning in
``fit``, learned state with a trailing underscore, ``predict`` after.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class SplitTree:
    """The bisection tree. Node 0 is the root; leaves are the clusters.

    ``parent[i]`` (-1 for the root), ``children[i]`` (two node ids, -1 for leaves), ``size[i]``,
    ``inertia[i]`` and ``center[i]`` of every node; ``leaf[i]`` is the cluster index of a leaf
    node (-1 for inner nodes); ``order[i]`` is the step at which node ``i`` was split (-1 never).
    """

    parent: np.ndarray
    children: np.ndarray
    size: np.ndarray
    inertia: np.ndarray
    center: np.ndarray
    leaf: np.ndarray
    order: np.ndarray


def _check_points(X: np.ndarray, what: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D (samples, features), got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ValueError(f"{what} has {bad} rows with NaN or infinite values")
    return np.ascontiguousarray(X, dtype=np.float32)


def _lloyd(points: np.ndarray, total: np.ndarray, c0: np.ndarray, c1: np.ndarray, tol: float,
           max_iter: int) -> np.ndarray:
    """2-means Lloyd iterations from centres ``c0``, ``c1`` (float64); ``total`` is the sum of
    ``points``. Returns the final assignment (True: centre 1)."""
    n, side, sum1 = len(points), None, None
    for _ in range(max_iter):
        new_side = points @ (c1 - c0).astype(np.float32) > 0.5 * (c1 @ c1 - c0 @ c0)
        n1 = np.count_nonzero(new_side)
        if n1 in (0, n):
            return new_side
        if side is None:
            sum1 = (new_side.astype(np.float32) @ points).astype(np.float64)
        else:  # only the members that changed sides move the sum: one pass per iteration, not two
            moved = np.flatnonzero(new_side != side)
            if not len(moved):  # a fixed point: these centres give this assignment again
                return new_side
            sum1 = sum1 + np.where(new_side[moved], 1.0, -1.0) @ points[moved].astype(np.float64)
        side = new_side
        new1, new0 = sum1 / n1, (total - sum1) / (n - n1)
        shift = ((new1 - c1) ** 2).sum() + ((new0 - c0) ** 2).sum()
        c0, c1 = new0, new1
        if shift <= tol:
            break
    return points @ (c1 - c0).astype(np.float32) > 0.5 * (c1 @ c1 - c0 @ c0)


def _farthest_point_split(points: np.ndarray, total: np.ndarray, squared: np.ndarray, tol: float,
                          max_iter: int) -> np.ndarray:
    """A split that always separates distinct points: Lloyd from the centroid and the member
    farthest from it; if Lloyd still puts everything on one side, that member alone. All False
    when every member is the same point."""
    if not len(points) or np.ptp(points, axis=0).max() == 0:
        return np.zeros(len(points), dtype=bool)
    mean = total / len(points)
    farthest = int(np.argmax(squared - 2 * (points @ mean.astype(np.float32)) + mean @ mean))
    side = _lloyd(points, total, mean, points[farthest].astype(np.float64), tol, max_iter)
    if 0 < np.count_nonzero(side) < len(points):
        return side
    side = np.zeros(len(points), dtype=bool)
    side[farthest] = True
    return side


class NumpyOps:
    """The array work of a fit on the host (numpy; each 2-means with FAISS for ``"faiss"``). The
    torch backend's :class:`gig_dist.kernels.kmeans_torch.TorchOps` has the same methods."""

    def __init__(self, backend: str = "numpy") -> None:
        self.backend = backend

    @staticmethod
    def prepare(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The points (a copy), their squared norms (float64) and original rows."""
        points = X.copy()
        return points, np.einsum("ij,ij->i", points, points, dtype=np.float64), np.arange(len(X))

    @staticmethod
    def empty_like(array: np.ndarray) -> np.ndarray:
        return np.empty_like(array)

    @staticmethod
    def total(points: np.ndarray) -> np.ndarray:
        return points.sum(0, dtype=np.float64)

    @staticmethod
    def count(side: np.ndarray) -> int:
        return int(np.count_nonzero(side))

    @staticmethod
    def partition(source: tuple, target: tuple, s: int, e: int, side: np.ndarray) -> None:
        """Segment ``s:e`` of every array of ``source`` into ``target``, side False first."""
        perm = np.argsort(side, kind="stable")
        for array, into in zip(source, target):
            # mode="clip": the indices are valid, and the default "raise" buffers ``out`` (a
            # second copy of the segment; measured 0.50 s of a 1.56 s fit)
            np.take(array[s:e], perm, axis=0, out=into[s:e], mode="clip")

    @staticmethod
    def host(array: np.ndarray) -> np.ndarray:
        return array

    farthest_point_split = staticmethod(_farthest_point_split)

    def two_means(self, km: BisectingKMeans, points: np.ndarray, total: np.ndarray, squared: np.ndarray,
                  tol: float, step: int) -> np.ndarray:
        """Assignment of a cluster's members to two halves (True: the second)."""
        if self.backend == "faiss":
            fitted = faiss.Kmeans(
                points.shape[1], 2, niter=min(km.max_iter, 25), nredo=km.n_init,
                seed=km.seed * 100_003 + step, max_points_per_centroid=len(points), min_points_per_centroid=1,
                gpu=faiss.get_num_gpus() > 0, verbose=False, init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
            )
            fitted.train(points)
            return fitted.index.search(points, 1)[1][:, 0] == 1
        rng = np.random.default_rng([km.seed, step])
        n, best, best_inertia = len(points), None, np.inf
        for _ in range(km.n_init):
            if n > km.subsample:
                sub = np.sort(rng.choice(n, km.subsample, replace=False))
                init_points, init_squared = points[sub], squared[sub]
                init_total = init_points.sum(0, dtype=np.float64)
            else:
                init_points, init_squared, init_total = points, squared, total
            # k-means++ for two centres: the second drawn with probability ~ squared distance.
            c0 = init_points[rng.integers(len(init_points))].astype(np.float64)
            d2 = np.maximum(init_squared - 2 * (init_points @ c0.astype(np.float32)) + c0 @ c0, 0)
            if d2.sum() <= 0 and len(init_points) < n:
                # The subsample holds copies of one point only: initialise on all members.
                init_points, init_squared, init_total = points, squared, total
                d2 = np.maximum(init_squared - 2 * (init_points @ c0.astype(np.float32)) + c0 @ c0, 0)
            if d2.sum() <= 0:
                return np.zeros(n, dtype=bool)  # every member coincides with c0
            c1 = init_points[rng.choice(len(init_points), p=d2 / d2.sum())].astype(np.float64)
            side = _lloyd(init_points, init_total, c0, c1, tol, km.max_iter)
            if len(init_points) < n:
                n1 = np.count_nonzero(side)
                if 0 < n1 < len(side):
                    sum1 = init_points[side].sum(0, dtype=np.float64)
                    c1, c0 = sum1 / n1, (init_total - sum1) / (len(side) - n1)
                side = _lloyd(points, total, c0, c1, tol,
                              km.max_iter if km.refine_iter is None else km.refine_iter)
            if km.n_init == 1:
                return side
            n1 = np.count_nonzero(side)
            if 0 < n1 < n:
                sum1 = points[side].sum(0, dtype=np.float64)
                inertia = squared.sum() - (sum1 @ sum1) / n1 - ((total - sum1) @ (total - sum1)) / (n - n1)
                if inertia < best_inertia:
                    best, best_inertia = side, inertia
        return best if best is not None else np.zeros(n, dtype=bool)


class BisectingKMeans:
    """Bisecting k-means with the largest-inertia splitting rule.

    Parameters: ``n_clusters``; ``max_iter`` Lloyd iterations per 2-means (an upper bound: Lloyd
    stops when the centres move less than ``tol`` times the mean feature variance); ``n_init``
    2-means runs per split, the lowest inertia kept; ``subsample`` members used to initialise a
    2-means; ``refine_iter``: Lloyd iterations on all members of a cluster larger than
    ``subsample``, after the 2-means of its subsample converged (None: up to ``max_iter``);
    ``seed``; ``backend`` "numpy", "faiss" or "auto" (FAISS when it sees a GPU).

    Where the time goes: passes over the members. On overlapping data (post-ReLU Gaussian blobs,
    2,048 centres, noise 0.8, 200,000 x 256, K = 1024) the full-member Lloyd of the large
    clusters ran 28 iterations on average (up to 172) to reach ``tol``; ``refine_iter=8`` stops
    them early (inertia within 1 % of scikit-learn's; ``python benchmarks/concepts.py``
    times it beside scikit-learn). On ``pfv_like`` data (the benchmark's, 512 modes) a fit of
    1.2 s splits into Lloyd passes 0.47 s, the partition's gathers 0.20 s, the float64 sums of
    the halves 0.18 s (a float64 column sum runs at a fifth of a float32 pass) and per-split
    overhead 0.16 s (cProfile). The floor is memory traffic: per tree level (10 for K = 1024)
    the partition reads and writes the data once and Lloyd streams it at least twice (the first
    assignment with its sum, the last assignment), about 0.8 GB per level for 200,000 x 256
    float32, 8 GB in all, 0.4 s at the ~20 GB/s a pass reaches here (10 ms per 200 MB).

    Learned: ``cluster_centers_`` (K, C), ``labels_`` (n,), ``inertia_`` (total),
    ``cluster_inertia_`` and ``cluster_size_`` (K,), ``tree_`` (:class:`SplitTree`).
    Clusters are numbered in depth-first order of the tree, so siblings are neighbours.
    """

    def __init__(self, n_clusters: int = 8, *, max_iter: int = 300, tol: float = 1e-4, n_init: int = 1,
                 subsample: int = 4096, refine_iter: int | None = None, seed: int = 0, backend: str = "auto",
                 device: str = "cpu") -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.refine_iter = refine_iter
        self.tol = tol
        self.n_init = n_init
        self.subsample = subsample
        self.seed = seed
        self.backend = backend
        self.device = device

    def _backend(self) -> str:
        if self.backend == "auto":
            if faiss.get_num_gpus() > 0:
                return "faiss"
            return "torch" if str(self.device).startswith("cuda") else "numpy"
        if self.backend not in ("numpy", "faiss", "torch"):
            raise ValueError(f"backend = {self.backend!r}: use 'numpy', 'faiss', 'torch' or 'auto'")
        return self.backend

    def fit(self, X: np.ndarray) -> BisectingKMeans:
        X = _check_points(X)
        n = len(X)
        if not 1 <= self.n_clusters <= n:
            raise ValueError(f"n_clusters = {self.n_clusters} must lie in [1, {n}] (the number of samples)")
        if self._backend() == "torch":
            from gig_dist.kernels.kmeans_torch import TorchOps

            ops = TorchOps(self.device)
        else:
            ops = NumpyOps(self._backend())
        # Two copies of the points, rows and squared norms, permuted so that each node's members
        # are contiguous: a split writes its children's segments into the other copy (one
        # gather pass, nothing copied back). ``side_of[node]`` says which copy holds the node.
        points, squared, rows = ops.prepare(X)
        copies = [(points, squared, rows), tuple(ops.empty_like(a) for a in (points, squared, rows))]
        side_of = [0]
        # Per node: segment [start, stop) of its copy, member sum, size, inertia.
        start, stop, sums = [0], [n], [ops.total(points)]
        mean = sums[0] / n
        tol = self.tol * max(float(squared.sum() / n - mean @ mean), 0.0) / X.shape[1]  # x mean variance
        parent, children, order = [-1], [[-1, -1]], [-1]

        def inertia_of(squared, s: int, e: int, total) -> float:
            return max(float(squared[s:e].sum() - total @ total / (e - s)), 0.0)

        inertia = [inertia_of(squared, 0, n, sums[0])]
        heap = [(-inertia[0], 0)] if n > 1 and inertia[0] > 0 else []
        leaves, step = 1, 0
        while leaves < self.n_clusters:
            if not heap:
                raise ValueError(
                    f"cannot make {self.n_clusters} clusters: only {leaves} are separable "
                    "(the data has fewer distinct points than n_clusters)"
                )
            _, node = heapq.heappop(heap)
            s, e = start[node], stop[node]
            points, squared, rows = copies[side_of[node]]
            side = ops.two_means(self, points[s:e], sums[node], squared[s:e], tol, step)
            n1 = ops.count(side)
            if n1 in (0, e - s):
                # 2-means put every member on one side, yet the leaf has distinct points: a leaf
                # with positive inertia is never dropped, it is split from its farthest point.
                side = ops.farthest_point_split(points[s:e], sums[node], squared[s:e], tol, self.max_iter)
                n1 = ops.count(side)
            if n1 in (0, e - s):  # identical points: this leaf cannot split
                continue
            # Partition the segment into the other copy: first half (side False) then second,
            # order kept within each.
            mid = s + (e - s - n1)
            target = 1 - side_of[node]
            ops.partition(copies[side_of[node]], copies[target], s, e, side)
            points, squared, rows = copies[target]
            # The smaller half's sum is computed; the other's is the difference.
            if mid - s <= e - mid:
                first = ops.total(points[s:mid])
                halves = (first, sums[node] - first)
            else:
                second = ops.total(points[mid:e])
                halves = (sums[node] - second, second)
            order[node] = step
            step += 1
            children[node] = [len(parent), len(parent) + 1]
            for (cs, ce), total in zip(((s, mid), (mid, e)), halves):
                child = len(parent)
                parent.append(node)
                children.append([-1, -1])
                order.append(-1)
                start.append(cs)
                stop.append(ce)
                side_of.append(target)
                sums.append(total)
                inertia.append(inertia_of(squared, cs, ce, total))
                if ce - cs > 1 and inertia[child] > 0:
                    heapq.heappush(heap, (-inertia[child], child))
            leaves += 1

        sums = [ops.host(total) for total in sums]
        copies = [tuple(ops.host(a) for a in copy) for copy in copies]
        size = np.asarray(stop, dtype=np.int64) - np.asarray(start, dtype=np.int64)
        centers = np.asarray(sums) / size[:, None]
        # Clusters in depth-first order, left child first.
        leaf = np.full(len(parent), -1, dtype=np.int64)
        stack, next_id = [0], 0
        while stack:
            node = stack.pop()
            if children[node][0] < 0:
                leaf[node] = next_id
                next_id += 1
            else:
                stack += [children[node][1], children[node][0]]
        leaf_nodes = np.flatnonzero(leaf >= 0)[np.argsort(leaf[leaf >= 0])]
        self.tree_ = SplitTree(
            parent=np.asarray(parent, dtype=np.int64), children=np.asarray(children, dtype=np.int64),
            size=size, inertia=np.asarray(inertia), center=centers, leaf=leaf,
            order=np.asarray(order, dtype=np.int64),
        )
        self.cluster_centers_ = centers[leaf_nodes].astype(np.float32)
        self.cluster_inertia_ = self.tree_.inertia[leaf_nodes]
        self.cluster_size_ = size[leaf_nodes]
        self.inertia_ = float(self.cluster_inertia_.sum())
        self.labels_ = np.empty(n, dtype=np.int64)
        for node in leaf_nodes:
            self.labels_[copies[side_of[node]][2][start[node] : stop[node]]] = leaf[node]
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Index of the nearest cluster centre for each row of ``X`` (a FAISS flat index)."""
        X = _check_points(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features; the clusters were fit on {self.n_features_in_}")
        index = faiss.IndexFlatL2(self.n_features_in_)
        index.add(self.cluster_centers_)
        return index.search(X, 1)[1][:, 0].astype(np.int64)

    def fit_predict(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).labels_


def concept_vectors(centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised centroids (K, C) and a mask of centroids with zero norm (clusters of all-zero
    PFVs), whose concept vector is left zero: it can never be used in a decomposition."""
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    zero = norms[:, 0] <= 1e-12
    return np.where(zero[:, None], 0.0, centers / np.where(zero[:, None], 1.0, norms)).astype(np.float32), zero
