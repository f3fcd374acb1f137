"""scikit-learn's mini-batch dictionary learning (non-negative), Lasso codes."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from gig_dist.kernels.dictionaries.base import (
    LassoCodedDictionary,
)


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
