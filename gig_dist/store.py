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
    concepts/<tap>/vector (K, C) float32 concept vectors (unit-norm centroids; zero rows for
                              clusters of all-zero PFVs, flagged in concepts/<tap>/zero (K,) bool)
    concepts/<tap>/center (K, C) float32 centroids; size (K,) int64; inertia (K,) float64
    concepts/<tap>/member (N, S) int32 the concept of each sample of samples/<tap> (-1: empty slot)
    concepts/<tap>/tree/{parent,size,inertia,leaf,order} (2K-1,), children (2K-1, 2): the split
                              tree (node 0 the root; leaf = concept index or -1); attributes hold
                              the fit statistics
    codes/<tap>/index (N, H*W, L) int32 concept indices of each PFV's code, by decreasing value,
                              -1 in unused slots; codes/<tap>/value (N, H*W, L) float32 (0 unused);
                              sharded like pfv/<tap>
    codes/<tap>/unit_stats (U, 7) float64 per unit: PFVs, sum of l0, squared reconstruction error,
                              sum of squared PFV norms, PFVs cut to L slots, largest l0, most
                              distinct concepts used by one image;
                              codes/<tap>/unit_sum (U, C) float64 the PFVs' sum (for R^2)
    gig/<a>__<b>/...          GIG from tap a's concepts to tap b's (b = 'logits': to classes):
                              source (N, W) each image's active source concepts (-1 pad),
                              target (N, T) its targets (top code mass at b, or predicted and
                              true class), delta (N, T) S(F(X~)) - S(F(0)), partial (S, N, T, W)
                              the per-step-range sums over the image's sources, total and gap
                              (N, T) sum_k GIG and the completeness gap, edges/{source,value}
                              (N, T, E) the top sources per target, matrix (K_a, K_b or classes)
                              the dataset Gamma, count its images per column; attributes: pair,
                              completeness statistics
    graphs (classes,)         one JSON class graph per class (method.md section 6)
    progress/<stage> (U,)     uint8, 1 once work unit u of the stage is committed (the concepts
                              stage has one unit per tap, in manifest order; attribute and reduce
                              as their stages plan them)

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

FORMAT_VERSION = 2
MANIFEST_KEY = "gig_dist"

PENDING, PROCESSED, SKIPPED = 0, 1, 2

