"""Datasets: listing them (the index the driver writes into the store) and loading one record.

An index is a list of ``(path, label)`` records. The driver builds it once, before any work, and
the store keeps it; workers read their unit's records from the store and never list the dataset
themselves. Toy-world records are ``toy://<seed>/<index>/<size>`` and are rendered on demand.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from gig_dist.data.files import is_url, name_bytes, read_object, shown, url_filesystem
from gig_dist.data.images import SkippedImage, allow_pixels, decode_rgb, open_rgb
from gig_dist.data.labels import UNLABELLED, LabelMap, interleave, map_labels
from gig_dist.settings import ConfigError

if TYPE_CHECKING:
    from gig_dist.config import DatasetConfig

TOY_SCHEME = "toy://"
#: Kernel filesystems: no dataset lives there, and their links lead everywhere.
VIRTUAL_FOLDERS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class DatasetIndex:
    """Paths and labels of the images to process, after the configured stride and limit."""

    paths: list[str]
    #: (N,) int64 output index of each image's class, UNLABELLED where unknown or unmapped.
    labels: np.ndarray
    #: One name per model output once mapped (:func:`apply_label_map`); the dataset's before.
    class_names: list[str]
    #: (N,) the dataset's own class of each image (-1: unlabelled), and those classes' names.
    groups: np.ndarray | None = None
    dataset_classes: list[str] = field(default_factory=list)
    #: How labels became output indices: a key of ``labels.DESCRIPTIONS``.
    label_source: str = "dataset"

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(name_bytes(path) + f"\t{label}\n".encode())  # a name's exact bytes, UTF-8 or not
        return digest.hexdigest()


def toy_path(seed: int, index: int, size: int) -> str:
    return f"{TOY_SCHEME}{seed}/{index}/{size}"


def _toy_index(config: DatasetConfig) -> tuple[list[str], list[int], list[str]]:
    from gig_dist.toy.world import CLASS_NAMES, toy_label

    toy = config.toy
    needed = range(toy.num_images)
    paths = [toy_path(toy.seed, i, toy.image_size) for i in needed]
    return paths, [toy_label(toy.seed, i) for i in needed], list(CLASS_NAMES)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _inside(path: str, regions: list[str]) -> bool:
    return any(path == region or path.startswith(region.rstrip(os.sep) + os.sep) for region in regions)


def _walk_files(folder: Path, regions: list[str], visited: set[str], skipped: list[str],
                outside: list[str]) -> list[str]:
    """Files under ``folder``, following symlinked directories that stay inside the dataset's
    real ``regions`` (its root and its class folders), each real directory once: a link to a
    directory already in the dataset (``ln -s . self``, ``ln -s .. up``) would repeat its images,
    or give another class's images this class's label; a link out of the dataset
    (``/proc/*/cwd``) would walk another tree. Such links go to ``skipped`` and ``outside``. A
    symlinked *file* is read wherever it points."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for name in sorted(d for d in dirnames if _visible(d)):
            real = os.path.realpath(os.path.join(dirpath, name))
            if not _inside(real, regions):
                outside.append(f"{shown(os.path.join(dirpath, name))} -> {shown(real)}")
            elif real in visited:
                skipped.append(f"{shown(os.path.join(dirpath, name))} -> {shown(real)}")
            else:
                visited.add(real)
                keep.append(name)
        dirnames[:] = keep
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f)]
    return found


def _imagefolder_index(root: Path) -> tuple[list[str], list[int], list[str]]:
    """``root/<class>/**/<file>``, classes in sorted order (ImageNet's sorted wnids give the
    torchvision class indices). A folder with files but no class folders is read unlabelled. A
    class folder may be a link to a folder elsewhere (a subset made of links); below the class
    folders, the walk never leaves the dataset."""
    if not root.exists():
        raise ConfigError(f"dataset.path = '{root}': no such directory")
    if not root.is_dir():
        raise ConfigError(f"dataset.path = '{root}' is a file; an imagefolder dataset needs a directory")
    real_root = os.path.realpath(root)
    virtual = [v for v in VIRTUAL_FOLDERS if _inside(real_root, [v])]
    if virtual:
        raise ConfigError(f"dataset.path = '{root}' is in {virtual[0]}, a virtual filesystem of the kernel, not a "
                          "dataset of images")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and _visible(entry.name))
    paths: list[str] = []
    labels: list[int] = []
    # The root and every class folder are in the dataset before any walk starts.
    regions = [real_root] + [os.path.realpath(root / name) for name in class_names]
    visited = set(regions)
    skipped: list[str] = []
    outside: list[str] = []
    for label, name in enumerate(class_names):
        files = _walk_files(root / name, regions, visited, skipped, outside)
        paths += files
        labels += [label] * len(files)
    if skipped:
        warnings.warn(f"dataset.path: {len(skipped)} symlinked folders lead to folders already in the dataset and "
                      f"were skipped (each real folder is read once): {'; '.join(skipped[:5])}"
                      f"{' ...' if len(skipped) > 5 else ''}", stacklevel=2)
    if outside:
        warnings.warn(f"dataset.path: {len(outside)} symlinked folders inside class folders lead out of the dataset "
                      f"and were not followed: {'; '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}",
                      stacklevel=2)
    if not class_names:
        paths = [str(root / f) for f in sorted(os.listdir(root)) if _visible(f) and (root / f).is_file()]
        labels = [UNLABELLED] * len(paths)
    return paths, labels, class_names


def _filelist_index(list_file: Path | str) -> tuple[list[str], list[int], list[str]]:
    """Lines ``path``, ``path,label`` or ``path<whitespace>label``; ``#`` starts a comment;
    relative paths are relative to the list file's folder (or prefix, for a list in object
    storage; entries may be URLs of their own)."""
    if isinstance(list_file, str):  # a URL
        try:
            text = read_object(list_file).decode()
        except FileNotFoundError:
            raise ConfigError(f"dataset.path = '{list_file}': file list not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"dataset.path = '{list_file}': cannot read the file list: {exc}") from None
        base_url = list_file.rsplit("/", 1)[0]
        join = (lambda path: path if is_url(path) else f"{base_url}/{path.lstrip('/')}")  # noqa: E731
    else:
        if not list_file.is_file():
            raise ConfigError(f"dataset.path = '{list_file}': file list not found")
        text = list_file.read_text()
        base = list_file.parent
        join = (lambda path: path if os.path.isabs(path) or is_url(path) else str(base / path))  # noqa: E731
    paths: list[str] = []
    labels: list[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "," in line:
            path, _, label_text = line.rpartition(",")
        else:
            parts = line.rsplit(None, 1)
            path, label_text = (parts[0], parts[1]) if len(parts) == 2 and parts[1].lstrip("-").isdigit() else (line, "")
        path, label_text = path.strip(), label_text.strip()
        try:
            label = int(label_text) if label_text else UNLABELLED
        except ValueError:
            raise ConfigError(f"{list_file}:{number}: label {label_text!r} is not an integer") from None
        paths.append(join(path))
        labels.append(label)
    return paths, labels, []


def _url_imagefolder_index(url: str) -> tuple[list[str], list[int], list[str]]:
    """An ImageFolder tree in object storage, by listing its keys: ``url/<class>/**/<key>``,
    classes in sorted order; keys directly under ``url`` without class folders are unlabelled."""
    fs, root = url_filesystem(url)
    root = root.rstrip("/")
    protocol = url.split("://", 1)[0]
    fs.invalidate_cache(root)
    try:
        keys = sorted(fs.find(root, withdirs=False))
    except (FileNotFoundError, NotADirectoryError):
        keys = []
    relative = [key[len(root) + 1:] for key in keys if key.startswith(root + "/")]
    relative = [key for key in relative if all(_visible(part) for part in key.split("/"))]
    if not relative:
        if fs.isfile(root):
            raise ConfigError(f"dataset.path = '{url}' is an object; an imagefolder dataset needs a prefix of them")
        raise ConfigError(f"dataset.path = '{url}': no objects under this prefix")
    class_names = sorted({key.split("/", 1)[0] for key in relative if "/" in key})
    index = {name: label for label, name in enumerate(class_names)}
    if class_names:
        relative = [key for key in relative if "/" in key]
        labels = [index[key.split("/", 1)[0]] for key in relative]
    else:
        labels = [UNLABELLED] * len(relative)
    return [f"{protocol}://{root}/{key}" for key in relative], labels, class_names


def build_index(config: DatasetConfig) -> DatasetIndex:
    """List the dataset: every ``stride``-th image, in an order that takes the classes in turn
    (``dataset.order``), then the first ``limit``. So every prefix (``limit``, ``decompose.images``,
    ``gig.images``) spreads over the classes instead of covering the first few of a sorted
    ImageFolder. A missing path or an empty dataset is an error here, before any work."""
    if config.kind == "toy":
        paths, labels, class_names = _toy_index(config)
    else:
        assert config.path is not None  # the config validator guarantees it
        if is_url(config.path):
            lister = _url_imagefolder_index if config.kind == "imagefolder" else _filelist_index
            paths, labels, class_names = lister(config.path)
        else:
            lister = _imagefolder_index if config.kind == "imagefolder" else _filelist_index
            paths, labels, class_names = lister(Path(config.path))
    paths, labels = paths[:: config.stride], np.asarray(labels[:: config.stride], dtype=np.int64)
    if config.order == "interleaved":
        order = interleave(labels)
        paths, labels = [paths[i] for i in order], labels[order]
    if config.limit is not None:
        paths, labels = paths[: config.limit], labels[: config.limit]
    if not paths:
        where = f" at '{config.path}'" if config.path else ""
        raise ConfigError(f"the {config.kind} dataset{where} is empty: no images to process")
    return DatasetIndex(paths, labels, class_names, groups=labels, dataset_classes=list(class_names))


def apply_label_map(index: DatasetIndex, mode: str, num_outputs: int, output_names: list[str] | None) -> LabelMap:
    """The index's labels as model outputs (see :mod:`gig_dist.data.labels`)."""
    groups = index.groups if index.groups is not None else index.labels
    return map_labels(mode, groups, index.dataset_classes, num_outputs, output_names,
                      labelled=bool((groups >= 0).any()))


