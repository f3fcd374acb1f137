"""Stage ``concepts``: one unit per tap, the run's dictionary (``concepts.method``, default
bisecting k-means, docs/method.md section 4) fit to the tap's samples, written under the dictionary's
own level of the store.

The samples of one tap are the only data a unit holds in memory: ``sample.per_image`` PFVs per
image (ImageNet validation at the paper's 1 per image and 2,048 channels: 200 MB in float16),
which k-means needs all at once.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from gig_dist.kernels.dictionaries import DICTIONARIES, make_dictionary
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.stages.coding import (
    concept_count,
    fit_params,
    own_param_errors,
    sample_count_errors,
)
from gig_dist.stages.forward import resolve_device
from gig_dist.store import ArraySpec, ConceptsSection, Facts, RunStore, SamplesSection
from gig_dist.store.concepts import member_specs

if TYPE_CHECKING:
    from gig_dist.config import Config


class ConceptsStage(Stage):
    name = "concepts"
    config_section = "concepts"
    linear_in_k = True
    units_per_tap = True
    family = ConceptsSection
    reads = ("sample",)
    result_keys = ("concepts.",)
    later_keys = {"concepts.refine_iter": None, "concepts.level": None, "concepts.params": {}}
    per_dictionary = True
    unit_noun = "taps"
    # 2: bisecting k-means's Lloyd moves its sums by the members that changed sides (float64)
    # instead of summing every member again in float32: other rounding, so other boundary points
    version = 2

    @classmethod
    def check(cls, config: Config, facts: Facts) -> list[str]:
        errors = []
        unknown = [tap for tap in config.concepts.k if tap not in facts.taps]
        if unknown:
            errors.append(f"concepts.k names taps that are not in this run: {unknown}; the run's taps are {list(facts.taps)}")
        known = {tap: shape for tap, shape in facts.taps.items()}
        for tap, (_, height, width) in known.items():
            if config.sample.per_image > height * width:
                warnings.warn(f"tap {tap}: sample.per_image = {config.sample.per_image} but the tap has {height * width} "
                              f"positions ({height} x {width}); it draws at most {height * width} per image",
                              stacklevel=2)
        capacity = {tap: facts.num_images * min(config.sample.per_image, h * w) for tap, (_, h, w) in known.items()}
        return errors + own_param_errors(config) + sample_count_errors(config, facts, capacity, "at most ",
                                                                       warn=True)

    @classmethod
    def key_values(cls, config: Config) -> dict[str, Any]:
        """A dictionary's own parameters count only for that dictionary."""
        mine = f"concepts.params.{config.concepts.method}."
        return {key: value for key, value in super().key_values(config).items()
                if not key.startswith("concepts.params.") or key.startswith(mine)}

    def check_inputs(self, store: RunStore) -> list[str]:
        """Against the samples actually drawn: skipped images gave none."""
        drawn = {tap: sum(int(block.sum()) for _, block in store.family(SamplesSection).valid_mask_blocks(tap)) for tap in store.taps}
        return sample_count_errors(self.config, store.facts, drawn, "", warn=False)

    def whole_arrays(self, facts: Facts, sizes: Sizes, calibration: dict[str, Any] | None) -> list[ArraySpec]:
        """Each tap's fitted dictionary: its arrays depend on the method and K alone, so a
        calibration (same K) gives their shapes; without one, only the concept vectors count."""
        if calibration is not None and calibration["dictionary_arrays"] is not None:
            return [ArraySpec(ConceptsSection.level_path(self.dictionary, name), tuple(shape), dtype,
                              ("i",) * len(shape), tuple(shape))
                    for name, (shape, dtype) in calibration["dictionary_arrays"].items()]
        return [ArraySpec(ConceptsSection.level_path(self.dictionary, f"{tap}/vector"), (sizes.concepts(tap), c),
                          "float32", ("concept", "channel"), (sizes.concepts(tap), c))
                for tap, (c, _, _) in facts.taps.items()]

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return member_specs(facts, self.dictionary, self.config.sample.per_image)

    def declared_arrays(self, store: RunStore) -> list[str]:
        """Each tap's fitted dictionary: written whole by its unit, shapes known once fit."""
        names = DICTIONARIES[self.method].stored_arrays
        return [path for tap in store.taps for path in store.family(ConceptsSection, self.dictionary).fitted_paths(tap, names)]

    def plan(self, facts: Facts) -> list[WorkUnit]:
        return [WorkUnit(self.progress_key, i, tap=tap) for i, tap in enumerate(facts.taps)]

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        """Every sample of a tap in float32, twice (read, and the fit's copy), the centres."""
        worker, dense = 0, []
        for tap, (c, h, w) in facts.taps.items():
            n = facts.num_images * min(self.config.sample.per_image, h * w)
            k = sizes.concepts(tap)
            worker = max(worker, 2 * n * c * 4 + 2 * k * c * 4 + n * 8)
            dense.append((f"{tap} concept vectors", (k, c), "float32"))
        return Footprint(worker, dense=dense)

    def open_worker(self, device: str) -> ConceptsWorker:
        return ConceptsWorker(self, str(resolve_device(device)))


