"""The run configuration: one schema, validated before any work starts.

A config is YAML (or JSON). Every key has a default, so an empty config is the embedded toy-world
run. ``-o key=value`` overrides on the command line address nested keys with dots
(``-o dataset.limit=100``); values are parsed as YAML, so ``-o taps=[layer1.0,layer2.1]`` works.

Errors name the key and the value: ``dataset.stride = 0: Input should be greater than or equal
to 1``; an unknown key suggests the closest valid one.

The run's inputs (model, dataset, transform, taps) and its execution (store, runtime) are
configured here; the stages' own sections live in :mod:`gig_dist.sections`, a leaf module, so
that validating a config imports no torch, FAISS or Zarr (a test checks it).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from gig_dist.sections import (
    AtlasConfig,
    ConceptsConfig,
    DecomposeConfig,
    EvaluateConfig,
    ExtractConfig,
    GIGConfig,
    SampleConfig,
)
from gig_dist.settings import ConfigError, Section

#: Samples per image and tap for the toy world (the paper's 1 is for ImageNet's 50,000 images).
TOY_SAMPLES_PER_IMAGE = 24
#: The toy world's lambda_rel: at the default 0.1 its first tap's R^2 sits right at 0.90; 0.05
#: gives 0.91-0.92 there (and 0.93-0.98 deeper) at under 1 % l0 ratio.
TOY_LAMBDA_REL = 0.05
#: Images the toy world's default run attributes with GIG (one store unit): about 1 s per image
#: on 2 cores for its 5 tap pairs. ``-o gig.images=none`` attributes all 1,024.
TOY_GIG_IMAGES = 64


class ModelConfig(Section):
    #: ``toy`` (the embedded model), a torchvision classifier name (``resnet50``), ``timm:<name>``
    #: (``timm:vit_small_patch16_224``; pip install -e ".[timm]"), or ``package.module:callable``,
    #: a factory of yours called with ``model.kwargs`` that returns an ``nn.Module``.
    name: str = "toy"
    #: ``shipped`` (toy default), a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2``),
    #: ``pretrained`` (timm's own), a path to a local state-dict file for any model (loaded with
    #: ``weights_only=True``), or ``none`` (random, from a fixed seed; a factory's as it returns them).
    weights: str | None = "shipped"
    #: Number of classes; only needed when a local state dict has a head of another size.
    num_classes: int | None = Field(default=None, ge=1)
    #: Keyword arguments of a factory, or of ``timm.create_model``.
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Class and register tokens before the patch tokens of a vision transformer's token taps,
    #: where the model does not say (timm's ``num_prefix_tokens`` and torchvision's
    #: ``class_token`` do). They are kept apart from the PFVs, which are the patch tokens.
    prefix_tokens: int | None = Field(default=None, ge=0)


class ToyWorldConfig(Section):
    num_images: int = Field(default=1024, ge=1)
    seed: int = 0
    image_size: int = Field(default=64, ge=16, le=512)


class DatasetConfig(Section):
    #: ``toy`` (generated, with part masks), ``imagefolder`` (``root/<class>/<image>``, e.g.
    #: ImageNet's ``val/<wnid>/*.JPEG``) or ``filelist`` (a text file of ``path[,label]`` lines).
    kind: Literal["toy", "imagefolder", "filelist"] = "toy"
    #: A local folder (or file list), or an fsspec URL of one (``s3://bucket/imagenet/val``,
    #: ``gs://...``): the driver lists it, every worker reads its images' bytes by key.
    path: str | None = None
    toy: ToyWorldConfig = ToyWorldConfig()
    #: Subset: every ``stride``-th image, then the first ``limit`` of those (in ``order``).
    stride: int = Field(default=1, ge=1)
    limit: int | None = Field(default=None, ge=1)
    #: ``interleaved``: the store takes one image of each class in turn, so that the first N
    #: images (``limit``, ``decompose.images``, ``gig.images``) spread over the classes;
    #: ``listed``: the listing's order (an ImageFolder is sorted by class).
    order: Literal["interleaved", "listed"] = "interleaved"
    #: Which model output a label means: ``auto``, ``dataset`` (class i is output i),
    #: ``imagenet`` (wnid folders, standard indices), ``prediction`` (group images by the
    #: model's prediction), or a file mapping class names to output indices (JSON or
    #: ``name index`` lines). ``auto`` warns and groups by prediction when the dataset's classes
    #: are not the model's outputs. See docs/guides/own-model.md.
    label_map: str = "auto"
    #: Images with more pixels than this are skipped as absurdly large (PIL's bomb limit).
    max_image_pixels: int = Field(default=89_478_485, ge=1)
    #: Threads decoding images inside each worker.
    loader_threads: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _path_matches_kind(self) -> DatasetConfig:
        if self.kind != "toy" and self.path is None:
            raise ValueError(f"dataset.path is required when dataset.kind is {self.kind!r}")
        if self.kind == "toy" and self.path is not None:
            raise ValueError(f"dataset.path = {self.path!r} is given but dataset.kind is 'toy' (the embedded toy "
                             "world, which reads no files): set dataset.kind=imagefolder (or filelist) to read it")
        return self


class TransformConfig(Section):
    """Input transform for image files. ``None`` values take the model's own defaults
    (torchvision weights' transforms, or the toy world's size and statistics)."""

    resize: int | None = Field(default=None, ge=1)
    crop: int | None = Field(default=None, ge=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    #: How the resize samples: the model's own where known (timm's EfficientNets and ViTs:
    #: bicubic), else bilinear.
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None

    @model_validator(mode="after")
    def _std_positive(self) -> TransformConfig:
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"transform.std must be positive, got {list(self.std)}")
        return self


class StoreConfig(Section):
    #: Where the run store lives: a directory, or an fsspec URL (``s3://bucket/run.zarr``) that
    #: every worker can reach. ``gig-dist run --out`` overrides it.
    path: str = "gig-dist-run.zarr"
    #: Images per work unit, which is also the shard size along the image axis: a unit is the
    #: only writer of its shard. Large enough to amortise overhead, small enough for memory.
    images_per_unit: int = Field(default=64, ge=1)
    #: Images per inner chunk (the unit of reading); must divide images_per_unit.
    images_per_chunk: int = Field(default=8, ge=1)
    #: zstd level. PFVs compress ~1.7x at level 1 and barely better above, at half the speed.
    zstd_level: int = Field(default=1, ge=1, le=22)
    #: Seconds without a heartbeat after which another driver may take over the run's lease
    #: (the driver beats every sixth of it; a paused driver checks before its next write).
    lease_timeout_s: float = Field(default=60.0, ge=1)

    @model_validator(mode="after")
    def _chunk_divides_unit(self) -> StoreConfig:
        if self.images_per_unit % self.images_per_chunk:
            raise ValueError(
                f"store.images_per_chunk ({self.images_per_chunk}) must divide "
                f"store.images_per_unit ({self.images_per_unit})"
            )
        return self


class RuntimeConfig(Section):
    #: ``local``: in-process, one worker (tests, debugging). ``ray``: Ray actors, one per GPU
    #: (or per ``cpus_per_worker`` CPUs where there is no GPU).
    kind: Literal["local", "ray"] = "local"
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. On Ray, ``cuda`` asks for GPU actors
    #: even before the autoscaler has started any GPU node.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Ray cluster address (``auto``, ``127.0.0.1:6379``, ``ray://host:10001``). ``None``: the
    #: cluster of a Ray job (``RAY_ADDRESS``), else a new local Ray bound to loopback.
    address: str | None = None
    #: Ray actors to start. ``None``: as many as the cluster's GPUs (or CPUs) hold now; set it
    #: on autoscaling clusters, where the nodes appear only once actors ask for them.
    num_workers: int | None = Field(default=None, ge=1)
    #: GPUs per actor; fractions put several actors on one GPU.
    gpus_per_worker: float = Field(default=1.0, gt=0)
    #: CPUs per actor (its share for torch and image decoding).
    cpus_per_worker: float = Field(default=1.0, gt=0)
    #: torch threads per worker. ``None``: all cores in-process, ``cpus_per_worker`` on Ray.
    #: Thread count changes float summation order (values differ by ~1e-6), so set it to the
    #: same number everywhere when results must be bitwise identical across runtimes.
    torch_threads: int | None = Field(default=None, ge=1)
    #: Memory of one worker, in GiB, that every stage's planned peak must fit before any work.
    #: ``None``: this machine's memory (or its cgroup's limit) for local runs; unchecked on Ray,
    #: where workers run on other nodes (``gig-dist plan --worker-memory`` checks a cluster).
    worker_memory_gib: float | None = Field(default=None, gt=0)
    #: How often a unit is tried before the stage fails (a unit is retried when its worker dies).
    max_unit_attempts: int = Field(default=3, ge=1)
    #: Environment variables for the worker processes.
    env: dict[str, str] = Field(default_factory=dict)
    progress: bool = True


class ReportConfig(Section):
    #: ``gig-dist run`` ends by writing the report (``gig-dist report``) of a finished run.
    enabled: bool = True
    #: Where: a local folder. ``None``: beside a local store, ``<store>.report``; a store on
    #: object storage gets no report unless this is set.
    out: str | None = None


class Config(Section):
    model: ModelConfig = ModelConfig()
    dataset: DatasetConfig = DatasetConfig()
    transform: TransformConfig = TransformConfig()
    #: Layer names whose outputs are read. ``None``: every residual block output.
    taps: tuple[str, ...] | None = None
    extract: ExtractConfig = ExtractConfig()
    sample: SampleConfig = SampleConfig()
    concepts: ConceptsConfig = ConceptsConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    gig: GIGConfig = GIGConfig()
    atlas: AtlasConfig = AtlasConfig()
    report: ReportConfig = ReportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    store: StoreConfig = StoreConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="before")
    @classmethod
    def _toy_defaults(cls, data: Any) -> Any:
        """The toy world's own default for what the paper sizes for ImageNet (see SampleConfig)."""
        if not isinstance(data, dict):
            return data
        dataset = data.get("dataset") or {}
        sample = data.get("sample") or {}
        decompose = data.get("decompose") or {}
        if not (isinstance(dataset, dict) and dataset.get("kind", "toy") == "toy"):
            return data
        if isinstance(sample, dict) and sample.get("per_image") is None:
            data = {**data, "sample": {**sample, "per_image": TOY_SAMPLES_PER_IMAGE}}
        if isinstance(decompose, dict) and decompose.get("lambda_rel") is None:
            data = {**data, "decompose": {**decompose, "lambda_rel": TOY_LAMBDA_REL}}
        gig = data.get("gig") or {}
        if isinstance(gig, dict) and "images" not in gig:
            data = {**data, "gig": {**gig, "images": TOY_GIG_IMAGES}}
        return data

    @model_validator(mode="after")
    def _toy_weights_only_for_toy(self) -> Config:
        if self.model.weights == "shipped" and self.model.name != "toy":
            raise ValueError(
                f"model.weights = 'shipped' exists only for the toy model; for {self.model.name!r} "
                "use its source's weights name (DEFAULT for torchvision, pretrained for timm), a state-dict path, or none"
            )
        if self.taps is not None and len(self.taps) == 0:
            raise ValueError("taps is empty; leave it unset for every residual block output")
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