def dataset_groups(index: DatasetIndex) -> np.ndarray:
    """The dataset's own class of every image (-1: unlabelled), whatever the labels map to."""
    return np.asarray(index.groups if index.groups is not None else index.labels, dtype=np.int64)


def with_labels(index: DatasetIndex, mapped: LabelMap) -> DatasetIndex:
    return replace(index, labels=mapped.labels, class_names=mapped.class_names, label_source=mapped.source)


@dataclass(frozen=True)
class TransformSpec:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def build(self) -> T.Compose:
        return T.Compose(
            [
                T.PILToTensor(),
                T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation), antialias=True),
                T.CenterCrop(self.crop),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.mean, self.std),
            ]
        )

    def build_for_mask(self) -> T.Compose:
        """The same geometry for a label mask, with nearest-neighbour resampling."""
        return T.Compose(
            [
                T.PILToTensor(),
                T.Resize(self.resize, interpolation=T.InterpolationMode.NEAREST_EXACT),
                T.CenterCrop(self.crop),
            ]
        )


@dataclass
class Loaded:
    """One record after loading: the model input, or the reason it was skipped."""

    image: torch.Tensor | None  # (3, crop, crop) float32
    reason: str = ""
    part_mask: np.ndarray | None = None  # (crop, crop) uint8, toy world only
    object_mask: np.ndarray | None = None  # (crop, crop) uint8: 0 background, 1 object, 2 distractor (toy only)
    distractor: int = -1  # the distractor's class (toy scenes with one)


