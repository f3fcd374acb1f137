"""What every concept dictionary is (the contract, :class:`Dictionary`), and the shared base of
those whose codes are the exact non-negative Lasso (:class:`LassoCoded`)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from gig_dist.kernels.kmeans import concept_vectors
from gig_dist.kernels.lasso import NonNegativeLassoCoder

__all__ = ["Dictionary", "LassoCoded", "LassoCodedDictionary", "NotFittedError"]


class Dictionary(BaseEstimator):
    """The contract. Subclasses implement :meth:`fit` and :meth:`encode`; :meth:`decode` is shared."""

    #: Parameters that only change how codes are computed (not the fitted dictionary): the
    #: decompose stage sets them from its own config section.
    encode_params: ClassVar[tuple[str, ...]] = ()
    #: The names of every array :meth:`fitted_arrays` may return: a run's store declares them
    #: before its workers write them.
    stored_arrays: ClassVar[tuple[str, ...]] = ("vector",)
    #: The ``__init__`` parameters of this method alone, set from the config as
    #: ``concepts.params.<method>.<name>`` (the shared ones come from ``concepts.*`` and
    #: ``decompose.*``).
    own_params: ClassVar[tuple[str, ...]] = ()

    #: Every dictionary takes these (the concepts stage passes them all); the Lasso coder uses
    #: the encode ones.
    def __init__(self, n_concepts: int = 8, *, seed: int = 0, n_init: int = 1, backend: str = "auto",
                 lambda_rel: float = 0.1, lam: float | None = None, tol: float = 1e-6, batch_size: int = 4096,
                 device: str = "cpu", refine_iter: int | None = None) -> None:
        self.n_concepts = n_concepts
        self.seed = seed
        self.n_init = n_init
        self.refine_iter = refine_iter
        self.backend = backend
        self.lambda_rel = lambda_rel
        self.lam = lam
        self.tol = tol
        self.batch_size = batch_size
        self.device = device

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


class LassoCoded(Dictionary):
    """A dictionary whose codes are exact non-negative Lasso solutions (docs/method.md section 5),
    ``lambda = lambda_rel * max_k <v_k, a>`` per PFV (or an absolute ``lam``): the paper's and
    every baseline whose vectors come from another fit. Subclasses implement :meth:`fit`."""

    encode_params = ("lambda_rel", "lam", "tol", "batch_size", "device")

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


class LassoCodedDictionary(LassoCoded):
    """A baseline whose concept vectors come from another fit, coded by the same exact
    non-negative Lasso as the paper's dictionary: the comparison is about the vectors."""

    stored_arrays = ("vector", "zero", "size", "loss")
    own_params = ("max_iter",)

    def __init__(self, n_concepts: int = 8, *, seed: int = 0, n_init: int = 1, backend: str = "auto",
                 lambda_rel: float = 0.1, lam: float | None = None, tol: float = 1e-6, batch_size: int = 4096,
                 device: str = "cpu", refine_iter: int | None = None, max_iter: int = 100) -> None:
        super().__init__(n_concepts, seed=seed, n_init=n_init, backend=backend, lambda_rel=lambda_rel, lam=lam,
                         tol=tol, batch_size=batch_size, device=device, refine_iter=refine_iter)
        self.max_iter = max_iter

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or not np.isfinite(X).all():
            raise ValueError(f"PFVs must be a finite (n, C) array, got shape {X.shape}")
        if len(X) < self.n_concepts:
            raise ValueError(f"{self.n_concepts} concepts need at least as many PFVs, got {len(X)}")
        return X

    def _finish(self, vectors: np.ndarray, X: np.ndarray, loss: list[float]) -> None:
        self.dictionary_, self.zero_ = concept_vectors(np.asarray(vectors, dtype=np.float32))
        self.loss_curve_ = [float(v) for v in loss]
        similarity = X @ self.dictionary_.T
        self.labels_ = similarity.argmax(1)  # each sample's most similar concept, for the atlas's sizes
        self.cluster_size_ = np.bincount(self.labels_, minlength=self.n_concepts)
        self._coder = None

    def fitted_arrays(self) -> dict[str, np.ndarray]:
        return {**super().fitted_arrays(), "zero": self.zero_, "size": self.cluster_size_,
                "loss": np.asarray(self.loss_curve_, dtype=np.float64)}

    def fit_statistics(self) -> dict[str, Any]:
        check_is_fitted(self, "dictionary_")
        sizes = self.cluster_size_
        return {"k": int(self.n_concepts), "samples": int(sizes.sum()), "mean_members": float(sizes.mean()),
                "singletons": int((sizes == 1).sum()), "zero_concepts": int(self.zero_.sum()),
                "explained": getattr(self, "explained_", None),
                "loss_first": self.loss_curve_[0] if self.loss_curve_ else None,
                "loss_last": self.loss_curve_[-1] if self.loss_curve_ else None}


def _explained(X: np.ndarray, reconstruction: np.ndarray) -> float:
    total = float(((X - X.mean(0)) ** 2).sum())
    return 1 - float(((X - reconstruction) ** 2).sum()) / total if total > 0 else None
