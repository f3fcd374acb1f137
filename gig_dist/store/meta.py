"""Section ``meta`` and ``pfv``: the image index, what extraction wrote of every image, and PFVs.

    meta/path        (image,)            image path (``toy://seed/index/size`` for the toy world); a
                                         name that is not UTF-8 as ``fsbytes:`` and its bytes
                                         percent-encoded
    meta/label       (image,)            int64 label as a model output, -1 when unknown or not one
    meta/group       (image,)            int64 the dataset's own class (an index into the facts'
                                         ``dataset_classes``), -1 when unlabelled; stores made
                                         before it get it when a run resumes them
    meta/status      (image,)            uint8: 0 pending, 1 processed, 2 skipped
    meta/skip_reason (image,)            why an image was skipped ('' otherwise)
    meta/logits      (image, output)     float32 model outputs (NaN for skipped images)
    meta/prediction  (image,)            int64 argmax of the logits (-1 for skipped images)
    meta/part_mask   (image, mask_y, mask_x)  uint8 ground-truth part ids (toy world only)
    pfv/<tap>/value  (image, position, channel)  PFVs, float16 by default; positions row-major in
                                         (h, w); sharded by unit, chunked for reading (a store made
                                         before has ``pfv/<tap>`` (image, position_<tap>,
                                         channel_<tap>): ``facts.pfv_groups`` says which)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes

import numpy as np

from gig_dist.data.files import shown
from gig_dist.store.types import (
    PENDING,
    PROCESSED,
    SKIPPED,
    ArraySpec,
    Facts,
    ImageRange,
    per_image_spec,
)

if TYPE_CHECKING:
    from gig_dist.store.core import RunStore

#: Prefix of a stored path whose name is not UTF-8 (Zarr stores text as UTF-8).
FSBYTES = "fsbytes:"


def stored_path(path: str) -> str:
    """``path`` as the store keeps it: itself, or, when its bytes are not UTF-8 (a file name
    Python holds with lone surrogates), ``fsbytes:`` and the bytes percent-encoded."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return FSBYTES + quote(os.fsencode(path), safe="/")


def loaded_path(stored: str) -> str:
    """The path a stored one names, as the OS takes it (inverse of :func:`stored_path`)."""
    return os.fsdecode(unquote_to_bytes(stored[len(FSBYTES):])) if stored.startswith(FSBYTES) else stored


def pfv_path(facts: Facts, tap: str) -> str:
    """Where a tap's PFVs are: ``pfv/<tap>/value``, or in a store made before, ``pfv/<tap>``."""
    return f"pfv/{tap}/value" if facts.pfv_groups else f"pfv/{tap}"


def index_specs(facts: Facts) -> list[ArraySpec]:
    """The index, written when the store is created."""
    return [per_image_spec(facts, "meta/path", (), "str", "", ()),
            per_image_spec(facts, "meta/label", (), "int64", -1, ()),
            per_image_spec(facts, "meta/group", (), "int64", -1, ())]


def extraction_specs(facts: Facts, pfv_dtype: str, pfvs: bool = True) -> list[ArraySpec]:
    """Everything the extract stage writes (without the PFVs when they are recomputed)."""
    specs = [
        per_image_spec(facts, "meta/status", (), "uint8", PENDING, ()),
        per_image_spec(facts, "meta/skip_reason", (), "str", "", ()),
        per_image_spec(facts, "meta/logits", (facts.num_outputs,), "float32", np.nan, ("output",)),
        per_image_spec(facts, "meta/prediction", (), "int64", -1, ()),
    ]
    if facts.part_masks:
        size = facts.input_size
        specs.append(per_image_spec(facts, "meta/part_mask", (size, size), "uint8", 0, ("mask_y", "mask_x")))
    for tap, (channels, height, width) in facts.taps.items() if pfvs else ():
        positions = height * width
        dims = ("image", "position", "channel") if facts.pfv_groups else ("image", f"position_{tap}", f"channel_{tap}")
        specs.append(ArraySpec(
            pfv_path(facts, tap), (facts.num_images, positions, channels), pfv_dtype,
            dims, (facts.images_per_chunk, positions, channels),
            shards=(facts.images_per_unit, positions, channels), fill_value=np.nan, zstd_level=facts.zstd_level))
    return specs


