"""Stage ``attribute``: GIG over the dataset (method.md section 6), the expensive part.

Work units are (tap pair, image range, step range, target chunk). Each computes, for every image
of its range and every target slot of its chunk, the GIG of each of the image's active source
concepts summed over its steps, and writes it to its own chunk of the pair's ``attribution``
array (float32, with their float64 sum over sources), or, when ``gig.step_chunks`` splits the
steps, as a *partial sum* (float64) to its chunk of ``partial``. The ``reduce`` stage adds them
up, then deletes what it no longer needs (see there).

Targets per image: the ``gig.targets`` concepts with the largest code mass (sum of code values
over positions) at the target tap, or the predicted and the true class for ``logits``.
``gig.images`` limits the images attributed: raising it later attributes only the new ones.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.gig import GIG, LOGITS, refine
from gig_dist.kernels.taps import stored_layout
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.settings import Section
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
    model_bytes,
    tap_values,
)
from gig_dist.stages.concepts import concept_count
from gig_dist.stages.decompose import decompose_taps
from gig_dist.stages.extract import PFVSource, forward_bytes, resolve_device
from gig_dist.store import PROCESSED, ArraySpec, Facts, ImageRange, RunStore
from gig_dist.store.gig import attribution_specs

if TYPE_CHECKING:
    from gig_dist.config import Config

Pair = tuple[str, str]


class GIGConfig(Section):
    """Generalized Integrated Gradients between taps and to the classes (method.md section 6)."""

    #: ``[source, target]`` tap pairs; ``logits`` as target for concept -> class. ``None``:
    #: consecutive stage outputs, plus every stage output to the logits (a stage output is the
    #: last tap of each ``layerN``; taps without that naming are each their own stage).
    pairs: tuple[tuple[str, str], ...] | None = None
    #: Integration steps M and the quadrature rule: ``midpoint``, ``left`` or ``right``, each step
    #: of weight 1/M; ``power``, midpoints ``t`` at ``alpha = t^4``, dense near the baseline, for
    #: models with layer norms (ViTs), which jump where evenly spaced steps never look.
    steps: int = Field(default=32, ge=1)
    rule: Literal["midpoint", "left", "right", "power"] = "midpoint"
    #: Target concepts per image: the T with the largest code mass at the target tap. Class
    #: targets are always the predicted and the true class.
    targets: int = Field(default=32, ge=1)
    #: Attribute only the first N images (rounded up to whole store units). ``None``: all. The
    #: toy world's default is 64 (``TOY_GIG_IMAGES``): GIG costs about 1.3 s per toy image on 2 cores.
    images: int | None = Field(default=None, ge=1)
    #: Work-unit splits: the M steps into ``step_chunks`` ranges, and the targets into chunks of
    #: ``targets_per_unit`` (``None``: all in one unit). Results do not depend on either.
    step_chunks: int = Field(default=1, ge=1)
    targets_per_unit: int | None = Field(default=None, ge=1)
    #: Steps per forward pass.
    step_batch: int = Field(default=8, ge=1)
    #: Strongest source concepts kept per (image, target) as the image's edges.
    top_edges: int = Field(default=16, ge=1)
    #: Store units per reduce block (the first level of the reduction tree): a reduce worker
    #: holds one block's sums, so fewer units per block lower its peak (``gig-dist plan``).
    reduce_block_units: int = Field(default=16, ge=1)
    #: Concepts per level of a class graph (the top sources of each node, and of the class).
    graph_top: int = Field(default=3, ge=1)
    #: Where a class graph's lower levels come from: ``class``, the GIG means over the class's
    #: own images (Gamma_c); ``dataset``, the means over all attributed images. See the README.
    graph_gamma: Literal["class", "dataset"] = "class"
    #: Refine the integral where it is coarse: a target whose relative completeness gap exceeds
    #: ``max_gap`` after ``steps`` is integrated again with twice the steps, and again, up to
    #: ``max_steps``. The steps each target used and its gap at ``steps`` are stored. ``None``: off.
    max_gap: float | None = Field(default=None, gt=0)
    max_steps: int = Field(default=256, ge=1)
    #: With ``max_gap``: a gap under ``atol`` times the readout's scale in the image (the largest
    #: magnitude a class, or target concept, takes at the path's ends) is fine whatever its share
    #: of the target's own change (``kernels.gig.refine``; the README's gap distributions).
    atol: float = Field(default=1e-3, ge=0)
    #: Keep each image's GIG per source concept (float32, images x targets x active sources)
    #: after the reduction. Off: once reduced, an image keeps its targets, totals, gaps and top
    #: ``top_edges`` sources per target, and ``gig-dist evaluate`` recomputes the GIG of the
    #: images it evaluates. The vectors take targets x active sources x 4 B per image and pair
    #: (``gig-dist plan`` shows them); without them, reducing again after a change
    #: (``gig.top_edges``, ``gig.images``) redoes the attribution.
    keep_image_attributions: bool = False
    #: A pair's dataset Gamma is stored dense while K_a x columns x 8 bytes is at most this many
    #: MiB, else sparse (its non-zero entries, CSR). ResNet50's layer3 -> layer4 at 8C concepts
    #: each is 1 GiB dense. ``gig-dist read`` and the graphs read either layout.
    dense_matrix_mib: float = Field(default=256, ge=0)

    @model_validator(mode="after")
    def _steps_split(self) -> GIGConfig:
        if self.step_chunks > self.steps:
            raise ValueError(f"gig.step_chunks ({self.step_chunks}) cannot exceed gig.steps ({self.steps})")
        if self.max_gap is not None:
            if self.step_chunks > 1:
                raise ValueError(f"gig.max_gap refines each image's whole integral, so it needs gig.step_chunks = 1 "
                                 f"(got {self.step_chunks}); split the work with gig.targets_per_unit instead")
            if self.max_steps < self.steps:
                raise ValueError(f"gig.max_steps ({self.max_steps}) is below gig.steps ({self.steps})")
        if self.graph_top > self.top_edges:
            raise ValueError(f"gig.graph_top ({self.graph_top}) cannot exceed gig.top_edges ({self.top_edges}), the "
                             "sources kept per class and target concept")
        return self


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


def gig_footprint(stage: Stage, facts: Facts, sizes: Sizes) -> Footprint:
    """A worker running GIG kernels: the model, its graph over a batch of steps (twice, for the
    gradients), each source tap's decoder V^T, and a unit's per-source GIG in float64."""
    config = stage.config
    worker = 2 * model_bytes(facts) + 3 * min(config.gig.steps, 32) * tap_values(facts) * 4
    dense, vectors = [], 0
    for source, target in gig_pairs(config, list(facts.taps)):
        dense.append((f"{source} decoder V^T", (facts.taps[source][0], sizes.concepts(source)), "float32"))
        vectors = max(vectors, facts.images_per_unit * num_targets(config, target) * max(1, sizes.max_active(source)) * 8)
    if config.extract.pfvs == "recompute" and stage.name == "attribute":  # the real PFVs' forward pass
        worker += forward_bytes(config, facts)
    return Footprint(worker + vectors, dense=list(dict.fromkeys(dense)))


def check_pairs(config: Config, pairs: list[Pair], order: list[str], channels: dict[str, int],
                code_taps: list[str]) -> list[str]:
    """Every reason a pair cannot be attributed, before any work."""
    errors = []
    decomposed, attributed = config.decompose.images, config.gig.images
    if decomposed is not None and (attributed is None or attributed > decomposed):
        errors.append(f"gig.images = {attributed} reaches past decompose.images = {decomposed}: images without "
                      "codes cannot be attributed; set gig.images to at most decompose.images")
    for source, target in pairs:
        unknown = [tap for tap in (source, target) if tap != LOGITS and tap not in channels]
        if unknown:
            errors += [f"gig.pairs: {tap!r} is not a tap of this run; the taps are {list(channels)}" for tap in unknown]
            continue
        if target != LOGITS and order.index(target) <= order.index(source):
            errors.append(f"gig.pairs: target tap {target} does not come after source tap {source} in the model")
        if source not in code_taps:
            errors.append(f"gig.pairs: pair {source} -> {target} has no codes at {source}; "
                          f"add {source} to decompose.taps")
        if target != LOGITS:
            if target not in code_taps:
                errors.append(f"gig.pairs: pair {source} -> {target} needs codes at {target} to choose its "
                              f"target concepts; add {target} to decompose.taps")
            k = concept_count(config, target, channels[target])
            if config.gig.targets > k:
                errors.append(f"gig.targets = {config.gig.targets} is more than the {k} concepts of tap {target}")
    return errors


def num_targets(config: Config, target: str) -> int:
    return 2 if target == LOGITS else config.gig.targets


def step_bounds(config: Config) -> list[int]:
    m, s = config.gig.steps, config.gig.step_chunks
    return [round(i * m / s) for i in range(s + 1)]


class AttributeStage(Stage):
    name = "attribute"
    reads = ("decompose",)
    result_keys = ("gig.pairs", "gig.steps", "gig.rule", "gig.targets", "gig.step_chunks", "gig.targets_per_unit",
                   "gig.step_batch", "gig.max_gap", "gig.max_steps", "gig.atol")
    coverage_key = "gig.images"
    per_dictionary = True
    # 2: also S(F(X)) - S(F(0)) of the real PFVs, for the kept fraction; 3: float32
    # ``attribution`` instead of float64 ``partial`` when the steps are not split
    version = 3
    #: The refinement (added after stores were made) counts only while gig.max_gap is set.
    later_keys = {"gig.max_gap": (None, ("gig.max_steps", "gig.atol"))}
    unit_noun = "image-pairs"  # an image of one pair (times its step and target chunks, when split)

    @classmethod
    def check(cls, config: Config, facts: Facts) -> list[str]:
        order = list(facts.taps)
        channels = {tap: shape[0] for tap, shape in facts.taps.items()}
        if config.gig.rule != "power" and facts.model is not None and any(
                isinstance(module, torch.nn.LayerNorm) for module in facts.model.modules()):
            warnings.warn(f"gig.rule = {config.gig.rule}: {type(facts.model).__name__} has layer norms, which jump near "
                          "the zero baseline where evenly spaced steps never look; completeness gaps of 34-1630 % were "
                          "measured on a ViT at 32 midpoint steps, under 0.7 % with gig.rule=power", stacklevel=2)
        return check_pairs(config, gig_pairs(config, order), order, channels, decompose_taps(config, order))

    def pairs(self, facts: Facts) -> list[Pair]:
        return gig_pairs(self.config, list(facts.taps))

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        """Each pair's arrays, as wide as the decomposition says an image's active concepts are
        (growable: decomposing more images later can only widen them)."""
        gig, specs = self.config.gig, []
        for pair in self.pairs(facts):
            t = num_targets(self.config, pair[1])
            specs += attribution_specs(facts, self.dictionary, pair, targets=t, target_chunk=gig.targets_per_unit or t,
                                       width=max(1, sizes.max_active(pair[0])), step_chunks=gig.step_chunks,
                                       refine=gig.max_gap is not None, keep=gig.keep_image_attributions)
        return specs

    def plan(self, facts: Facts) -> list[WorkUnit]:
        gig = self.config.gig
        bounds = step_bounds(self.config)
        units = []
        for pair in self.pairs(facts):
            t = num_targets(self.config, pair[1])
            chunk = gig.targets_per_unit or t
            for r in facts.units:
                for s in range(gig.step_chunks):
                    for c in range(0, t, chunk):
                        units.append(WorkUnit(self.progress_key, len(units), r.start, r.stop, pair=pair,
                                              steps=(bounds[s], bounds[s + 1]), targets=(c, min(c + chunk, t))))
        return units

    def covers(self, unit: WorkUnit) -> bool:
        return self.config.gig.images is None or unit.start < self.config.gig.images

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        return gig_footprint(self, facts, sizes)

    def open_worker(self, device: str) -> AttributeWorker:
        return AttributeWorker(self, resolve_device(device))


def image_gig(kernel_for, config: Config, index: torch.Tensor, value: torch.Tensor, goals: torch.Tensor,
              image: torch.Tensor | None, step_range: tuple[int, int] | None = None, endpoints: bool = True):
    """One image's GIG toward ``goals`` over ``step_range`` (None: all steps), refined per
    ``gig.max_gap`` (which needs the whole integral): the kernel's result, and with refinement
    the steps each target used and its gap at ``gig.steps`` (else None, None).
    ``kernel_for(steps)`` gives the pair's kernel at that many steps."""
    gig = config.gig
    result = kernel_for(gig.steps).attribute(index, value, goals, step_range=step_range, endpoints=endpoints,
                                             image=image)
    if gig.max_gap is None:
        return result, None, None
    return refine(kernel_for, result, index, value, goals, image, gig.steps, gig.max_gap, gig.max_steps, gig.atol)


