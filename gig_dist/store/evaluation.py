"""Section ``eval``: insertion and deletion curves per image (written by the evaluate stage).

    eval/<dict>/<a>__logits/insertion, deletion  (image, ordering, fraction) float32  the softmax
                         probability of the image's predicted class as its concepts at tap a
                         are inserted (from zero codes) or deleted, in each ordering
    eval/<dict>/<a>__<b>/insertion, deletion     (image, target_slot, ordering, fraction) float32
                         ``max_q <a^b_q, v_m>`` over its value at full reconstruction, for the
                         image's first target concepts m at tap b
    eval/<dict>/<a>__<b>/target                  (image, target_slot) int32 those concepts (-1: none)
    eval/<dict>/<pair>/count_insertion, count_deletion  as insertion and deletion, with the first
                         k = 0, 1, 2, 4, ..., 32 concepts (``kernels.evaluation.COUNTS``) in place of
                         fractions of the image's active ones
    eval/<dict>/<pair>/active                    (image,) int32 the image's active concepts at tap a

Ground truth (toy world, ``evaluate.ground_truth``), for each image and each tap with a class
matrix; variant 0 the image itself, 1 the same image with a distractor object of another class:

    eval/<dict>/ground/<tap>/mass    (image, variant, ordering, region) float32  the mean share of
                         the chosen concepts' iERF mass on each region (own object, distractor,
                         background); orderings: the class's top concepts by GIG, random active ones
    eval/<dict>/ground/<tap>/active  (image, variant, ordering) int16  chosen concepts active in it
    eval/<dict>/ground/pixels        (image, variant, region) float32  each region's share of pixels
    eval/<dict>/ground/prediction    (image, variant) int32  the model's prediction
    eval/<dict>/ground/distractor    (image,) int32  the distractor's class

NaN where an image was not evaluated (or a target's full-reconstruction value is not positive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gig_dist.store.gig import LOGITS, Pair, pair_key
from gig_dist.store.types import ArraySpec, Facts, ImageRange, per_image_spec

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore


def eval_specs(facts: Facts, dictionary: str, pair: Pair, orderings: int, points: int, targets: int,
               count_points: int) -> list[ArraySpec]:
    base = f"eval/{dictionary}/{pair_key(*pair)}"
    head, head_dims = ((), ()) if pair[1] == LOGITS else ((targets,), ("target_slot",))
    extra = [] if pair[1] == LOGITS else [
        per_image_spec(facts, f"{base}/target", (targets,), "int32", -1, ("target_slot",))]
    return ([per_image_spec(facts, f"{base}/{name}", (*head, orderings, points), "float32", np.nan,
                            (*head_dims, "ordering", "fraction")) for name in ("insertion", "deletion")]
            + [per_image_spec(facts, f"{base}/count_{name}", (*head, orderings, count_points), "float32", np.nan,
                              (*head_dims, "ordering", "count")) for name in ("insertion", "deletion")]
            + [per_image_spec(facts, f"{base}/active", (), "int32", -1, ())] + extra)


GROUND_VARIANTS = ("image", "with distractor")
GROUND_ORDERINGS = ("gig top", "random active")
GROUND_REGIONS = ("own object", "distractor", "background")


def ground_specs(facts: Facts, dictionary: str, taps: list[str]) -> list[ArraySpec]:
    base = f"eval/{dictionary}/ground"
    v, o, g = len(GROUND_VARIANTS), len(GROUND_ORDERINGS), len(GROUND_REGIONS)
    specs = [per_image_spec(facts, f"{base}/pixels", (v, g), "float32", np.nan, ("variant", "region")),
             per_image_spec(facts, f"{base}/prediction", (v,), "int32", -1, ("variant",)),
             per_image_spec(facts, f"{base}/distractor", (), "int32", -1, ())]
    for tap in taps:
        specs += [per_image_spec(facts, f"{base}/{tap}/mass", (v, o, g), "float32", np.nan,
                                 ("variant", "ordering", "region")),
                  per_image_spec(facts, f"{base}/{tap}/active", (v, o), "int16", -1, ("variant", "ordering"))]
    return specs


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

    def write_ground(self, r: ImageRange, arrays: dict[str, np.ndarray]) -> None:
        """``arrays``: names under ``ground/`` (``pixels``, ``<tap>/mass``, ...) -> unit rows."""
        sl = self.store.unit_slice(r)
        for name, values in arrays.items():
            self.store.array(f"eval/{self.dictionary}/ground/{name}")[sl] = values

    def ground_taps(self) -> list[str]:
        base = f"eval/{self.dictionary}/ground"
        if not self.store.has(base):
            return []
        # a tap's group that holds its arrays (not an empty one a redo left behind)
        return [key for key, node in self.store.members(base)
                if not hasattr(node, "shape") and self.store.has(f"{base}/{key}/mass")]

    def read_ground(self, r: ImageRange, taps: list[str]) -> dict[str, np.ndarray]:
        base = f"eval/{self.dictionary}/ground"
        names = ["pixels", "prediction", "distractor"] + [f"{tap}/{n}" for tap in taps for n in ("mass", "active")]
        return {name: self.store.array(f"{base}/{name}")[r.start : r.stop] for name in names}

    def has(self, pair: Pair) -> bool:
        return self.store.has(self._path(pair, "insertion"))

    def read(self, pair: Pair, r: ImageRange) -> dict[str, np.ndarray]:
        names = ("insertion", "deletion", "count_insertion", "count_deletion", "active") + (
            () if pair[1] == LOGITS else ("target",))
        return {name: self.store.array(self._path(pair, name))[r.start : r.stop] for name in names}
