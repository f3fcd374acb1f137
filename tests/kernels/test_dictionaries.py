"""Every registered dictionary keeps the contract (gig_dist.testing.check_dictionary); a new one
is one class, registered, with its own parameter set from the config."""

from __future__ import annotations

import numpy as np
import pytest

from gig_dist.kernels.dictionaries import DICTIONARIES, register
from gig_dist.kernels.dictionaries.base import LassoCoded
from gig_dist.store import CodesSection, ConceptsSection
from gig_dist.testing import check_dictionary

BUILTIN = ("bisecting_kmeans", "kmeans", "dictionary_learning", "nmf", "sae")


@pytest.mark.fast
@pytest.mark.parametrize("method", BUILTIN)
def test_every_dictionary_keeps_the_contract(method):
    params = {"steps": 200} if method == "sae" else {}
    check_dictionary(method, **params)


class RandomRows(LassoCoded):
    """A toy dictionary: ``K`` random samples as concepts, jittered by its own ``jitter``."""

    own_params = ("jitter",)

    def __init__(self, n_concepts: int = 8, *, seed: int = 0, n_init: int = 1, backend: str = "auto",
                 lambda_rel: float = 0.1, lam: float | None = None, tol: float = 1e-6, batch_size: int = 4096,
                 device: str = "cpu", refine_iter: int | None = None, jitter: float = 0.0) -> None:
        super().__init__(n_concepts, seed=seed, n_init=n_init, backend=backend, lambda_rel=lambda_rel, lam=lam,
                         tol=tol, batch_size=batch_size, device=device, refine_iter=refine_iter)
        self.jitter = jitter

    def fit(self, X):
        rng = np.random.default_rng(self.seed)
        rows = X[rng.choice(len(X), self.n_concepts, replace=False)] + self.jitter * np.abs(rng.normal(size=(
            self.n_concepts, X.shape[1])))
        rows = np.where(np.linalg.norm(rows, axis=1, keepdims=True) > 0, rows, 1.0)
        self.dictionary_ = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
        self._coder = None
        return self

    def fit_statistics(self):
        return {"k": self.n_concepts, "jitter": self.jitter}


@pytest.fixture
def random_rows():
    register("random_rows", RandomRows)
    yield "random_rows"
    DICTIONARIES.unregister("random_rows")


@pytest.mark.fast
def test_the_contract_catches_a_broken_dictionary(random_rows):
    class Unsorted(RandomRows):
        def encode(self, X):
            index, value = super().encode(X)
            return index[:, ::-1].copy(), value[:, ::-1].copy()

    with pytest.raises(AssertionError, match="by decreasing value"):
        check_dictionary(Unsorted, jitter=0.1)

    class Undeclared(RandomRows):
        def __init__(self, n_concepts=8, *, seed=0, n_init=1, backend="auto", lambda_rel=0.1, lam=None, tol=1e-6,
                     batch_size=4096, device="cpu", refine_iter=None, jitter=0.0, colour="red"):
            super().__init__(n_concepts, seed=seed, jitter=jitter)
            self.colour = colour

    with pytest.raises(AssertionError, match=r"takes \['colour'\], which are neither shared nor in own_params"):
        check_dictionary(Undeclared)


def test_a_new_dictionary_with_its_own_parameter_runs_in_the_pipeline(tmp_path, random_rows):
    """Registered, a dictionary is a concepts.method; its own parameter comes from
    concepts.params.<method>, counts in its fingerprint, and a name it does not take is refused."""
    from gig_dist import pipeline
    from gig_dist.settings import ConfigError
    from gig_dist.store import RunStore
    from tests.conftest import toy_config

    check_dictionary(random_rows, jitter=0.1)
    url = str(tmp_path / "r.zarr")
    config = toy_config("concepts.method=random_rows", "concepts.params.random_rows.jitter=0.25")
    pipeline.run(config, url, until="decompose")
    store = RunStore.open(url)
    fit = store.family(ConceptsSection, "random_rows").fit("layer3.1")
    assert fit["jitter"] == 0.25
    assert store.family(CodesSection, "random_rows").summary("layer3.1", store.family(ConceptsSection, "random_rows").count("layer3.1"))["r2"] > 0
    other = toy_config("concepts.method=random_rows", "concepts.params.random_rows.jitter=0.5")
    decisions = {d.key: d.action for d in pipeline.decide(RunStore.open(url), other, pipeline.stages_until("decompose"))}
    assert decisions["random_rows/concepts"] == "redo"
    with pytest.raises(ConfigError, match="random_rows takes no parameter 'jiter'; its own parameters are jitter"):
        pipeline.run(toy_config("concepts.method=random_rows", "concepts.params.random_rows.jiter=1"), url,
                     until="decompose")
