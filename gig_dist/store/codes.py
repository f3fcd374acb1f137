"""Section ``codes``: every decomposed PFV's sparse code, per dictionary and tap.

    codes/<dict>/<tap>/index (image, position, slot) concept indices by decreasing value, -1 in
                             unused slots; int16 while K < 32,768 (ImageNet's largest K at 8C
                             is 16,384), else int32; sharded like pfv/<tap>
    codes/<dict>/<tap>/value (image, position, slot) float32, or float16 with
                             ``decompose.value_dtype`` (0 in unused slots)

Reads return int32 indices and float32 values whatever is stored (stores made before hold int32).
    codes/<dict>/<tap>/unit_stats (unit, stat) float64 per unit, the columns of
                             ``kernels.metrics.RECONSTRUCTION_STATS``
    codes/<dict>/<tap>/unit_sum   (unit, channel) float64 the PFVs' sum (for R^2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gig_dist.kernels.metrics import RECONSTRUCTION_STATS, reconstruction_summary
from gig_dist.store.errors import StoreError
from gig_dist.store.types import ArraySpec, Facts, ImageRange, per_unit_spec

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore


def index_dtype(concepts: int) -> str:
    """The narrowest signed integer that holds every concept index and the -1 of an empty slot."""
    return "int16" if concepts <= np.iinfo(np.int16).max else "int32"


def code_specs(facts: Facts, dictionary: str, taps: dict[str, int], width: int,
               value_dtype: str = "float32") -> list[ArraySpec]:
    """``taps``: each decomposed tap with its K."""
    specs = []
    for tap, concepts in taps.items():
        channels, height, width_px = facts.taps[tap]
        positions = height * width_px
        for name, dtype, fill in (("index", index_dtype(concepts), -1), ("value", value_dtype, 0.0)):
            specs.append(ArraySpec(
                f"codes/{dictionary}/{tap}/{name}", (facts.num_images, positions, width), dtype,
                ("image", "position", "slot"), (facts.images_per_chunk, positions, width),
                shards=(facts.images_per_unit, positions, width), fill_value=fill, zstd_level=facts.zstd_level))
        specs += [per_unit_spec(facts, f"codes/{dictionary}/{tap}/unit_stats", (len(RECONSTRUCTION_STATS),),
                                "float64", np.nan, ("stat",)),
                  per_unit_spec(facts, f"codes/{dictionary}/{tap}/unit_sum", (channels,), "float64", np.nan,
                                ("channel",))]
    return specs


class CodesSection:
    def __init__(self, store: RunStore, dictionary: str) -> None:
        self.store = store
        self.dictionary = dictionary

    def _path(self, tap: str, name: str) -> str:
        return f"codes/{self.dictionary}/{tap}/{name}"

    def taps(self) -> list[str]:
        base = f"codes/{self.dictionary}"
        return [tap for tap in self.store.taps if self.store.has(f"{base}/{tap}/index")]

    def width(self, tap: str) -> int:
        return int(self.store.array(self._path(tap, "index")).shape[-1])

    def write(self, r: ImageRange, tap: str, index: np.ndarray, value: np.ndarray, stats: np.ndarray,
              pfv_sum: np.ndarray) -> None:
        """One decomposition unit's codes of ``tap`` and its statistics; ``r`` must be one whole unit."""
        sl = self.store.unit_slice(r)
        unit = self.store.unit_index(r)
        values = self.store.array(self._path(tap, "value"))
        largest = float(np.abs(value).max()) if value.size else 0.0
        limit = float(np.finfo(values.dtype).max)
        if largest > limit:  # zarr would store inf without a word
            raise StoreError(f"tap {tap}, images {r.start}:{r.stop}: a code value of {largest:.4g} does not fit the "
                             f"store's {values.dtype} (largest {limit:g}); rerun with "
                             "-o decompose.value_dtype=float32")
        self.store.array(self._path(tap, "index"))[sl] = index
        values[sl] = value
        self.store.array(self._path(tap, "unit_sum"))[unit] = pfv_sum
        self.store.array(self._path(tap, "unit_stats"))[unit] = stats

    def read(self, tap: str, r: ImageRange) -> tuple[np.ndarray, np.ndarray]:
        """Codes of images ``r``: indices (int32) and values (float32), each (n, H*W, L)."""
        return self.store.array(self._path(tap, "index"))[r.start : r.stop].astype(np.int32, copy=False), \
            self.store.array(self._path(tap, "value"))[r.start : r.stop].astype(np.float32, copy=False)

    def max_active(self, tap: str) -> int:
        """The most distinct concepts one image uses at ``tap``, over the units decomposed."""
        stats = self.store.array(self._path(tap, "unit_stats"))[...]
        return int(np.nan_to_num(stats[:, RECONSTRUCTION_STATS.index("max_active")]).max())

    def summary(self, tap: str, concepts: int) -> dict[str, Any]:
        """Per-tap decomposition figures over the units done so far: mean l0, l0 ratio, R^2."""
        return reconstruction_summary(self.store.array(self._path(tap, "unit_stats"))[...],
                                      self.store.array(self._path(tap, "unit_sum"))[...], concepts)
