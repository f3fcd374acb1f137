"""Section ``samples``: the PFVs drawn for concept discovery, per tap.

    samples/<tap>/position  (image, sample)            int32 drawn positions (-1: skipped image)
    samples/<tap>/vector    (image, sample, channel)   the drawn PFVs, in the PFV dtype
    samples/<tap>/relevance (image, position)          float32 score they were drawn from (SRD
                                                       relevance of the predicted class, or
                                                       grad x act); absent for uniform sampling
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from gig_dist.store.types import ArraySpec, Facts, ImageRange, per_image_spec

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore


def sample_specs(facts: Facts, per_image: int, pfv_dtype: str, scores: bool) -> list[ArraySpec]:
    specs = []
    for tap, (channels, height, width) in facts.taps.items():
        specs += [per_image_spec(facts, f"samples/{tap}/position", (per_image,), "int32", -1, ("sample",)),
                  per_image_spec(facts, f"samples/{tap}/vector", (per_image, channels), pfv_dtype, np.nan,
                                 ("sample", "channel"))]
        if scores:
            specs.append(per_image_spec(facts, f"samples/{tap}/relevance", (height * width,), "float32", np.nan,
                                        ("position",)))
    return specs


class SamplesSection:
    def __init__(self, store: RunStore) -> None:
        self.store = store

    def write(self, r: ImageRange, tap: str, positions: np.ndarray, vectors: np.ndarray,
              scores: np.ndarray | None) -> None:
        """One sampling unit's draws for ``tap``; ``r`` must be one whole unit."""
        sl = self.store.unit_slice(r)
        if scores is not None:
            self.store.array(f"samples/{tap}/relevance")[sl] = scores
        self.store.array(f"samples/{tap}/vector")[sl] = vectors
        self.store.array(f"samples/{tap}/position")[sl] = positions

    def positions(self, tap: str, r: ImageRange) -> np.ndarray:
        return self.store.array(f"samples/{tap}/position")[r.start : r.stop]

    def vectors(self, tap: str, r: ImageRange) -> np.ndarray:
        return self.store.array(f"samples/{tap}/vector")[r.start : r.stop]

    def iter_valid(self, tap: str) -> Iterator[np.ndarray]:
        """The sampled PFVs of ``tap`` (float32), one unit at a time, without the empty slots of
        skipped images (slots whose position is -1)."""
        for r in self.store.units():
            block = self.vectors(tap, r)
            yield block[self.positions(tap, r) >= 0].astype(np.float32)

    def valid_mask_blocks(self, tap: str) -> Iterator[tuple[ImageRange, np.ndarray]]:
        for r in self.store.units():
            yield r, self.positions(tap, r) >= 0
