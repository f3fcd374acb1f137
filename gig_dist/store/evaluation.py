"""Section ``eval``: insertion and deletion curves per image (written by the evaluate stage).

    eval/<dict>/<a>__logits/insertion, deletion  (image, ordering, fraction) float32  the softmax
                         probability of the image's predicted class as its concepts at tap a
                         are inserted (from zero codes) or deleted, in each ordering
    eval/<dict>/<a>__<b>/insertion, deletion     (image, target_slot, ordering, fraction) float32
                         ``max_q <a^b_q, v_m>`` over its value at full reconstruction, for the
                         image's first target concepts m at tap b
    eval/<dict>/<a>__<b>/target                  (image, target_slot) int32 those concepts (-1: none)

NaN where an image was not evaluated (or a target's full-reconstruction value is not positive).
"""

from __future__ import annotations

import numpy as np

from gig_dist.store.core import ArraySpec, Facts, ImageRange, RunStore, per_image_spec
from gig_dist.store.gig import LOGITS, Pair, pair_key


def eval_specs(facts: Facts, dictionary: str, pair: Pair, orderings: int, points: int, targets: int) -> list[ArraySpec]:
    base = f"eval/{dictionary}/{pair_key(*pair)}"
    if pair[1] == LOGITS:
        tail, dims = (orderings, points), ("ordering", "fraction")
        extra = []
    else:
        tail, dims = (targets, orderings, points), ("target_slot", "ordering", "fraction")
        extra = [per_image_spec(facts, f"{base}/target", (targets,), "int32", -1, ("target_slot",))]
    return [per_image_spec(facts, f"{base}/{name}", tail, "float32", np.nan, dims)
            for name in ("insertion", "deletion")] + extra


class EvaluationSection:
    def __init__(self, store: RunStore, dictionary: str) -> None:
        self.store = store
        self.dictionary = dictionary

    def _path(self, pair: Pair, name: str) -> str:
        return f"eval/{self.dictionary}/{pair_key(*pair)}/{name}"

    def write(self, pair: Pair, r: ImageRange, arrays: dict[str, np.ndarray]) -> None:
        sl = self.store.unit_slice(r)
        for name, values in arrays.items():
            self.store.array(self._path(pair, name))[sl] = values

    def has(self, pair: Pair) -> bool:
        return self.store.has(self._path(pair, "insertion"))

    def read(self, pair: Pair, r: ImageRange) -> dict[str, np.ndarray]:
        names = ("insertion", "deletion") + (() if pair[1] == LOGITS else ("target",))
        return {name: self.store.array(self._path(pair, name))[r.start : r.stop] for name in names}
