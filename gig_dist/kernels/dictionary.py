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

import warnings
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.validation import check_is_fitted

from gig_dist.kernels.kmeans import BisectingKMeans, concept_vectors
from gig_dist.kernels.lasso import NonNegativeLassoCoder

__all__ = ["DICTIONARIES", "BisectingKMeansDictionary", "Dictionary", "DictionaryLearningDictionary", "KMeansDictionary",
           "NMFDictionary", "NotFittedError", "SparseAutoencoderDictionary", "make_dictionary"]


class Dictionary(BaseEstimator):
    """The contract. Subclasses implement :meth:`fit` and :meth:`encode`; :meth:`decode` is shared."""

    #: Parameters that only change how codes are computed (not the fitted dictionary): the
    #: decompose stage sets them from its own config section.
    encode_params: ClassVar[tuple[str, ...]] = ()
    #: The names of every array :meth:`fitted_arrays` may return: a run's store declares them
    #: before its workers write them.
    stored_arrays: ClassVar[tuple[str, ...]] = ("vector",)

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
    """A dictionary whose codes are exact non-negative Lasso solutions (method.md section 5),
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


class BisectingKMeansDictionary(LassoCoded):
    """The paper's dictionary (method.md sections 4-5): concept vectors are the unit-normalised
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


class LassoCodedDictionary(LassoCoded):
    """A baseline whose concept vectors come from another fit, coded by the same exact
    non-negative Lasso as the paper's dictionary: the comparison is about the vectors."""

    stored_arrays = ("vector", "zero", "size", "loss")

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


