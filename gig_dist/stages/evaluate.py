"""Stage ``evaluate``: concept insertion and deletion (docs/method.md section 7), per store unit.

For every attributed image among the first ``evaluate.images`` (whole store units; the store's
interleaved order spreads them over the classes), and every GIG pair:

* to the logits (C-Insertion / C-Deletion): the image's active concepts at the source tap, ranked
  by each ordering toward its predicted class, inserted or deleted a growing fraction at a time;
  the readout is the softmax probability of that class;
* between concepts (inter-layer): for the image's first ``evaluate.targets`` target concepts m,
  its source concepts ranked toward m; the readout is ``max_q <a^b_q, v_m>`` over its value at
  full reconstruction.

Ground truth, on the toy world: for each image of class c and each tap with a class matrix, the
iERFs of c's top ``evaluate.top_concepts`` concepts by GIG (the dataset matrix's column c), each
the SRD iERF of the concept's code map in the image, and how their mass splits between the
image's object, a distractor object of another class (in a second version of the image, rendered
with one and encoded with the dictionary on the fly) and background; the same for random active
concepts, and each region's share of the pixels.

The orderings (``kernels.evaluation.ORDERINGS``): GIG, read from the attribute stage's per-image
sums (computed again, the same way, where the reduction compacted them); random; code mass; gradient x code (GIG with one right-rule step). ``evaluate.images = 0``
(the default) evaluates nothing: ``gig-dist evaluate DIR`` sets it and runs this stage alone.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.evaluation import (
    COUNTS,
    ORDERINGS,
    REGION_OF_OBJECT,
    class_probability,
    code_mass,
    concept_peak,
    concept_weights,
    count_grid,
    curves,
    random_scores,
    rank,
    region_shares,
)
from gig_dist.kernels.gig import GIG, LOGITS
from gig_dist.models.loading import resolve_transform
from gig_dist.stages.base import Footprint, Progress, Sizes, Stage, UnitReport, WorkUnit
from gig_dist.stages.forward import resolve_device
from gig_dist.stages.pairs import (
    Pair,
    PairWorker,
    gig_footprint,
    gig_pairs,
    image_gig,
    pair_kernel,
)
from gig_dist.store import (
    PROCESSED,
    ArraySpec,
    AtlasSection,
    CodesSection,
    ConceptsSection,
    EvaluationSection,
    Facts,
    GIGSection,
    ImageRange,
    MetaSection,
    RunStore,
)
from gig_dist.store.evaluation import (
    GROUND_ORDERINGS,
    GROUND_REGIONS,
    GROUND_VARIANTS,
    eval_specs,
    ground_specs,
)

if TYPE_CHECKING:
    from gig_dist.config import Config




class EvaluateStage(Stage):
    name = "evaluate"
    config_section = "evaluate"
    family = EvaluationSection
    version = 2  # 2: the absolute form (the first k concepts) and each image's active concepts
    reads = ("attribute", "reduce")  # per-image GIG for the orderings; the class matrices for ground truth
    result_keys = ("evaluate.steps", "evaluate.targets", "evaluate.seed", "evaluate.ground_truth",
                   "evaluate.top_concepts", "evaluate.taps", "evaluate.orderings",
                   "gig.images")  # gig.images: the class matrices
    later_keys = {"evaluate.orderings": ["gig", "random", "code_mass", "grad_x_code"]}
    coverage_key = "evaluate.images"
    per_dictionary = True
    unit_noun = "images"
    on_demand = True

    @classmethod
    def check(cls, config: Config, facts: Facts) -> list[str]:
        errors = []
        wanted, attributed = config.evaluate.images, config.gig.images
        if wanted and attributed is not None and wanted > attributed:
            errors.append(f"evaluate.images = {wanted} reaches past gig.images = {attributed}: the orderings need "
                          "each image's GIG; set evaluate.images to at most gig.images")
        sources = sorted({source for source, _ in gig_pairs(config, list(facts.taps))}, key=list(facts.taps).index)
        for tap in config.evaluate.taps or ():
            if tap not in facts.taps:
                errors.append(f"evaluate.taps: {tap!r} is not a tap of this run; the taps are {list(facts.taps)}")
            elif tap not in sources:
                errors.append(f"evaluate.taps: tap {tap} has no GIG pair (no codes there, or not in gig.pairs); "
                              f"the attributed taps are {sources}")
        return errors

    def pairs(self, facts: Facts) -> list[Pair]:
        taps = self.config.evaluate.taps
        return [pair for pair in gig_pairs(self.config, list(facts.taps)) if taps is None or pair[0] in taps]

    def ground_taps(self, facts: Facts) -> list[str]:
        """Taps of the ground-truth test: the toy world's taps with concepts -> classes GIG."""
        if not (self.config.evaluate.ground_truth and facts.part_masks):
            return []
        return [source for source, target in self.pairs(facts) if target == LOGITS]

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        e = self.config.evaluate
        specs = [spec for pair in self.pairs(facts)
                 for spec in eval_specs(facts, self.dictionary, pair, len(ORDERINGS), e.steps + 1,
                                        min(e.targets, self.config.gig.targets), len(COUNTS))]
        taps = self.ground_taps(facts)
        return specs + (ground_specs(facts, self.dictionary, taps) if taps else [])

    def covers(self, unit: WorkUnit) -> bool:
        return unit.start < self.config.evaluate.images

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        return gig_footprint(self, facts, sizes)

    def open_worker(self, device: str) -> EvaluateWorker:
        return EvaluateWorker(self, resolve_device(device))


