"""Stage ``reduce``: the attribute stage's partial sums into per-image results and the dataset
Gamma matrices (docs/method.md section 6), as a fixed tree over image units.

Units are (pair, block of ``gig.reduce_block_units`` store units) and run in parallel. Each reads its
images' GIG per source (the step ranges' partial sums added in step order, rounded to float32 as
unsplit runs store them), writes their totals, completeness gaps and top edges, and its block's
matrix sum, sparse (the entries its images touch, each key's values added in image order,
float64): a block holds at most images x sources x targets entries, where a dense K_a x K_b
block would grow with the dictionaries. When every block is done, :meth:`ReduceStage.finish`
adds the blocks in block order and divides: so the matrices do not depend on where or in what
order units ran.

For pairs between concepts, each block also writes its sums per class (sparse: the source and
target concepts each image of the class attributed), and ``finish`` adds those up class group by
class group into the class-conditional Gamma_c^(a->b) the class graphs read: per class and
target concept its ``gig.top_edges`` strongest sources. The classes are the graphs' classes
(``gig.graph_classes``): the model's outputs, or the dataset's own classes; for the latter the
pairs to the logits get per-class sums too, of each image's GIG toward its own class (one
target), which the graphs' top level reads. No step holds more than one block's
entries, or one class group's. Then the per-source arrays of the attribute stage are deleted,
unless ``gig.keep_image_attributions``.
"""

from __future__ import annotations

import numpy as np

from gig_dist.kernels.gig import LOGITS
from gig_dist.kernels.graphs import class_offsets, sum_entries, top_sources
from gig_dist.kernels.metrics import (
    completeness_gap,
    gap_summary,
    kept_fraction,
    kept_summary,
    refinement_summary,
)
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    StoreSizes,
    UnitReport,
    WorkUnit,
    level_of,
)
from gig_dist.stages.pairs import (
    Pair,
    check_graph_classes,
    gig_pairs,
    graph_class_names,
    num_targets,
)
from gig_dist.store import (
    PROCESSED,
    ArraySpec,
    Facts,
    GIGSection,
    ImageRange,
    MetaSection,
    RunStore,
)
from gig_dist.store.gig import class_specs, reduction_specs

#: Classes per step of the class-conditional reduction in ``finish``, at most: fewer where a
#: group's entries could exceed :data:`CLASS_GROUP_BYTES` (the sums do not depend on the grouping).
CLASS_GROUP = 64
CLASS_GROUP_BYTES = 2 * 2**30


