"""Which keys under a store are gig-dist's own, and so may ever be deleted.

A key is ours only when the manifest's list of the nodes the stages created (``Manifest.nodes``,
written by the driver *before* a node is created) names its array or group, and the key is one
of that node's own: its ``zarr.json``, or, for an array, one of its chunk keys (``c`` followed by
one integer per dimension, zarr v3's default encoding). Zarr's temporary files of those keys
(``<name>.<32 hex>.partial``, left by a process killed while it wrote them) are ours too, as are
the root's ``zarr.json`` and the lease's own objects. Nothing is decided by a name alone: a
user's group, a note in an array's folder, a stray ``zarr.json`` are never ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from gig_dist.store.lease import is_lease_key

ARRAY, GROUP = "array", "group"
_PARTIAL = re.compile(r"(?P<stem>.+)\.[0-9a-f]{32}\.partial")


def ancestors(path: str) -> list[str]:
    """The groups above ``path``, outermost first (the root, ``""``, excluded)."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def is_own_key(key: str, nodes: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether ``key`` (relative to the store's root) belongs to a node in ``nodes``."""
    if key == "zarr.json" or is_lease_key(key):
        return True
    folder, _, name = key.rpartition("/")
    partial = _PARTIAL.fullmatch(name)
    if partial:  # pathlib's with_suffix: "zarr.json" -> "zarr.<hex>.partial", "0" -> "0.<hex>.partial"
        stem = f"{folder}/{partial['stem']}" if folder else partial["stem"]
        return any(is_own_key(original, nodes) for original in (stem, f"{stem}.json") if not original.endswith(".partial"))
    if name == "zarr.json":
        return folder in nodes
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part != "c" or i == 0:
            continue
        node = nodes.get("/".join(parts[:i]))
        if node is not None and node.get("kind") == ARRAY and all(p.isdigit() for p in parts[i + 1:]):
            return True
    return False


def foreign_keys(keys: Iterable[str], nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The keys of ``keys`` that are not ours, in order."""
    return [key for key in keys if not is_own_key(key, nodes)]
