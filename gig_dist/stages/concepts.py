"""Stage ``concepts``: one unit per tap, bisecting k-means on the tap's samples (method.md
section 4), writing the concept vectors, centroids, split tree and fit statistics to the store.

The samples of one tap are the only data a unit holds in memory: ``sample.per_image`` PFVs per
image (ImageNet validation at the paper's 1 per image and 2,048 channels: 200 MB in float16),
which k-means needs all at once.
"""

from __future__ import annotations

import time

import numpy as np

from gig_dist.config import Config
from gig_dist.kernels.kmeans import BisectingKMeans, concept_vectors
from gig_dist.stages.base import Progress, Stage, StageWorker, UnitReport, WorkUnit
from gig_dist.store import RunStore


def concept_count(config: Config, tap: str, channels: int) -> int:
    """K for a tap: the absolute ``concepts.k[tap]``, else ``round(k_multiplier * C)``."""
    return int(config.concepts.k.get(tap, max(1, round(config.concepts.k_multiplier * channels))))


class ConceptsStage(Stage):
    name = "concepts"

    @classmethod
    def progress_size(cls, config: Config, num_units: int, taps: dict[str, tuple[int, int, int]]) -> int:
        return len(taps)

    def plan(self, store: RunStore) -> list[WorkUnit]:
        return [WorkUnit(self.name, i, 0, 0, tap=tap) for i, tap in enumerate(store.taps)]

    def open_worker(self, device: str) -> ConceptsWorker:
        return ConceptsWorker(self)


class ConceptsWorker(StageWorker):
    def __init__(self, stage: ConceptsStage) -> None:
        self.config = stage.config
        self.store = RunStore.open(stage.store_url, mode="r+")

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        tap = unit.tap
        channels = self.store.taps[tap][0]
        k = concept_count(self.config, tap, channels)
        samples = np.concatenate(list(self.store.iter_samples(tap)))
        if len(samples) < k:
            raise ValueError(
                f"tap {tap}: K = {k} concepts need at least {k} sampled PFVs, the store has {len(samples)}; "
                "raise sample.per_image or lower concepts.k_multiplier / concepts.k"
            )
        options = self.config.concepts
        started = time.perf_counter()
        try:
            model = BisectingKMeans(k, seed=options.seed, n_init=options.n_init, backend=options.backend).fit(samples)
        except ValueError as exc:
            raise ValueError(f"tap {tap}: {exc}") from None
        seconds = time.perf_counter() - started
        vectors, zero = concept_vectors(model.cluster_centers_)
        tree = model.tree_
        self.store.write_concepts(
            tap, vectors=vectors, centers=model.cluster_centers_, zero=zero, size=model.cluster_size_,
            inertia=model.cluster_inertia_, labels=model.labels_,
            tree={"parent": tree.parent, "children": tree.children, "size": tree.size, "inertia": tree.inertia,
                  "leaf": tree.leaf, "order": tree.order},
            stats={
                "k": k, "samples": len(samples), "inertia": model.inertia_,
                "total_inertia": float(tree.inertia[0]),
                "explained": 1 - model.inertia_ / tree.inertia[0] if tree.inertia[0] > 0 else None,
                "mean_members": len(samples) / k, "smallest": int(model.cluster_size_.min()),
                "largest": int(model.cluster_size_.max()), "singletons": int((model.cluster_size_ == 1).sum()),
                "zero_concepts": int(zero.sum()), "seconds": seconds, "backend": model._backend(),
            },
        )
        if progress is not None:
            progress(1)
        return UnitReport(unit.index, 0, 0)
