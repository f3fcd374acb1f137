"""Plain k-means (FAISS) centroids, Lasso codes: the simplest baseline."""

from __future__ import annotations

import numpy as np

from gig_dist.kernels.dictionaries.base import (
    LassoCodedDictionary,
    _explained,
)


class KMeansDictionary(LassoCodedDictionary):
    """Plain k-means (FAISS, all points: ``max_points_per_centroid`` is raised so that FAISS does
    not subsample), unit-normalised centroids, the same Lasso."""

    def fit(self, X: np.ndarray) -> KMeansDictionary:
        import faiss

        X = self._check(X)
        k = self.n_concepts
        kmeans = faiss.Kmeans(X.shape[1], k, niter=max(1, self.max_iter // 4), seed=self.seed, nredo=self.n_init,
                              max_points_per_centroid=-(-len(X) // k) + 1, min_points_per_centroid=1, verbose=False)
        kmeans.train(X)
        _, labels = kmeans.index.search(X, 1)
        centers = kmeans.centroids
        self._finish(centers, X, list(getattr(kmeans, "iteration_stats", None) and
                                      [s["obj"] for s in kmeans.iteration_stats] or []))
        self.explained_ = _explained(X, centers[labels[:, 0]])
        return self
