"""The run store: the only module that knows the on-disk (Zarr v3) layout.

One Zarr v3 group per run, readable with plain ``zarr`` by someone who never installed gig-dist::

    zarr.json                 root attributes["gig_dist"]: the manifest (format, config, versions,
                              taps and their shapes, dataset fingerprint, stages and unit counts)
    meta/path        (N,)     image path (``toy://seed/index/size`` for the toy world)
    meta/label       (N,)     int64 label, -1 when unknown
    meta/status      (N,)     uint8: 0 pending, 1 processed, 2 skipped
    meta/skip_reason (N,)     why an image was skipped ('' otherwise)
    meta/logits      (N, K)   float32 model outputs (NaN for skipped images)
    meta/prediction  (N,)     int64 argmax of the logits (-1 for skipped images)
    meta/part_mask   (N, S, S) uint8 ground-truth part ids (toy world only)
    pfv/<tap>        (N, H*W, C) PFVs, float16 by default, zstd; positions row-major in (h, w)
    samples/<tap>/position (N, S)    int32 sampled PFV positions per image (-1: skipped image)
    samples/<tap>/vector   (N, S, C) the sampled PFVs, in the PFV dtype
    relevance/<tap>  (N, H*W) float32 score the samples were drawn from (SRD relevance of the
                              predicted class, or grad x act); absent for uniform sampling
    ierf/<name>/map  (M, H, W) float32 iERFs of requested PFVs; ierf/<name>/request (M, 3) holds
                              (image, tap index, position), ierf/<name>/kind 'srd' or 'gradient'
    progress/<stage> (U,)     uint8, 1 once work unit u of the stage is committed

Writing rules that make concurrent, resumable work safe:

* Every array is split along the image axis at ``images_per_unit``: a shard (PFVs) or a chunk
  (everything else) holds exactly one work unit's images. A unit is the only writer of its
  shards, so no two processes ever write one shard (Zarr v3 loses data when they do).
* ``progress/<stage>`` has one chunk per unit, written only after all of the unit's data; a unit
  whose marker is missing is simply run again, and reruns write identical bytes.
* The manifest is written last when a store is created: a store without it was interrupted during
  creation and holds no results.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import ZstdCodec

FORMAT_VERSION = 1
MANIFEST_KEY = "gig_dist"

PENDING, PROCESSED, SKIPPED = 0, 1, 2


class StoreError(RuntimeError):
    """A store that is missing, not gig-dist's, half-created, or from another run."""


@dataclass(frozen=True)
class ImageRange:
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def unit_ranges(num_images: int, images_per_unit: int) -> list[ImageRange]:
    """The image ranges of the work units: one per shard along the image axis."""
    return [ImageRange(s, min(s + images_per_unit, num_images)) for s in range(0, num_images, images_per_unit)]