class EvaluateWorker(PairWorker):
    def __init__(self, stage: EvaluateStage, device: torch.device) -> None:
        super().__init__(stage, device)
        self.out = self.store.family(EvaluationSection, stage.dictionary)
        ground = stage.ground_taps(self.store.facts)
        self.ground = GroundTruth(self, ground) if ground else None

    def _kernel(self, pair: Pair) -> GIG:
        """A one-step right-rule GIG: its sub-network runs the curves, its attribution is the
        gradient x code ordering."""
        if pair not in self._kernels:
            self._kernels[pair] = pair_kernel(self.model, self.store, self.concepts, pair, self.device, steps=1,
                                              rule="right")
        return self._kernels[pair]

    def _image(self, image: int) -> torch.Tensor:
        if self._loader is None:
            self._loader = ImageLoader(resolve_transform(self.config), self.config.dataset.max_image_pixels, 1)
        return self._loader.load(self.store.family(MetaSection).path(image)).image.to(self.device)

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        e = self.config.evaluate
        r = ImageRange(unit.start, unit.stop)
        status, _ = self.store.family(MetaSection).read_status(r)
        rows = [int(row) for row in np.flatnonzero(status == PROCESSED) if r.start + row < e.images]
        for pair in self.stage.pairs(self.store.facts):
            self.run_pair(pair, r, rows)
        if self.ground is not None:
            self.out.write_ground(r, self.ground.run(r, rows))
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
        # (n, T, W): the attribute stage's sums, or, where the reduction compacted them, the same
        # GIG computed again here (gig.keep_image_attributions keeps them).
        summed = self.gig.read_vectors(pair, r)[0] if self.gig.has_vectors(pair, r) else None
        chosen, sources = parts["target"], parts["source"]
        slots = 1 if target == LOGITS else min(e.targets, chosen.shape[1])
        points = e.steps + 1
        ins = np.full((len(r), slots, len(ORDERINGS), points), np.nan, dtype=np.float32)
        dele = np.full_like(ins, np.nan)
        count_ins = np.full((len(r), slots, len(ORDERINGS), len(COUNTS)), np.nan, dtype=np.float32)
        count_del = np.full_like(count_ins, np.nan)
        targets = np.full((len(r), slots), -1, dtype=np.int32)
        active_count = np.full(len(r), -1, dtype=np.int32)
        for row in rows:
            used = index[row] >= 0
            active = np.unique(index[row][used])
            active_count[row] = len(active)
            wanted = [s for s in range(slots) if chosen[row, s] >= 0]
            if len(active) == 0 or not wanted:
                continue
            image_index = torch.from_numpy(index[row].astype(np.int64)).to(self.device)
            image_value = torch.from_numpy(value[row]).to(self.device)
            image = self._image(r.start + row) if kernel.subnet.needs_images else None
            goals = torch.from_numpy(chosen[row, wanted].astype(np.int64)).to(self.device)
            one_step = kernel.attribute(image_index, image_value, goals, image=image).attribution.cpu().numpy()
            if summed is not None:
                image_gig_values = summed[row, wanted]
            else:  # the attribute stage's computation, rounded to float32 as it stores it
                again = image_gig(lambda steps: self.gig_kernel(pair, steps), self.config, image_index, image_value,
                                  goals, image)[0].attribution.cpu().numpy()
                image_gig_values = again[:, sources[row][sources[row] >= 0]].astype(np.float32).astype(np.float64)
            mass = code_mass(index[row], value[row], k)
            noise = random_scores(k, e.seed, r.start + row)
            for j, s in enumerate(wanted):
                gig = np.zeros(k)
                present = sources[row] >= 0
                gig[sources[row][present]] = image_gig_values[j, : present.sum()]
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
                    if ORDERINGS[o] not in e.orderings:  # left NaN
                        continue
                    order = rank(scores, active)
                    ins[row, s, o], dele[row, s, o] = curves(forward, image_index, image_value, V, shape, order,
                                                             e.steps)
                    count_ins[row, s, o], count_del[row, s, o] = curves(
                        forward, image_index, image_value, V, shape, order, e.steps, kept=count_grid(len(order)))
                targets[row, s] = m
        first = (lambda a: a[:, 0]) if target == LOGITS else (lambda a: a)
        arrays = {"insertion": first(ins), "deletion": first(dele), "count_insertion": first(count_ins),
                  "count_deletion": first(count_del), "active": active_count}
        if target != LOGITS:
            arrays["target"] = targets
        self.out.write(pair, r, arrays)

    @staticmethod
    def _full(index: torch.Tensor, value: torch.Tensor, V: torch.Tensor, shape) -> torch.Tensor:
        from gig_dist.kernels.gig import reconstruct

        channels, height, width = shape
        return reconstruct(index, value, V).T.reshape(channels, height, width)

    def close(self) -> None:
        super().close()
        if self.ground is not None:
            self.ground.close()


