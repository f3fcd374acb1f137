"""Section ``atlas``: each concept's top members, the PFVs that show it best.

    atlas/<dict>/<tap>/unit_top/{value,image,position} (unit, concept, member)  each store
                         unit's strongest codes per concept (value desc, then image, position)
    atlas/<dict>/<tap>/unit_usage (unit, concept) int64  PFVs whose code uses the concept
    atlas/<dict>/<tap>/member/{value,image,position} (concept, member)  the merged top members
                         over every decomposed unit, in the same order (-1: fewer members)
    atlas/<dict>/<tap>/usage (concept,) int64  PFVs using the concept over the decomposed images
"""

from __future__ import annotations

import numpy as np

from gig_dist.store.core import ArraySpec, Facts, RunStore, StoreError

FIELDS = (("value", "float32", np.nan), ("image", "int32", -1), ("position", "int32", -1))
#: Concepts per chunk of the per-unit tables.
CONCEPT_CHUNK = 1024


def member_specs(facts: Facts, dictionary: str, tap: str, concepts: int, members: int) -> list[ArraySpec]:
    base, units = f"atlas/{dictionary}/{tap}", len(facts.units)
    block = min(concepts, CONCEPT_CHUNK)
    specs = []
    for name, dtype, fill in FIELDS:
        specs += [ArraySpec(f"{base}/unit_top/{name}", (units, concepts, members), dtype, ("unit", "concept", "member"),
                            (1, block, members), fill_value=fill),
                  ArraySpec(f"{base}/member/{name}", (concepts, members), dtype, ("concept", "member"),
                            (block, members), fill_value=fill)]
    specs += [ArraySpec(f"{base}/unit_usage", (units, concepts), "int64", ("unit", "concept"), (1, concepts),
                        fill_value=0),
              ArraySpec(f"{base}/usage", (concepts,), "int64", ("concept",), (concepts,), fill_value=0)]
    return specs


class AtlasSection:
    def __init__(self, store: RunStore, dictionary: str) -> None:
        self.store = store
        self.dictionary = dictionary

    def _path(self, tap: str, name: str) -> str:
        return f"atlas/{self.dictionary}/{tap}/{name}"

    def taps(self) -> list[str]:
        return [tap for tap in self.store.taps if self.store.has(self._path(tap, "member/value"))]

    def write_unit(self, tap: str, unit: int, top: dict[str, np.ndarray], usage: np.ndarray) -> None:
        for name, _, _ in FIELDS:
            self.store.array(self._path(tap, f"unit_top/{name}"))[unit] = top[name]
        self.store.array(self._path(tap, "unit_usage"))[unit] = usage

    def read_units(self, tap: str, units: list[int], first: int, stop: int) -> dict[str, np.ndarray]:
        """Concepts ``first..stop-1`` of the given units' tables: each (units, concepts, member)."""
        found = {name: np.stack([self.store.array(self._path(tap, f"unit_top/{name}"))[u, first:stop] for u in units])
                 for name, _, _ in FIELDS}
        return found

    def read_usage(self, tap: str, units: list[int]) -> np.ndarray:
        array = self.store.array(self._path(tap, "unit_usage"))
        return sum((array[u] for u in units), np.zeros(array.shape[1], dtype=np.int64))

    def write_members(self, tap: str, first: int, members: dict[str, np.ndarray]) -> None:
        for name, _, _ in FIELDS:
            values = members[name]
            self.store.array(self._path(tap, f"member/{name}"))[first : first + len(values)] = values

    def write_usage(self, tap: str, usage: np.ndarray) -> None:
        self.store.array(self._path(tap, "usage"))[...] = usage

    def members(self, tap: str, concept: int | None = None) -> dict[str, np.ndarray]:
        """The top members of one concept (member,), or of all (concept, member)."""
        if tap not in self.taps():
            raise StoreError(f"{self.store.url} has no concept members for tap {tap}; run the members stage")
        where = slice(None) if concept is None else concept
        return {name: self.store.array(self._path(tap, f"member/{name}"))[where] for name, _, _ in FIELDS}

    def usage(self, tap: str) -> np.ndarray:
        return self.store.array(self._path(tap, "usage"))[...]