class DictionaryLearningDictionary(LassoCodedDictionary):
    """scikit-learn's ``MiniBatchDictionaryLearning`` with non-negative codes and atoms."""

    def fit(self, X: np.ndarray) -> DictionaryLearningDictionary:
        from sklearn.decomposition import MiniBatchDictionaryLearning

        X = self._check(X)
        learner = MiniBatchDictionaryLearning(n_components=self.n_concepts, alpha=0.1, batch_size=256,
                                              max_iter=max(1, self.max_iter // 10), fit_algorithm="cd",
                                              positive_code=True, positive_dict=True, random_state=self.seed,
                                              transform_algorithm="lasso_cd")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a budgeted fit: its steps are recorded
            learner.fit(X)
        self._finish(learner.components_, X, [])
        self.n_iter_ = int(learner.n_steps_)
        return self


class NMFDictionary(LassoCodedDictionary):
    """Non-negative matrix factorisation of the samples (as CRAFT builds its concept bank):
    ``X ~ W H``, concepts the rows of ``H``."""

    def fit(self, X: np.ndarray) -> NMFDictionary:
        from sklearn.decomposition import NMF

        X = self._check(X)
        if (X < 0).any():
            raise ValueError("NMF needs non-negative PFVs (post-ReLU taps); this tap has negative values")
        # NNDSVD starts need K <= min(n, C); an overcomplete bank (K = 8C) starts at random.
        # Multiplicative updates cost O(n K C) a step, coordinate descent O(n K^2): at K = 8C
        # (2,048 concepts on 24,576 toy samples) cd took about 10 min for the smallest tap alone.
        init = "nndsvda" if self.n_concepts <= min(X.shape) else "random"
        model = NMF(n_components=self.n_concepts, init=init, solver="mu", max_iter=self.max_iter,
                    random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a budgeted fit: its error is recorded
            W = model.fit_transform(X)
        self._finish(model.components_, X, [float(model.reconstruction_err_)])
        self.explained_ = _explained(X, W @ model.components_)
        return self


class SparseAutoencoderDictionary(Dictionary):
    """A sparse autoencoder trained in torch on the samples (Adam, at least ``steps`` batches):
    ``z = ReLU(W_e x + c)``, ``x^ = z D`` with unit-norm decoder rows ``D`` and an L1 penalty
    ``l1 * |z|_1`` (or only the ``top_k`` largest latents kept). No decoder bias, so that codes
    reconstruct ``X~ = U V`` as the pipeline assumes. Concept vectors are the decoder rows; codes
    are the encoder's own (largest first), not the Lasso's. ``loss_curve_`` holds the mean loss
    per epoch."""

    encode_params = ("lambda_rel", "lam", "tol", "batch_size", "device")
    stored_arrays = ("vector", "encoder", "encoder_bias", "size", "zero", "loss")

    def __init__(self, n_concepts: int = 8, *, seed: int = 0, n_init: int = 1, backend: str = "auto",
                 lambda_rel: float = 0.1, lam: float | None = None, tol: float = 1e-6, batch_size: int = 4096,
                 device: str = "cpu", refine_iter: int | None = None, l1: float = 0.03, top_k: int | None = None,
                 steps: int = 3000, max_slots: int = 32) -> None:
        super().__init__(n_concepts, seed=seed, n_init=n_init, backend=backend, lambda_rel=lambda_rel, lam=lam,
                         tol=tol, batch_size=batch_size, device=device, refine_iter=refine_iter)
        self.l1 = l1
        self.top_k = top_k
        self.steps = steps
        self.max_slots = max_slots

    def _codes(self, X: torch.Tensor) -> torch.Tensor:
        z = torch.relu(X @ self.encoder_.T + self.encoder_bias_)
        if self.top_k is not None:
            kept = torch.topk(z, self.top_k, dim=1)
            z = torch.zeros_like(z).scatter_(1, kept.indices, kept.values)
        return z

    def fit(self, X: np.ndarray) -> SparseAutoencoderDictionary:
        generator = torch.Generator().manual_seed(self.seed)
        device = torch.device(self.device if self.device != "auto" else "cpu")
        data = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
        n, c = data.shape
        scale = float(data.norm(dim=1).mean().clamp_min(1e-12))
        decoder = torch.randn(self.n_concepts, c, generator=generator).to(device)
        decoder /= decoder.norm(dim=1, keepdim=True)
        # tied start, scaled so that sum_k ReLU(<x, d_k>) d_k is about x for isotropic d_k
        encoder = (decoder * (2 * c / self.n_concepts)).clone().requires_grad_(True)
        decoder.requires_grad_(True)
        bias = torch.zeros(self.n_concepts, device=device, requires_grad=True)
        optimiser = torch.optim.Adam([encoder, decoder, bias], lr=3e-3)
        loss_curve = []
        batch = min(256, n)
        epochs = max(1, -(-self.steps // -(-n // batch)))  # at least ``steps`` optimiser steps
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(device)
            total = 0.0
            for first in range(0, n, batch):
                x = data[order[first : first + batch]] / scale
                z = torch.relu(x @ encoder.T + bias)
                if self.top_k is not None:
                    kept = torch.topk(z, self.top_k, dim=1)
                    z = torch.zeros_like(z).scatter(1, kept.indices, kept.values)
                unit = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
                loss = ((z @ unit - x) ** 2).sum(1).mean() + (0 if self.top_k is not None else self.l1 * z.abs().sum(1).mean())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(x)
            loss_curve.append(total / n)
        with torch.no_grad():
            unit = (decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()
            # trained on x / scale: scale * ReLU(W (x / scale) + c) = ReLU(W x + scale c)
            self.encoder_ = encoder.detach().cpu()
            self.encoder_bias_ = (bias * scale).detach().cpu()
        self.dictionary_ = unit.astype(np.float32)
        self.zero_ = np.zeros(self.n_concepts, dtype=bool)
        self.loss_curve_ = loss_curve
        codes = self._codes(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        self.labels_ = codes.argmax(1).numpy()
        self.cluster_size_ = np.bincount(self.labels_, minlength=self.n_concepts)
        self.explained_ = _explained(np.asarray(X, dtype=np.float64), (codes @ torch.from_numpy(unit)).numpy())
        return self

    def encode(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self, "encoder_")
        z = self._codes(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        slots = min(self.max_slots, self.n_concepts)
        values, index = torch.topk(z, slots, dim=1)
        index = torch.where(values > 0, index, torch.full_like(index, -1))
        return index.numpy().astype(np.int32), torch.where(values > 0, values, 0).numpy().astype(np.float32)

    def fitted_arrays(self) -> dict[str, np.ndarray]:
        return {**super().fitted_arrays(), "encoder": self.encoder_.numpy(), "encoder_bias": self.encoder_bias_.numpy(),
                "size": self.cluster_size_, "zero": self.zero_, "loss": np.asarray(self.loss_curve_)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], **params: Any) -> SparseAutoencoderDictionary:
        dictionary = super().from_arrays(arrays, **params)
        dictionary.n_concepts = len(dictionary.dictionary_)
        dictionary.encoder_ = torch.from_numpy(np.asarray(arrays["encoder"], dtype=np.float32))
        dictionary.encoder_bias_ = torch.from_numpy(np.asarray(arrays["encoder_bias"], dtype=np.float32))
        return dictionary

    def fit_statistics(self) -> dict[str, Any]:
        sizes = self.cluster_size_
        return {"k": int(self.n_concepts), "samples": int(sizes.sum()), "mean_members": float(sizes.mean()),
                "singletons": int((sizes == 1).sum()), "zero_concepts": int((sizes == 0).sum()),
                "explained": self.explained_, "loss_first": self.loss_curve_[0], "loss_last": self.loss_curve_[-1]}


#: Every dictionary by the name ``concepts.method`` takes; the name is also its level in the store.
DICTIONARIES: dict[str, type[Dictionary]] = {
    "bisecting_kmeans": BisectingKMeansDictionary,
    "kmeans": KMeansDictionary,
    "dictionary_learning": DictionaryLearningDictionary,
    "nmf": NMFDictionary,
    "sae": SparseAutoencoderDictionary,
}


def make_dictionary(method: str, **params: Any) -> Dictionary:
    if method not in DICTIONARIES:
        raise ValueError(f"unknown dictionary {method!r}; the dictionaries are {', '.join(DICTIONARIES)}")
    return DICTIONARIES[method](**params)