class GroundTruth:
    """The toy world's ground-truth test of one evaluate worker (see the module's text)."""

    def __init__(self, worker: EvaluateWorker, taps: list[str]) -> None:
        from gig_dist.kernels.dictionaries import DICTIONARIES
        from gig_dist.kernels.srd import SRD
        from gig_dist.stages.coding import encode_params

        self.worker, self.taps = worker, taps
        config, method = worker.config, worker.stage.method
        self.top = {}
        for tap in taps:
            matrix = worker.gig.read_matrix((tap, LOGITS))  # (K, classes): the dataset's class means
            order = np.argsort(-matrix, axis=0, kind="stable")[: config.evaluate.top_concepts].T  # (classes, n)
            self.top[tap] = np.where(np.take_along_axis(matrix.T, order, 1) > 0, order, -1)
        self.coders = {tap: DICTIONARIES[method].from_arrays(worker.concepts.arrays(tap),
                                                                 **encode_params(config, tap, str(worker.device)))
                       for tap in taps}
        self.srd = SRD(worker.model)
        self.loader = ImageLoader(resolve_transform(config), config.dataset.max_image_pixels, 1)

    def _codes(self, pfvs: torch.Tensor, tap: str) -> tuple[np.ndarray, np.ndarray]:
        """Codes (P, L) of a distractor image's PFVs (C, H, W), as decompose would store them
        (through float16, the stored PFVs' type)."""
        index, value = self.coders[tap].encode(pfvs.flatten(1).T.to(torch.float16).float().cpu().numpy())
        width = self.worker.config.decompose.max_nonzero
        return index[:, :width], value[:, :width]

    def run(self, r: ImageRange, rows: list[int]) -> dict[str, np.ndarray]:
        worker, e = self.worker, self.worker.config.evaluate
        n, (v, o, g) = len(r), (len(GROUND_VARIANTS), len(GROUND_ORDERINGS), len(GROUND_REGIONS))
        out = {"pixels": np.full((n, v, g), np.nan, dtype=np.float32),
               "prediction": np.full((n, v), -1, dtype=np.int32),
               "distractor": np.full(n, -1, dtype=np.int32)}
        for tap in self.taps:
            out[f"{tap}/mass"] = np.full((n, v, o, g), np.nan, dtype=np.float32)
            out[f"{tap}/active"] = np.full((n, v, o), -1, dtype=np.int16)
        paths, labels = worker.store.family(MetaSection).read_index(r)
        _, predictions = worker.store.family(MetaSection).read_status(r)
        stored = {tap: worker.codes.read(tap, r) for tap in self.taps}
        for row in rows:
            cls = int(labels[row]) if labels[row] >= 0 else int(predictions[row])
            scenes = [self.loader.load_scene(str(paths[row]), distractor) for distractor in (False, True)]
            out["distractor"][row] = scenes[1].distractor
            decomposition = self.srd.decompose(torch.stack([scene.image for scene in scenes]).to(worker.device))
            out["prediction"][row] = decomposition.logits.argmax(1).cpu().numpy()
            regions = np.stack([REGION_OF_OBJECT[scene.object_mask] for scene in scenes])
            out["pixels"][row] = [np.bincount(m.ravel(), minlength=g) / m.size for m in regions]
            rng = np.random.default_rng([e.seed, r.start + row])
            for tap in self.taps:
                feature_map = decomposition.outputs[tap]
                codes = [(stored[tap][0][row], stored[tap][1][row]), self._codes(feature_map[1], tap)]
                chosen = []  # per variant: per ordering, the concepts whose iERFs are taken
                for index, _ in codes:
                    active = np.unique(index[index >= 0])
                    top = self.top[tap][cls]
                    random = rng.choice(active, min(len(active), e.top_concepts), replace=False) if len(active) \
                        else active
                    chosen.append([np.intersect1d(top[top >= 0], active), random])
                weights = torch.from_numpy(np.stack([
                    concept_weights(index, value, np.concatenate(picks + [np.zeros(0, dtype=np.int64)]),
                                    feature_map.shape[-2:], width=2 * e.top_concepts)
                    for (index, value), picks in zip(codes, chosen)])).to(feature_map)
                maps = decomposition.ierf_of(tap, weights).double().cpu().numpy()  # (variant, concept, H, W)
                for variant, picks in enumerate(chosen):
                    first = 0
                    for ordering, concepts in enumerate(picks):
                        out[f"{tap}/active"][row, variant, ordering] = len(concepts)
                        if len(concepts):
                            shares = region_shares(maps[variant, first : first + len(concepts)], regions[variant], g)
                            out[f"{tap}/mass"][row, variant, ordering] = shares.mean(0)
                        first += len(concepts)
        return out

    def close(self) -> None:
        self.loader.close()


