"""Stages ``attribute``, ``reduce`` and ``graphs``: GIG over the dataset (method.md section 6).

``attribute`` work units are (tap pair, image range, step range, target chunk). Each computes,
for every image of its range and every target slot of its chunk, the GIG of each of the image's
active source concepts summed over its steps, and writes that *partial sum* to its own chunk of
``gig/<pair>/partial``. ``reduce`` (one unit per pair) then adds the partial sums of the step
ranges in a fixed order, image unit by image unit, and accumulates the dataset matrices in
float64 in image order; so the result does not depend on how the work was split or where it ran.
``graphs`` builds every class graph from the matrices.

Targets per image: the ``gig.targets`` concepts with the largest code mass (sum of code values
over positions) at the target tap, or the predicted and the true class for ``logits``.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import torch

from gig_dist.config import Config, ConfigError
from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.gig import GIG, LOGITS
from gig_dist.kernels.graphs import class_graph, mark_shared
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.stages.base import Progress, Stage, StageWorker, UnitReport, WorkUnit
from gig_dist.stages.concepts import concept_count
from gig_dist.stages.extract import resolve_device
from gig_dist.store import PROCESSED, ImageRange, RunStore, unit_ranges

Pair = tuple[str, str]


def stage_outputs(taps: list[str]) -> list[str]:
    """The last tap of each ``layerN`` (taps in forward order); other taps are each their own stage."""
    outputs: list[str] = []
    for tap in taps:
        match = re.match(r"(layer\d+)\.", tap)
        if match and outputs and outputs[-1].startswith(match.group(1) + "."):
            outputs[-1] = tap
        else:
            outputs.append(tap)
    return outputs


def gig_pairs(config: Config, taps: list[str]) -> list[Pair]:
    """The configured pairs, or consecutive stage outputs plus every stage output to the logits."""
    if config.gig.pairs is not None:
        return [tuple(pair) for pair in config.gig.pairs]
    outputs = stage_outputs(taps)
    return list(zip(outputs, outputs[1:])) + [(tap, LOGITS) for tap in outputs]


def check_pairs(config: Config, pairs: list[Pair], order: list[str], channels: dict[str, int],
                code_taps: list[str]) -> None:
    """Every reason a pair cannot be attributed, before any work."""
    decomposed, attributed = config.decompose.images, config.gig.images
    if decomposed is not None and (attributed is None or attributed > decomposed):
        raise ConfigError(f"gig.images = {attributed} reaches past decompose.images = {decomposed}: images without "
                          "codes cannot be attributed; set gig.images to at most decompose.images")
    for source, target in pairs:
        for tap in (source, target):
            if tap != LOGITS and tap not in channels:
                raise ConfigError(f"gig.pairs: {tap!r} is not a tap of this run; the taps are {list(channels)}")
        if target != LOGITS and order.index(target) <= order.index(source):
            raise ConfigError(f"gig.pairs: target tap {target} does not come after source tap {source} in the model")
        if source not in code_taps:
            raise ConfigError(f"gig.pairs: pair {source} -> {target} has no codes at {source}; "
                              f"add {source} to decompose.taps")
        if target != LOGITS:
            if target not in code_taps:
                raise ConfigError(f"gig.pairs: pair {source} -> {target} needs codes at {target} to choose its "
                                  f"target concepts; add {target} to decompose.taps")
            k = concept_count(config, target, channels[target])
            if config.gig.targets > k:
                raise ConfigError(f"gig.targets = {config.gig.targets} is more than the {k} concepts of tap {target}")


def _num_targets(config: Config, target: str) -> int:
    return 2 if target == LOGITS else config.gig.targets


def _step_bounds(config: Config) -> list[int]:
    m, s = config.gig.steps, config.gig.step_chunks
    return [round(i * m / s) for i in range(s + 1)]


def _pairs_of(store: RunStore) -> list[Pair]:
    return [tuple(pair) for pair in store.manifest.get("gig_pairs", [])]


class AttributeStage(Stage):
    name = "attribute"

    @classmethod
    def progress_size(cls, config: Config, num_units: int, taps: dict[str, tuple[int, int, int]]) -> int:
        total = 0
        for _, target in gig_pairs(config, list(taps)):
            t = _num_targets(config, target)
            total += num_units * config.gig.step_chunks * math.ceil(t / (config.gig.targets_per_unit or t))
        return total

    def setup(self, store: RunStore) -> None:
        """Create each pair's arrays, now that the decomposition says how many concepts an image
        uses at most (the width of the per-image source lists)."""
        for source, target in _pairs_of(store):
            stats = store.group[f"codes/{source}/unit_stats"][...]
            width = max(1, int(np.nan_to_num(stats[:, -1]).max()))
            t = _num_targets(self.config, target)
            k_a = len(store.read_concepts(source))
            columns = store.manifest["num_outputs"] if target == LOGITS else len(store.read_concepts(target))
            store.create_gig_arrays(source, target, targets=t, target_chunk=self.config.gig.targets_per_unit or t,
                                    width=width, step_chunks=self.config.gig.step_chunks, edges=self.config.gig.top_edges,
                                    matrix_shape=(k_a, columns))

    def plan(self, store: RunStore) -> list[WorkUnit]:
        gig = self.config.gig
        bounds = _step_bounds(self.config)
        ranges = store.units()
        units, offset = [], 0
        for source, target in _pairs_of(store):
            t = _num_targets(self.config, target)
            chunk = gig.targets_per_unit or t
            chunks = [(c, min(c + chunk, t)) for c in range(0, t, chunk)]
            for r_index, r in enumerate(ranges):
                for s in range(gig.step_chunks):
                    for c_index, targets in enumerate(chunks):
                        index = offset + (r_index * gig.step_chunks + s) * len(chunks) + c_index
                        if gig.images is None or r.start < gig.images:
                            units.append(WorkUnit(self.name, index, r.start, r.stop, tap=store.pair_key(source, target),
                                                  steps=(bounds[s], bounds[s + 1]), targets=targets))
            offset += len(ranges) * gig.step_chunks * len(chunks)
        return units

    def open_worker(self, device: str) -> AttributeWorker:
        return AttributeWorker(self, resolve_device(device))


class AttributeWorker(StageWorker):
    def __init__(self, stage: AttributeStage, device: torch.device) -> None:
        self.config = stage.config
        self.store = RunStore.open(stage.store_url, mode="r+")
        self.device = device
        self.model = build_model(self.config.model).to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.pairs = {self.store.pair_key(*pair): pair for pair in _pairs_of(self.store)}
        self.bounds = _step_bounds(self.config)
        self._kernels: dict[str, GIG] = {}
        self._loader: ImageLoader | None = None

    def _kernel(self, key: str) -> GIG:
        if key not in self._kernels:
            source, target = self.pairs[key]
            V = torch.from_numpy(self.store.read_concepts(source)).to(self.device)
            W = None if target == LOGITS else torch.from_numpy(self.store.read_concepts(target)).to(self.device)
            self._kernels[key] = GIG(self.model, source, target, V, self.store.taps[source], W,
                                     steps=self.config.gig.steps, rule=self.config.gig.rule,
                                     step_batch=self.config.gig.step_batch)
        return self._kernels[key]

    def _images(self, r: ImageRange, rows: np.ndarray) -> dict[int, torch.Tensor]:
        if self._loader is None:
            self._loader = ImageLoader(resolve_transform(self.config), self.config.dataset.max_image_pixels,
                                       self.config.dataset.loader_threads)
        paths, _ = self.store.read_index(r)
        return {int(row): self._loader.load(paths[row]).image.to(self.device) for row in rows}

    def choose_targets(self, target: str, r: ImageRange, rows: np.ndarray, count: int) -> np.ndarray:
        """Target slots (n, count) of every image: concepts by code mass, or the classes (-1: none)."""
        chosen = np.full((len(r), count), -1, dtype=np.int32)
        _, prediction = self.store.read_status(r)
        if target == LOGITS:
            _, labels = self.store.read_index(r)
            for row in rows:
                chosen[row, 0] = prediction[row]
                if labels[row] >= 0 and labels[row] != prediction[row]:
                    chosen[row, 1] = labels[row]
            return chosen
        index, value = self.store.read_codes(target, r)
        k = len(self.store.read_concepts(target))
        for row in rows:
            used = index[row] >= 0
            mass = np.bincount(index[row][used], weights=value[row][used], minlength=k)
            order = np.argsort(-mass, kind="stable")[:count]
            chosen[row, : len(order)] = np.where(mass[order] > 0, order, -1)
        return chosen

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        source, target = self.pairs[unit.tap]
        kernel = self._kernel(unit.tap)
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.read_status(r)
        rows = np.flatnonzero(status == PROCESSED)
        step_chunk = self.bounds.index(unit.steps[0])
        first_steps = step_chunk == 0
        t0, t1 = unit.targets
        width = self.store.gig_array(source, target, "source").shape[1]
        chosen = self.choose_targets(target, r, rows, _num_targets(self.config, target))[:, t0:t1]
        index, value = self.store.read_codes(source, r)
        slots = max(1, int((index >= 0).sum(-1).max()))
        images = self._images(r, rows) if kernel.subnet.needs_images else {}
        partial = np.zeros((len(r), t1 - t0, width))
        sources = np.full((len(r), width), -1, dtype=np.int32)
        delta = np.full((len(r), t1 - t0), np.nan)
        for row in rows:
            image_index = torch.from_numpy(index[row, :, :slots].astype(np.int64)).to(self.device)
            image_value = torch.from_numpy(value[row, :, :slots]).to(self.device)
            active = np.unique(index[row][index[row] >= 0])
            if len(active) > width:
                raise ValueError(f"image {r.start + row} uses {len(active)} concepts at {source}, more than the "
                                 f"{width} the decomposition statistics recorded; rerun the decompose stage")
            sources[row, : len(active)] = active
            valid = np.flatnonzero(chosen[row] >= 0)
            if len(valid):  # an image without targets (no code mass at b) has nothing to attribute
                result = kernel.attribute(image_index, image_value,
                                          torch.from_numpy(chosen[row, valid].astype(np.int64)), step_range=unit.steps,
                                          endpoints=first_steps, image=images.get(int(row)))
                partial[row, valid, : len(active)] = result.attribution.cpu().numpy()[:, active]
                if result.delta is not None:
                    delta[row, valid] = result.delta.cpu().numpy()
            if progress is not None:
                progress(1)
        if progress is not None:
            progress(len(r) - len(rows))
        self.store.write_gig_unit(source, target, r, step_chunk=step_chunk, targets=unit.targets, partial=partial,
                                  sources=sources if first_steps and t0 == 0 else None,
                                  chosen=chosen if first_steps else None, delta=delta if first_steps else None)
        return UnitReport(unit.index, len(r), int(len(r) - len(rows)))

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()


class ReduceStage(Stage):
    """One unit per pair: add the partial sums in a fixed order; per-image totals, completeness
    gaps and top edges; the dataset matrix."""

    name = "reduce"

    @classmethod
    def progress_size(cls, config: Config, num_units: int, taps: dict[str, tuple[int, int, int]]) -> int:
        return len(gig_pairs(config, list(taps)))

    def plan(self, store: RunStore) -> list[WorkUnit]:
        return [WorkUnit(self.name, i, 0, 0, tap=store.pair_key(*pair)) for i, pair in enumerate(_pairs_of(store))]

    def open_worker(self, device: str) -> ReduceWorker:
        return ReduceWorker(self)


def reduce_pair(store: RunStore, config: Config, source: str, target: str) -> dict[str, float]:
    """Reduce one pair's partial sums; returns its completeness statistics."""
    gig = config.gig
    matrix = np.zeros(store.gig_array(source, target, "matrix").shape)
    count = np.zeros(matrix.shape[1], dtype=np.int64)
    columns = matrix.shape[1]
    gaps: list[np.ndarray] = []
    images = 0
    for r in store.units():
        if gig.images is not None and r.start >= gig.images:
            break
        parts = store.read_gig_unit(source, target, r)
        summed = parts["partial"][0].copy()
        for s in range(1, len(parts["partial"])):  # always in step order
            summed += parts["partial"][s]
        sources, chosen, delta = parts["source"], parts["target"], parts["delta"]
        status, prediction = store.read_status(r)
        _, labels = store.read_index(r)
        valid = chosen >= 0
        total = np.where(valid, summed.sum(axis=2), np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.where(valid & (np.abs(delta) > 1e-12), np.abs(total - delta) / np.abs(delta), np.nan)
        gaps.append(gap[~np.isnan(gap)])
        order = np.argsort(-summed, axis=2, kind="stable")[:, :, : gig.top_edges]
        edge_value = np.take_along_axis(summed, order, axis=2)
        edge_source = np.take_along_axis(np.broadcast_to(sources[:, None, :], summed.shape), order, axis=2)
        keep = valid[:, :, None] & (edge_source >= 0)
        width = order.shape[2]
        pad = ((0, 0), (0, 0), (0, gig.top_edges - width))
        store.write_gig_reduced(source, target, r, total=total, gap=gap,
                                edge_source=np.pad(np.where(keep, edge_source, -1), pad, constant_values=-1).astype(np.int32),
                                edge_value=np.pad(np.where(keep, edge_value, 0), pad).astype(np.float32))
        processed = np.flatnonzero(status == PROCESSED)
        images += len(processed)
        for row in processed:
            if target == LOGITS:
                cls = labels[row] if labels[row] >= 0 else prediction[row]
                slots = np.flatnonzero(chosen[row] == cls)
                if len(slots) == 0:
                    continue
                count[cls] += 1
            else:
                slots = np.flatnonzero(chosen[row] >= 0)
                count[chosen[row, slots]] += 1
            used = sources[row] >= 0
            for slot in slots:
                np.add.at(matrix, (sources[row, used], np.full(used.sum(), chosen[row, slot])), summed[row, slot, used])
    if target == LOGITS:
        matrix /= np.maximum(count, 1)[None, :]  # mean over the images of each class
    elif images:
        matrix /= images  # mean over all images; a concept not among an image's targets counts 0
    gaps_all = np.concatenate(gaps) if gaps else np.zeros(0)
    stats = {
        "images": images, "targets": int(gaps_all.size), "steps": gig.steps, "rule": gig.rule,
        "mean_gap": float(gaps_all.mean()) if gaps_all.size else None,
        "median_gap": float(np.median(gaps_all)) if gaps_all.size else None,
        "max_gap": float(gaps_all.max()) if gaps_all.size else None,
        "columns": columns,
    }
    store.write_gig_matrix(source, target, matrix, count, stats)
    return stats


class ReduceWorker(StageWorker):
    def __init__(self, stage: ReduceStage) -> None:
        self.config = stage.config
        self.store = RunStore.open(stage.store_url, mode="r+")

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        pair = {self.store.pair_key(*p): p for p in _pairs_of(self.store)}[unit.tap]
        reduce_pair(self.store, self.config, *pair)
        if progress is not None:
            progress(1)
        return UnitReport(unit.index, 0, 0)


def chain_to_class(pairs: list[Pair], order: list[str]) -> list[str]:
    """Taps from the last one (in forward order) with a class pair down through concept pairs."""
    class_taps = sorted((source for source, target in pairs if target == LOGITS), key=order.index)
    if not class_taps:
        return []
    concept = {target: source for source, target in pairs if target != LOGITS}
    chain = [class_taps[-1]]
    while chain[-1] in concept:
        chain.append(concept[chain[-1]])
    return chain


def build_graphs(store: RunStore, top: int) -> list[dict]:
    pairs = _pairs_of(store)
    chain = chain_to_class(pairs, store.manifest.get("tap_order", list(store.taps)))
    if not chain:
        return []
    class_matrix = store.read_gig_matrix(chain[0], LOGITS)
    matrices = {(lower, upper): store.read_gig_matrix(lower, upper) for upper, lower in zip(chain, chain[1:])}
    names = store.manifest.get("class_names") or []
    graphs = [class_graph(class_matrix, chain, matrices, c, top) for c in range(class_matrix.shape[1])]
    for graph in graphs:
        graph["class_name"] = names[graph["class"]] if graph["class"] < len(names) else str(graph["class"])
    return mark_shared(graphs)


class GraphStage(Stage):
    name = "graphs"

    @classmethod
    def progress_size(cls, config: Config, num_units: int, taps: dict[str, tuple[int, int, int]]) -> int:
        return 1

    def plan(self, store: RunStore) -> list[WorkUnit]:
        return [WorkUnit(self.name, 0, 0, 0, tap="all classes")]

    def open_worker(self, device: str) -> GraphWorker:
        return GraphWorker(self)


class GraphWorker(StageWorker):
    def __init__(self, stage: GraphStage) -> None:
        self.config = stage.config
        self.store = RunStore.open(stage.store_url, mode="r+")

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        graphs = build_graphs(self.store, self.config.gig.graph_top)
        self.store.write_graphs([json.dumps(graph) for graph in graphs])
        if progress is not None:
            progress(1)
        return UnitReport(unit.index, 0, 0)


__all__ = ["AttributeStage", "GraphStage", "ReduceStage", "build_graphs", "check_pairs", "gig_pairs",
           "reduce_pair", "stage_outputs", "unit_ranges"]
