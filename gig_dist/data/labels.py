"""Which model output a dataset label means (``dataset.label_map``).

A dataset's classes are its own: an ImageFolder of 7 classes numbers them 0..6 in sorted order,
and a 1000-class ImageNet model's output 0 is "tench". A label is only used as an output index
when something says it is one:

* ``dataset``: the dataset's class i is output i (the toy world; a model trained on these
  folders, with ``model.num_classes`` = their number; a file list's integer labels);
* ``imagenet``: folders named by ImageNet wnids (``n01440764``) map to the standard ILSVRC-2012
  indices: the position of the wnid in the sorted list of the 1000 wnids;
* a file: a JSON object ``{"folder": index}`` or lines ``folder index``;
* ``prediction``: labels are not used as outputs; images are grouped by the model's prediction.

``auto`` (the default) picks ``imagenet`` for wnid folders and a 1000-output model, ``dataset``
when the number of classes equals the number of outputs, and otherwise ``prediction`` with a
warning before any work: a run that reads the wrong logit for a class is worse than none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from gig_dist.data.files import regular_file_problem
from gig_dist.settings import ConfigError

UNLABELLED = -1
MODES = ("auto", "dataset", "imagenet", "prediction")
WNID = re.compile(r"n\d{8}")

#: What each label source means, for ``inspect`` and the report.
DESCRIPTIONS = {
    "dataset": "dataset labels are model outputs (class i is output i)",
    "imagenet": "ImageNet wnid folders mapped to the standard 1000-class indices",
    "map": "dataset classes mapped to outputs by dataset.label_map",
    "prediction": "grouped by the model's prediction: the dataset's classes are not the model's outputs",
    "none": "unlabelled images, grouped by the model's prediction",
}


@cache
def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 wnids, sorted: position = torchvision's class index."""
    text = resources.files("gig_dist.data").joinpath("imagenet_wnids.txt").read_text()
    return text.split()


def imagenet_names() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


@dataclass(frozen=True)
class LabelMap:
    labels: np.ndarray  # (N,) output index per image, UNLABELLED where none
    class_names: list[str]  # one per model output
    source: str  # a key of DESCRIPTIONS
    warning: str | None = None

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.source]


#: A label map names at most a few thousand classes; anything larger is not one.
MAX_MAP_BYTES = 16 * 2**20


def _read_map_file(path: Path) -> dict[str, int]:
    """A label map file. Its errors name lines, never quote them: a wrong path (a file of
    secrets, say) must not end up in a log."""
    problem = regular_file_problem(path)
    if problem == "not found":
        raise ConfigError(f"dataset.label_map = '{path}': not one of {', '.join(MODES)} and no such file")
    if problem:
        raise ConfigError(f"dataset.label_map = '{path}' {problem}; give a label map file (JSON or 'name index' lines)")
    if path.stat().st_size > MAX_MAP_BYTES:
        raise ConfigError(f"dataset.label_map = '{path}' has {path.stat().st_size} bytes; a label map is far smaller")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"dataset.label_map = '{path}' is not a text file (JSON or 'name index' lines)") from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:
        loaded = None
    if isinstance(loaded, dict):
        pairs = list(loaded.items())
    else:
        pairs = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise ConfigError(f"{path}:{number}: expected 'class_name output_index', got a line of {len(parts)} "
                                  "field(s)")
            pairs.append((parts[0], parts[1]))
    mapping = {}
    for name, index in pairs:
        try:
            mapping[str(name)] = int(index)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: entry {len(mapping) + 1} maps a class to something that is not an output "
                              "index (an integer)") from None
    return mapping


def _names(classes: list[str], limit: int = 5) -> str:
    return ", ".join(classes[:limit]) + (" ..." if len(classes) > limit else "")


