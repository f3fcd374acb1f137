"""The stage contract: every pipeline stage is one module that owns its slice of the system.

A stage declares

* ``name``, and ``reads``: the stages whose results it reads;
* ``result_keys``: the config keys that decide its results (a key, or a section ending in ``.``);
  with its upstream fingerprints they make its *fingerprint*. A rerun whose fingerprint is
  unchanged keeps the stage's results; a changed one redoes it, and so everything downstream;
* ``coverage_key``: the config key that says which images it covers (``gig.images``); raising
  it only adds units, it never redoes done ones;
* ``check(config, facts)``: every reason it cannot run, before any work;
* ``specs(facts, sizes)``: the specs of the arrays it writes, from the run's facts and, where a
  shape depends on data (K of a tap, an image's active concepts), from ``sizes``: the store's
  results when the stage starts, or a plan's estimates (``gig-dist plan``);
* ``plan(facts)``: its work units; a *worker* (one per process, holding the model) runs units;
* ``footprint(facts, sizes)``: the peak memory of a worker and of the driver, and the dense
  matrices it holds, for ``gig-dist plan``.

A stage never talks to Ray and never spells an array path: the store's sections do. Adding a
stage is its module plus one line in :mod:`gig_dist.stages.registry`.

Exactly-once: a unit's data is written before its completion marker, and a unit whose marker is
missing is run again, writing the same bytes to the same shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from gig_dist.store import (
    ArraySpec,
    AtlasSection,
    CodesSection,
    ConceptsSection,
    Facts,
    RunStore,
)
from gig_dist.store.lease import Fence

if TYPE_CHECKING:
    from gig_dist.config import Config

Progress = Callable[[int], None]


class UnitFailed(RuntimeError):
    """A unit failed in its own code, or kept losing its workers; names the unit and its images."""


@dataclass(frozen=True)
class WorkUnit:
    """Unit ``index`` of the stage whose progress key is ``stage``: images ``start:stop`` (exactly
    one shard of each array it writes, or a block of whole shards), and where the stage divides
    its work further, a ``tap``, a tap ``pair``, a range of integration ``steps`` or ``targets``."""

    stage: str
    index: int
    start: int = 0
    stop: int = 0
    tap: str | None = None
    pair: tuple[str, str] | None = None
    steps: tuple[int, int] | None = None
    targets: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        parts = [f"tap {self.tap}"] if self.tap else []
        if self.pair:
            parts.append(f"pair {self.pair[0]} -> {self.pair[1]}")
        if self.size:
            parts.append(f"images {self.start}:{self.stop}")
        if self.steps:
            parts.append(f"steps {self.steps[0]}:{self.steps[1]}")
        if self.targets:
            parts.append(f"targets {self.targets[0]}:{self.targets[1]}")
        return f"{self.stage} unit {self.index}" + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class UnitReport:
    """What a unit returns to the runtime: small, so it can travel through Ray's object store."""

    unit: int
    images: int
    skipped: int
    seconds: float = 0.0  # filled in by execute_unit
    #: The worker process's peak resident bytes so far (filled in by execute_unit).
    peak_rss: int = 0
    #: Which method ran where the config leaves the choice to the model (a few words).
    methods: dict[str, str] = dataclasses.field(default_factory=dict)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class Sizes:
    """The data-dependent sizes array shapes need. On a store, its inputs' results
    (:class:`StoreSizes`); in a plan, the config's values and a calibration's measurements."""

    def concepts(self, tap: str) -> int:
        """K of ``tap``'s dictionary."""
        raise NotImplementedError

    def max_active(self, tap: str) -> int:
        """The most distinct concepts one image uses at ``tap``."""
        raise NotImplementedError

    def crop_capacity(self) -> int:
        """Atlas crops per store unit."""
        raise NotImplementedError


class StoreSizes(Sizes):
    def __init__(self, store: RunStore, dictionary: str) -> None:
        self.store, self.dictionary = store, dictionary

    def concepts(self, tap: str) -> int:
        return self.store.family(ConceptsSection, self.dictionary).count(tap)

    def max_active(self, tap: str) -> int:
        return self.store.family(CodesSection, self.dictionary).max_active(tap)

    def crop_capacity(self) -> int:
        return self.store.family(AtlasSection, self.dictionary).capacity()


MiB = 2**20


@dataclass
class Footprint:
    """A stage's estimated peak memory while it runs: bytes of one worker and of the driver
    (formulas over the run's facts and sizes; ``gig-dist plan`` adds a process's own memory and
    puts a calibration's measured peak beside them), and the dense matrices it holds
    (name, shape, dtype)."""

    worker: int
    driver: int = 64 * MiB
    dense: list[tuple[str, tuple[int, ...], str]] = dataclasses.field(default_factory=list)
    #: The settings the peak grows with, named in a refusal when it does not fit.
    why: str = ""