def image_class(labels: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The class an image counts for: its label where labels index the outputs, else its prediction."""
    return np.where(labels >= 0, labels, prediction)


class ReduceStage(Stage):
    name = "reduce"
    config_section = "gig"
    family = GIGSection
    reads = ("attribute",)
    # gig.images is its coverage: a block records the image its sums stop at, and runs again when
    # that changes; the final step runs again when the covered images change. The stages that
    # read the matrices (graphs, evaluate) have gig.images among their own result keys.
    result_keys = ("gig.top_edges", "gig.keep_image_attributions", "gig.dense_matrix_mib", "gig.reduce_block_units",
                   "gig.graph_classes")
    later_keys = {"gig.reduce_block_units": 16, "gig.graph_classes": "model"}
    per_dictionary = True
    coverage_key = "gig.images"
    # 2: class-conditional Gamma of concept pairs; 3: from float32 per-image GIG, sparse block
    # sums, per-source GIG deleted once in the sums; 4: float32 per-class block sums
    version = 4
    unit_noun = "blocks"

    def pairs(self, facts: Facts) -> list[Pair]:
        return gig_pairs(self.config, list(facts.taps))

    @classmethod
    def check(cls, config, facts: Facts) -> list[str]:
        return check_graph_classes(config, facts)

    @property
    def by(self) -> str:
        """Which classes the class-conditional sums are of (``gig.graph_classes``)."""
        return self.config.gig.graph_classes

    def classes(self, facts: Facts) -> int:
        """The number of graph classes."""
        return len(graph_class_names(self.config, facts))

    def has_classes(self, pair: Pair) -> bool:
        """Whether a pair has per-class sums: pairs between concepts; to the logits, for graphs
        of the dataset's classes (their top level)."""
        return pair[1] != LOGITS or self.by == "dataset"

    def class_columns(self, pair: Pair, columns: int) -> int:
        """Targets of a pair's per-class sums: its target concepts; one for the logits (each
        image's own class)."""
        return 1 if pair[1] == LOGITS else columns

    def dense(self, k_a: int, columns: int) -> bool:
        """Whether a pair's dataset Gamma is kept dense (``gig.dense_matrix_mib``)."""
        return k_a * columns * 8 <= self.config.gig.dense_matrix_mib * 2**20

    def blocks(self, facts: Facts) -> list[ImageRange]:
        step = self.config.gig.reduce_block_units * facts.images_per_unit
        return [ImageRange(s, min(s + step, facts.num_images)) for s in range(0, facts.num_images, step)]

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        specs = []
        block_images = min(self.config.gig.reduce_block_units * facts.images_per_unit, facts.num_images)
        for source, target in self.pairs(facts):
            columns = facts.num_outputs if target == LOGITS else sizes.concepts(target)
            width = max(1, sizes.max_active(source))
            # an image adds its sources to every target concept, or to its own class only
            slots = 1 if target == LOGITS else num_targets(self.config, target)
            k_a = sizes.concepts(source)
            specs += reduction_specs(facts, self.dictionary, (source, target),
                                     targets=num_targets(self.config, target), edges=self.config.gig.top_edges,
                                     blocks=len(self.blocks(facts)), matrix_shape=(k_a, columns),
                                     capacity=min(block_images * width * slots, k_a * columns),
                                     dense=self.dense(k_a, columns))
            if self.has_classes((source, target)):
                specs += class_specs(facts, self.dictionary, (source, target), blocks=len(self.blocks(facts)),
                                     capacity=block_images * width * slots, k_a=sizes.concepts(source),
                                     k_b=self.class_columns((source, target), columns), edges=self.config.gig.top_edges,
                                     classes=self.classes(facts))
        return specs

    def plan(self, facts: Facts) -> list[WorkUnit]:
        blocks = self.blocks(facts)
        return [WorkUnit(self.progress_key, p * len(blocks) + b, block.start, block.stop, pair=pair)
                for p, pair in enumerate(self.pairs(facts)) for b, block in enumerate(blocks)]

    def covers(self, unit: WorkUnit) -> bool:
        return self.config.gig.images is None or unit.start < self.config.gig.images

    def block_stop(self, unit: WorkUnit, facts: Facts) -> int:
        """The image a block's sums stop at under the current coverage."""
        return min(unit.stop, self.covered_images(facts))

    def pending(self, store: RunStore) -> list[WorkUnit]:
        """Blocks not done, and done blocks whose sums stop elsewhere than the coverage asks now."""
        pending = super().pending(store)
        gig, facts = store.family(GIGSection, self.dictionary), store.facts
        count = len(self.blocks(facts))
        stops = {pair: gig.block_stops(pair) for pair in self.pairs(facts) if gig.has(pair, "block/stop")}
        todo = {u.index for u in pending}
        return pending + [u for u in self.covered_units(facts) if u.index not in todo
                          and (u.pair not in stops or stops[u.pair][u.index % count] != self.block_stop(u, facts))]

    def final_is_current(self, store: RunStore) -> bool:
        return store.family(GIGSection, self.dictionary).reduced_images() == self.covered_images(store.facts)

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        """A worker: one block's sparse entries (class, key, value and their sort, ~48 bytes
        each) and one store unit's per-source GIG; the driver: each pair's matrix, added up
        block by block: dense, or sparse (at most every block's entries, ~40 bytes each while
        merging)."""
        block_images = min(self.config.gig.reduce_block_units * facts.images_per_unit, facts.num_images)
        worker = driver = 0
        dense = []
        for source, target in self.pairs(facts):
            columns = facts.num_outputs if target == LOGITS else sizes.concepts(target)
            t = num_targets(self.config, target)
            width = max(1, sizes.max_active(source))
            slots = 1 if target == LOGITS else t
            k_a = sizes.concepts(source)
            entries = block_images * width * slots  # a block's entries, before they are summed
            unit = facts.images_per_unit * width * slots  # a store unit's
            stored = min(entries, k_a * columns)  # a block's sums: each key once
            # A unit's entries (class, key, value, the sort) and the running sums twice (the sums
            # so far, and their concatenation with the unit's); the class sums likewise, each
            # (class, key) at most once per entry.
            classes = (2 * 32 * min(entries, k_a * self.class_columns((source, target), columns) * self.classes(facts))
                       if self.has_classes((source, target)) else 0)
            worker = max(worker, 48 * unit + 2 * 24 * stored + classes + 2 * facts.images_per_unit * t * width * 8)
            if self.dense(k_a, columns):
                driver = max(driver, k_a * columns * 8 + 24 * stored)
                dense.append((f"{source} -> {target} Gamma", (k_a, columns), "float64"))
            else:
                driver = max(driver, 40 * min(k_a * columns, stored * len(self.blocks(facts))) + 24 * stored)
            if self.has_classes((source, target)):  # finish: one class group's sums of every block, twice
                driver = max(driver, 2 * self.class_group(facts, width, slots) * self.class_entry_bytes(facts, width, slots))
        return Footprint(worker, driver, dense)

    def class_group(self, facts: Facts, width: int, targets: int) -> int:
        """Classes per step of the class-conditional reduction: as many as keep a group's
        entries under CLASS_GROUP_BYTES at their bound (at least one)."""
        per_class = self.class_entry_bytes(facts, width, targets)
        return max(1, min(CLASS_GROUP, CLASS_GROUP_BYTES // max(per_class, 1)))

    def class_entry_bytes(self, facts: Facts, width: int, targets: int) -> int:
        """Bytes of one class's entries (class, key, value) in the sums of every block, at their
        bound: as if its images were an even share of the dataset."""
        return 32 * max(1, facts.num_images // max(self.classes(facts), 1)) * width * targets

    def open_worker(self, device: str) -> ReduceWorker:
        return ReduceWorker(self)

    def finish(self, store: RunStore) -> None:
        """Add each pair's block sums in block order; divide into the dataset Gamma."""
        gig = store.family(GIGSection, self.dictionary)
        units = self.covered_units(store.facts)
        for pair in self.pairs(store.facts):
            blocks = [u for u in units if u.pair == pair]
            shape = gig.matrix_shape(pair)
            sparse = gig.is_sparse(pair)
            count = np.zeros(shape[1], dtype=np.int64)
            images, gaps, kept, steps, first = 0, [], [], [], []
            refined = gig.has_refinement(pair)
            matrix = None if sparse else np.zeros(shape)
            keys, values = np.zeros(0, dtype=np.int64), np.zeros(0)
            for unit in blocks:  # in block order: the fixed second level of the tree
                block_keys, block_values, block_count = gig.read_block(pair, unit.index % len(self.blocks(store.facts)))
                if sparse:  # the sum so far, then this block: each key added in the dense order
                    _, keys, values = sum_entries(np.zeros(len(keys) + len(block_keys), dtype=np.int64),
                                                  np.concatenate([keys, block_keys]),
                                                  np.concatenate([values, block_values]), shape[0] * shape[1])
                else:
                    matrix.reshape(-1)[block_keys] += block_values  # each key once per block
                count += block_count
            for r in self.store_units_in(store, blocks):
                status, _ = store.family(MetaSection).read_status(r)
                images += int((status == PROCESSED).sum())
                reduced = gig.read_reduced(pair, r)
                gaps.append(reduced["gap"].ravel())
                kept.append(reduced["kept"].ravel())
                if refined:
                    found = gig.read_refinement(pair, r)
                    steps.append(found["steps"][reduced["target"] >= 0])
                    first.append(found["gap_first"].ravel())
            if pair[1] == LOGITS:  # mean over the images of each class
                if sparse:
                    values /= np.maximum(count, 1)[keys % shape[1]]
                else:
                    matrix /= np.maximum(count, 1)[None, :]
            elif images:  # mean over all images; a concept not among an image's targets counts 0
                if sparse:
                    values /= images
                else:
                    matrix /= images
            if self.has_classes(pair):
                self.finish_classes(store, gig, pair, [u.index % len(self.blocks(store.facts)) for u in blocks],
                                    self.store_units_in(store, blocks))
            gig.write_matrix(pair, (keys, values) if sparse else matrix, count, {
                "images": images, **gap_summary(np.concatenate(gaps) if gaps else np.zeros(0)),
                **kept_summary(np.concatenate(kept) if kept else np.zeros(0)),
                "steps": self.config.gig.steps, "rule": self.config.gig.rule, "columns": shape[1],
                **(refinement_summary(np.concatenate(steps), np.concatenate(first)) if refined and steps else {})})
        store.family(GIGSection, self.dictionary).set_reduced_images(self.covered_images(store.facts))
        self.compact(store, units)

    def compact(self, store: RunStore, units: list[WorkUnit]) -> None:
        """Delete the per-source GIG of the images whose blocks are whole in the sums (a block
        ``gig.images`` ends inside keeps them, for when it grows): the step ranges' partial
        sums, and, unless ``gig.keep_image_attributions``, the whole sums. The attribute stage's
        record says so first, so that a reduction that needs them again redoes the attribution
        (:func:`gig_dist.stages.base.consumed_by`) instead of reading zeros."""
        facts, gig = store.facts, store.family(GIGSection, self.dictionary)
        keep = self.config.gig.keep_image_attributions
        whole = [u for u in units if self.block_stop(u, facts) == u.stop]
        if not whole:
            return
        deleted = max(u.stop for u in whole)
        attribute = f"{level_of(self.config)}/attribute"  # the attribute stage's key
        if not keep:
            record = store.record(attribute)
            done = int(record.compacted["images"]) if record.compacted else 0
            store.mark_compacted(attribute, self.progress_key, store.record(self.progress_key).fingerprint,
                                 max(done, deleted))
        for unit in whole:
            for r in self.store_units_in(store, [unit]):
                gig.compact(unit.pair, r, keep_vectors=keep)

    def finish_classes(self, store: RunStore, gig, pair: Pair, blocks: list[int], units: list[ImageRange]) -> None:
        """The class-conditional Gamma: each class group's block sums added in block order,
        divided by the class's image count, cut to each target's strongest sources."""
        classes = self.classes(store.facts)
        count = np.zeros(classes, dtype=np.int64)
        meta = store.family(MetaSection)
        for r in units:
            status, _ = meta.read_status(r)
            cls = meta.graph_classes(r, self.by)[status == PROCESSED]
            count += np.bincount(cls[cls >= 0], minlength=classes)[:classes]
        k_a, columns = gig.matrix_shape(pair)
        k_b = self.class_columns(pair, columns)
        group = self.class_group(store.facts, StoreSizes(store, self.dictionary).max_active(pair[0]),
                                 1 if pair[1] == LOGITS else num_targets(self.config, pair[1]))
        for first in range(0, classes, group):
            stop = min(first + group, classes)
            parts = [gig.read_class_block(pair, b, first, stop) for b in blocks]
            cls, keys, values = sum_entries(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                            np.concatenate([p[2] for p in parts]), k_a * k_b)
            offsets = class_offsets(cls - first, stop - first)
            tops = [top_sources(keys[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]] / max(count[c], 1),
                                k_b, self.config.gig.top_edges) for i, c in enumerate(range(first, stop))]
            gig.write_class_top(pair, first, np.stack([t[0] for t in tops]), np.stack([t[1] for t in tops]))
        gig.write_class_count(pair, count)

    def store_units_in(self, store: RunStore, blocks: list[WorkUnit]) -> list[ImageRange]:
        """The store units of ``blocks`` that ``gig.images`` covers, in image order."""
        limit = self.config.gig.images
        return [r for b in blocks for r in store.units()
                if b.start <= r.start < b.stop and (limit is None or r.start < limit)]


class ReduceWorker(StageWorker):
    def __init__(self, stage: ReduceStage) -> None:
        self.stage = stage
        self.config = stage.config
        self.store = stage.open_store()
        self.gig = self.store.family(GIGSection, stage.dictionary)

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        pair = unit.pair
        block = unit.index % len(self.stage.blocks(self.store.facts))
        shape = self.gig.matrix_shape(pair)
        count = np.zeros(shape[1], dtype=np.int64)
        images = 0
        span = shape[0] * shape[1]
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
        total, per_class = empty, empty
        # Streamed a store unit at a time: the block's sums so far, then the unit's entries. Each
        # key's values are still added in image order (bincount adds in the order given), so the
        # sums are bitwise those of the whole block's entries at once, at a unit's memory.
        per_class_span = shape[0] * self.stage.class_columns(pair, shape[1])
        for r in self.stage.store_units_in(self.store, [unit]):
            entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            groups = self.store.family(MetaSection).graph_classes(r, self.stage.by)
            images += reduce_unit(self.store, self.gig, pair, r, self.config.gig.top_edges, shape, count, entries, groups)
            if not entries:
                continue
            classes, keys, values = (np.concatenate([e[i] for e in entries]) for i in range(3))
            total = _add(total, np.zeros_like(keys), keys, values, span)
            if self.stage.has_classes(pair):
                known = classes >= 0
                # to the logits, one target per image (its own class): the key is the source
                class_keys = keys[known] // shape[1] if pair[1] == LOGITS else keys[known]
                per_class = _add(per_class, classes[known], class_keys, values[known], per_class_span)
        self.gig.write_block(pair, block, total[1], total[2], count, self.stage.block_stop(unit, self.store.facts))
        if self.stage.has_classes(pair):
            classes, keys, values = per_class
            self.gig.write_class_block(pair, block, keys, values, class_offsets(classes, self.stage.classes(self.store.facts)))
        if progress is not None:
            progress(unit.size)
        return UnitReport(unit.index, images, 0)


def _add(running: tuple[np.ndarray, ...], classes: np.ndarray, keys: np.ndarray, values: np.ndarray,
         span: int) -> tuple[np.ndarray, ...]:
    """The running sums (class, key, value) with more entries added after them, in order."""
    return sum_entries(np.concatenate([running[0], classes]), np.concatenate([running[1], keys]),
                       np.concatenate([running[2], values]), span)


def reduce_unit(store: RunStore, gig, pair: Pair, r: ImageRange, top_edges: int, shape: tuple[int, int],
                count: np.ndarray, entries: list, groups: np.ndarray) -> int:
    """Per-image results of store unit ``r``; its images' matrix entries (graph class from
    ``groups``, source * columns + column, GIG) appended to ``entries`` in image order, and its
    images per column added to ``count``. Step ranges' partial sums are added into the images' float32 vectors
    here. Returns the number of processed images."""
    source, target = pair
    parts = gig.read_unit(pair, r)
    # float32 values, whatever the step split; their sums (completeness) before the rounding
    summed, exact, whole = gig.read_vectors(pair, r)
    if not whole:
        gig.write_vectors(pair, r, summed, exact)
    sources, chosen, delta = parts["source"], parts["target"], parts["delta"]
    status, prediction = store.family(MetaSection).read_status(r)
    _, labels = store.family(MetaSection).read_index(r)
    valid = chosen >= 0
    total = np.where(valid, exact, np.nan)
    gap = completeness_gap(total, delta)
    kept = np.where(valid, kept_fraction(delta, parts["delta_real"]), np.nan)
    order = np.argsort(-summed, axis=2, kind="stable")[:, :, :top_edges]
    edge_value = np.take_along_axis(summed, order, axis=2)
    edge_source = np.take_along_axis(np.broadcast_to(sources[:, None, :], summed.shape), order, axis=2)
    keep = valid[:, :, None] & (edge_source >= 0)
    pad = ((0, 0), (0, 0), (0, top_edges - order.shape[2]))
    gig.write_reduced(pair, r, total=total, gap=gap, kept=kept,
                      edge_source=np.pad(np.where(keep, edge_source, -1), pad, constant_values=-1).astype(np.int32),
                      edge_value=np.pad(np.where(keep, edge_value, 0), pad).astype(np.float32))
    processed = np.flatnonzero(status == PROCESSED)
    classes = image_class(labels, prediction)
    for row in processed:
        if target == LOGITS:
            cls = classes[row]
            slots = np.flatnonzero(chosen[row] == cls)
            if len(slots) == 0:
                continue
            count[cls] += 1
        else:
            slots = np.flatnonzero(chosen[row] >= 0)
            count[chosen[row, slots]] += 1
        used = sources[row] >= 0
        if len(slots):
            keys = chosen[row, slots][:, None].astype(np.int64) + sources[row, used][None, :].astype(np.int64) * shape[1]
            entries.append((np.full(keys.size, groups[row], dtype=np.int64), keys.ravel(),
                            summed[row][slots][:, used].ravel()))
    return len(processed)
