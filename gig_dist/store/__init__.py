"""The run store: the only package that knows the on-disk (Zarr v3) layout.

``types`` holds the value types (facts, manifest, array specs); ``core`` the handle (lifecycle,
progress, ownership); ``section`` the base of one module per family (reached by
``RunStore.family(<Family>Section, level)``), each owning that family's
paths, reads and writes: ``meta`` (index, extraction results and PFVs), ``samples``,
``concepts``, ``codes``, ``gig`` (attributions and class graphs), ``atlas``, ``evaluation``. Every
array carries dimension names, and finished stages leave consolidated metadata, so
``xarray.open_datatree(url, engine="zarr")`` opens a run.
"""

from gig_dist.store.atlas import AtlasSection
from gig_dist.store.codes import CodesSection
from gig_dist.store.concepts import ConceptsSection
from gig_dist.store.core import RunStore
from gig_dist.store.errors import LeaseLost, StoreError
from gig_dist.store.evaluation import EvaluationSection
from gig_dist.store.gig import LOGITS, GIGSection, pair_key
from gig_dist.store.meta import MetaSection
from gig_dist.store.samples import SamplesSection
from gig_dist.store.section import Section
from gig_dist.store.types import (
    FORMAT_VERSION,
    PENDING,
    PROCESSED,
    SKIPPED,
    ArraySpec,
    Facts,
    ImageRange,
    Manifest,
    StageRecord,
    unit_ranges,
)

__all__ = ["FORMAT_VERSION", "LOGITS", "PENDING", "PROCESSED", "SKIPPED", "ArraySpec", "AtlasSection", "CodesSection",
           "ConceptsSection", "EvaluationSection", "Facts", "GIGSection", "ImageRange", "LeaseLost", "Manifest",
           "MetaSection", "RunStore", "SamplesSection", "Section", "StageRecord", "StoreError", "pair_key",
           "unit_ranges"]
