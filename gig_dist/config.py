"""The run configuration: one schema, validated before any work starts.

A config is YAML (or JSON). Every key has a default, so an empty config is the embedded toy-world
run. ``-o key=value`` overrides on the command line address nested keys with dots
(``-o dataset.limit=100``); values are parsed as YAML, so ``-o taps=[layer1.0,layer2.1]`` works.

Errors name the key and the value: ``dataset.stride = 0: Input should be greater than or equal
to 1``; an unknown key suggests the closest valid one.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


#: Samples per image and tap for the toy world (the paper's 1 is for ImageNet's 50,000 images).
TOY_SAMPLES_PER_IMAGE = 24
#: The toy world's lambda_rel: at the paper's 0.1 its first tap's R^2 sits right at 0.90; 0.05
#: gives 0.91-0.92 there (and 0.93-0.98 deeper) at under 1 % l0 ratio.
TOY_LAMBDA_REL = 0.05
#: Images the toy world's default run attributes with GIG (one store unit): about 1 s per image
#: on 2 cores for its 5 tap pairs. ``-o gig.images=none`` attributes all 1,024.
TOY_GIG_IMAGES = 64


class ConfigError(ValueError):
    """A config that cannot run, with a message that names the key and value at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    #: ``toy`` (the embedded model) or any torchvision classifier name, e.g. ``resnet50``.
    name: str = "toy"
    #: ``shipped`` (toy default), a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2``), a
    #: path to a local state-dict file (loaded with ``weights_only=True``), or ``none`` (random).
    weights: str | None = "shipped"
    #: Number of classes; only needed when a local state dict has a head of another size.
    num_classes: int | None = Field(default=None, ge=1)


class ToyWorldConfig(_Section):
    num_images: int = Field(default=1024, ge=1)
    seed: int = 0
    image_size: int = Field(default=64, ge=16, le=512)


class DatasetConfig(_Section):
    #: ``toy`` (generated, with part masks), ``imagefolder`` (``root/<class>/<image>``, e.g.
    #: ImageNet's ``val/<wnid>/*.JPEG``) or ``filelist`` (a text file of ``path[,label]`` lines).
    kind: Literal["toy", "imagefolder", "filelist"] = "toy"
    path: Path | None = None
    toy: ToyWorldConfig = ToyWorldConfig()
    #: Subset: every ``stride``-th image, then the first ``limit`` of those.
    stride: int = Field(default=1, ge=1)
    limit: int | None = Field(default=None, ge=1)
    #: Images with more pixels than this are skipped as absurdly large (PIL's bomb limit).
    max_image_pixels: int = Field(default=89_478_485, ge=1)
    #: Threads decoding images inside each worker.
    loader_threads: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _path_matches_kind(self) -> DatasetConfig:
        if self.kind != "toy" and self.path is None:
            raise ValueError(f"dataset.path is required when dataset.kind is {self.kind!r}")
        return self


class TransformConfig(_Section):
    """Input transform for image files. ``None`` values take the model's own defaults
    (torchvision weights' transforms, or the toy world's size and statistics)."""

    resize: int | None = Field(default=None, ge=1)
    crop: int | None = Field(default=None, ge=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _std_positive(self) -> TransformConfig:
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"transform.std must be positive, got {list(self.std)}")
        return self


class ExtractConfig(_Section):
    batch_size: int = Field(default=32, ge=1)
    dtype: Literal["float16", "float32"] = "float16"


class SampleConfig(_Section):
    """PFV sampling for concept discovery (method.md section 3)."""

    #: ``srd``: probability proportional to max(R_p, 0), the SRD relevance of the predicted class
    #: (ResNet-style models); ``grad_x_act``: to max(<dy_c/da_p, a_p>, 0), any model;
    #: ``uniform``. Where every score is <= 0, an image's PFVs are drawn uniformly.
    method: Literal["srd", "grad_x_act", "uniform"] = "srd"
    #: PFVs drawn per image and tap, without replacement. The paper draws 1; the toy world's
    #: default is 24 (``TOY_SAMPLES_PER_IMAGE``): its 1,024 images would otherwise give the
    #: ``8 x C`` concepts of a 256-channel tap one or two members each, and 24 gives 12 on average.
    per_image: int = Field(default=1, ge=1)
    seed: int = 0
    #: Images per SRD or gradient pass.
    batch_size: int = Field(default=16, ge=1)


class ConceptsConfig(_Section):
    """Concept dictionaries: bisecting k-means on each tap's samples (method.md section 4)."""

    #: The dictionary (``gig_dist.kernels.dictionary.DICTIONARIES``); also its level in the store
    #: (``concepts/<method>/<tap>``), so several dictionaries of one run share its PFVs and samples.
    method: Literal["bisecting_kmeans"] = "bisecting_kmeans"
    #: ``K = round(k_multiplier * C)`` concepts for a tap of C channels (the paper: 8).
    k_multiplier: float = Field(default=8.0, gt=0)
    #: Absolute K per tap (``{layer4.2: 4096}``), overriding the multiplier for those taps.
    k: dict[str, int] = Field(default_factory=dict)
    seed: int = 0
    #: 2-means runs per split; the lowest inertia is kept.
    n_init: int = Field(default=1, ge=1)
    #: ``numpy`` (fastest on CPUs), ``faiss`` (``faiss.Kmeans`` per split, on the GPU with
    #: faiss-gpu) or ``auto`` (FAISS when it sees a GPU).
    backend: Literal["auto", "numpy", "faiss"] = "auto"

    @model_validator(mode="after")
    def _positive_k(self) -> ConceptsConfig:
        bad = {tap: k for tap, k in self.k.items() if k < 1}
        if bad:
            raise ValueError(f"concepts.k must be at least 1 per tap, got {bad}")
        return self


