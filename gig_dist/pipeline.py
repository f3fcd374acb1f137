"""The pipeline: check everything a run needs, create or resume its store, run the stages.

Every check that can fail (config values, model name and weights, taps, dataset path, the
store at ``out``) runs in :func:`prepare` before any unit of work starts.
"""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from gig_dist.config import Config, ConfigError
from gig_dist.data.sources import build_index
from gig_dist.kernels.taps import probe_model, resolve_taps
from gig_dist.models.loading import build_model, resolve_transform
from gig_dist.runtime.local import LocalRuntime, StageReport
from gig_dist.stages import STAGES, AttributeStage, ConceptsStage
from gig_dist.stages.attribute import check_pairs, gig_pairs
from gig_dist.stages.concepts import concept_count
from gig_dist.stages.decompose import decompose_taps
from gig_dist.store import RunStore, StoreError, unit_ranges

#: Config keys (and key prefixes) that may change between a run and its resumption: they decide
#: how and where work is executed, never what the results are. A store may be moved and resumed.
EXECUTION_ONLY = ("runtime.", "store.path")


def store_url(out: str | os.PathLike[str]) -> str:
    """A local path (or ``file://`` URL) becomes an absolute path, since workers may run in other
    directories; other fsspec URLs (``s3://``, ``gs://``, ``memory://``) pass through."""
    text = os.fspath(out).removeprefix("file://")
    return text if "://" in text else str(Path(text).expanduser().resolve())


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("gig-dist", "torch", "torchvision", "zarr", "numpy", "ray", "faiss-cpu", "scikit-learn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _result_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _flatten(config).items() if not k.startswith(EXECUTION_ONLY)}


def _guard_foreign_directory(url: str) -> None:
    """Never overwrite a directory that is not a Zarr group: it may hold the user's files."""
    if "://" in url:
        return
    path = Path(url)
    if path.is_file():
        raise StoreError(f"--out {url} is a file, not a run store")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").exists():
        raise StoreError(f"--out {url} is a non-empty directory that is not a run store; refusing to write into it")


def stages_until(until: str | None) -> tuple[type, ...]:
    """The stages to run: all, or the first ones up to and including ``until``."""
    names = [stage.name for stage in STAGES]
    if until is None:
        return STAGES
    if until not in names:
        raise ConfigError(f"unknown stage {until!r}; the stages are {', '.join(names)}")
    return STAGES[: names.index(until) + 1]


def prepare(config: Config, out: str | os.PathLike[str] | None = None, overwrite: bool = False,
            until: str | None = None) -> RunStore:
    """Validate the run against the model and the data, then create its store (at ``out``, else
    ``store.path``) or reopen it to resume. With ``until``, only what the stages up to it need
    is checked (a later run that goes further checks the rest then)."""
    model = build_model(config.model)
    taps = resolve_taps(model, config.taps)
    if config.sample.method == "srd":
        _check_srd(model, taps)
    transform = resolve_transform(config)
    index = build_index(config.dataset)
    shapes, num_outputs = probe_model(model, taps, (transform.crop, transform.crop))
    channels = {tap: s.channels for tap, s in shapes.items()}
    if ConceptsStage in stages_until(until):
        _check_concepts(config, channels, len(index.paths))
    order = list(shapes)  # forward order
    pairs = gig_pairs(config, order)
    if AttributeStage in stages_until(until):
        check_pairs(config, pairs, order, channels, decompose_taps(config, taps))
    config_dict = config.to_dict()
    tap_shapes = {tap: (s.channels, s.height, s.width) for tap, s in shapes.items()}
    url = store_url(out if out is not None else config.store.path)
    _guard_foreign_directory(url)

    if RunStore.exists(url) and not overwrite:
        try:
            store = RunStore.open(url, mode="r+")
        except StoreError as exc:
            if "no manifest" not in str(exc):
                raise
            # Interrupted while being created: no unit can have run, so nothing is lost by redoing it.
        else:
            _check_resumable(store, config_dict, index.fingerprint(), url)
            return store

    return RunStore.create(
        url,
        manifest={
            "config": config_dict,
            "versions": versions(),
            "dataset_fingerprint": index.fingerprint(),
            "class_names": index.class_names,
            "transform": vars(transform),
            "gig_pairs": [list(pair) for pair in pairs],
            "tap_order": order,
        },
        paths=index.paths,
        labels=index.labels,
        tap_shapes=tap_shapes,
        num_outputs=num_outputs,
        images_per_unit=config.store.images_per_unit,
        images_per_chunk=config.store.images_per_chunk,
        pfv_dtype=config.extract.dtype,
        zstd_level=config.store.zstd_level,
        part_mask_size=transform.crop if config.dataset.kind == "toy" else None,
        stages={stage.name: stage.progress_size(config, len(unit_ranges(len(index.paths), config.store.images_per_unit)),
                                                {tap: tap_shapes[tap] for tap in order}) for stage in STAGES},
        samples_per_image=config.sample.per_image,
        sample_scores=config.sample.method != "uniform",
        code_taps=decompose_taps(config, taps),
        code_width=config.decompose.max_nonzero,
    )


def _check_concepts(config: Config, channels: dict[str, int], num_images: int) -> None:
    """Concept and decomposition settings against the taps and the dataset, before any work."""
    taps = list(channels)
    for key, named in (("concepts.k", config.concepts.k), ("decompose.taps", config.decompose.taps or []),
                       ("decompose.lambda_rel", config.decompose.lambda_rel
                        if isinstance(config.decompose.lambda_rel, dict) else {})):
        unknown = [tap for tap in named if tap not in channels]
        if unknown:
            raise ConfigError(f"{key} names taps that are not in this run: {unknown}; the run's taps are {taps}")
    samples = num_images * config.sample.per_image
    for tap, c in channels.items():
        k = concept_count(config, tap, c)
        if k > samples:
            raise ConfigError(
                f"tap {tap}: K = {k} concepts but the run draws at most {samples} samples "
                f"({num_images} images x sample.per_image = {config.sample.per_image}); raise sample.per_image "
                "or lower concepts.k_multiplier (or set concepts.k for this tap)"
            )
        if samples / k < 10:
            warnings.warn(
                f"tap {tap}: K = {k} concepts from at most {samples} samples leaves {samples / k:.1f} "
                "members per concept on average; below about 10, concepts are single PFVs rather than "
                "clusters (raise sample.per_image or lower concepts.k_multiplier)",
                stacklevel=2,
            )


def _check_srd(model, taps: list[str]) -> None:
    from gig_dist.kernels.srd import SRD, SRDUnsupported

    try:
        srd = SRD(model)
        for tap in taps:
            srd.check_tap(tap)
    except SRDUnsupported as exc:
        raise ConfigError(
            f"sample.method = 'srd' cannot run: {exc}. Use sample.method=grad_x_act (any model) or uniform"
        ) from None


def _check_resumable(store: RunStore, config: dict[str, Any], fingerprint: str, url: str) -> None:
    before = _result_config(store.manifest["config"])
    now = _result_config(config)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ConfigError(
            f"{url} holds a run with another config ({details}). Resume it with the same config, "
            "write to another --out, or pass --overwrite to discard it"
        )
    if store.manifest["dataset_fingerprint"] != fingerprint:
        raise ConfigError(
            f"the dataset changed since {url} was created (its list of images and labels differs); "
            "write to another --out, or pass --overwrite to discard the old run"
        )


@dataclass(frozen=True)
class PipelineReport:
    url: str
    stages: list[StageReport]


def make_runtime(config: Config):
    if config.runtime.kind == "local":
        return LocalRuntime(config.runtime.device, config.runtime.progress, config.runtime.torch_threads)
    from gig_dist.runtime.ray_runtime import RayRuntime  # Ray is imported only when asked for

    return RayRuntime(config.runtime)


def run(config: Config, out: str | os.PathLike[str] | None = None, overwrite: bool = False,
        until: str | None = None) -> PipelineReport:
    """Run every stage of the pipeline (or those up to ``until``) into the store at ``out``,
    resuming what is already done."""
    store = prepare(config, out, overwrite, until)
    runtime = make_runtime(config)
    reports = [runtime.run(stage_type(config, store.url)) for stage_type in stages_until(until)]
    return PipelineReport(store.url, reports)
