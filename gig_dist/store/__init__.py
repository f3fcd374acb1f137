"""The run store: the only package that knows the on-disk (Zarr v3) layout.

``core`` owns the lifecycle, the typed manifest, progress, ownership and array specs; one module
per family owns that family's paths, reads and writes: ``meta`` (index, extraction results and
PFVs), ``samples``, ``concepts``, ``codes`` and ``gig`` (attributions and class graphs). Every
array carries dimension names, and finished stages leave consolidated metadata, so
``xarray.open_datatree(url, engine="zarr")`` opens a run.
"""

from gig_dist.store.core import (
                                 FORMAT_VERSION,
                                 PENDING,
                                 PROCESSED,
                                 SKIPPED,
                                 ArraySpec,
                                 Facts,
                                 ImageRange,
                                 Manifest,
                                 RunStore,
                                 StageRecord,
                                 unit_ranges,
)
from gig_dist.store.errors import LeaseLost, StoreError
from gig_dist.store.gig import LOGITS, pair_key

__all__ = ["FORMAT_VERSION", "LOGITS", "PENDING", "PROCESSED", "SKIPPED", "ArraySpec", "Facts", "ImageRange",
           "LeaseLost", "Manifest", "RunStore", "StageRecord", "StoreError", "pair_key", "unit_ranges"]
