"""Stage ``extract``: images -> PFVs of every tap, logits, predictions, skip records.

One unit is one shard of images. Images are decoded on a thread pool while earlier batches run
through the model, tap outputs are copied to the store dtype inside the forward hooks, and the
unit's arrays are written shard by shard at the end, while the next unit computes: a worker runs
two units at once, their compute serialised by a lock and their writes outside it.

The model runs in channels-last memory format: convolutions are faster on CPU and GPU, and a
channels-last (N, C, H, W) tap is already laid out as PFVs (N, H*W, C), so no transpose is copied.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gig_dist.models.loading import resolve_transform, weights_digest
from gig_dist.stages.base import (
    Footprint,
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.stages.forward import (
    UnitForward,
    forward_bytes,
    forward_why,
    resolve_device,
)
from gig_dist.store import SKIPPED, ArraySpec, Facts, ImageRange, MetaSection, RunStore
from gig_dist.store.meta import extraction_specs

if TYPE_CHECKING:
    from gig_dist.config import Config


class ExtractStage(Stage):
    name = "extract"
    config_section = "extract"
    family = MetaSection
    # What decides the PFVs: the model, the images and how they are read, the taps, the dtype.
    # (The batch size too: convolution results may differ in the last bits between batch sizes.)
    result_keys = ("model.", "dataset.kind", "dataset.path", "dataset.toy.", "dataset.stride", "dataset.limit",
                   "dataset.max_image_pixels", "transform.", "taps", "extract.")
    later_keys = {"model.kwargs": {}, "model.prefix_tokens": None, "transform.interpolation": None}

    @classmethod
    def key_values(cls, config: Config) -> dict[str, Any]:
        """Its config keys, and what they leave open that decides the PFVs all the same: the
        bytes of a local weights file (another checkpoint at the same path redoes the store) and
        a resize interpolation the model's source chose (other than bilinear, all gig-dist knew
        before)."""
        found = super().key_values(config)
        digest = weights_digest(config.model.weights)
        if digest is not None:
            found["model.weights_sha256"] = digest
        if "transform.interpolation" not in found:
            interpolation = resolve_transform(config).interpolation
            if interpolation != "bilinear":
                found["transform.interpolation"] = interpolation
        return found
    worker_concurrency = 2

    def whole_arrays(self, facts: Facts, sizes: Sizes, calibration: dict[str, Any] | None) -> list[ArraySpec]:
        """The image index, written with the store (its strings have no fixed size: not counted)."""
        from gig_dist.store.meta import index_specs

        return [spec for spec in index_specs(facts) if spec.dtype != "str"]

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return extraction_specs(facts, self.config.extract.dtype, pfvs=self.config.extract.pfvs == "store")

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        return Footprint(forward_bytes(self.config, facts), why=forward_why(self.config))

    def finish(self, store: RunStore) -> None:
        """Warn when the predictions collapse onto a few outputs (random weights, a wrong
        transform): every later result would then be about those outputs alone."""
        predicted, labelled = store.family(MetaSection).prediction_counts()
        said = prediction_collapse(predicted, labelled, store.facts.class_names)
        if said:
            warnings.warn(said, stacklevel=2)

    def open_worker(self, device: str) -> ExtractWorker:
        return ExtractWorker(self, resolve_device(device))


def prediction_collapse(predicted: np.ndarray, labelled: np.ndarray, names: list[str] | tuple[str, ...] = (),
                        share: float = 0.8, images: int = 16) -> str | None:
    """What to say when one output takes at least ``share`` of the predictions of at least
    ``images`` processed images while their labels (where they name outputs) spread over more
    classes than that; None when the predictions look like a working model's."""
    n = int(predicted.sum())
    if n < images or predicted.max() < share * n:
        return None
    top = int(predicted.argmax())
    if labelled.sum() and labelled.max() >= share * labelled.sum():
        return None  # the labels are as one-sided: nothing collapsed
    name = f" ({names[top]})" if top < len(names) else ""
    spread = (f", while their labels span {int((labelled > 0).sum())} classes" if labelled.sum() else "")
    return (f"predictions collapse: {int(predicted[top])} of {n} processed images are predicted as output {top}{name}"
            f"{spread}. Random weights (model.weights) or a wrong transform (transform.*)? Concepts, GIG and the "
            "class graphs would describe that one output.")


class ExtractWorker(StageWorker):
    def __init__(self, stage: ExtractStage, device: torch.device) -> None:
        config = stage.config
        self.store = stage.open_store()
        self.compute_lock = threading.Lock()
        # recompute: the forward pass for the logits only, no tap captured
        taps = list(self.store.taps) if config.extract.pfvs == "store" else []
        self.forward = UnitForward(config, self.store, device, taps)
        self.meta = self.store.family(MetaSection)

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        with self.compute_lock:
            pfv, logits, status, reasons, masks = self.forward.compute(r, progress)
        self.meta.write_extraction(r, pfvs=pfv, logits=logits, status=status, skip_reasons=reasons, part_masks=masks)
        return UnitReport(unit.index, len(r), int((status == SKIPPED).sum()))

    def close(self) -> None:
        self.forward.close()