def summarize(store: RunStore, dictionary: str, pairs: list[Pair], images: int) -> dict[str, dict]:
    """Per pair and ordering: mean and 95 % interval over images of AUC_ins - AUC_del, AUC_ins
    and AUC_del by fraction of the active concepts (``score``), and of the mean of ins(k) -
    del(k) over the first k = 1, 2, 4, ..., 32 concepts (``count_score``); an inter-layer image's
    targets are averaged first, so the interval is over images, not image x target pairs. Beside
    them, ``sparsity``: the source tap's R^2 and mean l0 over all its codes, and the evaluated
    images' active concepts (mean). Read a unit at a time."""
    from gig_dist.kernels.evaluation import auc, count_score, mean_interval

    section = store.family(EvaluationSection, dictionary)
    codes, concepts = store.family(CodesSection, dictionary), store.family(ConceptsSection, dictionary)
    found: dict[str, dict] = {}
    for pair in pairs:
        if not section.has(pair):
            continue
        scores: dict[str, list[np.ndarray]] = {"score": [], "insertion": [], "deletion": [], "count_score": []}
        active: list[np.ndarray] = []
        counted = store.has(section._path(pair, "count_insertion"))  # evaluated before the absolute form
        for r in store.units():
            if r.start >= images:
                break
            got = section.read(pair, r) if counted else _read_fractions(section, pair, r)
            stop = min(len(r), images - r.start)
            i, d = got["insertion"][:stop].astype(np.float64), got["deletion"][:stop].astype(np.float64)
            ins_auc, del_auc = auc(i), auc(d)  # (n[, target], ordering)
            per_image = {"score": ins_auc - del_auc, "insertion": ins_auc, "deletion": del_auc}
            if counted:
                per_image["count_score"] = count_score(got["count_insertion"][:stop], got["count_deletion"][:stop])
                active.append(got["active"][:stop][got["active"][:stop] >= 0])
            for name, values in per_image.items():
                if pair[1] != LOGITS:  # an image's targets averaged: one value per image
                    with np.errstate(invalid="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        values = np.nanmean(values, axis=1)
                scores[name].append(values)
        merged = {name: np.concatenate(parts) for name, parts in scores.items() if parts}
        entry = {ordering: {name: mean_interval(values[:, o]) for name, values in merged.items()}
                 for o, ordering in enumerate(ORDERINGS)}
        summary = codes.summary(pair[0], concepts.count(pair[0])) if concepts.has(pair[0]) else {}
        entry["sparsity"] = {"r2": summary.get("r2"), "mean_l0": summary.get("mean_l0"),
                             "active_per_image": float(np.concatenate(active).mean()) if active and
                             np.concatenate(active).size else None}
        found[f"{pair[0]} -> {pair[1]}"] = entry
    return found


def _read_fractions(section, pair: Pair, r: ImageRange) -> dict[str, np.ndarray]:
    """The fraction curves of a store evaluated before the absolute form existed."""
    return {name: section.store.array(section._path(pair, name))[r.start : r.stop] for name in ("insertion", "deletion")}


def summarize_ground(store: RunStore, dictionary: str, images: int, top_concepts: int) -> dict[str, Any] | None:
    """The toy world's ground truth of one dictionary: where the class's top concepts' and random
    active concepts' iERF mass falls (mean and 95 % interval over images, per tap, variant and
    region), each region's share of pixels, the model's accuracy on both variants; and, from the
    atlas where it ran, the purity and part recall of all concepts and of the classes' top ones.
    ``None`` where the store has no ground truth."""
    from gig_dist.kernels.evaluation import mean_interval
    from gig_dist.kernels.metrics import concept_purity, part_recall
    from gig_dist.toy.world import NUM_PARTS

    section = store.family(EvaluationSection, dictionary)
    taps = sorted(section.ground_taps(), key=list(store.taps).index)
    if not taps:
        return None
    rows: dict[str, list[np.ndarray]] = {}
    labels, status = [], []
    for r in store.units():
        if r.start >= images:
            break
        stop = min(len(r), images - r.start)
        for name, values in section.read_ground(r, taps).items():
            rows.setdefault(name, []).append(values[:stop])
        labels.append(store.family(MetaSection).read_index(r)[1][:stop])
        status.append(store.family(MetaSection).read_status(r)[0][:stop])
    got = {name: np.concatenate(values) for name, values in rows.items()}
    labels, done = np.concatenate(labels), np.concatenate(status) == PROCESSED
    prediction, distractor = got["prediction"], got["distractor"]
    seen = done & (prediction[:, 0] >= 0)
    found: dict[str, Any] = {
        "images": int(seen.sum()),
        "accuracy": {variant: float((prediction[seen, v] == labels[seen]).mean()) if seen.any() else None
                     for v, variant in enumerate(GROUND_VARIANTS)},
        "predicts_distractor": float((prediction[seen, 1] == distractor[seen]).mean()) if seen.any() else None,
        "pixels": {variant: {region: mean_interval(got["pixels"][seen, v, g].astype(np.float64))
                             for g, region in enumerate(GROUND_REGIONS)} for v, variant in enumerate(GROUND_VARIANTS)},
        "taps": {},
    }
    gig = store.family(GIGSection, dictionary)
    atlas = store.family(AtlasSection, dictionary)
    everything, tops = [], []
    for tap in taps:
        mass, active = got[f"{tap}/mass"][seen].astype(np.float64), got[f"{tap}/active"][seen]
        entry: dict[str, Any] = {
            variant: {ordering: {"active": float(active[:, v, o].mean()) if len(active) else None,
                                 **{region: mean_interval(mass[:, v, o, g]) for g, region in enumerate(GROUND_REGIONS)}}
                      for o, ordering in enumerate(GROUND_ORDERINGS)}
            for v, variant in enumerate(GROUND_VARIANTS)}
        part_mass = atlas.part_mass(tap) if tap in atlas.taps() and atlas.has_render(tap) else None
        if part_mass is not None:
            purity, part = concept_purity(part_mass)
            matrix = gig.read_matrix((tap, LOGITS))
            order = np.argsort(-matrix, axis=0, kind="stable")[:top_concepts]
            top = np.unique(order[np.take_along_axis(matrix, order, 0) > 0])
            entry["purity"] = {"all": float(np.nanmedian(purity)) if np.isfinite(purity).any() else None,
                               "class_top": float(np.nanmedian(purity[top])) if np.isfinite(purity[top]).any() else None,
                               "class_top_concepts": len(top)}
            everything.append((purity, part))
            tops.append((purity[top], part[top]))
        found["taps"][tap] = entry
    if everything:
        found["part_recall"] = {"all": part_recall(everything, NUM_PARTS)["recall"],
                                "class_top": part_recall(tops, NUM_PARTS)["recall"]}
    return found
