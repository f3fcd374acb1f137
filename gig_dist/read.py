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

from gig_dist.config import config_from_tree
from gig_dist.stages.base import level_of
from gig_dist.store import (
    LOGITS,
    AtlasSection,
    CodesSection,
    ConceptsSection,
    GIGSection,
    ImageRange,
    MetaSection,
    RunStore,
    StoreError,
)

STATUS_NAMES = ("pending", "processed", "skipped")


class Run:
    """A read-only view of one run store. ``dictionary`` picks among the run's dictionaries
    (default: the one its config names)."""

    def __init__(self, store: RunStore, dictionary: str | None = None) -> None:
        self.store = store
        manifest = store.manifest
        own = level_of(config_from_tree(manifest.config, source=f"the config recorded in {store.url}"))
        if dictionary is None and "@" in own:
            # the last run made a sweep point or a matched level (``<method>@...``): the run's own
            # level is the first one it made
            own = next((level for level in manifest.dictionaries if "@" not in level), own)
        self.dictionary = dictionary or own
        #: The config the dictionary level was made with.
        self.config = config_from_tree(manifest.dictionary_config(self.dictionary),
                                       source=f"the config of {self.dictionary} recorded in {store.url}")
        self._loader = None
        self._pfvs = None

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

    @property
    def graph_class_names(self) -> list[str]:
        """The classes the class graphs are of, one name per graph (``gig.graph_classes``): the
        model's outputs, or the dataset's own classes."""
        from gig_dist.stages.pairs import graph_class_names

        return graph_class_names(self.config, self.store.facts)

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
            paths, labels = self.store.family(MetaSection).read_index(r)
            status, prediction = self.store.family(MetaSection).read_status(r)
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
        loaded = self._loader.load(self.store.family(MetaSection).path(image))
        if loaded.image is None:
            raise StoreError(f"image {image} cannot be read now: {loaded.reason}")
        mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
        return np.clip(loaded.image.numpy() * std + mean, 0, 1).transpose(1, 2, 0).astype(np.float32)

    def pfvs(self, tap: str, image: int) -> xr.DataArray:
        """The PFVs of one image (y, x, channel) float32. A run with ``extract.pfvs = recompute``
        stored none: they are computed again with its image's unit, as its stages computed them
        (the unit's are kept for the next image asked)."""
        channels, height, width = self._tap(tap)
        r = self._image_range(image)
        if self.store.family(MetaSection).has_pfvs(tap):
            values = self.store.family(MetaSection).read_pfvs(tap, r)[0].astype(np.float32)
        else:
            if self._pfvs is None:
                from gig_dist.stages.forward import PFVSource, resolve_device

                self._pfvs = PFVSource(self.config, self.store, resolve_device("auto"), list(self.store.taps))
            unit = self.store.units()[image // self.store.facts.images_per_unit]
            values = self._pfvs.read(tap, unit)[image - unit.start].astype(np.float32)
        return xr.DataArray(values.reshape(height, width, channels), dims=("y", "x", "channel"), name=tap)

    def code_maps(self, tap: str, image: int) -> xr.DataArray:
        """Codes of one image as dense per-concept maps (concept, y, x): the value of each concept
        at each position (0 where the code does not use it)."""
        _, height, width = self._tap(tap)
        codes = self.store.family(CodesSection, self.dictionary)
        if tap not in codes.taps():
            raise StoreError(f"{self.url} has no {self.dictionary} codes at {tap}; decomposed taps: {codes.taps()}")
        index, value = codes.read(tap, self._image_range(image))
        k = self.store.family(ConceptsSection, self.dictionary).count(tap)
        dense = np.zeros((k, height * width), dtype=np.float32)
        positions, slots = np.nonzero(index[0] >= 0)
        np.add.at(dense, (index[0][positions, slots], positions), value[0][positions, slots])
        return xr.DataArray(dense.reshape(k, height, width), dims=("concept", "y", "x"),
                            coords={"concept": np.arange(k)}, name=f"{tap} codes")

    def dataset_label(self, image: int) -> str:
        """The dataset's own label of an image: its class name where labels index the model's
        outputs, else its folder (an image folder's class), else ''."""
        meta = self.store.family(MetaSection)
        path, label = meta.read_index(self._image_range(image))
        if label[0] >= 0:
            return self.class_names[int(label[0])] if label[0] < len(self.class_names) else str(int(label[0]))
        classes = self.store.facts.dataset_classes
        if meta.has_groups():  # the index's own record of the image's dataset class
            group = int(meta.read_groups(self._image_range(image))[0])
            return classes[group] if 0 <= group < len(classes) else ""
        folder = path[0].replace("\\", "/").rsplit("/", 2)[-2] if path[0].count("/") else ""
        return folder if folder in self.store.facts.dataset_classes else ""

    def attributed_images(self) -> np.ndarray:
        """The images GIG attributed toward a class (every pair to the logits has their targets)."""
        gig = self.store.family(GIGSection, self.dictionary)
        pairs = [p for p in self._class_pairs() if gig.has(p, "total")]
        if not pairs:
            return np.zeros(0, dtype=np.int64)
        found = []
        for r in self.store.units():
            reduced = gig.read_reduced(pairs[0], r)
            done = (reduced["target"] >= 0).any(1) & np.isfinite(np.where(reduced["target"] >= 0, reduced["total"], np.nan)).any(1)
            found.append(np.flatnonzero(done) + r.start)
            if not done.any() and r.start >= (self.config.gig.images or self.num_images):
                break
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _class_pairs(self) -> list[tuple[str, str]]:
        from gig_dist.stages.pairs import gig_pairs

        return [p for p in gig_pairs(self.config, list(self.store.taps)) if p[1] == LOGITS]

    def image_summary(self, image: int, top: int = 5) -> dict[str, Any]:
        """What one image shows: its dataset label and the model's prediction, and per decomposed
        tap its ``top`` concepts with their code mass (codes summed over positions), the positions
        that use them, a (y, x) map of their codes, and, where GIG attributed the image, their GIG
        toward its class (the concepts are then those with the largest GIG, by magnitude)."""
        r = self._image_range(image)
        status, prediction = self.store.family(MetaSection).read_status(r)
        predicted = int(prediction[0])
        gig = self.store.family(GIGSection, self.dictionary)
        codes = self.store.family(CodesSection, self.dictionary)
        out: dict[str, Any] = {
            "image": image, "path": self.store.family(MetaSection).path(image), "label": self.dataset_label(image),
            "status": STATUS_NAMES[int(status[0])], "prediction": predicted,
            "prediction_name": self.class_names[predicted] if 0 <= predicted < len(self.class_names) else "",
            "target": None, "target_name": "", "taps": {}}
        for tap in (t for t in self.store.taps if t in codes.taps()):
            maps = self.code_maps(tap, image).values
            mass = maps.reshape(len(maps), -1).sum(1)
            used = (maps.reshape(len(maps), -1) > 0).sum(1)
            toward: dict[int, float] = {}
            pair = (tap, LOGITS)
            if gig.has(pair, "total"):
                reduced = gig.read_reduced(pair, r)
                targets = reduced["target"][0]
                slots = np.flatnonzero((targets >= 0) & np.isfinite(reduced["total"][0]))
                if len(slots):
                    slot = next((t for t in slots if targets[t] == predicted), slots[0])
                    out["target"] = int(targets[slot])
                    out["target_name"] = self.class_names[out["target"]]
                    try:  # every source's GIG, where the run kept it; else the strongest edges
                        vectors, _, _ = gig.read_vectors(pair, r)
                        sources = reduced["source"][0]
                        toward = {int(k): float(v) for k, v in zip(sources, vectors[0, slot]) if k >= 0}
                    except StoreError:
                        toward = {int(k): float(v) for k, v in zip(reduced["edges/source"][0, slot],
                                                                    reduced["edges/value"][0, slot]) if k >= 0}
            if toward:
                order = sorted(toward, key=lambda k: -abs(toward[k]))[:top]
            else:
                order = [int(k) for k in np.argsort(-mass, kind="stable")[:top] if mass[k] > 0]
            out["taps"][tap] = [{"concept": int(k), "mass": float(mass[k]), "positions": int(used[k]),
                                 "gig": toward.get(int(k)), "map": maps[k]} for k in order]
        return out

    def show_image(self, image: int, top: int = 4):
        """A figure of one image: the picture with its label and prediction, and per tap its
        ``top`` concepts (by GIG toward its class where attributed, else by code mass), each
        outlined where its codes are, with its GIG. A ``Figure`` of its own, as
        :meth:`show_concept`."""
        from matplotlib.figure import Figure

        found = self.image_summary(image, top)
        picture = self.image(image)
        taps = [t for t, concepts in found["taps"].items() if concepts]
        columns = max([len(found["taps"][t]) for t in taps] + [1])
        fig = Figure(figsize=(2.1 * (columns + 1), 2.3 * max(len(taps), 1)))
        axes = fig.subplots(max(len(taps), 1), columns + 1, squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        axes[0, 0].imshow(picture)
        axes[0, 0].set_title(f"image {image}\nlabel {found['label'] or '-'}\npredicted {found['prediction_name']}",
                             fontsize=8)
        height, width = picture.shape[:2]
        for row, tap in enumerate(taps):
            axes[row, 0].text(-0.05, 0.5, tap, transform=axes[row, 1].transAxes, rotation=90,
                             ha="right", va="center", fontsize=9)
            for j, entry in enumerate(found["taps"][tap]):
                ax = axes[row, j + 1]
                ax.imshow(highlight(picture, entry["map"]), extent=(0, width, height, 0))
                what = f"GIG {entry['gig']:+.3g}" if entry["gig"] is not None else f"mass {entry['mass']:.3g}"
                ax.set_title(f"{tap}:{entry['concept']}\n{what}", fontsize=7)
        toward = f" (GIG toward {found['target_name']})" if found["target"] is not None else " (not attributed)"
        fig.suptitle(f"image {image}: its concepts{toward}", fontsize=10)
        fig.tight_layout()
        return fig

    # -- per run ------------------------------------------------------------------------------------

    def concepts(self, tap: str) -> xr.DataArray:
        """The concept vectors of ``tap`` (concept, channel)."""
        self._tap(tap)
        vectors = self.store.family(ConceptsSection, self.dictionary).vectors(tap)
        return xr.DataArray(vectors, dims=("concept", "channel"), coords={"concept": np.arange(len(vectors))},
                            name=f"{tap} concepts")

    def gamma(self, source: str, target: str) -> xr.DataArray:
        """The dataset GIG matrix Gamma^(source -> target): (``source_concept``,
        ``target_concept``), or (``source_concept``, ``class``) with the class names as a
        coordinate; the taps are its ``source`` and ``target`` attributes. A matrix stored sparse
        (``gig.dense_matrix_mib``) is read dense here; :meth:`gamma_sparse` reads it as it is stored."""
        matrix = self.store.family(GIGSection, self.dictionary).read_matrix((source, target))
        attrs = {"source": source, "target": target}
        if target == LOGITS:
            return xr.DataArray(matrix, dims=("source_concept", "class"), name=f"Gamma {source} -> classes",
                                coords={"source_concept": np.arange(matrix.shape[0]), "class": np.arange(matrix.shape[1]),
                                        "class_name": ("class", self.class_names[: matrix.shape[1]])}, attrs=attrs)
        return xr.DataArray(matrix, dims=("source_concept", "target_concept"), name=f"Gamma {source} -> {target}",
                            coords={"source_concept": np.arange(matrix.shape[0]),
                                    "target_concept": np.arange(matrix.shape[1])}, attrs=attrs)

    def gamma_sparse(self, source: str, target: str) -> Any:
        """Gamma^(source -> target) as a ``scipy.sparse.csr_array`` (rows: source concepts),
        without its dense form in memory when the store keeps it sparse."""
        return self.store.family(GIGSection, self.dictionary).read_matrix((source, target), sparse=True)

    def _class_index(self, cls: int | str) -> int:
        """A class graph's index from its class's index or name (the model's classes, or the
        dataset's with ``gig.graph_classes = dataset``)."""
        names = self.graph_class_names
        whose = "the dataset has" if self.config.gig.graph_classes == "dataset" else "the model has"
        if isinstance(cls, str) and not cls.lstrip("-").isdigit():
            if cls not in names:
                raise StoreError(f"unknown class {cls!r}; {whose} classes 0..{len(names) - 1} or names "
                                 f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
            return names.index(cls)
        if not 0 <= int(cls) < len(names):
            raise StoreError(f"class {cls} out of range: {whose} classes 0..{len(names) - 1}")
        return int(cls)

    def graph(self, cls: int | str, top: int | None = None, gamma: str | None = None) -> dict[str, Any]:
        """The concept graph of a class (index or name): the stored one, or, with another ``top``
        (sources per concept) or ``gamma`` (``class`` or ``dataset``) than the run's, one built
        again from the stored Gamma."""
        index = self._class_index(cls)
        gig = self.config.gig
        if top is None and gamma in (None, gig.graph_gamma):
            return self.store.family(GIGSection, self.dictionary).read_graph(index)
        from gig_dist.stages.graphs import build_graphs
        from gig_dist.stages.pairs import gig_pairs

        top, gamma = top or gig.graph_top, gamma or gig.graph_gamma
        if top > gig.top_edges and (gamma == "class" or gig.graph_classes == "dataset"):
            raise StoreError(f"--top {top}: the run kept {gig.top_edges} sources per class and target concept "
                             "(gig.top_edges); use --top at most that"
                             + (", or --gamma dataset" if gig.graph_classes == "model" else ""))
        return build_graphs(self.store, self.dictionary, gig_pairs(self.config, list(self.store.taps)), top,
                            gamma, names=self.graph_class_names, by=gig.graph_classes)[index]

    # -- the atlas ----------------------------------------------------------------------------------

    def members(self, tap: str, concept: int) -> dict[str, Any]:
        """A concept's members: image, position, code value and crop (member, y, x, rgb) uint8
        around its iERF, and the iERF kind. Members are the PFVs with the largest code value."""
        self._tap(tap)
        atlas = self.store.family(AtlasSection, self.dictionary)
        if tap not in atlas.taps():
            found = atlas.taps()
            raise StoreError(f"{self.url} has no atlas for tap {tap}" + (
                f"; taps with one: {', '.join(found)}" if found else "; run the members and atlas stages"))
        k = self.store.family(ConceptsSection, self.dictionary).count(tap)
        if not 0 <= concept < k:
            raise StoreError(f"concept {concept} out of range: tap {tap} has concepts 0..{k - 1}")
        members = atlas.members(tap, concept)
        valid = members["image"] >= 0
        rows = atlas.rows(tap)[concept][valid]
        crops = atlas.read_crops("crop", rows) if atlas.has_render(tap) else None
        heat = atlas.read_crops("heat", rows) if crops is not None and atlas.has_heat() else None
        return {"image": members["image"][valid], "position": members["position"][valid],
                "value": members["value"][valid], "crop": crops, "heat": heat,
                "kind": str(atlas.read_crops("kind", rows[:1])[0]) if crops is not None and len(rows) else ""}

    def examples(self, tap: str, concept: int) -> dict[str, Any]:
        """A concept beyond its top members: ``sample``, its random examples (image, position,
        value; a uniform sample of the PFVs that use it, in hash order; None where the run kept
        none), each code's ``percentile`` among the concept's uses, and ``histogram``: counts of
        its code values on the fixed log bins ``edges`` (``kernels.examples``)."""
        from gig_dist.kernels.examples import HISTOGRAM_EDGES, percentile

        self.members(tap, concept)  # the same checks
        atlas = self.store.family(AtlasSection, self.dictionary)
        if not atlas.has_examples(tap):
            raise StoreError(f"{self.url} was made before random examples and histograms; rerun the members stage "
                             "(gig-dist run redoes it)")
        sample, counts = atlas.examples(tap, concept)
        if sample is not None:
            valid = sample["image"] >= 0
            sample = {name: values[valid] for name, values in sample.items()}
            sample["percentile"] = np.asarray([percentile(counts, float(v)) for v in sample["value"]])
        return {"sample": sample, "histogram": counts, "edges": HISTOGRAM_EDGES}

    def show_concept(self, tap: str, concept: int, columns: int = 4):
        """A figure of a concept: its members' crops, the iERF overlaid, in a grid. A matplotlib
        ``Figure`` of its own: pyplot's state and the notebook's backend are left as they were
        (a notebook shows the returned figure; ``fig.savefig(path)`` writes it)."""
        from matplotlib.figure import Figure

        found = self.members(tap, concept)
        n = len(found["image"])
        if found["crop"] is None:
            raise StoreError(f"{self.url} has members but no crops for tap {tap}; run the atlas stage")
        if n == 0:
            fig = Figure(figsize=(3, 1))
            ax = fig.add_subplot()
            ax.axis("off")
            ax.text(0.5, 0.5, f"{tap}:{concept} has no members\n(no decomposed PFV uses it)", ha="center", va="center")
            return fig
        rows = -(-n // columns)
        fig = Figure(figsize=(2 * min(columns, n), 2.3 * rows))
        axes = fig.subplots(rows, min(columns, n), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for j in range(n):
            ax = axes.ravel()[j]
            ax.imshow(found["crop"][j], interpolation="nearest")
            cls = int(self.store.family(MetaSection).image_classes(ImageRange(int(found["image"][j]), int(found["image"][j]) + 1))[0])
            ax.set_title(f"image {found['image'][j]}\n{self.class_names[cls] if cls >= 0 else ''} "
                         f"({found['value'][j]:.2g})", fontsize=8)
        fig.suptitle(f"{tap}: concept {concept} ({found['kind']} iERFs)", fontsize=10)
        fig.tight_layout()
        return fig

    @staticmethod
    def _thumbnail(atlas, tap: str, concept: int) -> np.ndarray:
        """A concept's picture: its top member's crop (the stored mean of its crops without one)."""
        first = atlas.rows(tap)[concept][:1]
        return atlas.read_crops("crop", first)[0] if first[0] >= 0 else atlas.thumbs(tap, concept)

    def show_class(self, cls: int | str):
        """A figure of a class's concept graph: concept thumbnails by tap, edges by Gamma (one
        scale per level), shared concepts framed in orange. A ``Figure`` of its own, as
        :meth:`show_concept`."""
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        c = self._class_index(cls)
        graph = self.graph(c)
        atlas = self.store.family(AtlasSection, self.dictionary)
        levels = graph["taps"]
        nodes = {tap: [n for n in graph["nodes"] if n["tap"] == tap] for tap in levels}
        widest = max([len(v) for v in nodes.values()] + [1])
        fig = Figure(figsize=(max(4, 1.3 * widest), 2.6 * (len(levels) + 1)))
        ax = fig.add_subplot()
        ax.axis("off")
        gap = 2.0  # between the levels: room for the arrows and their values
        where = {("class", c): (widest / 2, gap * len(levels))}
        for level, tap in enumerate(levels):
            for i, node in enumerate(nodes[tap]):
                where[(tap, node["concept"])] = ((i + 0.5) * widest / len(nodes[tap]), gap * (len(levels) - 1 - level))
        for edge in graph["edges"]:  # arrows towards the class, each with its Gamma at its middle
            (x1, y1), (x2, y2) = where[tuple(edge["source"])], where[tuple(edge["target"])]
            ax.annotate("", xy=(x2, y2 - (0.3 if edge["target"][0] == "class" else 0.62)), xytext=(x1, y1 + 0.38), zorder=1,
                        arrowprops={"arrowstyle": "-|>", "color": "0.55", "linewidth": 0.5 + 4 * edge.get("relative", 1),
                                    "shrinkA": 0, "shrinkB": 0, "mutation_scale": 10})
            ax.text(x1 + 0.35 * (x2 - x1), y1 + 0.38 + 0.35 * (y2 - y1 - 1.0), f"{edge['weight']:.2g}", fontsize=6, ha="center", va="center",
                    color="0.25", zorder=3, bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "linewidth": 0})
        x, y = where[("class", c)]
        ax.text(x, y, graph["class_name"], ha="center", va="center", fontsize=11,
                bbox={"boxstyle": "round", "facecolor": "white"}, zorder=3)
        for tap in levels:
            rendered = atlas.has_render(tap) if tap in atlas.taps() else False
            for node in nodes[tap]:
                x, y = where[(tap, node["concept"])]
                if rendered:  # the top member's crop, as the report's thumbnails (a mean of crops blurred)
                    ax.imshow(self._thumbnail(atlas, tap, node["concept"]), extent=(x - 0.35, x + 0.35, y - 0.35, y + 0.35),
                              zorder=2, interpolation="nearest")
                colour = "orange" if node.get("shared") else "0.3"
                ax.add_patch(Rectangle((x - 0.36, y - 0.36), 0.72, 0.72, fill=not rendered, facecolor="white",
                                           edgecolor=colour, linewidth=2, zorder=2))
                ax.text(x, y - 0.48, f"{tap}:{node['concept']}", ha="center", fontsize=7)
        ax.set_xlim(-0.2, widest + 0.2)
        ax.set_ylim(-0.8, gap * len(levels) + 0.6)
        title = (f"{'dataset class' if graph.get('classes') == 'dataset' else 'class'} {c} ({graph['class_name']}): "
                 f"{graph.get('gamma', 'dataset')} Gamma")
        if graph.get("empty"):
            title += f"\nempty graph: {graph['empty']}"
        ax.set_title(title, fontsize=9)
        return fig


def open_run(url: str, dictionary: str | None = None) -> Run:
    """Open the run store at ``url`` (a directory or fsspec URL) for reading."""
    from gig_dist.pipeline import store_url

    return Run(RunStore.open(store_url(url)), dictionary)


# -- the run's summary: what `gig-dist inspect`, the report and the plan show --------------------


def stage_states(store) -> dict[str, dict[str, Any]]:
    """Each recorded stage: units done of those planned, complete, and stale (an input it read
    was redone since)."""
    states = {}
    records = store.manifest.stages
    for key, record in records.items():
        done = store.done_units(key)
        stale = [k for k, fp in record.upstream.items() if k not in records or records[k].fingerprint != fp]
        states[key] = {"complete": bool(record.finished and record.fingerprint), "units_done": int(done.sum()),
                       "units": record.units, "stale": stale, **_coverage(store, key)}
    return states


def _coverage(store, key: str) -> dict[str, Any]:
    """Where a stage's coverage key asks for fewer units than it has (``gig.images``): the key,
    its value and the units it asks for."""
    from gig_dist.stages import registry

    level, _, name = key.rpartition("/")
    try:
        stage_type = registry.by_name(name)
    except KeyError:  # a stage this code does not register
        return {}
    if stage_type.coverage_key is None:
        return {}
    config = config_from_tree(store.manifest.dictionary_config(level) if level else store.manifest.config,
                              source=f"the config of {level or 'the run'} recorded in {store.url}")
    stage = stage_type(config, store.url)
    covered = len(stage.covered_units(store.facts))
    if covered >= store.manifest.stages[key].units:
        return {}
    return {"coverage_key": stage_type.coverage_key, "coverage": stage_type.coverage_value(config),
            "units_covered": covered}


def stage_summaries(store) -> dict[str, dict[str, Any]]:
    """What each registered stage that declares a summary says of its finished results, by
    progress key (``Stage.summary``)."""
    from gig_dist.stages import registry

    found = {}
    records = store.manifest.stages
    for stage in registry.STAGES:
        keys = [f"{d}/{stage.name}" for d in store.dictionaries()] if stage.per_dictionary else [stage.name]
        for key in keys:
            record = records.get(key)
            if record is not None and record.finished:
                said = stage.summary(store, key)
                if said:
                    found[key] = said
    return found


def inspect_summary(url: str) -> dict[str, Any]:
    from gig_dist.store import RunStore

    store = RunStore.open(url)
    manifest = store.manifest
    dictionaries = {}
    for name in store.dictionaries():
        concepts, codes, gig = store.family(ConceptsSection, name), store.family(CodesSection, name), store.family(GIGSection, name)
        dictionaries[name] = {
            "concepts": {tap: concepts.fit(tap) for tap in store.taps if concepts.has(tap)},
            "codes": {tap: codes.summary(tap, concepts.count(tap)) for tap in codes.taps() if concepts.has(tap)},
            "gig": gig.summary(),
        }
    return {
        "store": store.url,
        "stages": stage_states(store),
        "summaries": stage_summaries(store),
        # which relevance and iERF each stage ran, where the model decides (SRD or not)
        "methods": {key: dict(record.methods) for key, record in manifest.stages.items() if record.methods},
        "labels": label_summary(store),
        "coverage": coverage_summary(store),
        "arrays": store.describe_arrays(),
        "images": store.family(MetaSection).image_counts(),
        "skipped": store.family(MetaSection).skipped_images(),
        "taps": {tap: list(shape) for tap, shape in store.taps.items()},
        "dictionaries": dictionaries,
        "config": manifest.config,
        "versions": manifest.versions,
    }


def label_summary(store) -> dict[str, Any]:
    from gig_dist.data.labels import DESCRIPTIONS

    facts = store.facts
    return {"source": facts.label_source, "description": DESCRIPTIONS.get(facts.label_source, facts.label_source),
            "dataset_classes": len(facts.dataset_classes), "outputs": facts.num_outputs}


def coverage_summary(store) -> dict[str, dict[str, Any]]:
    """Processed images per class in what each stage covers: every image (extract), the first
    ``decompose.images`` and the first ``gig.images`` (whole store units)."""
    if not store.family(MetaSection).has_status():
        return {}
    config = store.manifest.config
    unit = store.facts.images_per_unit
    found = {}
    for name, limit in (("extract", None), ("decompose", config.get("decompose", {}).get("images")),
                        ("attribute", config.get("gig", {}).get("images"))):
        if limit is not None:
            limit = min(store.num_images, -(-limit // unit) * unit)
        counts = store.family(MetaSection).class_counts(limit)
        used = counts[counts > 0]
        found[name] = {"images": int(counts.sum()), "classes": int(len(used)), "of_classes": len(counts),
                       "per_class_min": int(used.min()) if len(used) else 0,
                       "per_class_median": float(np.median(used)) if len(used) else 0.0,
                       "per_class_max": int(used.max()) if len(used) else 0}
    return found


def highlight(picture: np.ndarray, code_map: np.ndarray, keep: float = 0.5) -> np.ndarray:
    """``picture`` (H, W, 3) in [0, 1] with the cells of ``code_map`` (h, w) that hold at least
    ``keep`` of its maximum left as they are, the rest washed toward white, and the region's
    edge drawn in orange. Cell (y, x) covers the pixels [y H / h, (y + 1) H / h) x [x W / w, ...):
    the map is placed where the tap's grid lies over the input, not shifted by a cell."""
    height, width = picture.shape[:2]
    peak = float(code_map.max()) if code_map.size else 0.0
    cells = code_map >= keep * peak if peak > 0 else np.zeros_like(code_map, dtype=bool)
    rows = np.minimum(np.arange(height) * code_map.shape[0] // height, code_map.shape[0] - 1)
    cols = np.minimum(np.arange(width) * code_map.shape[1] // width, code_map.shape[1] - 1)
    mask = cells[rows][:, cols]
    shown = np.where(mask[..., None], picture, 0.35 * picture + 0.65)
    edge = mask & ~(np.pad(mask, 1, mode="edge")[:-2, 1:-1] & np.pad(mask, 1, mode="edge")[2:, 1:-1]
                    & np.pad(mask, 1, mode="edge")[1:-1, :-2] & np.pad(mask, 1, mode="edge")[1:-1, 2:])
    shown[edge] = (1.0, 0.55, 0.0)
    return shown.astype(np.float32)