def _fit_settings(concepts: dict) -> dict:
    return {key: value for key, value in concepts.items() if key != "level"}


class ConceptsWorker(StageWorker):
    def __init__(self, stage: ConceptsStage, device: str = "cpu") -> None:
        self.device = device  # where a torch fit runs (concepts.backend torch, or auto on a GPU)
        self.stage = stage
        self.config = stage.config
        self.store = stage.open_store()
        self.concepts = self.store.family(ConceptsSection, stage.dictionary)

    def _same_fit(self, tap: str) -> ConceptsSection | None:
        """For a level ``<dictionary>@...`` (``evaluate --match``): that dictionary's concepts, where
        it finished its fit of the same samples with the same fit settings (the fit is
        deterministic, so fitting again gives the same arrays; NMF's took 48 minutes)."""
        level = self.stage.dictionary
        if "@" not in level:
            return None
        source = level.split("@", 1)[0]
        record = self.store.manifest.stages.get(f"{source}/concepts")
        sample = self.store.manifest.stages.get("sample")
        if record is None or not record.finished or sample is None or record.upstream.get("sample") != sample.fingerprint:
            return None
        if source not in self.store.manifest.dictionaries:
            return None
        if _fit_settings(self.store.manifest.dictionary_config(source)["concepts"]) != \
                _fit_settings(self.config.concepts.model_dump(mode="json")):
            return None
        found = self.store.family(ConceptsSection, source)
        return found if found.has(tap) else None

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        tap = unit.tap
        k = concept_count(self.config, tap, self.store.taps[tap][0])
        source = self._same_fit(tap)
        if source is not None:  # a matched level of a finished dictionary: its fit, not a second one
            self.concepts.write(tap, source.arrays(tap), source.labels(tap), {**source.fit(tap), "copied_from": source.dictionary},
                                owner=self.stage.progress_key)
            if progress is not None:
                progress(1)
            return UnitReport(unit.index, 0, 0)
        samples = np.concatenate(list(self.store.family(SamplesSection).iter_valid(tap)))
        if len(samples) < k:
            raise ValueError(
                f"tap {tap}: K = {k} concepts need at least {k} sampled PFVs, the store has {len(samples)}; "
                "raise sample.per_image or lower concepts.k_multiplier / concepts.k"
            )
        started = time.perf_counter()
        dictionary = make_dictionary(self.stage.method, n_concepts=k, device=self.device, **fit_params(self.config))
        try:
            dictionary.fit(samples)
        except ValueError as exc:
            raise ValueError(f"tap {tap}: {exc}") from None
        stats = {**dictionary.fit_statistics(), "seconds": time.perf_counter() - started}
        self.concepts.write(tap, dictionary.fitted_arrays(), getattr(dictionary, "labels_", None), stats,
                            owner=self.stage.progress_key)
        if progress is not None:
            progress(1)
        return UnitReport(unit.index, 0, 0)
