"""Non-negative matrix factorisation (CRAFT's concept bank), Lasso codes."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from gig_dist.kernels.dictionaries.base import (
    LassoCodedDictionary,
    _explained,
)


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
