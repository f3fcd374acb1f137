"""Bisecting k-means on FAISS (Steinbach et al. 2000), the concept clustering of method.md section 4.

Start with one cluster; repeatedly split the leaf with the largest inertia (sum of squared
distances to its centroid) by 2-means, until ``n_clusters`` leaves. The 2-means runs on FAISS
(k-means++ initialisation; on the GPU when faiss-gpu sees one) over *every* member: FAISS
subsamples silently to ``max_points_per_centroid * k`` points, so that limit is raised to the
member count. The split tree is kept: it is the concept hierarchy users browse.

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


class BisectingKMeans:
    """Bisecting k-means with the largest-inertia splitting rule.

    Parameters: ``n_clusters``; ``n_iter`` Lloyd iterations per 2-means; ``n_init`` 2-means runs
    per split, the best kept; ``seed``; ``use_gpu`` ("auto": when FAISS sees a GPU).

    Learned: ``cluster_centers_`` (K, C), ``labels_`` (n,), ``inertia_`` (total),
    ``cluster_inertia_`` and ``cluster_size_`` (K,), ``tree_`` (:class:`SplitTree`).
    Clusters are numbered in depth-first order of the tree, so siblings are neighbours.
    """

    def __init__(self, n_clusters: int = 8, *, n_iter: int = 20, n_init: int = 1, seed: int = 0,
                 use_gpu: bool | str = "auto") -> None:
        self.n_clusters = n_clusters
        self.n_iter = n_iter
        self.n_init = n_init
        self.seed = seed
        self.use_gpu = use_gpu

    def _two_means(self, points: np.ndarray, step: int) -> np.ndarray:
        gpu = faiss.get_num_gpus() > 0 if self.use_gpu == "auto" else bool(self.use_gpu)
        km = faiss.Kmeans(
            points.shape[1], 2, niter=self.n_iter, nredo=self.n_init, seed=self.seed * 100_003 + step,
            max_points_per_centroid=len(points), min_points_per_centroid=1, gpu=gpu, verbose=False,
            init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        )
        km.train(points)
        return km.index.search(points, 1)[1][:, 0]

    def fit(self, X: np.ndarray) -> BisectingKMeans:
        X = _check_points(X)
        n = len(X)
        if not 1 <= self.n_clusters <= n:
            raise ValueError(f"n_clusters = {self.n_clusters} must lie in [1, {n}] (the number of samples)")
        parent, children, size, inertia, centers, order = [-1], [[-1, -1]], [n], [], [], [-1]
        members = {0: np.arange(n)}
        squared_norms = np.einsum("ij,ij->i", X, X, dtype=np.float64)

        def stats(idx: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, float]:
            # inertia = sum ||x||^2 - n ||mean||^2, in float64: one pass instead of two.
            center = points.sum(axis=0, dtype=np.float64) / len(idx)
            return center, max(float(squared_norms[idx].sum() - len(idx) * center @ center), 0.0)

        center, total = stats(members[0], X)
        centers.append(center)
        inertia.append(total)
        heap = [(-total, 0)] if n > 1 and total > 0 else []
        leaves, step = 1, 0
        while leaves < self.n_clusters:
            if not heap:
                raise ValueError(
                    f"cannot make {self.n_clusters} clusters: only {leaves} are separable "
                    "(the data has fewer distinct points than n_clusters)"
                )
            _, node = heapq.heappop(heap)
            idx = members[node]
            points = X[idx]
            assign = self._two_means(points, step)
            halves = [idx[assign == 0], idx[assign == 1]]
            parts = [points[assign == 0], points[assign == 1]]
            if min(len(h) for h in halves) == 0:  # identical points: this leaf cannot split
                continue
            order[node] = step
            step += 1
            del members[node]
            for half, part in zip(halves, parts):
                child = len(parent)
                parent.append(node)
                children.append([-1, -1])
                size.append(len(half))
                order.append(-1)
                center, child_inertia = stats(half, part)
                centers.append(center)
                inertia.append(child_inertia)
                members[child] = half
                if len(half) > 1 and child_inertia > 0:
                    heapq.heappush(heap, (-child_inertia, child))
            children[node] = [len(parent) - 2, len(parent) - 1]
            leaves += 1

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
            size=np.asarray(size, dtype=np.int64), inertia=np.asarray(inertia), center=np.asarray(centers),
            leaf=leaf, order=np.asarray(order, dtype=np.int64),
        )
        self.cluster_centers_ = self.tree_.center[leaf_nodes].astype(np.float32)
        self.cluster_inertia_ = self.tree_.inertia[leaf_nodes]
        self.cluster_size_ = self.tree_.size[leaf_nodes]
        self.inertia_ = float(self.cluster_inertia_.sum())
        self.labels_ = np.empty(n, dtype=np.int64)
        for node in leaf_nodes:
            self.labels_[members[node]] = leaf[node]
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Index of the nearest cluster centre for each row of ``X``."""
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