def pair_kernel(model: torch.nn.Module, store: RunStore, concepts, pair: Pair, device: torch.device,
                **options: Any) -> GIG:
    """The GIG kernel of a pair over the dictionary's concept vectors on ``device``."""
    source, target = pair
    V = torch.from_numpy(concepts.vectors(source)).to(device)
    W = None if target == LOGITS else torch.from_numpy(concepts.vectors(target)).to(device)
    layouts = tuple(stored_layout(store.facts.layouts, tap) for tap in pair)
    return GIG(model, source, target, V, store.taps[source], W, layouts=layouts, **options)


class PairWorker(StageWorker):
    """What a worker running a dictionary's GIG kernels holds: the store, the frozen model on its
    device, the dictionary's GIG, codes and concepts, its kernels and (lazily) an image loader."""

    def __init__(self, stage: Stage, device: torch.device) -> None:
        self.stage = stage
        self.config = stage.config
        self.store = stage.open_store()
        self.device = device
        self.model = build_model(self.config.model).to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.gig = self.store.gig(stage.dictionary)
        self.codes = self.store.codes(stage.dictionary)
        self.concepts = self.store.concepts(stage.dictionary)
        self._kernels: dict = {}
        self._loader: ImageLoader | None = None

    def gig_kernel(self, pair: Pair, steps: int | None = None) -> GIG:
        """The attribute stage's kernel of ``pair`` at ``steps`` (default ``gig.steps``), cached."""
        steps = steps or self.config.gig.steps
        if (pair, steps) not in self._kernels:
            self._kernels[pair, steps] = pair_kernel(self.model, self.store, self.concepts, pair, self.device,
                                                     steps=steps, rule=self.config.gig.rule,
                                                     step_batch=self.config.gig.step_batch)
        return self._kernels[pair, steps]

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()


