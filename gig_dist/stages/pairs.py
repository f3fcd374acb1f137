"""GIG's pairs, below the stages (no stage imports another): which (source tap, target) pairs a
run attributes, their checks and memory, and one image's GIG of one pair on a worker
(:class:`PairWorker`), which the attribute and evaluate stages share."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.gig import GIG, LOGITS, refine
from gig_dist.kernels.taps import stored_layout
from gig_dist.models.loading import build_model
from gig_dist.stages.base import (
    Footprint,
    Sizes,
    Stage,
    StageWorker,
    model_bytes,
    tap_values,
)
from gig_dist.stages.coding import concept_count
from gig_dist.stages.forward import forward_bytes
from gig_dist.store import CodesSection, ConceptsSection, Facts, GIGSection, RunStore

if TYPE_CHECKING:
    from gig_dist.config import Config

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


def graph_class_names(config: Config, facts: Facts) -> list[str]:
    """The classes the class graphs are of (``gig.graph_classes``), one name per graph: the
    model's outputs, or the dataset's own classes."""
    if config.gig.graph_classes == "dataset":
        return list(facts.dataset_classes)
    names = list(facts.class_names)
    return names + [str(c) for c in range(len(names), facts.num_outputs)]


def check_graph_classes(config: Config, facts: Facts) -> list[str]:
    """Why the class graphs cannot be of the classes ``gig.graph_classes`` asks for (empty: they can)."""
    if config.gig.graph_classes != "dataset" or facts.dataset_classes:
        return []
    return ["gig.graph_classes = dataset groups the images by the dataset's named classes (an image folder's "
            "class folders), and this dataset has none (unlabelled images, or a file list's integer labels); use "
            "gig.graph_classes = model"]


def num_targets(config: Config, target: str) -> int:
    return 2 if target == LOGITS else config.gig.targets


def step_bounds(config: Config) -> list[int]:
    m, s = config.gig.steps, config.gig.step_chunks
    return [round(i * m / s) for i in range(s + 1)]


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
        self.gig = self.store.family(GIGSection, stage.dictionary)
        self.codes = self.store.family(CodesSection, stage.dictionary)
        self.concepts = self.store.family(ConceptsSection, stage.dictionary)
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