class MetaSection:

    @staticmethod
    def is_pfv_path(path: str) -> bool:
        """Whether an array path is a tap's PFVs."""
        return path.startswith("pfv/")
    def __init__(self, store: RunStore) -> None:
        self.store = store

    # -- the index -----------------------------------------------------------------------------

    def write_index(self, paths: list[str], labels: np.ndarray, groups: np.ndarray) -> None:
        for r in self.store.units():  # one unit at a time: each write covers whole chunks only
            self.store.array("meta/path")[r.start : r.stop] = np.asarray(
                [stored_path(p) for p in paths[r.start : r.stop]], dtype=str)
            self.store.array("meta/label")[r.start : r.stop] = labels[r.start : r.stop]
        self.write_groups(groups)

    def write_groups(self, groups: np.ndarray) -> None:
        """The dataset's own class of every image (a store made before ``meta/group`` gets it
        when a run resumes it: the driver passes the dataset's index)."""
        for r in self.store.units():
            self.store.array("meta/group")[r.start : r.stop] = groups[r.start : r.stop]

    def has_groups(self) -> bool:
        return self.store.has("meta/group")

    def read_groups(self, r: ImageRange) -> np.ndarray:
        """The dataset's own class of images ``r`` (an index into ``facts.dataset_classes``; -1:
        unlabelled)."""
        return self.store.array("meta/group")[r.start : r.stop]

    def graph_classes(self, r: ImageRange, by: str) -> np.ndarray:
        """The class each image of ``r`` counts for in the class graphs (``gig.graph_classes``):
        ``model``, :meth:`image_classes`; ``dataset``, its dataset class (-1: none)."""
        return self.read_groups(r) if by == "dataset" else self.image_classes(r)

    def read_index(self, r: ImageRange) -> tuple[list[str], np.ndarray]:
        paths = [loaded_path(str(p)) for p in self.store.array("meta/path")[r.start : r.stop]]
        return paths, self.store.array("meta/label")[r.start : r.stop]

    def path(self, image: int) -> str:
        return loaded_path(str(self.store.array("meta/path")[image]))

    # -- extraction ------------------------------------------------------------------------------

    def write_extraction(self, r: ImageRange, *, pfvs: Mapping[str, np.ndarray], logits: np.ndarray,
                         status: np.ndarray, skip_reasons: list[str], part_masks: np.ndarray | None) -> None:
        """All outputs of one extraction unit. ``r`` must be one whole unit (one shard)."""
        sl = self.store.unit_slice(r)
        for tap, values in pfvs.items():
            # PFV chunks are never all fill value; skipping Zarr's per-chunk check makes writes ~1.4x faster.
            self.store.array(pfv_path(self.store.facts, tap)).with_config({"write_empty_chunks": True})[sl] = values
        self.store.array("meta/logits")[sl] = logits
        prediction = np.where(status == PROCESSED, np.nan_to_num(logits, nan=-np.inf).argmax(axis=1), -1)
        self.store.array("meta/prediction")[sl] = prediction
        # A reason may quote a file name that is not UTF-8: kept readable, never a failed write.
        self.store.array("meta/skip_reason")[sl] = np.asarray([shown(reason) for reason in skip_reasons], dtype=str)
        if part_masks is not None and self.store.has("meta/part_mask"):
            self.store.array("meta/part_mask")[sl] = part_masks
        self.store.array("meta/status")[sl] = status

    def read_status(self, r: ImageRange) -> tuple[np.ndarray, np.ndarray]:
        """Status and prediction of images ``r``."""
        return self.store.array("meta/status")[r.start : r.stop], self.store.array("meta/prediction")[r.start : r.stop]

    def read_logits(self, r: ImageRange) -> np.ndarray:
        return self.store.array("meta/logits")[r.start : r.stop]

    def read_part_masks(self, r: ImageRange, images: list[int] | None = None) -> np.ndarray:
        """Ground-truth part masks (toy world) of images ``r``, or of the listed ``images``."""
        array = self.store.array("meta/part_mask")
        if images is not None:
            return np.stack([array[i] for i in images])
        return array[r.start : r.stop]

    def read_pfvs(self, tap: str, r: ImageRange) -> np.ndarray:
        """PFVs (images, positions, channels) of ``tap`` for images ``r``."""
        return self.store.array(pfv_path(self.store.facts, tap))[r.start : r.stop]

    # -- iERFs of requested PFVs ---------------------------------------------------------------------

    def has_status(self) -> bool:
        """Whether the run has its image index and statuses yet."""
        return self.store.has("meta/status")

    def has_pfvs(self, tap: str) -> bool:
        """Whether the run stored the PFVs of ``tap`` (not with ``extract.pfvs: recompute``)."""
        return self.store.has(pfv_path(self.store.facts, tap))

    # -- summaries ---------------------------------------------------------------------------------

    def iter_status(self) -> Iterator[tuple[ImageRange, np.ndarray]]:
        """The status one unit at a time (never the whole dataset at once)."""
        if not self.store.has("meta/status"):
            return
        array = self.store.array("meta/status")
        for r in self.store.units():
            yield r, array[r.start : r.stop]

    def image_counts(self) -> dict[str, int]:
        counts = np.zeros(3, dtype=np.int64)
        for _, block in self.iter_status():
            counts += np.bincount(block, minlength=3)[:3]
        if not self.store.has("meta/status"):
            counts[PENDING] = self.store.num_images
        return {"total": self.store.num_images, "processed": int(counts[PROCESSED]),
                "skipped": int(counts[SKIPPED]), "pending": int(counts[PENDING])}

    def image_classes(self, r: ImageRange) -> np.ndarray:
        """The class each image of ``r`` counts for: its label where labels index the model's
        outputs, else its prediction (-1: neither, e.g. skipped or not yet extracted)."""
        _, labels = self.read_index(r)
        if self.store.has("meta/prediction"):
            labels = np.where(labels >= 0, labels, self.store.array("meta/prediction")[r.start : r.stop])
        return labels

    def prediction_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Processed images per predicted output, and per dataset label (labels that index no
        output, or none, left out), one unit at a time."""
        outputs = self.store.facts.num_outputs
        predicted, labelled = np.zeros(outputs, dtype=np.int64), np.zeros(outputs, dtype=np.int64)
        for r, status in self.iter_status():
            _, prediction = self.read_status(r)
            _, labels = self.read_index(r)
            done = status == PROCESSED
            predicted += np.bincount(prediction[done & (prediction >= 0)], minlength=outputs)[:outputs]
            labels = np.asarray(labels, dtype=np.int64)
            known = done & (labels >= 0) & (labels < outputs)
            labelled += np.bincount(labels[known], minlength=outputs)[:outputs]
        return predicted, labelled

    def class_counts(self, limit: int | None = None) -> np.ndarray:
        """Processed images per class among the first ``limit`` images (all: ``None``), one unit
        at a time; see :meth:`image_classes`."""
        counts = np.zeros(self.store.facts.num_outputs, dtype=np.int64)
        for r, status in self.iter_status():
            if limit is not None and r.start >= limit:
                break
            classes = self.image_classes(r)[: (limit - r.start) if limit is not None else None]
            used = (status[: len(classes)] == PROCESSED) & (classes >= 0)
            counts += np.bincount(classes[used], minlength=len(counts))[: len(counts)]
        return counts

    def skipped_images(self, limit: int | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for r, status in self.iter_status():
            rows = np.flatnonzero(status == SKIPPED)
            if rows.size == 0:
                continue
            paths, _ = self.read_index(r)
            reasons = self.store.array("meta/skip_reason")[r.start : r.stop]
            for row in rows:
                found.append({"index": r.start + int(row), "path": shown(paths[row]), "reason": str(reasons[row])})
                if limit is not None and len(found) >= limit:
                    return found
        return found
