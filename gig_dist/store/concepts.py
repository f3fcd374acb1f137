"""Section ``concepts``: each dictionary's fitted concepts per tap.

    concepts/<dict>/<tap>/vector  (concept, channel)  float32 concept vectors (unit rows; zero rows
                                                      where a dictionary says a concept is empty)
    concepts/<dict>/<tap>/member  (image, sample)     int32 the concept of each sample of
                                                      samples/<tap> (-1: empty slot), when the
                                                      dictionary assigns its training samples
    concepts/<dict>/<tap>/...                         whatever else the dictionary stores
                                                      (bisecting k-means: center, size, inertia,
                                                      zero and tree/{parent,children,size,
                                                      inertia,leaf,order}); attributes ``fit``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gig_dist.store.errors import StoreError
from gig_dist.store.samples import SamplesSection
from gig_dist.store.types import ArraySpec, Facts, per_image_spec

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore

#: Dimension names of the arrays dictionaries store, by name; the first axis of others is
#: ``concept`` when it has K rows.
_DIMS = {"vector": ("concept", "channel"), "center": ("concept", "channel"), "tree/children": ("node", "side")}


def member_specs(facts: Facts, dictionary: str, per_image: int) -> list[ArraySpec]:
    return [per_image_spec(facts, f"concepts/{dictionary}/{tap}/member", (per_image,), "int32", -1, ("sample",))
            for tap in facts.taps]


class ConceptsSection:
    def __init__(self, store: RunStore, dictionary: str) -> None:
        self.store = store
        self.dictionary = dictionary

    @staticmethod
    def level_path(dictionary: str, name: str = "") -> str:
        """A dictionary level's group (``concepts/<level>``), or ``name`` under it (``<tap>/vector``)."""
        return f"concepts/{dictionary}" + (f"/{name}" if name else "")

    def _path(self, tap: str, name: str = "") -> str:
        return f"concepts/{self.dictionary}/{tap}" + (f"/{name}" if name else "")

    def fitted_paths(self, tap: str, names: tuple[str, ...]) -> list[str]:
        """Where the fitted arrays ``names`` of ``tap``'s dictionary go (declared before a fit)."""
        return [self._path(tap, name) for name in names]

    def write(self, tap: str, arrays: dict[str, np.ndarray], labels: np.ndarray | None, stats: dict[str, Any],
              owner: str) -> None:
        """One tap's fitted dictionary (written by that tap's unit only) and, when given, the
        concept of each valid sample, in the order of :meth:`SamplesSection.iter_valid`."""
        k = len(arrays["vector"])
        for name, values in arrays.items():
            values = np.asarray(values)
            dims = _DIMS.get(name) or tuple(
                ("concept" if (axis == 0 and values.shape[0] == k) else
                 "node" if name.startswith("tree/") and axis == 0 else f"{name.replace('/', '_')}_{axis}")
                for axis in range(values.ndim))
            self.store.write_whole(self._path(tap, name), values, dims, owner)
        if labels is not None:
            member = self.store.array(self._path(tap, "member"))
            filled = 0
            for r, valid in self.store.family(SamplesSection).valid_mask_blocks(tap):
                block = np.full(valid.shape, -1, dtype=np.int32)
                block[valid] = labels[filled : filled + int(valid.sum())]
                filled += int(valid.sum())
                member[r.start : r.stop] = block
            if filled != len(labels):
                raise ValueError(f"{len(labels)} sample labels for {filled} samples of tap {tap}")
        self.store.set_attrs(self._path(tap), fit=stats)

    def has(self, tap: str) -> bool:
        return self.store.has(self._path(tap, "vector"))

    def vectors(self, tap: str) -> np.ndarray:
        """The concept vectors (K, C) of ``tap``."""
        if not self.has(tap):
            raise StoreError(f"{self.store.url} has no {self.dictionary} concepts for tap {tap!r}; "
                             "run the concepts stage first")
        return self.store.array(self._path(tap, "vector"))[...]

    def count(self, tap: str) -> int:
        return int(self.store.array(self._path(tap, "vector")).shape[0])

    def sizes(self, tap: str) -> np.ndarray | None:
        """Samples per concept (None for a dictionary that stores none)."""
        path = self._path(tap, "size")
        return self.store.array(path)[...] if self.store.has(path) else None

    def arrays(self, tap: str) -> dict[str, np.ndarray]:
        """Every stored array of the tap's dictionary (small: K rows), except the sample members."""
        found = {}
        for name, node in self.store.members(self._path(tap)):
            if name == "member":
                continue
            if hasattr(node, "shape"):
                found[name] = node[...]
            else:
                found.update({f"{name}/{sub}": child[...] for sub, child in node.members()})
        return found

    def labels(self, tap: str) -> np.ndarray | None:
        """The concept of each valid sample, in the order of :meth:`SamplesSection.iter_valid`
        (None: the dictionary stores none)."""
        path = self._path(tap, "member")
        if not self.store.has(path):
            return None
        member = self.store.array(path)
        return np.concatenate([member[r.start : r.stop][valid] for r, valid in
                               self.store.family(SamplesSection).valid_mask_blocks(tap)] or [np.zeros(0, np.int32)])

    def fit(self, tap: str) -> dict[str, Any]:
        return dict(self.store.attrs(self._path(tap)).get("fit", {})) if self.has(tap) else {}