class DecomposeConfig(_Section):
    """Every PFV as a sparse non-negative combination of its tap's concepts (method.md section 5)."""

    #: Taps to decompose. ``None``: every tap.
    taps: tuple[str, ...] | None = None
    #: Decompose only the first N images (rounded up to whole store units). ``None``: all.
    images: int | None = Field(default=None, ge=1)
    #: ``lambda = lambda_rel * max_k <v_k, a>`` per PFV; one value, or one per tap
    #: (``{layer1.0: 0.05, layer4.2: 0.1}``; taps not listed take 0.1). The paper's 0.1; the toy
    #: world's default is 0.05 (``TOY_LAMBDA_REL``).
    lambda_rel: float | dict[str, float] = 0.1
    #: An absolute lambda for every PFV instead (``None``: use lambda_rel).
    lam: float | None = Field(default=None, ge=0)
    #: Code slots stored per PFV. A PFV whose support is larger keeps its largest coefficients;
    #: how many PFVs were cut is counted per tap and shown by ``gig-dist inspect``.
    max_nonzero: int = Field(default=32, ge=1)
    #: KKT tolerance of the solver, relative to the PFV's norm.
    tol: float = Field(default=1e-6, gt=0)
    #: PFVs per batched solve.
    batch_size: int = Field(default=4096, ge=1)

    @model_validator(mode="after")
    def _lambda_non_negative(self) -> DecomposeConfig:
        values = self.lambda_rel.values() if isinstance(self.lambda_rel, dict) else [self.lambda_rel]
        if any(v < 0 for v in values):
            raise ValueError(f"decompose.lambda_rel must be non-negative, got {self.lambda_rel}")
        if self.taps is not None and len(self.taps) == 0:
            raise ValueError("decompose.taps is empty; leave it unset to decompose every tap")
        return self

    def lambda_for(self, tap: str) -> float:
        if isinstance(self.lambda_rel, dict):
            return self.lambda_rel.get(tap, 0.1)
        return self.lambda_rel


class GIGConfig(_Section):
    """Generalized Integrated Gradients between taps and to the classes (method.md section 6)."""

    #: ``[source, target]`` tap pairs; ``logits`` as target for concept -> class. ``None``:
    #: consecutive stage outputs, plus every stage output to the logits (a stage output is the
    #: last tap of each ``layerN``; taps without that naming are each their own stage).
    pairs: tuple[tuple[str, str], ...] | None = None
    #: Integration steps M and the quadrature rule (each step weighs 1/M).
    steps: int = Field(default=32, ge=1)
    rule: Literal["midpoint", "left", "right"] = "midpoint"
    #: Target concepts per image: the T with the largest code mass at the target tap. Class
    #: targets are always the predicted and the true class.
    targets: int = Field(default=32, ge=1)
    #: Attribute only the first N images (rounded up to whole store units). ``None``: all. The
    #: toy world's default is 64 (``TOY_GIG_IMAGES``): GIG costs about 1.3 s per toy image on 2 cores.
    images: int | None = Field(default=None, ge=1)
    #: Work-unit splits: the M steps into ``step_chunks`` ranges, and the targets into chunks of
    #: ``targets_per_unit`` (``None``: all in one unit). Results do not depend on either.
    step_chunks: int = Field(default=1, ge=1)
    targets_per_unit: int | None = Field(default=None, ge=1)
    #: Steps per forward pass.
    step_batch: int = Field(default=8, ge=1)
    #: Strongest source concepts kept per (image, target) as the image's edges.
    top_edges: int = Field(default=16, ge=1)
    #: Concepts per level of a class graph (the top sources of each node, and of the class).
    graph_top: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _steps_split(self) -> GIGConfig:
        if self.step_chunks > self.steps:
            raise ValueError(f"gig.step_chunks ({self.step_chunks}) cannot exceed gig.steps ({self.steps})")
        return self


class StoreConfig(_Section):
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

    @model_validator(mode="after")
    def _chunk_divides_unit(self) -> StoreConfig:
        if self.images_per_unit % self.images_per_chunk:
            raise ValueError(
                f"store.images_per_chunk ({self.images_per_chunk}) must divide "
                f"store.images_per_unit ({self.images_per_unit})"
            )
        return self


class RuntimeConfig(_Section):
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
    #: How often a unit is tried before the stage fails (a unit is retried when its worker dies).
    max_unit_attempts: int = Field(default=3, ge=1)
    #: Environment variables for the worker processes.
    env: dict[str, str] = Field(default_factory=dict)
    progress: bool = True


class Config(_Section):
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
                "use a torchvision weights name (e.g. DEFAULT), a state-dict path, or none"
            )
        if self.taps is not None and len(self.taps) == 0:
            raise ValueError("taps is empty; leave it unset for every residual block output")
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


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


def _none_strings(value: Any) -> Any:
    """YAML reads ``none`` as a string; accept it (and ``null``) for 'no value' everywhere."""
    if isinstance(value, dict):
        return {k: _none_strings(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return value


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    node: Any = Config
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
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return Config.model_validate(_none_strings(tree))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
