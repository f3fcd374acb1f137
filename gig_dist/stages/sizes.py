"""The data-dependent sizes of a run before it runs: from the config, a calibration's
measurements, or their bounds (``gig-dist plan`` and the memory check before any work)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gig_dist.stages.base import Sizes
from gig_dist.stages.coding import concept_count
from gig_dist.store import Facts

if TYPE_CHECKING:
    from gig_dist.config import Config


class PlanSizes(Sizes):
    """K from the config; an image's active concepts and the atlas's crops per unit from a
    calibration (``measured``), else their bounds."""

    def __init__(self, config: Config, facts: Facts, measured: dict[str, Any] | None = None) -> None:
        self.config, self.facts, self.measured = config, facts, measured or {}
        #: Set when a size was a bound, not a measurement (the footprints that used it are bounds).
        self.bounded = False

    def concepts(self, tap: str) -> int:
        return concept_count(self.config, tap, self.facts.taps[tap][0])

    def max_active(self, tap: str) -> int:
        found = self.measured.get("max_active", {}).get(tap)
        if found:
            return int(found)
        self.bounded = True
        _, h, w = self.facts.taps[tap]
        return min(self.concepts(tap), h * w * self.config.decompose.max_nonzero)

    def crop_capacity(self) -> int:
        from gig_dist.stages.coding import decompose_taps

        crops = self.config.atlas.members * sum(self.concepts(t) for t in decompose_taps(self.config, list(self.facts.taps)))
        units = len(self.facts.units)
        if "crop_capacity" in self.measured:  # crops spread over more units as the run grows
            return max(1, math.ceil(self.measured["crop_capacity"] * self.measured["units"] / units))
        self.bounded = True
        return max(1, min(crops, 2 * math.ceil(crops / units)))