#: Columns of codes/<tap>/unit_stats.
CODE_STATS = ("pfvs", "l0_sum", "squared_error", "squared_norm", "truncated", "max_l0", "max_active")


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
        stages: Mapping[str, int],
        samples_per_image: int,
        sample_scores: bool,
        code_taps: list[str],
        code_width: int,
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
        units = len(unit_ranges(n, unit))
        for tap in code_taps:
            channels, height, width = tap_shapes[tap]
            for name, dtype, fill in (("index", "int32", -1), ("value", "float32", 0.0)):
                group.create_array(
                    f"codes/{tap}/{name}", shape=(n, height * width, code_width),
                    shards=(unit, height * width, code_width), chunks=(images_per_chunk, height * width, code_width),
                    dtype=dtype, fill_value=fill, compressors=compressors,
                    dimension_names=("image", "position", "slot"),
                )
            group.create_array(f"codes/{tap}/unit_stats", shape=(units, len(CODE_STATS)), chunks=(1, len(CODE_STATS)),
                               dtype="float64", fill_value=np.nan)
            group.create_array(f"codes/{tap}/unit_sum", shape=(units, channels), chunks=(1, channels),
                               dtype="float64", fill_value=np.nan)
        for stage, count in stages.items():
            group.create_array(f"progress/{stage}", shape=(count,), chunks=(1,), dtype="uint8", fill_value=0)
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
            stages=list(stages),
            code_taps=list(code_taps),
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

    def iter_samples(self, tap: str) -> Iterator[np.ndarray]:
        """The sampled PFVs of ``tap`` (float32), one unit at a time, without the empty slots of
        skipped images (slots whose position is -1)."""
        vectors, positions = self.group[f"samples/{tap}/vector"], self.group[f"samples/{tap}/position"]
        for r in self.units():
            block = vectors[r.start : r.stop]
            yield block[positions[r.start : r.stop] >= 0].astype(np.float32)

    # -- concepts ----------------------------------------------------------------------------

    def write_concepts(self, tap: str, *, vectors: np.ndarray, centers: np.ndarray, zero: np.ndarray,
                       size: np.ndarray, inertia: np.ndarray, tree: Mapping[str, np.ndarray],
                       labels: np.ndarray, stats: Mapping[str, Any]) -> None:
        """One tap's dictionary, split tree and the concept of each sample (in the order of
        :meth:`iter_samples`), written by that tap's unit only, replacing any."""
        positions = self.group[f"samples/{tap}/position"]
        member = np.full(positions.shape, -1, dtype=np.int32)
        filled = 0
        for r in self.units():
            valid = positions[r.start : r.stop] >= 0
            block = member[r.start : r.stop]
            block[valid] = labels[filled : filled + int(valid.sum())]
            filled += int(valid.sum())
        if filled != len(labels):
            raise ValueError(f"{len(labels)} sample labels for {filled} samples of tap {tap}")
        group = self.group.require_group("concepts")
        if tap in group:
            del group[tap]
        node = group.create_group(tap)
        for name, values in [("vector", vectors), ("center", centers), ("zero", zero), ("size", size),
                             ("inertia", inertia), ("member", member)] + [(f"tree/{k}", v) for k, v in tree.items()]:
            values = np.asarray(values)
            array = node.create_array(name, shape=values.shape, chunks=values.shape, dtype=values.dtype)
            array[...] = values
        node.attrs["fit"] = json.loads(json.dumps(dict(stats)))

    def has_concepts(self, tap: str) -> bool:
        return "concepts" in self.group and tap in self.group["concepts"] and "vector" in self.group[f"concepts/{tap}"]

    def read_concepts(self, tap: str) -> np.ndarray:
        """The concept vectors (K, C) of ``tap``."""
        if not self.has_concepts(tap):
            raise StoreError(f"{self.url} has no concepts for tap {tap!r}; run the concepts stage first")
        return self.group[f"concepts/{tap}/vector"][...]

    def concept_fit(self, tap: str) -> dict[str, Any]:
        return dict(self.group[f"concepts/{tap}"].attrs["fit"]) if self.has_concepts(tap) else {}

    # -- codes -------------------------------------------------------------------------------

    @property
    def code_taps(self) -> list[str]:
        return list(self.manifest.get("code_taps", []))

    @property
    def code_width(self) -> int:
        return int(self.group[f"codes/{self.code_taps[0]}/index"].shape[-1]) if self.code_taps else 0

    def write_codes(self, r: ImageRange, tap: str, index: np.ndarray, value: np.ndarray,
                    stats: np.ndarray, pfv_sum: np.ndarray) -> None:
        """One decomposition unit's codes of ``tap`` and its statistics; ``r`` must be one whole unit."""
        sl = self._unit_slice(r)
        unit = self.units().index(r)
        self.group[f"codes/{tap}/index"][sl] = index
        self.group[f"codes/{tap}/value"][sl] = value
        self.group[f"codes/{tap}/unit_sum"][unit] = pfv_sum
        self.group[f"codes/{tap}/unit_stats"][unit] = stats

    def read_codes(self, tap: str, r: ImageRange) -> tuple[np.ndarray, np.ndarray]:
        """Codes of images ``r``: indices and values, each (n, H*W, L)."""
        return self.group[f"codes/{tap}/index"][r.start : r.stop], self.group[f"codes/{tap}/value"][r.start : r.stop]

    def code_summary(self, tap: str) -> dict[str, Any]:
        """Per-tap decomposition figures over the units done so far: mean l0, l0 ratio, R^2."""
        stats = self.group[f"codes/{tap}/unit_stats"][...]
        sums = self.group[f"codes/{tap}/unit_sum"][...]
        done = ~np.isnan(stats).any(axis=1)
        totals = dict(zip(CODE_STATS, stats[done].sum(axis=0))) if done.any() else dict.fromkeys(CODE_STATS, 0.0)
        pfvs = totals["pfvs"]
        k = int(self.concept_fit(tap).get("k", 0))
        summary: dict[str, Any] = {"units_done": int(done.sum()), "pfvs": int(pfvs), "k": k}
        if pfvs:
            mean = sums[done].sum(axis=0) / pfvs
            total_variance = totals["squared_norm"] - pfvs * float(mean @ mean)
            summary.update(
                mean_l0=totals["l0_sum"] / pfvs,
                l0_ratio=totals["l0_sum"] / pfvs / k if k else None,
                r2=1 - totals["squared_error"] / total_variance if total_variance > 0 else None,
                max_l0=int(stats[done, CODE_STATS.index("max_l0")].max()),
                truncated=int(totals["truncated"]),
            )
        return summary

    # -- GIG attributions ----------------------------------------------------------------------

    @staticmethod
    def pair_key(source: str, target: str) -> str:
        return f"{source}__{target}"

    def create_gig_arrays(self, source: str, target: str, *, targets: int, target_chunk: int, width: int,
                          step_chunks: int, edges: int, matrix_shape: tuple[int, int]) -> None:
        """The arrays of one tap pair (idempotent: existing arrays of the same shapes are kept)."""
        key = self.pair_key(source, target)
        n, unit = self.num_images, int(self.manifest["images_per_unit"])
        zstd = ZstdCodec(level=1)
        specs = {
            "source": ((n, width), (unit, width), "int32", -1),
            "target": ((n, targets), (unit, target_chunk), "int32", -1),
            "delta": ((n, targets), (unit, target_chunk), "float64", np.nan),
            "partial": ((step_chunks, n, targets, width), (1, unit, target_chunk, width), "float64", 0.0),
            "total": ((n, targets), (unit, targets), "float64", np.nan),
            "gap": ((n, targets), (unit, targets), "float64", np.nan),
            "edges/source": ((n, targets, edges), (unit, targets, edges), "int32", -1),
            "edges/value": ((n, targets, edges), (unit, targets, edges), "float32", 0.0),
            "matrix": (matrix_shape, matrix_shape, "float64", 0.0),
            "count": ((matrix_shape[1],), (matrix_shape[1],), "int64", 0),
        }
        group = self.group.require_group("gig")
        if key in group and all(name in group[key] and group[key][name].shape == spec[0]
                                for name, spec in specs.items()):
            return
        if key in group:
            del group[key]
        node = group.create_group(key)
        for name, (shape, chunks, dtype, fill) in specs.items():
            node.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=zstd)
        node.attrs["pair"] = [source, target]

    def gig_array(self, source: str, target: str, name: str) -> zarr.Array:
        return self.group[f"gig/{self.pair_key(source, target)}/{name}"]

    def write_gig_unit(self, source: str, target: str, r: ImageRange, *, step_chunk: int, targets: tuple[int, int],
                       partial: np.ndarray, sources: np.ndarray | None, chosen: np.ndarray | None,
                       delta: np.ndarray | None) -> None:
        """One attribution unit: its chunk of partial sums (step range ``step_chunk``, images
        ``r``, target slots ``targets``); the unit of the first step range also writes the chosen
        targets and the completeness endpoints, and with the first target slots the sources."""
        sl = self._unit_slice(r)
        t = slice(*targets)
        self.gig_array(source, target, "partial")[step_chunk, sl, t] = partial
        if chosen is not None:
            self.gig_array(source, target, "target")[sl, t] = chosen
            self.gig_array(source, target, "delta")[sl, t] = delta
        if sources is not None:
            self.gig_array(source, target, "source")[sl] = sources

    def read_gig_unit(self, source: str, target: str, r: ImageRange) -> dict[str, np.ndarray]:
        """What the reduce step needs of images ``r``: partial sums (S, n, T, W), sources, targets, deltas."""
        return {name: (self.gig_array(source, target, name)[:, r.start : r.stop] if name == "partial"
                       else self.gig_array(source, target, name)[r.start : r.stop])
                for name in ("partial", "source", "target", "delta")}

    def write_gig_reduced(self, source: str, target: str, r: ImageRange, *, total: np.ndarray, gap: np.ndarray,
                          edge_source: np.ndarray, edge_value: np.ndarray) -> None:
        sl = self._unit_slice(r)
        self.gig_array(source, target, "total")[sl] = total
        self.gig_array(source, target, "gap")[sl] = gap
        self.gig_array(source, target, "edges/source")[sl] = edge_source
        self.gig_array(source, target, "edges/value")[sl] = edge_value

    def write_gig_matrix(self, source: str, target: str, matrix: np.ndarray, count: np.ndarray,
                         stats: Mapping[str, Any]) -> None:
        self.gig_array(source, target, "matrix")[...] = matrix
        self.gig_array(source, target, "count")[...] = count
        self.group[f"gig/{self.pair_key(source, target)}"].attrs["completeness"] = json.loads(json.dumps(dict(stats)))

    def gig_summary(self) -> dict[str, dict[str, Any]]:
        """Per reduced pair: the matrix shape and the completeness statistics."""
        found = {}
        if "gig" not in self.group:
            return found
        for key, node in self.group["gig"].groups():
            if "completeness" in node.attrs:
                found[key] = {"pair": list(node.attrs["pair"]), "matrix": list(node["matrix"].shape),
                              **dict(node.attrs["completeness"])}
        return found

    def read_gig_matrix(self, source: str, target: str) -> np.ndarray:
        key = self.pair_key(source, target)
        if "gig" not in self.group or key not in self.group["gig"] or "completeness" not in self.group[f"gig/{key}"].attrs:
            raise StoreError(f"{self.url} has no reduced GIG matrix for {source} -> {target}")
        return self.gig_array(source, target, "matrix")[...]

    def write_graphs(self, graphs: list[str]) -> None:
        """The class graphs, one JSON document per class."""
        if "graphs" in self.group:
            del self.group["graphs"]
        array = self.group.create_array("graphs", shape=(len(graphs),), chunks=(max(len(graphs), 1),), dtype=str)
        array[...] = np.asarray(graphs, dtype=str)

    def read_graph(self, class_index: int) -> dict[str, Any]:
        if "graphs" not in self.group:
            raise StoreError(f"{self.url} has no class graphs yet; run the pipeline to the end")
        graphs = self.group["graphs"]
        if not 0 <= class_index < graphs.shape[0]:
            raise StoreError(f"class {class_index} out of range: the model has {graphs.shape[0]} classes")
        return json.loads(str(graphs[class_index]))

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