_MODELS: dict[tuple[tuple[str, type], ...], type[Config]] = {}


def config_model() -> type[Config]:
    """The schema configs are validated against: :class:`Config`, plus the config section of
    every stage added to the registry (``registry.register``), each under its own name."""
    from pydantic import create_model

    from gig_dist.sections import added_sections

    added = tuple(sorted(added_sections().items()))
    if not added:
        return Config
    if added not in _MODELS:
        clashes = [name for name, _ in added if name in Config.model_fields]
        if clashes:
            raise ConfigError(f"a registered stage's config section clashes with a built-in key: {', '.join(clashes)}")
        fields: dict[str, Any] = {name: (section, section()) for name, section in added}
        _MODELS[added] = create_model("Config", __base__=Config, __module__=__name__, **fields)
    return _MODELS[added]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. dataset.limit=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _none_strings(value: Any) -> Any:
    """YAML reads ``none`` as a string; accept it (and ``null``) for 'no value' everywhere."""
    if isinstance(value, dict):
        return {k: _none_strings(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return value


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    node: Any = config_model()
    for part in loc[:-1]:
        field = node.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        node = field.annotation
    return list(node.model_fields)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "<root>"
        if item["type"] == "extra_forbidden":
            valid = _field_names(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {key}: unknown key{hint}; valid keys here: {', '.join(valid)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if loc and item["type"] != "value_error":
            lines.append(f"  {key} = {item.get('input')!r}: {message}")
        else:
            lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read and validate a config file (or the embedded default), applying ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    return config_from_tree(tree, overrides, source)


#: Settings a release renamed or moved: a store records the config it was run with, and one made
#: before the change still reads (``old dotted key: new dotted key``).
RENAMED = {
    "concepts.sae_l1": "concepts.params.sae.l1",
    "concepts.sae_top_k": "concepts.params.sae.top_k",
}


def _upgrade(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` (a copy of its own) with the keys of :data:`RENAMED` moved to their new place; a
    value set at the new place wins."""
    for old, new in RENAMED.items():
        *path, leaf = old.split(".")
        node = tree
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *above, last = new.split(".")
        target = tree
        for key in above:
            target = target.setdefault(key, {}) if isinstance(target, dict) else None
        if isinstance(target, dict) and value is not None:
            target.setdefault(last, value)
    return tree


def config_from_tree(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     source: str = "a run's config") -> Config:
    """A config from a mapping (a run's stored config, whose renamed keys move to their new place),
    with ``key=value`` overrides."""
    import copy

    tree = _upgrade(copy.deepcopy(tree))
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return config_model().model_validate(_none_strings(tree))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