class RunStore:
    """A handle on one run's Zarr group. Cheap to open; open one per process."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        self.group = group
        self.url = url
        self.manifest: dict[str, Any] = dict(group.attrs[MANIFEST_KEY])

    # -- creating and opening --------------------------------------------------------------

    @staticmethod
    def exists(url: str) -> bool:
        try:
            zarr.open_group(url, mode="r")
            return True
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return False
        except zarr.errors.ContainsArrayError:
            return True

    @classmethod
    def create(
        cls,
        url: str,
        *,
        manifest: Mapping[str, Any],
        paths: list[str],
        labels: np.ndarray,
        tap_shapes: Mapping[str, tuple[int, int, int]],
        num_outputs: int,
        images_per_unit: int,
        images_per_chunk: int,
        pfv_dtype: str,
        zstd_level: int,
        part_mask_size: int | None,
        stages: list[str],
        samples_per_image: int,
        sample_scores: bool,
    ) -> RunStore:
        """Create an empty store (overwriting whatever is at ``url``) and write the dataset index."""
        n = len(paths)
        group = zarr.open_group(url, mode="w")
        compressors = ZstdCodec(level=zstd_level)
        # Shards keep their configured size even past the end of a small dataset: Zarr allows a
        # partial last shard, and the inner chunks must always divide the shard.
        unit = images_per_unit

        def per_image(name: str, tail: tuple[int, ...], dtype: Any, fill: Any, **extra: Any) -> zarr.Array:
            return group.create_array(
                name, shape=(n, *tail), chunks=(unit, *tail), dtype=dtype, fill_value=fill,
                compressors=compressors, **extra,
            )

        per_image("meta/path", (), str, "")
        per_image("meta/label", (), "int64", -1)
        per_image("meta/status", (), "uint8", PENDING)
        per_image("meta/skip_reason", (), str, "")
        per_image("meta/logits", (num_outputs,), "float32", np.nan)
        per_image("meta/prediction", (), "int64", -1)
        if part_mask_size is not None:
            per_image("meta/part_mask", (part_mask_size, part_mask_size), "uint8", 0)
        for tap, (channels, height, width) in tap_shapes.items():
            positions = height * width
            group.create_array(
                f"pfv/{tap}",
                shape=(n, positions, channels),
                shards=(unit, positions, channels),
                chunks=(images_per_chunk, positions, channels),
                dtype=pfv_dtype,
                fill_value=np.nan,
                compressors=compressors,
                dimension_names=("image", "position", "channel"),
            )
        for tap, (channels, height, width) in tap_shapes.items():
            per_image(f"samples/{tap}/position", (samples_per_image,), "int32", -1)
            per_image(f"samples/{tap}/vector", (samples_per_image, channels), pfv_dtype, np.nan)
            if sample_scores:
                per_image(f"relevance/{tap}", (height * width,), "float32", np.nan)
        for stage in stages:
            group.create_array(f"progress/{stage}", shape=(len(unit_ranges(n, unit)),), chunks=(1,), dtype="uint8", fill_value=0)
        # The index, written one unit at a time: each write covers whole chunks only.
        for r in unit_ranges(n, unit):
            group["meta/path"][r.start : r.stop] = np.asarray(paths[r.start : r.stop], dtype=str)
            group["meta/label"][r.start : r.stop] = labels[r.start : r.stop]
        full = dict(manifest)
        full.update(
            format_version=FORMAT_VERSION,
            num_images=n,
            images_per_unit=unit,
            taps={tap: list(shape) for tap, shape in tap_shapes.items()},
            num_outputs=num_outputs,
            stages=stages,
        )
        group.attrs[MANIFEST_KEY] = json.loads(json.dumps(full))  # the commit point of creation
        return cls(group, url)

    @classmethod
    def open(cls, url: str, mode: str = "r") -> RunStore:
        try:
            group = zarr.open_group(url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreError(f"no run store at {url}") from None
        except (zarr.errors.NodeTypeValidationError, zarr.errors.ContainsArrayError):
            raise StoreError(f"{url} is a Zarr array, not a gig-dist run store") from None
        if MANIFEST_KEY not in group.attrs:
            raise StoreError(
                f"{url} is not a complete gig-dist run store (no manifest): either another tool's "
                "Zarr group, or a run interrupted while creating it; rerun with --overwrite to start afresh"
            )
        version = group.attrs[MANIFEST_KEY].get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{url} has store format {version}; this gig-dist reads format {FORMAT_VERSION}")
        return cls(group, url)

    # -- layout facts ------------------------------------------------------------------------

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def taps(self) -> dict[str, tuple[int, int, int]]:
        return {tap: tuple(shape) for tap, shape in self.manifest["taps"].items()}

    def units(self) -> list[ImageRange]:
        return unit_ranges(self.num_images, int(self.manifest["images_per_unit"]))

    def shard_ranges(self, path: str) -> list[ImageRange]:
        """Image ranges of the shards (or chunks, when unsharded) of array ``path`` along axis 0."""
        array = self.group[path]
        step = (array.shards or array.chunks)[0]
        return unit_ranges(array.shape[0], step)

    # -- work-unit progress ------------------------------------------------------------------

    def is_unit_done(self, stage: str, unit: int) -> bool:
        return bool(self.group[f"progress/{stage}"][unit])

    def done_units(self, stage: str) -> np.ndarray:
        return self.group[f"progress/{stage}"][:].astype(bool)

    def mark_unit_done(self, stage: str, unit: int) -> None:
        self.group[f"progress/{stage}"][unit] = 1

    def stage_complete(self, stage: str) -> bool:
        return bool(self.done_units(stage).all())

    # -- extraction ------------------------------------------------------------------------

    def read_index(self, r: ImageRange) -> tuple[list[str], np.ndarray]:
        paths = [str(p) for p in self.group["meta/path"][r.start : r.stop]]
        return paths, self.group["meta/label"][r.start : r.stop]

    def write_extraction(
        self,
        r: ImageRange,
        *,
        pfvs: Mapping[str, np.ndarray],
        logits: np.ndarray,
        status: np.ndarray,
        skip_reasons: list[str],
        part_masks: np.ndarray | None,
    ) -> None:
        """All outputs of one extraction unit. ``r`` must be one whole unit (one shard)."""
        sl = self._unit_slice(r)
        for tap, values in pfvs.items():
            # PFV chunks are never all fill value; skipping Zarr's per-chunk check makes writes ~1.4x faster.
            self.group[f"pfv/{tap}"].with_config({"write_empty_chunks": True})[sl] = values
        self.group["meta/logits"][sl] = logits
        prediction = np.where(status == PROCESSED, np.nan_to_num(logits, nan=-np.inf).argmax(axis=1), -1)
        self.group["meta/prediction"][sl] = prediction
        self.group["meta/skip_reason"][sl] = np.asarray(skip_reasons, dtype=str)
        if part_masks is not None and "meta/part_mask" in self.group:
            self.group["meta/part_mask"][sl] = part_masks
        self.group["meta/status"][sl] = status

    def _unit_slice(self, r: ImageRange) -> slice:
        """The slice of one whole unit: writes of anything else could share a shard with another unit."""
        if r not in self.units():
            raise ValueError(f"{r} is not a work unit of this store; units are shard-aligned")
        return slice(r.start, r.stop)

    def read_status(self, r: ImageRange) -> tuple[np.ndarray, np.ndarray]:
        """Status and prediction of images ``r``."""
        return self.group["meta/status"][r.start : r.stop], self.group["meta/prediction"][r.start : r.stop]

    def write_samples(self, r: ImageRange, tap: str, positions: np.ndarray, vectors: np.ndarray,
                      scores: np.ndarray | None) -> None:
        """One sampling unit's draws for ``tap``; ``r`` must be one whole unit."""
        sl = self._unit_slice(r)
        if scores is not None:
            self.group[f"relevance/{tap}"][sl] = scores
        self.group[f"samples/{tap}/vector"][sl] = vectors
        self.group[f"samples/{tap}/position"][sl] = positions

    def write_ierfs(self, name: str, requests: np.ndarray, maps: np.ndarray, kinds: list[str],
                    block: int = 256) -> None:
        """iERFs of requested PFVs (few: the ones a report shows), replacing any of that name."""
        m, h, w = maps.shape
        group = self.group.require_group("ierf")
        if name in group:
            del group[name]
        made = {
            "map": group.create_array(f"{name}/map", shape=(m, h, w), chunks=(block, h, w), dtype="float32"),
            "request": group.create_array(f"{name}/request", shape=(m, 3), chunks=(block, 3), dtype="int64"),
            "kind": group.create_array(f"{name}/kind", shape=(m,), chunks=(block,), dtype=str),
        }
        made["map"][...] = maps
        made["request"][...] = requests
        made["kind"][...] = np.asarray(kinds, dtype=str)
        group[name].attrs["taps"] = list(self.taps)

    def read_pfvs(self, tap: str, r: ImageRange) -> np.ndarray:
        """PFVs (images, positions, channels) of ``tap`` for images ``r``."""
        return self.group[f"pfv/{tap}"][r.start : r.stop]

    # -- summaries -------------------------------------------------------------------------

    def iter_blocks(self, path: str) -> Iterator[tuple[ImageRange, np.ndarray]]:
        """Read a per-image array one unit at a time (never the whole dataset at once)."""
        array = self.group[path]
        for r in self.units():
            yield r, array[r.start : r.stop]

    def image_counts(self) -> dict[str, int]:
        counts = np.zeros(3, dtype=np.int64)
        for _, block in self.iter_blocks("meta/status"):
            counts += np.bincount(block, minlength=3)[:3]
        return {
            "total": self.num_images,
            "processed": int(counts[PROCESSED]),
            "skipped": int(counts[SKIPPED]),
            "pending": int(counts[PENDING]),
        }

    def skipped_images(self, limit: int | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for r, status in self.iter_blocks("meta/status"):
            rows = np.flatnonzero(status == SKIPPED)
            if rows.size == 0:
                continue
            paths, _ = self.read_index(r)
            reasons = self.group["meta/skip_reason"][r.start : r.stop]
            for row in rows:
                found.append({"index": r.start + int(row), "path": paths[row], "reason": str(reasons[row])})
                if limit is not None and len(found) >= limit:
                    return found
        return found

    def describe_arrays(self) -> dict[str, dict[str, Any]]:
        described = {}
        for path, node in sorted(self.group.members(max_depth=None)):
            if isinstance(node, zarr.Array):
                described[path] = {
                    "shape": list(node.shape),
                    "dtype": str(node.dtype),
                    "chunks": list(node.chunks),
                    "shards": list(node.shards) if node.shards else None,
                    "compressors": [type(c).__name__ for c in node.compressors],
                    "stored_bytes": node.nbytes_stored(),
                }
        return described
