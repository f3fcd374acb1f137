"""Section ``atlas``: each concept's top members, the PFVs that show it best.

    atlas/<dict>/<tap>/unit_top/{value,image,position} (unit, concept, member)  each store
                         unit's strongest codes per concept (value desc, then image, position)
    atlas/<dict>/<tap>/unit_usage (unit, concept) int64  PFVs whose code uses the concept
    atlas/<dict>/<tap>/member/{value,image,position} (concept, member)  the merged top members
                         over every decomposed unit, in the same order (-1: fewer members)
    atlas/<dict>/<tap>/usage (concept,) int64  PFVs using the concept over the decomposed images
    atlas/<dict>/<tap>/unit_sample/{value,image,position} (unit, concept, example)  each store
                         unit's random examples per concept: the uses with the smallest hash of
                         (concept, image, position), a deterministic uniform sample
    atlas/<dict>/<tap>/sample/{value,image,position} (concept, example)  the merged sample over
                         every decomposed unit, in hash order (-1: fewer uses)
    atlas/<dict>/<tap>/unit_histogram (unit, concept, bin) int32  each unit's code values per bin
    atlas/<dict>/<tap>/histogram (concept, bin) int64  a concept's code values over the decomposed
                         images, on fixed log bins (``kernels.examples.HISTOGRAM_EDGES``)
    atlas/<dict>/<tap>/row (concept, member) int64  where the member's crop is in atlas/<dict>/crops

written by the members stage, and by the atlas stage:

    atlas/<dict>/crops/crop (row, y, x, rgb) uint8  each member's crop around its iERF, the iERF
                         overlaid; rows grouped by store unit (a shard of ``capacity`` rows each,
                         its unit the only writer), -1 / empty where unused
    atlas/<dict>/crops/box  (row, corner) int32      the crop's box in the model input (y0, x0, y1, x1)
    atlas/<dict>/crops/kind (row,) str               the iERF's kind (srd or gradient)
    atlas/<dict>/crops/heat (row, heat_y, heat_x) uint8  the iERF over the whole input, area-averaged
                         to 32 x 32, 255 at its peak (a contour on the whole image)
    atlas/<dict>/crops/part_mass (row, mask_value) float32  toy world: iERF mass per mask value
    atlas/<dict>/<tap>/thumb (concept, y, x, rgb) uint8  the mean of the concept's crops
    atlas/<dict>/<tap>/part_mass (concept, mask_value) float32  toy world: its members' mass summed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gig_dist.store.errors import StoreError
from gig_dist.store.types import ArraySpec, Facts

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore

FIELDS = (("value", "float32", np.nan), ("image", "int32", -1), ("position", "int32", -1))
#: Concepts per chunk of the per-unit tables.
CONCEPT_CHUNK = 1024
#: Crops per inner chunk (at most; a divisor of the shard's rows: the members stage makes the
#: rows per unit a multiple of it). 16 crops of 48 px: about 110 KiB raw.
CROPS_PER_CHUNK = 16


def member_specs(facts: Facts, dictionary: str, tap: str, concepts: int, members: int,
                 examples: int = 0) -> list[ArraySpec]:
    from gig_dist.kernels.examples import HISTOGRAM_BINS

    base, units = f"atlas/{dictionary}/{tap}", len(facts.units)
    block = min(concepts, CONCEPT_CHUNK)
    specs = []
    for name, dtype, fill in FIELDS:
        specs += [ArraySpec(f"{base}/unit_top/{name}", (units, concepts, members), dtype, ("unit", "concept", "member"),
                            (1, block, members), fill_value=fill),
                  ArraySpec(f"{base}/member/{name}", (concepts, members), dtype, ("concept", "member"),
                            (block, members), fill_value=fill)]
        if examples:
            specs += [ArraySpec(f"{base}/unit_sample/{name}", (units, concepts, examples), dtype,
                                ("unit", "concept", "example"), (1, block, examples), fill_value=fill),
                      ArraySpec(f"{base}/sample/{name}", (concepts, examples), dtype, ("concept", "example"),
                                (block, examples), fill_value=fill)]
    specs += [ArraySpec(f"{base}/unit_histogram", (units, concepts, HISTOGRAM_BINS), "int32", ("unit", "concept", "bin"),
                        (1, block, HISTOGRAM_BINS), fill_value=0),
              ArraySpec(f"{base}/histogram", (concepts, HISTOGRAM_BINS), "int64", ("concept", "bin"),
                        (block, HISTOGRAM_BINS), fill_value=0)]
    specs += [ArraySpec(f"{base}/row", (concepts, members), "int64", ("concept", "member"), (block, members),
                        fill_value=-1),
              ArraySpec(f"{base}/unit_usage", (units, concepts), "int64", ("unit", "concept"), (1, concepts),
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

    def write_unit(self, tap: str, unit: int, top: dict[str, np.ndarray], usage: np.ndarray,
                   sample: dict[str, np.ndarray] | None = None, histogram: np.ndarray | None = None) -> None:
        for name, _, _ in FIELDS:
            self.store.array(self._path(tap, f"unit_top/{name}"))[unit] = top[name]
            if sample is not None:
                self.store.array(self._path(tap, f"unit_sample/{name}"))[unit] = sample[name]
        if histogram is not None:
            self.store.array(self._path(tap, "unit_histogram"))[unit] = histogram
        self.store.array(self._path(tap, "unit_usage"))[unit] = usage

    def read_unit_samples(self, tap: str, units: list[int], first: int, stop: int) -> dict[str, np.ndarray]:
        """Concepts ``first..stop-1`` of the given units' random examples: each (units, concepts, example)."""
        return {name: np.stack([self.store.array(self._path(tap, f"unit_sample/{name}"))[u, first:stop] for u in units])
                for name, _, _ in FIELDS}

    def read_unit_histograms(self, tap: str, units: list[int], first: int, stop: int) -> np.ndarray:
        """Concepts ``first..stop-1`` of the units' histograms, summed (int64)."""
        array = self.store.array(self._path(tap, "unit_histogram"))
        return sum((array[u, first:stop].astype(np.int64) for u in units),
                   np.zeros((stop - first, array.shape[2]), dtype=np.int64))

    def write_examples(self, tap: str, first: int, sample: dict[str, np.ndarray] | None, histogram: np.ndarray) -> None:
        if sample is not None:
            for name, _, _ in FIELDS:
                self.store.array(self._path(tap, f"sample/{name}"))[first : first + len(histogram)] = sample[name]
        self.store.array(self._path(tap, "histogram"))[first : first + len(histogram)] = histogram

    def has_examples(self, tap: str) -> bool:
        """Whether the members stage kept random examples and a histogram (stores made before do not)."""
        return self.store.has(self._path(tap, "histogram"))

    def samples(self, tap: str) -> dict[str, np.ndarray] | None:
        """Every concept's random examples (concept, example), in hash order; None: none kept."""
        if not self.store.has(self._path(tap, "sample/value")):
            return None
        return {name: self.store.array(self._path(tap, f"sample/{name}"))[...] for name, _, _ in FIELDS}

    def histograms(self, tap: str) -> np.ndarray:
        """Every concept's code histogram (concept, bin)."""
        return self.store.array(self._path(tap, "histogram"))[...]

    def has_heat(self) -> bool:
        """Whether the atlas stored its members' iERF heat maps (stores made before do not)."""
        return self.store.has(f"atlas/{self.dictionary}/crops/heat")

    def examples(self, tap: str, concept: int) -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
        """A concept's random examples (in hash order; None: none kept) and its code histogram."""
        sample = ({name: self.store.array(self._path(tap, f"sample/{name}"))[concept] for name, _, _ in FIELDS}
                  if self.store.has(self._path(tap, "sample/value")) else None)
        return sample, self.store.array(self._path(tap, "histogram"))[concept]

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

    def write_rows(self, tap: str, rows: np.ndarray, capacity: int) -> None:
        self.store.array(self._path(tap, "row"))[...] = rows
        self.store.set_attrs(f"atlas/{self.dictionary}", crop_capacity=int(capacity))

    def rows(self, tap: str) -> np.ndarray:
        return self.store.array(self._path(tap, "row"))[...]

    def capacity(self) -> int | None:
        """Crop rows the atlas declared (None: no atlas yet)."""
        base = f"atlas/{self.dictionary}"
        return int(self.store.attrs(base)["crop_capacity"]) if self.store.has(base) else None

    # -- the atlas stage ------------------------------------------------------------------------

    def write_crops(self, unit: int, arrays: dict[str, np.ndarray]) -> None:
        """One store unit's shard of crops (``capacity`` rows)."""
        cap = self.capacity()
        for name, values in arrays.items():
            self.store.array(f"atlas/{self.dictionary}/crops/{name}")[unit * cap : (unit + 1) * cap] = values

    def read_unit_crops(self, name: str, unit: int) -> np.ndarray:
        """One store unit's shard of a crops array (``capacity`` rows), read whole."""
        cap = self.capacity()
        return self.store.array(f"atlas/{self.dictionary}/crops/{name}")[unit * cap : (unit + 1) * cap]

    def read_crops(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a crops array (any order; -1 rows give the fill)."""
        array = self.store.array(f"atlas/{self.dictionary}/crops/{name}")
        rows = np.asarray(rows).ravel()
        valid = rows >= 0
        out = np.full((len(rows), *array.shape[1:]), array.fill_value, dtype=array.dtype)
        if valid.any():
            unique, inverse = np.unique(rows[valid], return_inverse=True)
            out[valid] = array.get_orthogonal_selection((unique,))[inverse]
        return out

    def write_concepts(self, tap: str, thumb: np.ndarray, part_mass: np.ndarray | None) -> None:
        self.store.array(self._path(tap, "thumb"))[...] = thumb
        if part_mass is not None:
            self.store.array(self._path(tap, "part_mass"))[...] = part_mass

    def has_render(self, tap: str) -> bool:
        return self.store.has(self._path(tap, "thumb"))

    def thumbs(self, tap: str, concepts: np.ndarray | slice) -> np.ndarray:
        return self.store.array(self._path(tap, "thumb"))[concepts]

    def part_mass(self, tap: str) -> np.ndarray | None:
        return self.store.array(self._path(tap, "part_mass"))[...] if self.store.has(self._path(tap, "part_mass")) else None

    def members(self, tap: str, concept: int | None = None) -> dict[str, np.ndarray]:
        """The top members of one concept (member,), or of all (concept, member)."""
        if tap not in self.taps():
            raise StoreError(f"{self.store.url} has no concept members for tap {tap}; run the members stage")
        where = slice(None) if concept is None else concept
        return {name: self.store.array(self._path(tap, f"member/{name}"))[where] for name, _, _ in FIELDS}

    def usage(self, tap: str) -> np.ndarray:
        return self.store.array(self._path(tap, "usage"))[...]


def render_specs(facts: Facts, dictionary: str, taps: dict[str, int], size: int, parts: int,
                 capacity: int) -> list[ArraySpec]:
    """The atlas stage's arrays: crops (rows of ``capacity`` per store unit) and per-concept
    thumbnails; ``taps`` maps each tap to its number of concepts; ``parts`` > 0 on the toy world."""
    from gig_dist.kernels.crops import HEAT_SIDE

    base, cap, units = f"atlas/{dictionary}", capacity, len(facts.units)
    rows = units * cap
    inner = max(d for d in range(1, min(cap, CROPS_PER_CHUNK) + 1) if cap % d == 0)  # divides the shard
    specs = [
        ArraySpec(f"{base}/crops/crop", (rows, size, size, 3), "uint8", ("row", "y", "x", "rgb"),
                  (inner, size, size, 3), shards=(cap, size, size, 3), fill_value=0),
        ArraySpec(f"{base}/crops/box", (rows, 4), "int32", ("row", "corner"), (cap, 4), fill_value=-1),
        ArraySpec(f"{base}/crops/kind", (rows,), "str", ("row",), (cap,), fill_value=""),
        ArraySpec(f"{base}/crops/heat", (rows, HEAT_SIDE, HEAT_SIDE), "uint8", ("row", "heat_y", "heat_x"),
                  (inner, HEAT_SIDE, HEAT_SIDE), shards=(cap, HEAT_SIDE, HEAT_SIDE), fill_value=0),
    ]
    if parts:
        specs.append(ArraySpec(f"{base}/crops/part_mass", (rows, parts), "float32", ("row", "mask_value"),
                               (cap, parts), fill_value=0.0))
    for tap, k in taps.items():
        specs.append(ArraySpec(f"{base}/{tap}/thumb", (k, size, size, 3), "uint8", ("concept", "y", "x", "rgb"),
                               (min(k, CROPS_PER_CHUNK), size, size, 3), fill_value=0))
        if parts:
            specs.append(ArraySpec(f"{base}/{tap}/part_mass", (k, parts), "float32", ("concept", "mask_value"),
                                   (k, parts), fill_value=0.0))
    return specs
