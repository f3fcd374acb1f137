"""Concept dictionaries, one module each, behind one interface (docs/architecture.md).

A dictionary follows scikit-learn's estimator contract and overcomplete's verbs::

    dictionary = make_dictionary("bisecting_kmeans", n_concepts=512).fit(X)   # X (n, C) PFVs
    index, value = dictionary.encode(X)       # sparse codes, each (n, L); index -1 in unused slots
    X_hat = dictionary.decode(index, value)   # (n, C) reconstruction
    dictionary.dictionary_                    # (K, C) concept vectors, unit rows (zero rows allowed)
    dictionary.tree_                          # optional: a split tree over the concepts

Hyper-parameters live only in ``__init__``; those of one method alone are its ``own_params``,
set from the config as ``concepts.params.<method>.<name>``. Learned state ends in ``_``;
``encode``/``decode`` before ``fit`` raise ``NotFittedError``. The pipeline stores a fitted
dictionary as named arrays (:meth:`~base.Dictionary.fitted_arrays`) and rebuilds it in a worker
with :meth:`~base.Dictionary.from_arrays`.

A new dictionary is one module with one class, and one line in :data:`DICTIONARIES` (or
:func:`register` at run time, or an entry point in the group ``gig_dist.dictionaries``);
:func:`gig_dist.testing.check_dictionary` is the contract it must pass.

This module imports none of them until one is asked for: validating a config imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

__all__ = ["DICTIONARIES", "make_dictionary", "register"]

_BUILTIN = {
    "bisecting_kmeans": "gig_dist.kernels.dictionaries.bisecting_kmeans:BisectingKMeansDictionary",
    "kmeans": "gig_dist.kernels.dictionaries.kmeans:KMeansDictionary",
    "dictionary_learning": "gig_dist.kernels.dictionaries.dictionary_learning:DictionaryLearningDictionary",
    "nmf": "gig_dist.kernels.dictionaries.nmf:NMFDictionary",
    "sae": "gig_dist.kernels.dictionaries.sae:SparseAutoencoderDictionary",
}


class _Registry(Mapping):
    """Dictionary classes by the name ``concepts.method`` takes (also its level in the store),
    each imported when first asked for."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = dict(paths)
        self._loaded: dict[str, type] = {}
        self._plugins = False

    def _discover(self) -> None:
        if not self._plugins:
            self._plugins = True
            for entry in metadata.entry_points(group="gig_dist.dictionaries"):
                self._paths.setdefault(entry.name, entry.value)

    def __getitem__(self, name: str) -> type:
        self._discover()
        if name not in self._loaded:
            if name not in self._paths:
                raise KeyError(name)
            target = self._paths[name]
            if isinstance(target, str):
                module, _, attribute = target.partition(":")
                target = getattr(importlib.import_module(module), attribute)
            self._loaded[name] = target
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:  # by name: imports nothing
        self._discover()
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        self._discover()
        return iter(self._paths)

    def __len__(self) -> int:
        self._discover()
        return len(self._paths)

    def register(self, name: str, target: type | str) -> None:
        self._paths[name] = target
        self._loaded.pop(name, None)

    def unregister(self, name: str) -> None:
        self._paths.pop(name, None)
        self._loaded.pop(name, None)


#: Every dictionary by name.
DICTIONARIES = _Registry(_BUILTIN)


def register(name: str, target: type | str) -> None:
    """Add a dictionary (a class, or ``"module:Class"``) under ``name``: ``concepts.method=name``
    then uses it, with its ``own_params`` settable as ``concepts.params.<name>.<param>``. This
    registers it in this process only: Ray workers are other processes, so for a run on Ray
    declare it as an entry point in the group ``gig_dist.dictionaries`` of an installed package."""
    DICTIONARIES.register(name, target)


def make_dictionary(method: str, **params: Any):
    if method not in DICTIONARIES:
        raise ValueError(f"unknown dictionary {method!r}; the dictionaries are {', '.join(DICTIONARIES)}")
    return DICTIONARIES[method](**params)
