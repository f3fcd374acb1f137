"""The store core: a run's lifecycle, its typed manifest, progress, ownership and array specs.

One Zarr v3 group per run. The root's attributes hold the manifest under ``gig_dist``, written
*first* when a store is created (``state: creating``) and completed last (``state: ready``), so
a store always identifies itself before anything in it may be removed. Rules every write keeps:

* **Never delete what is not ours.** A prefix is taken only when it is empty or is a gig-dist
  store whose every key is a Zarr node or chunk; anything else (a user's file, another tool's
  Zarr group, a finished run's sub-group) is refused, with or without ``--overwrite``, naming
  what was found. The same code path serves local disks and fsspec stores (``memory://``,
  ``s3://``). An array is deleted only when its attributes name the stage that owns it.
* **No half-written result is ever claimed.** A stage being redone is first marked so in the
  manifest (its fingerprint cleared), then its arrays are replaced; a unit is marked done in
  ``progress/<stage>`` only after all its data is written.
* **One writer per shard.** Arrays split along the image axis at ``images_per_unit`` (a shard,
  or a chunk), and a work unit is exactly one such range: :meth:`RunStore.unit_slice` refuses
  any other write.

The section modules (``meta``, ``samples``, ``concepts``, ``codes``, ``gig``) own the layout
of their families; nothing outside this package spells an array path or touches the group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any, TypeVar

import fsspec
import numpy as np
import zarr
import zarr.errors
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import ZstdCodec

from gig_dist.store.errors import StoreError
from gig_dist.store.fenced import FencedStore, open_zarr_store
from gig_dist.store.lease import Fence, is_lease_key
from gig_dist.store.location import filesystem
from gig_dist.store.ownership import ARRAY, GROUP, ancestors, foreign_keys
from gig_dist.store.section import Section
from gig_dist.store.types import (
    FORMAT_VERSION,
    MARKER,
    ArraySpec,
    Facts,
    ImageRange,
    Manifest,
    StageRecord,
    unit_ranges,
)

warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
# The lease object sits beside the root's zarr.json; zarr notes any non-Zarr key it lists.
warnings.filterwarnings("ignore", message="Object at gig-dist.lease is not recognized", category=UserWarning)


F = TypeVar("F")


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return filesystem(url)


def _foreign_message(url: str, found: list[str]) -> str:
    return (f"{url} holds data that is not a gig-dist run store ({', '.join(found)}); refusing to write there, "
            "with or without --overwrite. Choose an empty or new --out")


def _list_keys(fs: fsspec.AbstractFileSystem, base: str) -> list[str]:
    """Every key under ``base``, relative to it, listed afresh (object stores' clients cache listings)."""
    fs.invalidate_cache(base)
    if not fs.isdir(base):
        return []
    return sorted(key[len(base) + 1:] for key in fs.find(base))


def _legacy_nodes(fs: fsspec.AbstractFileSystem, root: str, keys: list[str],
                  marked_only: bool = True) -> dict[str, dict[str, str]]:
    """The node list of a store written before stores kept one: the arrays whose attributes name
    their owning stage (format 3), or every Zarr array (format 2, before arrays named their
    owner; also an interrupted creation), and the groups above them."""
    nodes: dict[str, dict[str, str]] = {}
    for key in keys:
        if not key.endswith("/zarr.json"):
            continue
        try:
            meta = json.loads(fs.cat_file(f"{root}/{key}"))
        except (ValueError, OSError):
            continue
        if not isinstance(meta, dict):
            continue
        owner = (meta.get("attributes", {}).get(MARKER) or {}).get("owner") or (None if marked_only else "format 2")
        if meta.get("node_type") == "array" and isinstance(owner, str):
            path = key[: -len("/zarr.json")]
            nodes[path] = {"kind": ARRAY, "owner": owner}
            for group in ancestors(path):
                nodes.setdefault(group, {"kind": GROUP, "owner": owner})
    return nodes


def _remove(fs: fsspec.AbstractFileSystem, root: str, paths: list[str]) -> None:
    """Delete ``paths`` (files, each one checked to be ours), then the local folders they leave
    empty; a folder that still holds something (the lease) stays."""
    if paths:
        fs.rm(paths)
    if isinstance(fs, LocalFileSystem):
        for folder, _, _ in sorted(os.walk(root), key=lambda entry: -entry[0].count(os.sep)):
            if folder != root:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # not empty


class RunStore:
    """A handle on one run's Zarr group. Cheap to open; open one per process.

    A handle with a ``fence`` passes it before every write (the run's lease, see
    ``store.lease``); a ``worker`` handle writes data only: it never changes the manifest, and
    creates only the nodes its stage declared on the driver beforehand."""

    def __init__(self, group: zarr.Group, url: str, fence: Fence | None = None, role: str = "driver") -> None:
        self._group = group
        self.url = url
        self.fence = fence
        self.role = role
        self.manifest = Manifest.from_json(group.attrs[MARKER])
        self._families: dict[type, Any] = {}

    # -- creating and opening --------------------------------------------------------------

    @staticmethod
    def _open_group(url: str, mode: str, fence: Fence | None) -> zarr.Group:
        store = open_zarr_store(url, read_only=mode == "r")
        return zarr.open_group(FencedStore(store, fence) if fence is not None else store, mode=mode,
                               use_consolidated=False)

    @staticmethod
    def inspect_prefix(url: str) -> tuple[str, list[str]]:
        """What is at ``url``: ``("empty", [])``, ``("ours", [])`` (a gig-dist store holding only
        the keys of the nodes its manifest lists), or ``("foreign", keys)`` with keys that are not
        ours."""
        fs, root = _fs(url)
        if fs.isfile(root):
            return "foreign", [root]
        keys = _list_keys(fs, root)
        if not [key for key in keys if not is_lease_key(key)]:
            return "empty", []
        if "zarr.json" not in keys:
            return "foreign", keys[:5]
        try:
            root_meta = json.loads(fs.cat_file(f"{root}/zarr.json"))
        except (ValueError, OSError):
            return "foreign", ["zarr.json (unreadable)"]
        marker = root_meta.get("attributes", {}).get(MARKER) if isinstance(root_meta, dict) else None
        if root_meta.get("node_type") != "group" or not isinstance(marker, dict):
            return "foreign", ["zarr.json (a Zarr " + str(root_meta.get("node_type")) + " without gig-dist's marker)"]
        # Without a node list: format 2 marked no owners, and a creation interrupted before one
        # was kept never became a run anybody could add to; in both, every Zarr array is ours.
        permissive = marker.get("format_version", 0) < 3 or marker.get("state") == "creating"
        nodes = marker.get("nodes") or _legacy_nodes(fs, root, keys, marked_only=not permissive)
        foreign = foreign_keys(keys, nodes)
        return ("foreign", foreign[:5]) if foreign else ("ours", [])

    @staticmethod
    def _marker(url: str) -> dict[str, Any] | None:
        """The gig-dist marker of the root ``zarr.json`` at ``url``, if there is one."""
        fs, root = _fs(url)
        if not fs.isfile(f"{root}/zarr.json"):
            return None
        try:
            found = json.loads(fs.cat_file(f"{root}/zarr.json"))
        except (ValueError, OSError):
            return None
        marker = found.get("attributes", {}).get(MARKER) if found.get("node_type") == "group" else None
        return marker if isinstance(marker, dict) else None

    @classmethod
    def refuse_foreign(cls, url: str) -> None:
        """Raise :class:`StoreError` unless ``url`` is empty or a gig-dist store (reading only the
        root metadata when it is one)."""
        if cls._marker(url) is not None:
            return
        kind, found = cls.inspect_prefix(url)
        if kind == "foreign":
            raise StoreError(_foreign_message(url, found))

    @classmethod
    def claim(cls, url: str, overwrite: bool, fence: Fence | None = None) -> bool:
        """Make ``url`` ready for a new store, or say that one is there to resume (True).

        Deletes only a gig-dist store, and only with ``overwrite`` or when its creation was
        interrupted; refuses anything else before touching it, and deletes only the keys of the
        nodes its manifest lists. Resuming reads the root metadata only: every key is listed just
        before something would be deleted. The lease stays."""
        marker = cls._marker(url) or {}
        if not overwrite and marker.get("state") == "ready":
            return True
        if not overwrite and marker and marker.get("state") != "creating":
            raise StoreError(f"{url} is a gig-dist run of store format {marker.get('format_version')}; this gig-dist "
                             f"writes format {FORMAT_VERSION}. Write to a new --out, or pass --overwrite to replace it")
        kind, found = cls.inspect_prefix(url)
        if kind == "empty":
            return False
        if kind == "foreign":
            raise StoreError(_foreign_message(url, found))
        fs, root = _fs(url)
        doomed = [f"{root}/{key}" for key in _list_keys(fs, root) if not is_lease_key(key)]  # each one ours
        if fence is not None:
            fence.check()
        _remove(fs, root, doomed)
        return False

    @classmethod
    def create(cls, url: str, manifest: Manifest, facts: Facts, paths: list[str], labels: np.ndarray,
               groups: np.ndarray, fence: Fence | None = None) -> RunStore:
        """A new store at ``url`` (which :meth:`claim` cleared): the marker first, then the image
        index, then the manifest's ``ready`` state, the commit point of creation."""
        from gig_dist.store.meta import index_specs

        # Mode "a" deletes nothing; claim() left nothing here but this run's lease.
        group = cls._open_group(url, "a", fence)
        if MARKER in group.attrs or next(iter(group.members()), None) is not None:
            raise StoreError(f"{url}: another gig-dist run created a store here at the same moment; rerun")
        manifest = dataclasses.replace(manifest, format_version=FORMAT_VERSION, state="creating",
                                       facts=facts.to_json(), nodes={})
        group.attrs[MARKER] = manifest.to_json()
        store = cls(group, url, fence)
        store.ensure_arrays("index", index_specs(facts))
        from gig_dist.store.meta import MetaSection

        store.family(MetaSection).write_index(paths, labels, groups)
        store.manifest.state = "ready"
        store.save_manifest()
        return store

    @classmethod
    def open(cls, url: str, mode: str = "r", fence: Fence | None = None, role: str = "driver") -> RunStore:
        try:
            group = cls._open_group(url, mode, fence)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreError(f"no run store at {url}") from None
        except (zarr.errors.NodeTypeValidationError, zarr.errors.ContainsArrayError):
            raise StoreError(f"{url} is a Zarr array, not a gig-dist run store") from None
        if MARKER not in group.attrs:
            raise StoreError(f"{url} is a Zarr group, but not a gig-dist run store (it has no gig-dist marker)")
        found = group.attrs[MARKER]
        version = found.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{url} has store format {version}; this gig-dist reads format {FORMAT_VERSION}. "
                             "Rerun it into a new --out")
        if found.get("state") != "ready":
            raise StoreError(f"{url} is a gig-dist run whose creation was interrupted; rerun the same command "
                             "(or with --overwrite) to create it again")
        return cls(group, url, fence, role)

    def _commit_point(self) -> None:
        """Before a commit (the manifest, a unit's completion, a delete): the lease is still ours."""
        if self.fence is not None:
            self.fence.check()

    def save_manifest(self) -> None:
        """Write the manifest (driver only: workers never change it)."""
        if self.role != "driver":
            raise StoreError(f"{self.url}: a worker tried to change the manifest; only the driver does")
        self._commit_point()
        self._group.attrs[MARKER] = self.manifest.to_json()

    def consolidate(self) -> None:
        """Consolidated metadata for readers (xarray, open_run). Any later manifest write drops it
        again, so readers never see stale consolidated metadata."""
        self._commit_point()
        zarr.consolidate_metadata(self._group.store_path.store, path=self._group.store_path.path or None)

    # -- the nodes the stages created ----------------------------------------------------------------

    @property
    def nodes(self) -> dict[str, dict[str, str]]:
        """The manifest's list of created nodes (derived once for a store written before it)."""
        if not self.manifest.nodes:
            fs, root = _fs(self.url)
            self.manifest.nodes = _legacy_nodes(fs, root, _list_keys(fs, root))
        return self.manifest.nodes

    def declare(self, owner: str, arrays: Iterable[str] = (), groups: Iterable[str] = ()) -> None:
        """Add nodes to the manifest's list before they are created (driver only), with the
        groups above them; one manifest write for all that were not listed."""
        nodes, added = self.nodes, False
        for path, kind in [*((p, ARRAY) for p in arrays), *((p, GROUP) for p in groups)]:
            for group in ancestors(path):
                if group not in nodes:
                    nodes[group], added = {"kind": GROUP, "owner": owner}, True
            if nodes.get(path, {}).get("kind") != kind:
                if path in nodes and nodes[path]["owner"] != owner:
                    raise StoreError(f"{self.url}: {path} belongs to {nodes[path]['owner']}, not {owner}")
                nodes[path], added = {"kind": kind, "owner": owner}, True
        if added:
            self.save_manifest()

    def _require_declared(self, path: str, kind: str, owner: str) -> None:
        if self.nodes.get(path, {}).get("kind") == kind:
            return
        if self.role != "driver":
            raise StoreError(f"{self.url}: {owner} tried to create the {kind} {path}, which its stage did not declare "
                             "before its workers ran (Stage.declared_arrays)")
        self.declare(owner, **({"arrays": [path]} if kind == ARRAY else {"groups": [path]}))

    # -- layout facts ------------------------------------------------------------------------

    @cached_property
    def facts(self) -> Facts:
        return Facts.from_json(self.manifest.facts)

    @property
    def num_images(self) -> int:
        return self.facts.num_images

    @property
    def taps(self) -> dict[str, tuple[int, int, int]]:
        return self.facts.taps

    def units(self) -> list[ImageRange]:
        return self.facts.units

    def unit_slice(self, r: ImageRange) -> slice:
        """The slice of one whole unit: writes of anything else could share a shard with another unit."""
        if r not in self.units():
            raise ValueError(f"{r} is not a work unit of this store; units are shard-aligned")
        return slice(r.start, r.stop)

    def unit_index(self, r: ImageRange) -> int:
        self.unit_slice(r)
        return r.start // self.facts.images_per_unit

    def shard_ranges(self, path: str) -> list[ImageRange]:
        """Image ranges of the shards (or chunks, when unsharded) of array ``path`` along axis 0."""
        array = self.array(path)
        step = (array.shards or array.chunks)[0]
        return unit_ranges(array.shape[0], step)

    # -- arrays ------------------------------------------------------------------------------

    def array(self, path: str) -> zarr.Array:
        """The array at ``path`` (for the section modules only)."""
        try:
            node = self._group[path]
        except KeyError:
            raise StoreError(f"{self.url} has no array {path}; has the stage that writes it run?") from None
        return node

    def has(self, path: str) -> bool:
        return path in self._group

    def members(self, path: str = "") -> Iterator[tuple[str, zarr.Array | zarr.Group]]:
        node = self._group[path] if path else self._group
        return node.members()

    def attrs(self, path: str) -> dict[str, Any]:
        return dict(self._group[path].attrs)

    def set_attrs(self, path: str, **values: Any) -> None:
        """Attributes of a group the stages declared (a group above their arrays)."""
        if self.nodes.get(path, {}).get("kind") != GROUP:
            raise StoreError(f"{self.url}: {path} is not a group of this run's own; its attributes stay as they are")
        node = self._group.require_group(path) if path not in self._group else self._group[path]
        node.attrs.update(json.loads(json.dumps(values)))

    def create_array(self, spec: ArraySpec, owner: str) -> zarr.Array:
        self._require_declared(spec.path, ARRAY, owner)
        array = self._group.create_array(
            spec.path, shape=spec.shape, chunks=spec.chunks, shards=spec.shards, dtype=spec.dtype,
            fill_value=spec.fill_value, compressors=ZstdCodec(level=spec.zstd_level), dimension_names=spec.dims,
            attributes={MARKER: {"owner": owner}},  # with the array's metadata: one write, not two
        )
        return array

    def write_whole(self, path: str, values: np.ndarray, dims: tuple[str, ...], owner: str) -> None:
        """A small array written at once (a fit's results), replacing one the same owner wrote."""
        values = np.asarray(values)
        if path in self._group:
            self.delete(path, owner)
        dtype = "str" if values.dtype.kind in "UO" else values.dtype.str
        array = self.create_array(ArraySpec(path, values.shape, dtype, dims, values.shape or (), fill_value=(
            "" if dtype == "str" else 0)), owner)
        array[...] = values.astype(str) if dtype == "str" else values

    def ensure_arrays(self, owner: str, specs: Iterable[ArraySpec]) -> None:
        """Create the arrays of ``owner`` that do not exist (declared first, in one manifest
        write); keep those that match their spec; grow the growable ones; anything else is an
        error (its stage should have been redone)."""
        specs = list(specs)
        if self.role == "driver":
            self.declare(owner, arrays=[spec.path for spec in specs])
        for spec in specs:
            if spec.path not in self._group:
                self.create_array(spec, owner)
                continue
            array = self._group[spec.path]
            if tuple(array.shape) == spec.shape:
                continue
            grows = all(new >= old for new, old in zip(spec.shape, array.shape))
            if spec.growable and grows and array.ndim == len(spec.shape):
                array.resize(spec.shape)
                continue
            raise StoreError(f"{self.url}: array {spec.path} is {tuple(array.shape)}, its stage now plans "
                             f"{spec.shape}; rerun with --overwrite")

    def delete(self, path: str, owner: str) -> None:
        """Delete the node at ``path``, only if it is ``owner``'s (for a group: every node in it)
        and every key under it is one of the listed nodes' own."""
        if path not in self._group:
            return
        nodes = self.nodes
        node = nodes.get(path)
        if node is None:
            raise StoreError(f"{self.url}: refusing to delete {path}: no stage of this run created it")
        inside = {p: n for p, n in nodes.items() if p == path or p.startswith(path + "/")}
        strangers = [p for p, n in inside.items() if n["kind"] == ARRAY and n["owner"] != owner]
        if node["kind"] == ARRAY and node["owner"] != owner:
            strangers.insert(0, path)
        if strangers:
            raise StoreError(f"{self.url}: refusing to delete {path}: {', '.join(strangers[:3])} not written by {owner}")
        fs, root = _fs(self.url)
        found = foreign_keys([f"{path}/{key}" for key in _list_keys(fs, f"{root}/{path}")], inside)
        if found:
            raise StoreError(f"{self.url}: refusing to delete {path}: it holds {', '.join(found[:5])}, not ours")
        self._commit_point()
        del self._group[path]
        if self.role == "driver":  # a worker replacing an array whole creates it again at once
            for gone in inside:
                if nodes.get(gone, {}).get("kind") == ARRAY:
                    nodes.pop(gone)

    # -- stages and work-unit progress ---------------------------------------------------------

    def record(self, key: str) -> StageRecord | None:
        return self.manifest.stages.get(key)

    @staticmethod
    def is_progress(path: str) -> bool:
        """Whether an array path is a stage's progress (its units' completion markers)."""
        return path.startswith("progress/")

    def owned_arrays(self, owner: str) -> list[str]:
        """Paths of the arrays ``owner`` (a stage's key) created that are in the store."""
        return sorted(path for path, node in self.nodes.items()
                      if node["kind"] == ARRAY and node["owner"] == owner and path in self._group)

    def reset_stage(self, key: str, arrays: Iterable[str]) -> None:
        """Forget a stage's results before redoing it: first the manifest says so, then its
        progress and its arrays go."""
        if key in self.manifest.stages:
            self.manifest.stages[key].fingerprint = None
            self.manifest.stages[key].compacted = None
            self.save_manifest()
        for path in [f"progress/{key}", *arrays]:
            self.delete(path, key)
        self.prune_groups(key)

    def prune_groups(self, owner: str) -> None:
        """Delete the groups ``owner`` created that hold nothing any more (a redo that writes
        fewer taps left empty ``ground/<tap>`` groups that readers still listed), deepest first."""
        nodes = self.nodes
        groups = sorted((p for p, n in nodes.items() if n["kind"] == GROUP and n["owner"] == owner),
                        key=lambda p: -p.count("/"))
        pruned = False
        for path in groups:
            if path in self._group and next(iter(self._group[path].members()), None) is None:
                self.delete(path, owner)
                nodes.pop(path, None)
                pruned = True
        if pruned and self.role == "driver":
            self.save_manifest()

    def begin_stage(self, key: str, record: StageRecord) -> None:
        """Create (or keep) the stage's progress array, then record its fingerprint."""
        self.ensure_arrays(key, [ArraySpec(f"progress/{key}", (max(record.units, 1),), "uint8",
                                           (f"unit_{key.replace('/', '_')}",), (1,), fill_value=0)])
        self.manifest.stages[key] = record
        self.save_manifest()

    def add_seconds(self, key: str, seconds: float) -> None:
        if key in self.manifest.stages:
            self.manifest.stages[key].seconds += seconds
            self.save_manifest()

    def mark_compacted(self, key: str, by: str, fingerprint: str, images: int) -> None:
        """Stage ``key``'s results below image ``images`` are (about to be) deleted by stage
        ``by``, which has them in its own (fingerprint ``fingerprint``)."""
        self.manifest.stages[key].compacted = {"by": by, "fingerprint": fingerprint, "images": images}
        self.save_manifest()

    def finish_stage(self, key: str, methods: dict[str, str] | None = None) -> None:
        self.manifest.stages[key].finished = True
        if methods:
            self.manifest.stages[key].methods = dict(methods)
        self.save_manifest()

    def is_unit_done(self, key: str, unit: int) -> bool:
        return bool(self._group[f"progress/{key}"][unit])

    def done_units(self, key: str) -> np.ndarray:
        if f"progress/{key}" not in self._group:
            return np.zeros(0, dtype=bool)
        return self._group[f"progress/{key}"][:].astype(bool)

    def mark_unit_done(self, key: str, unit: int) -> None:
        self._commit_point()
        self._group[f"progress/{key}"][unit] = 1

    # -- sections --------------------------------------------------------------------------------

    def family(self, kind: type[F], dictionary: str | None = None) -> F:
        """The store's section of one family (``MetaSection``, ``CodesSection``, a new stage's
        own :class:`~gig_dist.store.section.Section` subclass): the family's class owns its paths,
        reads and writes, so a stage adds a family without touching this handle. Families per
        dictionary level take the level's name; a family without one is made once per handle."""
        if dictionary is not None:
            return kind(self, dictionary)
        made = self._families.get(kind)
        if made is None:
            made = self._families[kind] = kind(self)
        return made

    def section(self, prefix: str) -> Section:
        """A plain per-image section at ``prefix``: its arrays are ``<prefix>/<name>``."""
        return Section(self, prefix)

    def dictionaries(self) -> list[str]:
        """The dictionaries this run has concepts for."""
        return [name for name, _ in self.members("concepts")] if self.has("concepts") else []

    # -- summaries -------------------------------------------------------------------------

    def describe_arrays(self) -> dict[str, dict[str, Any]]:
        described = {}
        for path, node in sorted(self._group.members(max_depth=None)):
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


