"""Stage ``evaluate``: concept insertion and deletion (method.md section 7), per store unit.

For every attributed image among the first ``evaluate.images`` (whole store units; the store's
interleaved order spreads them over the classes), and every GIG pair:

* to the logits (C-Insertion / C-Deletion): the image's active concepts at the source tap, ranked
  by each ordering toward its predicted class, inserted or deleted a growing fraction at a time;
  the readout is the softmax probability of that class;
* between concepts (inter-layer): for the image's first ``evaluate.targets`` target concepts m,
  its source concepts ranked toward m; the readout is ``max_q <a^b_q, v_m>`` over its value at
  full reconstruction.

The orderings (``kernels.evaluation.ORDERINGS``): GIG, read from the attribute stage's per-image
sums; random; code mass; gradient x code (GIG with one right-rule step). ``evaluate.images = 0``
(the default) evaluates nothing: ``gig-dist evaluate DIR`` sets it and runs this stage alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import Field

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.evaluation import (
    ORDERINGS,
    class_probability,
    code_mass,
    concept_peak,
    curves,
    random_scores,
    rank,
)
from gig_dist.kernels.gig import GIG, LOGITS
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.settings import Section
from gig_dist.stages.attribute import Pair, gig_pairs
from gig_dist.stages.base import Progress, Stage, StageWorker, UnitReport, WorkUnit
from gig_dist.stages.extract import resolve_device
from gig_dist.store import PROCESSED, ArraySpec, Facts, ImageRange, RunStore
from gig_dist.store.evaluation import eval_specs

if TYPE_CHECKING:
    from gig_dist.config import Config


class EvaluateConfig(Section):
    """Concept insertion/deletion (``gig-dist evaluate``)."""

    #: Evaluate the first N images (whole store units; at most ``gig.images``). 0: none.
    images: int = Field(default=0, ge=0)
    #: Fractions 0, 1/steps, ..., 1 of the concepts inserted or deleted.
    steps: int = Field(default=10, ge=1)
    #: Target concepts per image for the inter-layer test (the image's first GIG targets).
    targets: int = Field(default=5, ge=1)
    #: Seed of the random ordering (per image: (seed, image index)).
    seed: int = 0


class EvaluateStage(Stage):
    name = "evaluate"
    reads = ("attribute",)
    result_keys = ("evaluate.steps", "evaluate.targets", "evaluate.seed")
    coverage_key = "evaluate.images"
    per_dictionary = True
    unit_noun = "images"
    on_demand = True

    @classmethod
    def check(cls, config: Config, facts: Facts) -> list[str]:
        wanted, attributed = config.evaluate.images, config.gig.images
        if wanted and attributed is not None and wanted > attributed:
            return [f"evaluate.images = {wanted} reaches past gig.images = {attributed}: the orderings need each "
                    "image's GIG; set evaluate.images to at most gig.images"]
        return []

    def pairs(self, facts: Facts) -> list[Pair]:
        return gig_pairs(self.config, list(facts.taps))

    def arrays(self, store: RunStore) -> list[ArraySpec]:
        e = self.config.evaluate
        return [spec for pair in self.pairs(store.facts)
                for spec in eval_specs(store.facts, self.dictionary, pair, len(ORDERINGS), e.steps + 1,
                                       min(e.targets, self.config.gig.targets))]

    def covers(self, unit: WorkUnit) -> bool:
        return unit.start < self.config.evaluate.images

    def open_worker(self, device: str) -> EvaluateWorker:
        return EvaluateWorker(self, resolve_device(device))


class EvaluateWorker(StageWorker):
    def __init__(self, stage: EvaluateStage, device: torch.device) -> None:
        self.stage = stage
        self.config = stage.config
        self.device = device
        self.store = RunStore.open(stage.store_url, mode="r+")
        self.model = build_model(self.config.model).to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.gig = self.store.gig(stage.dictionary)
        self.codes = self.store.codes(stage.dictionary)
        self.concepts = self.store.concepts(stage.dictionary)
        self.out = self.store.evaluation(stage.dictionary)
        self._kernels: dict[Pair, GIG] = {}
        self._loader: ImageLoader | None = None

    def _kernel(self, pair: Pair) -> GIG:
        """A one-step right-rule GIG: its sub-network runs the curves, its attribution is the
        gradient x code ordering."""
        if pair not in self._kernels:
            source, target = pair
            V = torch.from_numpy(self.concepts.vectors(source)).to(self.device)
            W = None if target == LOGITS else torch.from_numpy(self.concepts.vectors(target)).to(self.device)
            self._kernels[pair] = GIG(self.model, source, target, V, self.store.taps[source], W, steps=1,
                                      rule="right")
        return self._kernels[pair]

    def _image(self, image: int) -> torch.Tensor:
        if self._loader is None:
            self._loader = ImageLoader(resolve_transform(self.config), self.config.dataset.max_image_pixels, 1)
        return self._loader.load(self.store.meta.path(image)).image.to(self.device)

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        e = self.config.evaluate
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.meta.read_status(r)
        rows = [int(row) for row in np.flatnonzero(status == PROCESSED) if r.start + row < e.images]
        for pair in self.stage.pairs(self.store.facts):
            self.run_pair(pair, r, rows)
        if progress is not None:
            progress(len(r))
        return UnitReport(unit.index, len(rows), int((status != PROCESSED).sum()))

    def run_pair(self, pair: Pair, r: ImageRange, rows: list[int]) -> None:
        e = self.config.evaluate
        source, target = pair
        kernel = self._kernel(pair)
        V = kernel.V
        k = len(V)
        shape = self.store.taps[source]
        index, value = self.codes.read(source, r)
        parts = self.gig.read_unit(pair, r)
        summed = parts["partial"].sum(axis=0)  # (n, T, W): every step range
        chosen, sources = parts["target"], parts["source"]
        slots = 1 if target == LOGITS else min(e.targets, chosen.shape[1])
        points = e.steps + 1
        ins = np.full((len(r), slots, len(ORDERINGS), points), np.nan, dtype=np.float32)
        dele = np.full_like(ins, np.nan)
        targets = np.full((len(r), slots), -1, dtype=np.int32)
        for row in rows:
            used = index[row] >= 0
            active = np.unique(index[row][used])
            wanted = [s for s in range(slots) if chosen[row, s] >= 0]
            if len(active) == 0 or not wanted:
                continue
            image_index = torch.from_numpy(index[row].astype(np.int64)).to(self.device)
            image_value = torch.from_numpy(value[row]).to(self.device)
            image = self._image(r.start + row) if kernel.subnet.needs_images else None
            goals = torch.from_numpy(chosen[row, wanted].astype(np.int64)).to(self.device)
            one_step = kernel.attribute(image_index, image_value, goals, image=image).attribution.cpu().numpy()
            mass = code_mass(index[row], value[row], k)
            noise = random_scores(k, e.seed, r.start + row)
            for j, s in enumerate(wanted):
                gig = np.zeros(k)
                present = sources[row] >= 0
                gig[sources[row][present]] = summed[row, s][present]
                m = int(chosen[row, s])
                if target == LOGITS:
                    readout = class_probability(m)
                else:
                    peak = concept_peak(kernel.W[m])
                    full = float(peak(kernel.subnet(self._full(image_index, image_value, V, shape)[None],
                                                    None if image is None else image[None]))[0])
                    if not full > 0:
                        continue
                    readout = (lambda p, full=full: lambda a: p(a) / full)(peak)
                forward = (lambda read, image=image: lambda x: read(kernel.subnet(
                    x, None if image is None else image[None].expand(len(x), -1, -1, -1))))(readout)
                for o, scores in enumerate((gig, noise, mass, one_step[j])):
                    order = rank(scores, active)
                    ins[row, s, o], dele[row, s, o] = curves(forward, image_index, image_value, V, shape, order,
                                                             e.steps)
                targets[row, s] = m
        arrays = {"insertion": ins[:, 0] if target == LOGITS else ins,
                  "deletion": dele[:, 0] if target == LOGITS else dele}
        if target != LOGITS:
            arrays["target"] = targets
        self.out.write(pair, r, arrays)

    @staticmethod
    def _full(index: torch.Tensor, value: torch.Tensor, V: torch.Tensor, shape) -> torch.Tensor:
        from gig_dist.kernels.gig import reconstruct

        channels, height, width = shape
        return reconstruct(index, value, V).T.reshape(channels, height, width)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()


def summarize(store: RunStore, dictionary: str, pairs: list[Pair], images: int) -> dict[str, dict]:
    """Per pair and ordering: mean and 95 % interval over images (inter-layer: over image x
    target) of AUC_ins - AUC_del, AUC_ins and AUC_del; read a unit at a time."""
    from gig_dist.kernels.evaluation import auc, mean_interval

    section = store.evaluation(dictionary)
    found: dict[str, dict] = {}
    for pair in pairs:
        if not section.has(pair):
            continue
        ins_auc, del_auc = [], []
        for r in store.units():
            if r.start >= images:
                break
            got = section.read(pair, r)
            stop = min(len(r), images - r.start)
            i, d = got["insertion"][:stop], got["deletion"][:stop]
            if pair[1] != LOGITS:
                i, d = i.reshape(-1, *i.shape[2:]), d.reshape(-1, *d.shape[2:])
            ins_auc.append(auc(i.astype(np.float64)))
            del_auc.append(auc(d.astype(np.float64)))
        ins_auc, del_auc = np.concatenate(ins_auc), np.concatenate(del_auc)  # (n, ordering)
        found[f"{pair[0]} -> {pair[1]}"] = {
            ordering: {"score": mean_interval(ins_auc[:, o] - del_auc[:, o]), "insertion": mean_interval(ins_auc[:, o]),
                       "deletion": mean_interval(del_auc[:, o])} for o, ordering in enumerate(ORDERINGS)}
    return found
