"""The dictionary contract (:func:`check_dictionary`)."""

from __future__ import annotations

import inspect

import numpy as np

#: The ``__init__`` parameters every dictionary takes: the concepts stage passes the fit ones
#: from ``concepts.*``, the decompose stage the encode ones from ``decompose.*``.
SHARED_PARAMS = ("n_concepts", "seed", "n_init", "backend", "lambda_rel", "lam", "tol", "batch_size", "device",
                 "refine_iter")


def _data(seed: int, n: int = 240, channels: int = 10) -> np.ndarray:
    """Non-negative PFVs from a few directions (post-ReLU taps are non-negative), some all-zero."""
    rng = np.random.default_rng(seed)
    directions = np.abs(rng.normal(size=(5, channels)))
    X = np.abs(rng.gamma(2.0, size=(n, 5)) @ directions + 0.05 * rng.normal(size=(n, channels)))
    X[:4] = 0.0
    return X.astype(np.float32)


def check_dictionary(method: str | type, n_concepts: int = 6, **params) -> None:
    """Assert that a dictionary (a registered name, or a class) keeps the contract the pipeline
    relies on: its parameters, fitting, codes, reconstruction, the store's round trip, and
    determinism. Raises ``AssertionError`` naming the broken rule."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    from gig_dist.kernels.dictionaries import DICTIONARIES
    from gig_dist.kernels.dictionaries.base import Dictionary

    cls = DICTIONARIES[method] if isinstance(method, str) else method
    name = getattr(cls, "__name__", str(method))
    assert issubclass(cls, Dictionary), f"{name} is not a gig_dist Dictionary"
    signature = inspect.signature(cls.__init__).parameters
    missing = [p for p in (*SHARED_PARAMS, *cls.own_params) if p not in signature]
    assert not missing, f"{name}.__init__ lacks {missing} (the shared parameters and its own_params)"
    unnamed = [p for p in signature if p not in ("self", *SHARED_PARAMS, *cls.own_params)]
    assert not unnamed, f"{name}.__init__ takes {unnamed}, which are neither shared nor in own_params"

    dictionary = cls(n_concepts=n_concepts, **params)
    assert clone(dictionary).get_params() == dictionary.get_params(), f"{name}: get_params/clone lose a parameter"
    X = _data(0)
    try:
        dictionary.encode(X[:3])
    except NotFittedError:
        pass
    else:
        raise AssertionError(f"{name}.encode before fit must raise NotFittedError")

    assert dictionary.fit(X) is dictionary, f"{name}.fit must return self"
    vectors = np.asarray(dictionary.dictionary_)
    assert vectors.shape == (n_concepts, X.shape[1]), f"{name}.dictionary_ is {vectors.shape}, not (K, C)"
    assert np.isfinite(vectors).all(), f"{name}.dictionary_ has non-finite values"
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-4), f"{name}.dictionary_ rows must be unit (or zero)"

    index, value = dictionary.encode(X)
    assert index.shape == value.shape and index.ndim == 2 and len(index) == len(X), \
        f"{name}.encode must give (n, L) index and value arrays, got {index.shape} and {value.shape}"
    assert index.dtype.kind == "i" and value.dtype.kind == "f", f"{name}.encode: integer index, float value"
    assert ((index >= -1) & (index < n_concepts)).all(), f"{name}.encode: an index out of [-1, K)"
    assert (value[index < 0] == 0).all(), f"{name}.encode: an unused slot (index -1) must hold 0"
    assert (value >= 0).all(), f"{name}.encode: codes must be non-negative"
    assert (np.diff(value, axis=1) <= 1e-6).all(), f"{name}.encode: slots must be by decreasing value"
    for row in index:
        used = row[row >= 0]
        assert len(np.unique(used)) == len(used), f"{name}.encode: a concept twice in one code"
    assert (index[:4] < 0).all(), f"{name}.encode: an all-zero PFV must have an empty code"

    reconstruction = dictionary.decode(index, value)
    assert reconstruction.shape == X.shape and reconstruction.dtype == np.float32, f"{name}.decode: (n, C) float32"
    error = float(((X - reconstruction) ** 2).sum()) / float(((X - X.mean(0)) ** 2).sum())
    assert error < 1.0, f"{name}: codes reconstruct worse than the mean (relative error {error:.2f})"

    arrays = dictionary.fitted_arrays()
    assert "vector" in arrays and np.array_equal(arrays["vector"], vectors), f"{name}.fitted_arrays needs 'vector'"
    undeclared = set(arrays) - set(cls.stored_arrays)
    assert not undeclared, f"{name}.fitted_arrays gives {sorted(undeclared)}, not in stored_arrays (the store " \
                           "declares those before its workers write them)"
    encode = {key: value for key, value in dictionary.get_params().items() if key != "n_concepts"}
    again = cls.from_arrays(arrays, **encode)
    index2, value2 = again.encode(X)
    assert np.array_equal(index, index2) and np.allclose(value, value2, rtol=1e-5, atol=1e-6), \
        f"{name}: from_arrays(fitted_arrays()) must encode as the fitted dictionary does"

    twin = cls(n_concepts=n_concepts, **params).fit(X)
    assert np.array_equal(np.asarray(twin.dictionary_), vectors), f"{name}: the same seed must give the same dictionary"
    stats = dictionary.fit_statistics()
    import json

    json.dumps(stats)  # JSON-able: the manifest records it
