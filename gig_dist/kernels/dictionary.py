"""One interface for every concept dictionary (design.md, "Dictionaries swap").

A dictionary follows scikit-learn's estimator contract and overcomplete's verbs::

    dictionary = make_dictionary("bisecting_kmeans", n_concepts=512).fit(X)   # X (n, C) PFVs
    index, value = dictionary.encode(X)       # sparse codes, each (n, L); index -1 in unused slots
    X_hat = dictionary.decode(index, value)   # (n, C) reconstruction
    dictionary.dictionary_                    # (K, C) concept vectors, unit rows (zero rows allowed)
    dictionary.tree_                          # optional: a split tree over the concepts

Hyper-parameters live only in ``__init__`` (``get_params``/``set_params`` come from
``BaseEstimator``); learned state ends in ``_``; ``encode``/``decode`` before ``fit`` raise
``NotFittedError``. The pipeline stores a fitted dictionary as named arrays
(:meth:`Dictionary.fitted_arrays`) and rebuilds it in a worker with :meth:`Dictionary.from_arrays`,
so a new dictionary is one class here and one entry in :data:`DICTIONARIES`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from gig_dist.kernels.kmeans import BisectingKMeans, concept_vectors
from gig_dist.kernels.lasso import NonNegativeLassoCoder

__all__ = ["DICTIONARIES", "BisectingKMeansDictionary", "Dictionary", "NotFittedError", "make_dictionary"]


class Dictionary(BaseEstimator):
    """The contract. Subclasses implement :meth:`fit` and :meth:`encode`; :meth:`decode` is shared."""

    #: Parameters that only change how codes are computed (not the fitted dictionary): the
    #: decompose stage sets them from its own config section.
    encode_params: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def fit(self, X: np.ndarray) -> Dictionary:
        """Learn ``dictionary_`` (K, C) from PFVs ``X`` (n, C); returns self."""

    @abstractmethod
    def encode(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sparse codes of ``X`` (n, C): ``(index, value)``, each (n, L), by decreasing value;
        unused slots hold index -1 and value 0."""

    def decode(self, index: np.ndarray, value: np.ndarray) -> np.ndarray:
        """The reconstruction ``X^ = U V`` (n, C) float32 of sparse codes ``index``/``value`` (n, L)."""
        check_is_fitted(self, "dictionary_")
        index, value = np.asarray(index), np.asarray(value, dtype=np.float64)
        if index.shape != value.shape or index.ndim != 2:
            raise ValueError(f"codes must be (n, slots) index and value arrays, got {index.shape} and {value.shape}")
        if index.size and int(index.max()) >= len(self.dictionary_):
            raise ValueError(f"code index {int(index.max())} out of range: the dictionary has "
                             f"{len(self.dictionary_)} concepts")
        vectors = np.asarray(self.dictionary_, dtype=np.float64)
        out = np.zeros((len(index), vectors.shape[1]))
        for slot in range(index.shape[1]):  # slot by slot: never an (n, L, C) temporary
            used = index[:, slot] >= 0
            out[used] += value[used, slot, None] * vectors[index[used, slot]]
        return out.astype(np.float32)

    def fitted_arrays(self) -> dict[str, np.ndarray]:
        """Everything :meth:`from_arrays` needs to encode again, plus what a reader may show;
        ``vector`` is always ``dictionary_``."""
        check_is_fitted(self, "dictionary_")
        return {"vector": np.asarray(self.dictionary_, dtype=np.float32)}

    def fit_statistics(self) -> dict[str, Any]:
        """JSON-able figures of the fit (sizes, inertia, timing)."""
        return {}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], **params: Any) -> Dictionary:
        """A fitted dictionary from stored arrays and hyper-parameters (the encode ones, say)."""
        dictionary = cls(**params)
        dictionary.dictionary_ = np.asarray(arrays["vector"], dtype=np.float32)
        return dictionary


class BisectingKMeansDictionary(Dictionary):
    """The paper's dictionary (method.md sections 4-5): concept vectors are the unit-normalised
    centroids of bisecting k-means (largest-inertia splits); codes are exact non-negative Lasso
    solutions, ``lambda = lambda_rel * max_k <v_k, a>`` per PFV (or an absolute ``lam``).

    Learned besides ``dictionary_``: ``cluster_centers_``, ``cluster_size_``,
    ``cluster_inertia_``, ``zero_`` (concepts from all-zero PFVs, their vector left zero),
    ``labels_`` (the concept of each training PFV), ``inertia_`` and ``tree_``.
    """

    encode_params = ("lambda_rel", "lam", "tol", "batch_size", "device")

    def __init__(self, n_concepts: int = 8, *, seed: int = 0, n_init: int = 1, backend: str = "auto",
                 lambda_rel: float = 0.1, lam: float | None = None, tol: float = 1e-6, batch_size: int = 4096,
                 device: str = "cpu") -> None:
        self.n_concepts = n_concepts
        self.seed = seed
        self.n_init = n_init
        self.backend = backend
        self.lambda_rel = lambda_rel
        self.lam = lam
        self.tol = tol
        self.batch_size = batch_size
        self.device = device

    def fit(self, X: np.ndarray) -> BisectingKMeansDictionary:
        kmeans = BisectingKMeans(self.n_concepts, seed=self.seed, n_init=self.n_init, backend=self.backend).fit(X)
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

    def _coder_for(self) -> NonNegativeLassoCoder:
        check_is_fitted(self, "dictionary_")
        params = (self.lambda_rel, self.lam, self.tol, self.batch_size, self.device)
        if getattr(self, "_coder", None) is None or self._coder_params != params:
            self._coder = NonNegativeLassoCoder(self.dictionary_, lambda_rel=self.lambda_rel, lam=self.lam,
                                                tol=self.tol, batch_size=self.batch_size, device=self.device)
            self._coder_params = params
        return self._coder

    def encode(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._coder_for().encode(X)

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


#: Every dictionary by the name ``concepts.method`` takes; the name is also its level in the store.
DICTIONARIES: dict[str, type[Dictionary]] = {
    "bisecting_kmeans": BisectingKMeansDictionary,
}


def make_dictionary(method: str, **params: Any) -> Dictionary:
    if method not in DICTIONARIES:
        raise ValueError(f"unknown dictionary {method!r}; the dictionaries are {', '.join(DICTIONARIES)}")
    return DICTIONARIES[method](**params)