class AttributeWorker(PairWorker):
    def __init__(self, stage: AttributeStage, device: torch.device) -> None:
        super().__init__(stage, device)
        self.bounds = step_bounds(self.config)
        self.pfvs = PFVSource(self.config, self.store, device, [source for source, _ in stage.pairs(self.store.facts)])

    def close(self) -> None:
        self.pfvs.close()
        super().close()

    def _images(self, r: ImageRange, rows: np.ndarray) -> dict[int, torch.Tensor]:
        if self._loader is None:
            self._loader = ImageLoader(resolve_transform(self.config), self.config.dataset.max_image_pixels,
                                       self.config.dataset.loader_threads)
        paths, _ = self.store.meta.read_index(r)
        return {int(row): self._loader.load(paths[row]).image.to(self.device) for row in rows}

    def choose_targets(self, target: str, r: ImageRange, rows: np.ndarray, count: int) -> np.ndarray:
        """Target slots (n, count) of every image: concepts by code mass, or the classes (-1: none)."""
        chosen = np.full((len(r), count), -1, dtype=np.int32)
        _, prediction = self.store.meta.read_status(r)
        if target == LOGITS:
            _, labels = self.store.meta.read_index(r)
            for row in rows:
                chosen[row, 0] = prediction[row]
                if labels[row] >= 0 and labels[row] != prediction[row]:
                    chosen[row, 1] = labels[row]
            return chosen
        index, value = self.codes.read(target, r)
        k = self.concepts.count(target)
        for row in rows:
            used = index[row] >= 0
            mass = np.bincount(index[row][used], weights=value[row][used], minlength=k)
            order = np.argsort(-mass, kind="stable")[:count]
            chosen[row, : len(order)] = np.where(mass[order] > 0, order, -1)
        return chosen

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        source, target = pair = unit.pair
        kernel = self.gig_kernel(pair)
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.meta.read_status(r)
        rows = np.flatnonzero(status == PROCESSED)
        step_chunk = self.bounds.index(unit.steps[0])
        first_steps = step_chunk == 0
        t0, t1 = unit.targets
        width = self.gig.width(pair)
        chosen = self.choose_targets(target, r, rows, num_targets(self.config, target))[:, t0:t1]
        index, value = self.codes.read(source, r)
        slots = max(1, int((index >= 0).sum(-1).max()))
        images = self._images(r, rows) if kernel.subnet.needs_images else {}
        partial = np.zeros((len(r), t1 - t0, width))
        sources = np.full((len(r), width), -1, dtype=np.int32)
        delta = np.full((len(r), t1 - t0), np.nan)
        delta_real = np.full((len(r), t1 - t0), np.nan)
        refining = self.config.gig.max_gap is not None
        steps_used = np.zeros((len(r), t1 - t0), dtype=np.int32)
        gap_first = np.full((len(r), t1 - t0), np.nan)
        channels, height, width_px = self.store.taps[source]
        real = self.pfvs.read(source, r) if first_steps else None  # the real X, as stored (or recomputed)
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
                goals = torch.from_numpy(chosen[row, valid].astype(np.int64))
                result, used, first = image_gig(lambda steps: self.gig_kernel(pair, steps), self.config, image_index,
                                                image_value, goals, images.get(int(row)), unit.steps, first_steps)
                if refining:
                    steps_used[row, valid], gap_first[row, valid] = used, first
                partial[row, valid, : len(active)] = result.attribution.cpu().numpy()[:, active]
                if result.delta is not None:
                    delta[row, valid] = result.delta.cpu().numpy()
                    activation = torch.from_numpy(real[row].astype(np.float32).T.reshape(channels, height, width_px))
                    delta_real[row, valid] = kernel.change(
                        activation, torch.from_numpy(chosen[row, valid].astype(np.int64)),
                        images.get(int(row))).cpu().numpy()
            if progress is not None:
                progress(1)
        if progress is not None:
            progress(len(r) - len(rows))
        self.gig.write_unit(pair, r, step_chunk=step_chunk, targets=unit.targets, partial=partial,
                                  sources=sources if first_steps and t0 == 0 else None,
                                  chosen=chosen if first_steps else None, delta=delta if first_steps else None,
                                  delta_real=delta_real if first_steps else None,
                                  refined={"steps": steps_used, "gap_first": gap_first} if refining else None)
        return UnitReport(unit.index, len(r), int(len(r) - len(rows)))
