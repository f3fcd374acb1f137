"""The paper's dictionary: bisecting k-means centroids, Lasso codes (docs/method.md sections 4-5)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from gig_dist.kernels.dictionaries.base import (
    LassoCoded,
)
from gig_dist.kernels.kmeans import BisectingKMeans, concept_vectors


class BisectingKMeansDictionary(LassoCoded):
    """The paper's dictionary (docs/method.md sections 4-5): concept vectors are the unit-normalised
    centroids of bisecting k-means (largest-inertia splits); codes are exact non-negative Lasso
    solutions, ``lambda = lambda_rel * max_k <v_k, a>`` per PFV (or an absolute ``lam``).

    Learned besides ``dictionary_``: ``cluster_centers_``, ``cluster_size_``,
    ``cluster_inertia_``, ``zero_`` (concepts from all-zero PFVs, their vector left zero),
    ``labels_`` (the concept of each training PFV), ``inertia_`` and ``tree_``.
    """

    stored_arrays = ("vector", "center", "zero", "size", "inertia", "tree/parent", "tree/children", "tree/size",
                     "tree/inertia", "tree/leaf", "tree/order")

    def fit(self, X: np.ndarray) -> BisectingKMeansDictionary:
        kmeans = BisectingKMeans(self.n_concepts, seed=self.seed, n_init=self.n_init, backend=self.backend,
                                 refine_iter=self.refine_iter, device=self.device).fit(X)
        self.dictionary_, self.zero_ = concept_vectors(kmeans.cluster_centers_)
        self.cluster_centers_ = kmeans.cluster_centers_
        self.cluster_size_ = kmeans.cluster_size_
        self.cluster_inertia_ = kmeans.cluster_inertia_
        self.labels_ = kmeans.labels_
        self.inertia_ = kmeans.inertia_
        self.tree_ = kmeans.tree_
        self.backend_ = kmeans._backend()
        self._coder = None
        return self

    def fitted_arrays(self) -> dict[str, np.ndarray]:
        arrays = super().fitted_arrays()
        if hasattr(self, "tree_"):
            tree = self.tree_
            arrays.update(center=self.cluster_centers_, zero=self.zero_, size=self.cluster_size_,
                          inertia=self.cluster_inertia_, **{f"tree/{name}": getattr(tree, name) for name in
                                                             ("parent", "children", "size", "inertia", "leaf", "order")})
        return arrays

    def fit_statistics(self) -> dict[str, Any]:
        check_is_fitted(self, "tree_")
        root = float(self.tree_.inertia[0])
        sizes = self.cluster_size_
        return {"k": int(self.n_concepts), "samples": int(sizes.sum()), "inertia": float(self.inertia_),
                "total_inertia": root, "explained": 1 - self.inertia_ / root if root > 0 else None,
                "mean_members": float(sizes.sum() / self.n_concepts), "smallest": int(sizes.min()),
                "largest": int(sizes.max()), "singletons": int((sizes == 1).sum()),
                "zero_concepts": int(self.zero_.sum()), "backend": self.backend_}
