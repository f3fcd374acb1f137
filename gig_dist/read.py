"""``open_run``: the one way to read a finished (or partial) run, for notebooks, the report and
the evaluation. Reads go through the store's sections, one image or one matrix at a time, so a
run of any size can be explored from a laptop.

    run = gig_dist.open_run("gig-dist-run.zarr")
    run.image(3)                      # (H, W, 3) float in [0, 1]: image 3 as the model saw it
    run.code_maps("layer3.1", 3)      # (concept, y, x) xarray.DataArray of its codes
    run.gamma("layer3.1", "logits")   # (layer3.1 concept, class) with the class names
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from gig_dist.config import Config
from gig_dist.store import LOGITS, ImageRange, RunStore, StoreError

STATUS_NAMES = ("pending", "processed", "skipped")


class Run:
    """A read-only view of one run store. ``dictionary`` picks among the run's dictionaries
    (default: the one its config names)."""

    def __init__(self, store: RunStore, dictionary: str | None = None) -> None:
        self.store = store
        self.config = Config.model_validate(store.manifest.config)
        self.dictionary = dictionary or self.config.concepts.method
        self._loader = None

    def __repr__(self) -> str:
        return (f"Run({self.store.url!r}: {self.num_images} images, taps {', '.join(self.taps)}, "
                f"dictionaries {', '.join(self.store.dictionaries()) or 'none yet'})")

    # -- what the run is --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def num_images(self) -> int:
        return self.store.num_images

    @property
    def taps(self) -> dict[str, tuple[int, int, int]]:
        """tap -> (channels, height, width), in forward order."""
        return dict(self.store.taps)

    @property
    def class_names(self) -> list[str]:
        names = list(self.store.facts.class_names)
        return names + [str(c) for c in range(len(names), self.store.facts.num_outputs)]

    def _tap(self, tap: str) -> tuple[int, int, int]:
        if tap not in self.store.taps:
            raise KeyError(f"tap {tap!r} is not in this run; its taps are {', '.join(self.store.taps)}")
        return self.store.taps[tap]

    def _image_range(self, image: int) -> ImageRange:
        if not 0 <= image < self.num_images:
            raise IndexError(f"image {image} is outside the run (0..{self.num_images - 1})")
        return ImageRange(image, image + 1)

    # -- per image --------------------------------------------------------------------------------

    def images(self) -> xr.Dataset:
        """Path, label, prediction and status of every image (one row each; small even at 50,000)."""
        columns: dict[str, list[np.ndarray]] = {"path": [], "label": [], "prediction": [], "status": []}
        for r in self.store.units():
            paths, labels = self.store.meta.read_index(r)
            status, prediction = self.store.meta.read_status(r)
            columns["path"].append(np.asarray(paths, dtype=str))
            columns["label"].append(labels)
            columns["prediction"].append(prediction)
            columns["status"].append(np.asarray(STATUS_NAMES, dtype=str)[status])
        return xr.Dataset({name: ("image", np.concatenate(parts)) for name, parts in columns.items()},
                          coords={"image": np.arange(self.num_images)})

    def image(self, image: int) -> np.ndarray:
        """Image ``image`` (H, W, 3) float32 in [0, 1], as the model saw it: decoded (or rendered,
        on the toy world) and resized and cropped with the run's transform."""
        from gig_dist.data.sources import ImageLoader, TransformSpec

        self._image_range(image)
        spec = TransformSpec(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in self.store.manifest.transform.items()})
        if self._loader is None:
            self._loader = ImageLoader(spec, self.config.dataset.max_image_pixels, 1)
        loaded = self._loader.load(self.store.meta.path(image))
        if loaded.image is None:
            raise StoreError(f"image {image} cannot be read now: {loaded.reason}")
        mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
        return np.clip(loaded.image.numpy() * std + mean, 0, 1).transpose(1, 2, 0).astype(np.float32)

    def pfvs(self, tap: str, image: int) -> xr.DataArray:
        """The PFVs of one image (y, x, channel) float32."""
        channels, height, width = self._tap(tap)
        values = self.store.meta.read_pfvs(tap, self._image_range(image))[0].astype(np.float32)
        return xr.DataArray(values.reshape(height, width, channels), dims=("y", "x", "channel"), name=tap)

    def code_maps(self, tap: str, image: int) -> xr.DataArray:
        """Codes of one image as dense per-concept maps (concept, y, x): the value of each concept
        at each position (0 where the code does not use it)."""
        _, height, width = self._tap(tap)
        codes = self.store.codes(self.dictionary)
        if tap not in codes.taps():
            raise StoreError(f"{self.url} has no {self.dictionary} codes at {tap}; decomposed taps: {codes.taps()}")
        index, value = codes.read(tap, self._image_range(image))
        k = self.store.concepts(self.dictionary).count(tap)
        dense = np.zeros((k, height * width), dtype=np.float32)
        positions, slots = np.nonzero(index[0] >= 0)
        np.add.at(dense, (index[0][positions, slots], positions), value[0][positions, slots])
        return xr.DataArray(dense.reshape(k, height, width), dims=("concept", "y", "x"),
                            coords={"concept": np.arange(k)}, name=f"{tap} codes")

    # -- per run ------------------------------------------------------------------------------------

    def concepts(self, tap: str) -> xr.DataArray:
        """The concept vectors of ``tap`` (concept, channel)."""
        self._tap(tap)
        vectors = self.store.concepts(self.dictionary).vectors(tap)
        return xr.DataArray(vectors, dims=("concept", "channel"), coords={"concept": np.arange(len(vectors))},
                            name=f"{tap} concepts")

    def gamma(self, source: str, target: str) -> xr.DataArray:
        """The dataset GIG matrix Gamma^(source -> target): (``<source> concept``, ``<target>
        concept``) or (``<source> concept``, ``class``) with the class names as coordinates."""
        matrix = self.store.gig(self.dictionary).read_matrix((source, target))
        rows = f"{source} concept"
        if target == LOGITS:
            return xr.DataArray(matrix, dims=(rows, "class"), name=f"Gamma {source} -> classes",
                                coords={rows: np.arange(matrix.shape[0]), "class": np.arange(matrix.shape[1]),
                                        "class_name": ("class", self.class_names[: matrix.shape[1]])})
        columns = f"{target} concept"
        return xr.DataArray(matrix, dims=(rows, columns), name=f"Gamma {source} -> {target}",
                            coords={rows: np.arange(matrix.shape[0]), columns: np.arange(matrix.shape[1])})

    def graph(self, cls: int | str) -> dict[str, Any]:
        """The concept graph of a class (index or name)."""
        if isinstance(cls, str):
            if cls not in self.class_names:
                raise KeyError(f"unknown class {cls!r}; classes: {', '.join(self.class_names[:10])} ...")
            cls = self.class_names.index(cls)
        return self.store.gig(self.dictionary).read_graph(int(cls))


def open_run(url: str, dictionary: str | None = None) -> Run:
    """Open the run store at ``url`` (a directory or fsspec URL) for reading."""
    from gig_dist.pipeline import store_url

    return Run(RunStore.open(store_url(url)), dictionary)