class ImageLoader:
    """Loads records to model inputs on a thread pool (PIL decodes with the GIL released)."""

    def __init__(self, transform: TransformSpec, max_pixels: int, threads: int) -> None:
        self.spec = transform
        self.transform = transform.build()
        self.mask_transform = transform.build_for_mask()
        self.max_pixels = max_pixels
        allow_pixels(max_pixels)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gig-dist-load")

    def load(self, path: str) -> Loaded:
        try:
            if path.startswith(TOY_SCHEME):
                return self._load_toy(path)
            image = self._read_object(path) if is_url(path) else open_rgb(path, self.max_pixels)
        except SkippedImage as exc:
            return Loaded(None, str(exc))
        try:
            return Loaded(self.transform(image))
        except Exception as exc:  # noqa: BLE001 - one image that cannot be transformed is skipped, with why
            return Loaded(None, f"cannot transform to the model's input: {type(exc).__name__}: {exc}")

    def _read_object(self, url: str):
        """An image in object storage, by its key (tried again where the store fails)."""
        try:
            data = read_object(url)
        except FileNotFoundError:
            raise SkippedImage("object not found") from None
        except (OSError, ConfigError) as exc:
            raise SkippedImage(f"cannot read object after its retries: {exc}") from None
        return decode_rgb(data, self.max_pixels)

    def _load_toy(self, path: str, distractor: bool = False) -> Loaded:
        from gig_dist.toy.world import render_scene

        seed, index, size = (int(p) for p in path.removeprefix(TOY_SCHEME).split("/"))
        scene = render_scene(seed, index, size, distractor)
        pil = Image.fromarray(np.round(scene.image * 255).astype(np.uint8))
        part_mask = self.mask_transform(Image.fromarray(scene.part_mask))[0].numpy()
        object_mask = self.mask_transform(Image.fromarray(scene.object_mask))[0].numpy()
        return Loaded(self.transform(pil), part_mask=part_mask, object_mask=object_mask, distractor=scene.distractor)

    def load_scene(self, path: str, distractor: bool) -> Loaded:
        """A toy-world record with its part and object masks; with ``distractor``, the same image
        plus an object of another class (``toy.world.render_scene``)."""
        if not path.startswith(TOY_SCHEME):
            raise ValueError(f"{path} is not a toy-world record: only the toy world has ground truth")
        return self._load_toy(path, distractor)

    def submit_all(self, paths: list[str]) -> list[Future[Loaded]]:
        return [self.pool.submit(self.load, path) for path in paths]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