def map_labels(mode: str, groups: np.ndarray, dataset_classes: list[str], num_outputs: int,
               output_names: list[str] | None, labelled: bool) -> LabelMap:
    """Output index of every image from its dataset class (``groups``, -1 unknown).

    ``labelled``: the dataset gives labels at all. ``dataset_classes`` are the class names (empty
    for a file list, whose integer labels are taken as output indices)."""
    outputs = output_names if output_names and len(output_names) == num_outputs else None
    default_names = outputs or [str(i) for i in range(num_outputs)]
    none = np.full(len(groups), UNLABELLED, dtype=np.int64)
    if not labelled:
        return LabelMap(none, default_names, "none")
    classes = list(dataset_classes)
    wnids = bool(classes) and all(WNID.fullmatch(c) for c in classes)
    count = len(classes) if classes else int(groups.max()) + 1
    if mode == "auto":
        if wnids and num_outputs == 1000:
            mode = "imagenet"
        elif count == num_outputs or (not classes and count <= num_outputs):
            mode = "dataset"
        else:
            what = f"{count} classes ({_names(classes)})" if classes else f"labels up to {count - 1}"
            warning = (f"the dataset's {what} are not the model's {num_outputs} outputs, so a label is not an output "
                       f"index; images are grouped by the model's prediction instead. Set dataset.label_map to a file "
                       f"mapping class names to output indices ('imagenet' for ImageNet wnid folders), or use a model "
                       f"with model.num_classes = {count}; gig.graph_classes=dataset draws the class graphs by the dataset's own "
                       f"classes")
            return LabelMap(none, default_names, "prediction", warning)
    if mode == "prediction":
        return LabelMap(none, default_names, "prediction")
    if mode == "dataset":
        if count > num_outputs:
            raise ConfigError(f"dataset.label_map = dataset: the dataset has {count} classes but the model only "
                              f"{num_outputs} outputs")
        names = classes + default_names[len(classes):] if classes else default_names
        return LabelMap(groups.astype(np.int64), names, "dataset")
    if mode == "imagenet":
        if num_outputs != 1000:
            raise ConfigError(f"dataset.label_map = imagenet needs a 1000-output model; this one has {num_outputs}")
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [c for c in classes if c not in index]
        if not classes or unknown:
            raise ConfigError("dataset.label_map = imagenet: "
                              + (f"these folders are not ImageNet wnids: {_names(unknown)}" if classes else
                                 "the dataset has no class folders"))
        lookup = np.asarray([index[c] for c in classes], dtype=np.int64)
        return LabelMap(np.where(groups >= 0, lookup[np.maximum(groups, 0)], UNLABELLED), imagenet_names(), "imagenet")
    mapping = _read_map_file(Path(mode))
    if not classes:
        raise ConfigError(f"dataset.label_map = '{mode}' maps class names, but this dataset has no class folders")
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise ConfigError(f"dataset.label_map = '{mode}' does not map the classes {_names(missing)}")
    wrong = {c: mapping[c] for c in classes if not 0 <= mapping[c] < num_outputs}
    if wrong:
        raise ConfigError(f"dataset.label_map = '{mode}': outputs {wrong} are outside the model's 0..{num_outputs - 1}")
    lookup = np.asarray([mapping[c] for c in classes], dtype=np.int64)
    names = list(default_names)
    if not outputs:
        for c in classes:
            names[mapping[c]] = c
    return LabelMap(np.where(groups >= 0, lookup[np.maximum(groups, 0)], UNLABELLED), names, "map")


def interleave(groups: np.ndarray) -> np.ndarray:
    """An order of the images that takes one image of each class in turn (classes in index order,
    each class's images in their listed order): the first N images of it cover min(N, classes)
    classes as evenly as the class sizes allow. Unlabelled images keep their order, at the end."""
    groups = np.asarray(groups)
    rank = np.zeros(len(groups), dtype=np.int64)
    for g in np.unique(groups[groups >= 0]):
        members = np.flatnonzero(groups == g)
        rank[members] = np.arange(len(members))
    rank[groups < 0] = np.iinfo(np.int64).max
    return np.lexsort((np.arange(len(groups)), groups, rank))
