"""Stage ``members``: each concept's top members, the first step of the concept atlas.

A concept's members are the PFVs whose codes give it the largest values, over every decomposed
image. That is a dataset reduction, run as a fixed two-level tree: each unit (one store unit)
writes the ``atlas.members`` strongest codes of every concept among its images, and
:meth:`MembersStage.finish` merges the units' tables in unit order, a block of concepts at a
time. Ties go to the smaller image index, then position, so the result does not depend on where
units ran. Skipped images have no codes and so are never members.

Alongside, each concept's ``atlas.examples`` random examples (the uses with the smallest hash,
merged the same way) and the histogram of its code values (``kernels.examples``): what a concept
looks like at its ordinary strength, not only at its strongest.
"""

from __future__ import annotations

import numpy as np

from gig_dist.kernels.examples import histogram, sample_strength
from gig_dist.kernels.topk import top_per_group
from gig_dist.stages.base import (
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.stages.coding import decompose_taps
from gig_dist.store import (
    PROCESSED,
    ArraySpec,
    AtlasSection,
    CodesSection,
    ConceptsSection,
    Facts,
    ImageRange,
    MetaSection,
    RunStore,
)
from gig_dist.store.atlas import CONCEPT_CHUNK, CROPS_PER_CHUNK, FIELDS, member_specs


class MembersStage(Stage):
    name = "members"
    config_section = "atlas"
    family = AtlasSection
    reads = ("decompose",)
    # Which images were decomposed decides the merged members, so decompose.images redoes it.
    result_keys = ("atlas.members", "atlas.distinct_images", "atlas.examples", "decompose.images")
    # stores made before distinct members keep theirs while the key is false
    later_keys = {"atlas.distinct_images": False}
    version = 3  # 2: the crop rows of the atlas stage; 3: random examples and histograms
    per_dictionary = True
    coverage_key = "decompose.images"

    def taps(self, store: RunStore | Facts) -> list[str]:
        return decompose_taps(self.config, list(store.taps))

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return [spec for tap in self.taps(facts)
                for spec in member_specs(facts, self.dictionary, tap, sizes.concepts(tap), self.config.atlas.members,
                                         self.config.atlas.examples)]

    def covers(self, unit: WorkUnit) -> bool:
        limit = self.config.decompose.images
        return limit is None or unit.start < limit

    def open_worker(self, device: str) -> MembersWorker:
        return MembersWorker(self)

    def finish(self, store: RunStore) -> None:
        atlas, concepts = store.family(AtlasSection, self.dictionary), store.family(ConceptsSection, self.dictionary)
        units = [u.index for u in self.covered_units(store.facts)]
        m = self.config.atlas.members
        for tap in self.taps(store):
            k = concepts.count(tap)
            for first in range(0, k, CONCEPT_CHUNK):
                stop = min(first + CONCEPT_CHUNK, k)
                found = atlas.read_units(tap, units, first, stop)  # each (units, block, m)
                block = stop - first
                flat = {name: found[name].transpose(1, 0, 2).reshape(block, -1) for name in found}
                valid = flat["image"] >= 0
                concept = np.broadcast_to(np.arange(block)[:, None], valid.shape)[valid]
                entry = top_per_group(concept, flat["value"][valid],
                                      (flat["image"][valid], flat["position"][valid]), block, m)
                merged = {}
                for name, dtype, fill in FIELDS:
                    column = flat[name][valid]
                    merged[name] = np.where(entry >= 0, column[np.maximum(entry, 0)], fill).astype(dtype)
                atlas.write_members(tap, first, merged)
                atlas.write_examples(tap, first, self.merge_samples(atlas, tap, units, first, stop),
                                     atlas.read_unit_histograms(tap, units, first, stop))
            atlas.write_usage(tap, atlas.read_usage(tap, units))
        self.assign_rows(store, atlas)

    def merge_samples(self, atlas, tap: str, units: list[int], first: int, stop: int) -> dict[str, np.ndarray] | None:
        """Concepts ``first..stop-1``'s random examples over every unit: the smallest hashes of
        the units' samples (a sample of the union), in hash order."""
        r = self.config.atlas.examples
        if not r:
            return None
        found = atlas.read_unit_samples(tap, units, first, stop)
        block = stop - first
        flat = {name: found[name].transpose(1, 0, 2).reshape(block, -1) for name in found}
        valid = flat["image"] >= 0
        local = np.broadcast_to(np.arange(block)[:, None], valid.shape)[valid]
        image, position = flat["image"][valid], flat["position"][valid]
        entry = top_per_group(local, sample_strength(local + first, image, position), (image, position), block, r)
        return {name: np.where(entry >= 0, flat[name][valid][np.maximum(entry, 0)], fill).astype(dtype)
                for name, dtype, fill in FIELDS}

    def assign_rows(self, store: RunStore, atlas) -> None:
        """Where each member's crop goes: rows grouped by the store unit of its image, so that
        the atlas stage's units each write one shard of their own."""
        taps = self.taps(store)
        images = {tap: atlas.members(tap)["image"] for tap in taps}
        entries = [(np.full(len(c), t), c, j, images[tap][c, j] // store.facts.images_per_unit)
                   for t, tap in enumerate(taps) for c, j in [np.nonzero(images[tap] >= 0)]]
        tap_index, concept, member, unit = (np.concatenate([e[i] for e in entries]) for i in range(4))
        order = np.lexsort((member, concept, tap_index, unit))
        unit_sorted = unit[order]
        rank = np.arange(len(order)) - np.searchsorted(unit_sorted, unit_sorted)
        # Rows per unit, a whole number of the crops' inner chunks: a shard of single-crop chunks
        # wrote 10x slower and read scattered rows 10x slower than chunks of 16 crops.
        capacity = -(-max(1, int(rank.max()) + 1 if len(rank) else 1) // CROPS_PER_CHUNK) * CROPS_PER_CHUNK
        row = np.empty(len(order), dtype=np.int64)
        row[order] = unit_sorted * capacity + rank
        for t, tap in enumerate(taps):
            rows = np.full(images[tap].shape, -1, dtype=np.int64)
            mine = tap_index == t
            rows[concept[mine], member[mine]] = row[mine]
            atlas.write_rows(tap, rows, capacity)


def _top_distinct(concept: np.ndarray, strength: np.ndarray, image: np.ndarray, position: np.ndarray, k: int,
                  m: int) -> np.ndarray:
    """:func:`top_per_group` over each image's strongest entry per concept (ties: the smaller
    position), so that a concept's members come from distinct images."""
    if len(concept) == 0:
        return top_per_group(concept, strength, (image, position), k, m)
    order = np.lexsort((position, -np.asarray(strength, dtype=np.float64), image, concept))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (concept[order][1:] != concept[order][:-1]) | (image[order][1:] != image[order][:-1])
    kept = order[first]
    entry = top_per_group(concept[kept], strength[kept], (image[kept], position[kept]), k, m)
    return np.where(entry >= 0, kept[np.maximum(entry, 0)], -1)


class MembersWorker(StageWorker):
    def __init__(self, stage: MembersStage) -> None:
        self.stage = stage
        self.store = stage.open_store()
        self.atlas = self.store.family(AtlasSection, stage.dictionary)
        self.codes = self.store.family(CodesSection, stage.dictionary)
        self.concepts = self.store.family(ConceptsSection, stage.dictionary)

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.family(MetaSection).read_status(r)
        processed = status == PROCESSED
        m = self.stage.config.atlas.members
        for tap in self.stage.taps(self.store):
            k = self.concepts.count(tap)
            index, value = self.codes.read(tap, r)  # (n, P, L)
            used = (index >= 0) & processed[:, None, None]
            image, position, _ = np.nonzero(used)
            concept, strength = index[used].astype(np.int64), value[used]
            image = image + r.start
            if self.stage.config.atlas.distinct_images:
                entry = _top_distinct(concept, strength, image, position, k, m)
            else:
                entry = top_per_group(concept, strength, (image, position), k, m)
            top, sample = {}, None
            for (name, dtype, fill), column in zip(FIELDS, (strength, image, position)):
                top[name] = np.where(entry >= 0, column[np.maximum(entry, 0)] if len(column) else fill, fill).astype(dtype)
            examples = self.stage.config.atlas.examples
            if examples:
                chosen = top_per_group(concept, sample_strength(concept, image, position), (image, position), k, examples)
                sample = {name: np.where(chosen >= 0, column[np.maximum(chosen, 0)] if len(column) else fill,
                                         fill).astype(dtype)
                          for (name, dtype, fill), column in zip(FIELDS, (strength, image, position))}
            self.atlas.write_unit(tap, unit.index, top, np.bincount(concept, minlength=k), sample,
                                  histogram(concept, strength, k).astype(np.int32))
        if progress is not None:
            progress(len(r))
        return UnitReport(unit.index, int(processed.sum()), int((~processed).sum()))
