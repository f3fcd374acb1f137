"""Stage ``sample``: per image and tap, draw PFVs for concept discovery, weighted by their
contribution to the predicted class (docs/method.md section 3), and keep the drawn vectors.

Draws depend only on ``(sample.seed, tap, image)``, never on how images were split into units
or batches. The drawn vectors are read from the extracted PFVs, so the concepts are fit to
exactly what the store holds.
"""

from __future__ import annotations

import numpy as np
import torch

from gig_dist.data.sources import ImageLoader
from gig_dist.kernels.sampling import draw_positions, grad_x_act
from gig_dist.kernels.srd import SRD, srd_problem
from gig_dist.kernels.taps import stored_layout
from gig_dist.models.loading import build_model, resolve_transform
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
from gig_dist.stages.forward import PFVSource, forward_bytes, resolve_device
from gig_dist.store import (
    PROCESSED,
    ArraySpec,
    Facts,
    ImageRange,
    MetaSection,
    SamplesSection,
)
from gig_dist.store.samples import sample_specs


class SampleStage(Stage):
    name = "sample"
    config_section = "sample"
    family = SamplesSection
    reads = ("extract",)
    result_keys = ("sample.",)


    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return sample_specs(facts, self.config.sample.per_image, self.config.extract.dtype,
                            self.config.sample.method != "uniform")

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        """SRD: a batch's activations and relevances, the unit's scores."""
        values = tap_values(facts)
        recompute = forward_bytes(self.config, facts) if self.config.extract.pfvs == "recompute" else 0
        per_image, item = self.config.sample.per_image, np.dtype(self.config.extract.dtype).itemsize
        drawn = facts.images_per_unit * per_image * sum(c * item + 4 for c, _, _ in facts.taps.values())
        return Footprint(3 * model_bytes(facts) + 4 * self.config.sample.batch_size * values * 4
                         + facts.images_per_unit * values * 4 + drawn + recompute,
                         why=f"sample.per_image = {per_image} (rows of every image's samples, however many "
                             f"positions a tap has), sample.batch_size = {self.config.sample.batch_size}, "
                             f"store.images_per_unit = {facts.images_per_unit}")

    def open_worker(self, device: str) -> SampleWorker:
        return SampleWorker(self, resolve_device(device))


class SampleWorker(StageWorker):
    def __init__(self, stage: SampleStage, device: torch.device) -> None:
        config = stage.config
        self.sample = config.sample
        self.store = stage.open_store()
        self.taps = list(self.store.taps)
        self.device = device
        self.pfvs = PFVSource(config, self.store, device, self.taps)
        self.model = None
        self.layouts = {tap: stored_layout(self.store.facts.layouts, tap) for tap in self.taps}
        self.relevance = "uniform"
        if self.sample.method != "uniform":
            self.model = build_model(config.model).to(device)
            # SRD where it has rules for the model and every tap; grad x act everywhere else.
            problem = srd_problem(self.model, self.taps) if self.sample.method == "srd" else None
            self.srd = SRD(self.model) if self.sample.method == "srd" and problem is None else None
            self.relevance = "srd" if self.srd is not None else "grad x act" + (
                f" (SRD cannot run: {problem})" if problem else "")
            self.loader = ImageLoader(resolve_transform(config), config.dataset.max_image_pixels,
                                      config.dataset.loader_threads)

    def _scores(self, paths: list[str], rows: np.ndarray, predictions: np.ndarray,
                progress: Progress | None) -> dict[str, np.ndarray]:
        """Score of every PFV of every tap for the images at ``rows``: {tap: (len(rows), H*W)}."""
        found: dict[str, list[np.ndarray]] = {tap: [] for tap in self.taps}
        loading = self.loader.submit_all([paths[row] for row in rows])
        batch = self.sample.batch_size
        for first in range(0, len(rows), batch):
            loaded = [f.result() for f in loading[first : first + batch]]
            if any(item.image is None for item in loaded):  # extracted before, unreadable now
                bad = next(item.reason for item in loaded if item.image is None)
                raise RuntimeError(f"an image that extraction read can no longer be read: {bad}")
            x = torch.stack([item.image for item in loaded]).to(self.device)
            classes = torch.as_tensor(predictions[rows[first : first + batch]], device=self.device)
            if self.srd is not None:
                maps = self.srd.decompose(x).relevance(classes)
            else:
                maps = grad_x_act(self.model, x, self.taps, classes, self.layouts)
            for tap in self.taps:
                found[tap].append(maps[tap].flatten(1).float().cpu().numpy())
            if progress is not None:
                progress(len(x))
        return {tap: np.concatenate(parts) for tap, parts in found.items()}

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        status, predictions = self.store.family(MetaSection).read_status(r)
        rows = np.flatnonzero(status == PROCESSED)
        count = self.sample.per_image
        scores = None
        if self.model is not None and rows.size:
            paths, _ = self.store.family(MetaSection).read_index(r)
            scores = self._scores(paths, rows, predictions, progress)  # reports the scored images
            if progress is not None:
                progress(len(r) - rows.size)  # and the skipped ones
        elif progress is not None:
            progress(len(r))
        for tap_index, tap in enumerate(self.taps):
            channels, height, width = self.store.taps[tap]
            pfvs = self.pfvs.read(tap, r)  # (n, H*W, C)
            positions = np.full((len(r), count), -1, dtype=np.int32)
            vectors = np.full((len(r), count, channels), np.nan, dtype=pfvs.dtype)
            tap_scores = None if scores is None else np.full((len(r), height * width), np.nan, dtype=np.float32)
            for k, row in enumerate(rows):
                rng = np.random.default_rng([self.sample.seed, tap_index, r.start + int(row)])
                score = np.zeros(height * width) if scores is None else scores[tap][k]  # zeros: uniform
                drawn = draw_positions(score, count, rng)
                positions[row, : len(drawn)] = drawn
                vectors[row, : len(drawn)] = pfvs[row, drawn]
                if tap_scores is not None:
                    tap_scores[row] = score
            self.store.family(SamplesSection).write(r, tap, positions, vectors, tap_scores)
        return UnitReport(unit.index, len(r), int(len(r) - rows.size), methods={"relevance": self.relevance})

    def close(self) -> None:
        self.pfvs.close()
        if self.model is not None:
            self.loader.close()
