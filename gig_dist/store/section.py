"""The base of the store's sections (``meta``, ``samples``, ``codes``, ...): rows of per-image arrays
under one prefix. Below the store handle, which gives each section its accessor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gig_dist.store.types import (
    ArraySpec,
    ImageRange,
    per_image_spec,
)

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore


class Section:
    """Rows of per-image arrays under one prefix: specs, whole-unit writes and reads."""

    def __init__(self, store: RunStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    def spec(self, name: str, tail: tuple[int, ...], dtype: str, fill: Any, dims: tuple[str, ...] = ()) -> ArraySpec:
        return per_image_spec(self.store.facts, f"{self.prefix}/{name}", tail, dtype, fill, dims)

    def write(self, name: str, r: ImageRange, values: np.ndarray) -> None:
        self.store.array(f"{self.prefix}/{name}")[self.store.unit_slice(r)] = values

    def read(self, name: str, r: ImageRange) -> np.ndarray:
        return self.store.array(f"{self.prefix}/{name}")[r.start : r.stop]