def model_bytes(facts: Facts) -> int:
    """The model's parameters in bytes (0 where the facts carry no model)."""
    model = facts.model
    return 0 if model is None else sum(p.numel() * p.element_size() for p in model.parameters())


def tap_values(facts: Facts) -> int:
    """Values of one image's activations at every tap."""
    return sum(c * h * w for c, h, w in facts.taps.values())


class StageWorker(ABC):
    """Per-process state of a stage (model, loader, store handle); runs many units, up to the
    stage's ``worker_concurrency`` at once, in threads."""

    @abstractmethod
    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        """Compute the unit and write its outputs to the store (not its completion marker)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads or devices."""


def level_of(config: Config) -> str:
    """A config's dictionary level: ``concepts.level``, else ``concepts.method``."""
    return config.concepts.level or config.concepts.method


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Stage(ABC):
    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    result_keys: ClassVar[tuple[str, ...]] = ()
    coverage_key: ClassVar[str | None] = None
    #: Results live under a dictionary level (``concepts.method``), one set per dictionary.
    per_dictionary: ClassVar[bool] = False
    #: What the progress bar and the summary count.
    unit_noun: ClassVar[str] = "images"
    #: Bump when the stage computes differently: stores made before then redo it.
    version: ClassVar[int] = 1
    #: Result keys added after stores were made, with the value that gives the results of
    #: before: while a key holds that value it is left out of the fingerprint, so those stores
    #: keep their results. ``{"gig.max_gap": None}``; a key may also name its companions, which
    #: count only with it: ``{"gig.max_gap": (None, ("gig.max_steps",))}``.
    later_keys: ClassVar[dict[str, Any]] = {}
    #: Run only when asked for by name (``--until``, or its own command), never by default.
    on_demand: ClassVar[bool] = False
    #: Units in flight per worker, in threads. A worker that serialises its compute internally
    #: and writes outside that lock overlaps one unit's writes with the next unit's compute.
    worker_concurrency: ClassVar[int] = 1
    #: Its config section: ``config.<config_section>`` holds its settings (the built-in stages'
    #: sections are in :mod:`gig_dist.sections`; several stages may share one).
    config_section: ClassVar[str | None] = None
    #: A stage added to the registry brings its section's class here (a
    #: :class:`gig_dist.settings.Section` with defaults); ``registry.register`` adds it to the schema.
    config_model: ClassVar[type | None] = None
    #: How ``gig-dist plan`` scales a calibration's time: its work grows linearly with K (the
    #: concepts' assignments, the coder's correlations), and it runs one unit per tap (its time
    #: scales with the samples, its taps spread over the workers) rather than per image unit.
    linear_in_k: ClassVar[bool] = False
    units_per_tap: ClassVar[bool] = False
    #: The settings that shrink its time, named in the projection the runtime prints once its
    #: first piece of work is done (None: no projection; for the stages that take hours).
    projection_hint: ClassVar[str | None] = None
    #: Its store family: the class that owns the paths, reads and writes of what it stores,
    #: reached as ``store.family(<family>[, level])`` (``family_of`` below).
    family: ClassVar[type | None] = None

    def __init__(self, config: Config, store_url: str, fence: Fence | None = None) -> None:
        self.config = config
        self.store_url = store_url
        #: The run's lease generation every write of this stage passes (None outside a run).
        self.fence = fence

    def open_store(self) -> RunStore:
        """A worker's handle on the run's store: it writes data under the run's fence, and only
        into the nodes the driver declared."""
        return RunStore.open(self.store_url, mode="r+", fence=self.fence, role="worker")

    # -- identity -------------------------------------------------------------------------------

    @classmethod
    def key(cls, config: Config) -> str:
        """Its name in the store's progress and manifest: ``<level>/<name>`` per dictionary level."""
        return f"{level_of(config)}/{cls.name}" if cls.per_dictionary else cls.name

    @property
    def progress_key(self) -> str:
        return self.key(self.config)

    @property
    def dictionary(self) -> str:
        """The dictionary level its results live under (``concepts.level``, else the method)."""
        return level_of(self.config)

    @property
    def method(self) -> str:
        """The dictionary's method (``concepts.method``)."""
        return self.config.concepts.method

    @classmethod
    def key_values(cls, config: Config) -> dict[str, Any]:
        """The values of its result keys in ``config``."""
        flat = _flatten(config.to_dict())
        # A key, a section ("concepts."), or a key whose value is a mapping, flattened below it
        # ("decompose.lambda_rel.layer3.1": a per-tap lambda decides the results as much as one for all).
        found = {key: value for key, value in sorted(flat.items())
                 if any(key == want or key.startswith(want if want.endswith(".") else want + ".")
                        for want in cls.result_keys)}
        for key, rule in cls.later_keys.items():
            before, companions = rule if isinstance(rule, tuple) else (rule, ())
            if found.get(key, before) == before:
                for dropped in (key, *companions):
                    found.pop(dropped, None)
        return found

    @classmethod
    def fingerprint(cls, config: Config, upstream: dict[str, str]) -> str:
        text = json.dumps({"stage": cls.name, "version": cls.version, "keys": cls.key_values(config),
                           "upstream": upstream}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def settings(self) -> Any:
        """Its config section's values (``config.<config_section>``)."""
        return getattr(self.config, self.config_section) if self.config_section else None

    def family_of(self, store: RunStore) -> Any:
        """Its store family in ``store``, under its dictionary level where it has one."""
        if self.family is None:
            raise TypeError(f"stage {self.name!r} declares no store family")
        return store.family(self.family, self.dictionary if self.per_dictionary else None)

    # -- what the read layer shows (optional) ------------------------------------------------

    @classmethod
    def summary(cls, store: RunStore, key: str) -> dict[str, Any] | None:
        """A few named values ``gig-dist inspect`` prints under the stage's line (and ``--json``
        lists), read from its finished results under progress key ``key``. None: nothing."""
        return None

    @classmethod
    def report_panel(cls, run: Any) -> tuple[str, str] | None:
        """A panel of the report's index page, ``(title, HTML body)``, for a run (``read.Run``)
        whose results this stage finished. None: no panel (the built-in stages have pages)."""
        return None

    # -- before any work ---------------------------------------------------------------------------

    @classmethod
    def check(cls, config: Config, facts: Facts) -> list[str]:
        """Every reason this stage cannot run with ``config`` on ``facts`` (empty: it can)."""
        return []

    def check_inputs(self, store: RunStore) -> list[str]:
        """Checks that need what earlier stages wrote, run on the driver when the stage starts,
        before any of its units (empty: it can run)."""
        return []

    @abstractmethod
    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        """The arrays it writes."""

    def footprint(self, facts: Facts, sizes: Sizes) -> Footprint:
        """Its estimated peak memory (``gig-dist plan``). Default: small tables."""
        return Footprint(worker=128 * MiB)

    def whole_arrays(self, facts: Facts, sizes: Sizes, calibration: dict[str, Any] | None) -> list[ArraySpec]:
        """For ``gig-dist plan``: arrays it writes whole rather than from :meth:`specs` (their
        shapes from a calibration's ``dictionary_arrays`` where only the work knows them). Default: none."""
        return []

    def declared_arrays(self, store: RunStore) -> list[str]:
        """Arrays its workers write whole, whose shapes only the work knows (a fitted
        dictionary): the driver lists them in the manifest before any unit runs. Default: none."""
        return []

    def arrays(self, store: RunStore) -> list[ArraySpec]:
        """The arrays it writes into ``store``, sized by what its inputs hold there."""
        return self.specs(store.facts, StoreSizes(store, self.dictionary))

    # -- the work ------------------------------------------------------------------------------------

    def plan(self, facts: Facts) -> list[WorkUnit]:
        """All units of the stage, in order, whatever the coverage. Default: one per image shard."""
        return [WorkUnit(self.progress_key, i, r.start, r.stop) for i, r in enumerate(facts.units)]

    def work(self, unit: WorkUnit, facts: Facts) -> int:
        """How many ``unit_noun`` a unit counts towards the progress bar (its images, else 1)."""
        return unit.size or 1

    def covers(self, unit: WorkUnit) -> bool:
        """Whether the current config asks for ``unit`` (the stage's coverage key)."""
        return True

    def pending(self, store: RunStore) -> list[WorkUnit]:
        done = store.done_units(self.progress_key)
        return [u for u in self.plan(store.facts) if self.covers(u) and not (u.index < len(done) and done[u.index])]

    def covered_units(self, facts: Facts) -> list[WorkUnit]:
        return [u for u in self.plan(facts) if self.covers(u)]

    @classmethod
    def coverage_value(cls, config: Config) -> Any:
        """The value of its coverage key in ``config`` (None: no key, or every image)."""
        if cls.coverage_key is None:
            return None
        node: Any = config
        for part in cls.coverage_key.split("."):
            node = getattr(node, part)
        return node

    def covered_images(self, facts: Facts) -> int:
        """The images the stage writes rows for: whole store units up to its coverage key."""
        limit = self.coverage_value(self.config)
        if limit is None:
            return facts.num_images
        unit = facts.images_per_unit
        return min(facts.num_images, -(-int(limit) // unit) * unit)

    @abstractmethod
    def open_worker(self, device: str) -> StageWorker:
        """Build the per-process state; called once per worker, never on the driver's hot path."""

    def finish(self, store: RunStore) -> None:  # noqa: B027 - optional hook
        """Run on the driver once every unit is done (a fixed-order final combination)."""

    def final_is_current(self, store: RunStore) -> bool:
        """Whether the last :meth:`finish` was made for the coverage asked for now (a stage whose
        final step depends on its coverage says so here; a change makes it run again)."""
        return True


