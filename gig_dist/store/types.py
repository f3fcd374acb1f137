"""The store's value types, below the store handle and its sections: an image range, the run's
facts, a stage's record and the manifest, an array's spec, and the format's constants."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: An image's status in ``meta/status``.
PENDING, PROCESSED, SKIPPED = 0, 1, 2

FORMAT_VERSION = 3


MARKER = "gig_dist"


@dataclass(frozen=True)
class ImageRange:
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def unit_ranges(num_images: int, images_per_unit: int) -> list[ImageRange]:
    """The image ranges of the work units: one per shard along the image axis."""
    return [ImageRange(s, min(s + images_per_unit, num_images)) for s in range(0, num_images, images_per_unit)]


@dataclass(frozen=True)
class Facts:
    """What a run is made of, known before any work: collected from the model and the dataset,
    and the input of every stage's checks, array specs and plans."""

    num_images: int
    images_per_unit: int
    images_per_chunk: int
    zstd_level: int
    #: tap -> (channels, height, width), in forward order.
    taps: dict[str, tuple[int, int, int]]
    num_outputs: int
    class_names: list[str] = field(default_factory=list)
    #: Side of the model's input (the crop), and of the part masks on the toy world.
    input_size: int = 0
    part_masks: bool = False
    #: How the dataset's labels became output indices (``gig_dist.data.labels.DESCRIPTIONS``),
    #: and the dataset's own class names.
    label_source: str = "dataset"
    dataset_classes: list[str] = field(default_factory=list)
    #: tap -> its output's layout (``kernels.taps.TapLayout.to_json``); absent: (N, C, H, W).
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: PFVs in a group per tap, ``pfv/<tap>/value`` (image, position, channel); ``False``: a store
    #: made before, ``pfv/<tap>`` (image, position_<tap>, channel_<tap>), kept as it was made.
    pfv_groups: bool = False
    #: The model itself, for checks before any work (never stored).
    model: Any = field(default=None, compare=False, repr=False)

    @property
    def units(self) -> list[ImageRange]:
        return unit_ranges(self.num_images, self.images_per_unit)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                      if f.name != "model"}))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Facts:
        return cls(**{**data, "taps": {tap: tuple(shape) for tap, shape in data["taps"].items()}})


@dataclass
class StageRecord:
    """A stage's state in the manifest. ``fingerprint`` is None while the stage is being
    (re)created: its arrays then hold nothing that counts."""

    fingerprint: str | None
    #: The fingerprints of the stages it reads, when it was planned: a reader can tell a stage
    #: whose inputs were redone since (stale) from a current one.
    upstream: dict[str, str] = field(default_factory=dict)
    #: Length of its progress array (its full plan).
    units: int = 0
    #: The config values it was planned with, for the keep/redo explanation.
    keys: dict[str, Any] = field(default_factory=dict)
    #: Its units and its final step (``Stage.finish``) are all done.
    finished: bool = False
    #: Wall-clock seconds its runs took, added up over resumes (0 when kept from before).
    seconds: float = 0.0
    #: Set when a later stage deleted results of this one it had in its own (``{"by": key,
    #: "fingerprint": its fingerprint then, "images": below which}``): should that stage need
    #: them again, this one is redone first.
    compacted: dict[str, Any] | None = None
    #: Which method ran where the config leaves a choice to the model (``{"relevance": "grad x
    #: act: SRD ..."}``), as its workers reported it.
    methods: dict[str, str] = field(default_factory=dict)


@dataclass
class Manifest:
    """The run's typed manifest (the root attributes' ``gig_dist``)."""

    format_version: int
    state: str  # "creating" or "ready"
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    dataset_fingerprint: str = ""
    transform: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    #: Every array and group the stages created, declared before it is created: ``{path:
    #: {"kind": "array" | "group", "owner": stage key}}``. Only their keys may ever be deleted
    #: (``store.ownership``). Stores written before this list derive it once, from the owner
    #: each array's attributes name.
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    #: The config each dictionary level was last run with (``{method: config}``): evaluating a
    #: dictionary uses its own settings, not those of the run of another.
    dictionaries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dictionary_config(self, method: str) -> dict[str, Any]:
        """The config dictionary ``method``'s level was made with (a store from before this
        record: the run's last config)."""
        return self.dictionaries.get(method, self.config)

    def to_json(self) -> dict[str, Any]:
        """A JSON copy (nothing shared with the manifest). Not ``dataclasses.asdict``: it deep-copies
        each of the node list's and the level configs' values before JSON copies them again, 0.15 s
        a write in a store of 14 dictionary levels."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["stages"] = {key: vars(record) for key, record in self.stages.items()}
        return json.loads(json.dumps(fields))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["stages"] = {key: StageRecord(**record) for key, record in data.get("stages", {}).items()}
        return cls(**data)


@dataclass(frozen=True)
class ArraySpec:
    """One array a stage writes: path, shape, dtype, chunking along the image axis (``chunks``,
    and ``shards`` for the arrays read in smaller pieces), fill value and dimension names.
    ``growable``: a later plan may enlarge it (a resize keeps what is written); ``transient``:
    deleted once consumed."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    fill_value: Any = 0
    zstd_level: int = 1
    growable: bool = False
    #: Deleted by a later stage once it has what it needs from it (``gig-dist plan`` counts it
    #: in the peak of a run, not in the store it leaves).
    transient: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes before compression (strings: not counted, they have no fixed size)."""
        if self.dtype == "str":
            return 0
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def __post_init__(self) -> None:
        if not (len(self.shape) == len(self.dims) == len(self.chunks)):
            raise ValueError(f"{self.path}: shape {self.shape}, dims {self.dims} and chunks {self.chunks} differ in rank")


def per_image_spec(facts: Facts, path: str, tail: tuple[int, ...], dtype: str, fill: Any, dims: tuple[str, ...],
                   chunk_images: int | None = None, **extra: Any) -> ArraySpec:
    """An array of one row per image, chunked by work unit (a unit is its chunk's only writer)."""
    unit = facts.images_per_unit
    return ArraySpec(path, (facts.num_images, *tail), dtype, ("image", *dims), (chunk_images or unit, *tail),
                     fill_value=fill, zstd_level=facts.zstd_level, **extra)


def per_unit_spec(facts: Facts, path: str, tail: tuple[int, ...], dtype: str, fill: Any,
                  dims: tuple[str, ...]) -> ArraySpec:
    """An array of one row per work unit (statistics a unit adds to)."""
    units = len(facts.units)
    return ArraySpec(path, (units, *tail), dtype, ("unit", *dims), (1, *tail), fill_value=fill,
                     zstd_level=facts.zstd_level)
