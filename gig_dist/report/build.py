"""The report's builder: what each page shows, read through the run, handed to the templates."""

from __future__ import annotations

import html
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gig_dist.kernels import metrics
from gig_dist.kernels.examples import (
    HISTOGRAM_EDGES,
    QUANTILES,
    percentile,
    quantile_picks,
    quantile_values,
    top_share,
)
from gig_dist.kernels.gig import LOGITS
from gig_dist.kernels.graphs import column, row, strongest
from gig_dist.kernels.metrics import concept_purity
from gig_dist.read import Run
from gig_dist.report import figures
from gig_dist.report.pages import PAGE, render, safe
from gig_dist.store import (
    AtlasSection,
    CodesSection,
    ConceptsSection,
    EvaluationSection,
    GIGSection,
    MetaSection,
    RunStore,
    StoreError,
)

#: Concepts read per block while building.
BLOCK = 1024
#: Side in px of a member's crop and of an example on a concept page.
VIEW = 112


@dataclass
class ReportSummary:
    site: Path
    pages: int = 0
    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)
    graph_layout: str = ""


class Report:
    """Builds the site of one run's dictionary level: reads through the run (``read.Run`` and its
    store's families), renders pages from ``templates/`` and draws figures (``figures``)."""

    def __init__(self, url: str, site: Path, dictionary: str | None = None) -> None:
        self.run = Run(RunStore.open(url), dictionary)
        self.store = self.run.store
        self.config = self.run.config
        self.dictionary = self.run.dictionary
        self.site = Path(site).resolve()
        self.summary = ReportSummary(self.site)
        self.class_names = self.run.class_names
        #: The classes the graphs are of (``gig.graph_classes``): the model's, or the dataset's own.
        self.graph_names = self.run.graph_class_names
        self.by = self.config.gig.graph_classes
        self.atlas = self.store.family(AtlasSection, self.dictionary)
        self.gig = self.store.family(GIGSection, self.dictionary)
        self.concepts = self.store.family(ConceptsSection, self.dictionary)
        self.taps = [t for t in self.store.taps if self.concepts.has(t)] if self.dictionary in self.store.dictionaries() else []
        self.rendered = [t for t in self.taps if t in self.atlas.taps() and self.atlas.has_render(t)]
        self.purity: dict[str, dict[str, Any]] = {}
        self.background: dict[str, np.ndarray] = {}
        #: The class graphs, and the classes with attributed images (the ones that get a page;
        #: None: no graphs yet, every class is linked as before).
        self.graphs, self.attributed = self._read_graphs()
        #: Images whose picture is written (img/image/<i>.jpg): their (height, width); None: unreadable.
        self.pictures: dict[int, tuple[int, int] | None] = {}
        #: Per tap its most important concepts (the index shows them).
        self.top: dict[str, list[int]] = {}
        #: The attributed images (each has a page) and, for every image the report names, its
        #: dataset label, prediction and the class it counts for.
        self.images = self.run.attributed_images() if self.dictionary in self.store.dictionaries() else np.zeros(0, int)
        self.image_facts: dict[int, dict[str, Any]] = {}
        self.image_set = {int(i) for i in self.images}

    # -- helpers -----------------------------------------------------------------------------------

    def _write(self, relative: str, template: str, title: str, depth: int, **values: Any) -> None:
        path = self.site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(template, title=title, depth=depth, concept_link=self.concept_link,
                               class_link=self.class_link, graph_link=self.graph_link, image_pages=self.image_set,
                               **values))
        self.summary.pages += 1

    def _matrix(self, pair: tuple[str, str]) -> np.ndarray | None:
        return self.gig.read_matrix(pair) if self.gig.has_matrix(pair) else None

    def importance(self, tap: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per concept its strongest Gamma to a class, and that matrix (None without one)."""
        matrix = self._matrix((tap, LOGITS))
        if matrix is None:
            return None, None
        return matrix.max(axis=1), matrix

    def concept_link(self, tap: str, k: int, depth: int, label: str = "") -> str:
        up = "../" * depth
        thumb = (f"<img class='thumb' src='{up}img/{safe(tap)}/t{k}.png' alt='{tap}:{k}'>" if tap in self.rendered
                 else "")
        return f"<a href='{up}concept/{safe(tap)}/{k}.html'>{thumb} {html.escape(label or f'{tap}:{k}')}</a>"

    def class_link(self, c: int, depth: int) -> str:
        """A model class, linked to its graph's page where it has one."""
        if self.by == "dataset":  # the graphs are of the dataset's classes: a model class has no page
            return html.escape(self.class_names[c])
        return self.graph_link(c, depth)

    def graph_link(self, c: int, depth: int) -> str:
        """A graph class (``gig.graph_classes``), linked to its page where it has one."""
        if self.attributed is not None and c not in self.attributed:  # no page: no attributed image
            return html.escape(self.graph_names[c])
        return f"<a href='{'../' * depth}class/{c}.html'>{html.escape(self.graph_names[c])}</a>"

    def _read_graphs(self) -> tuple[dict[int, dict[str, Any]], list[int] | None]:
        if not self.gig.has_graphs():
            return {}, None
        graphs = {}
        for c in range(len(self.graph_names)):
            try:
                graphs[c] = self.gig.read_graph(c)
            except StoreError:  # not built yet
                return {}, None
        return graphs, [c for c, graph in graphs.items() if graph.get("images", 1)]

    # -- build ------------------------------------------------------------------------------------------

    def build(self) -> ReportSummary:
        started = time.perf_counter()
        if self.site.exists():
            marker = self.site / ".gig-dist-report"
            if any(self.site.iterdir()) and not marker.exists():
                raise StoreError(f"--out {self.site} exists and is not a gig-dist report; choose another folder")
            shutil.rmtree(self.site)
        self.site.mkdir(parents=True)
        (self.site / ".gig-dist-report").write_text(self.store.url + "\n")
        if not self.taps:
            self.summary.missing.append("concepts (run the concepts stage)")
        self._read_image_facts(self.images)
        for tap in self.taps:
            self.build_tap(tap)
        self.build_images()
        self.build_classes()
        self.build_index()
        self.summary.seconds = time.perf_counter() - started
        files = [p for p in self.site.rglob("*") if p.is_file()]
        self.summary.bytes = sum(p.stat().st_size for p in files)
        self.summary.images = sum(1 for p in files if p.suffix in (".png", ".svg"))
        return self.summary

    def build_tap(self, tap: str) -> None:
        k = self.concepts.count(tap)
        importance, class_matrix = self.importance(tap)
        has_members = tap in self.atlas.taps()
        usage = self.atlas.usage(tap) if has_members else np.zeros(k, dtype=np.int64)
        share = usage / max(int(usage.sum()), 1)
        part_mass = self.atlas.part_mass(tap) if tap in self.rendered else None
        purity = part = None
        if part_mass is not None:
            purity, part = concept_purity(part_mass)
            self.purity[tap] = {"purity": purity, "part": part}
            # the share of the shown iERF mass on no part: at half or more, a background concept
            total = part_mass.sum(1)
            self.background[tap] = np.where(total > 0, part_mass[:, 0] / np.maximum(total, 1e-30), np.nan)
        order = np.argsort(-(importance if importance is not None else usage.astype(float)), kind="stable")
        self.top[tap] = [int(c) for c in order[:8]]
        tree = self.concepts.arrays(tap)
        sources = [p for p in self._pairs() if p[1] == tap and self.gig.has_matrix(p)]
        targets = [p for p in self._pairs() if p[0] == tap and p[1] != LOGITS and self.gig.has_matrix(p)]
        # concept pairs may be stored sparse (gig.dense_matrix_mib): a page reads one column or row
        source_mats = {p: self.gig.read_matrix(p, sparse=True).tocsc() for p in sources}
        target_mats = {p: self.gig.read_matrix(p, sparse=True) for p in targets}
        samples = histograms = None
        if has_members and self.atlas.has_examples(tap):
            samples, histograms = self.atlas.samples(tap), self.atlas.histograms(tap)
            if samples is not None and tap in self.rendered:
                self._read_image_facts(samples["image"])
        heat = tap in self.rendered and self.atlas.has_heat()
        if tap in self.rendered:
            rows_all = self.atlas.rows(tap)
            members = self.atlas.members(tap)
            self._read_image_facts(members["image"])
            kind = str(self.atlas.read_crops("kind", rows_all[rows_all >= 0][:1])[0]) if (rows_all >= 0).any() else ""
        for first in range(0, k, BLOCK):  # thumbnails and concept pages, a block at a time
            stop = min(first + BLOCK, k)
            shown = None
            if tap in self.rendered:
                thumbs = self.atlas.thumbs(tap, slice(first, stop))
                block_rows = rows_all[first:stop]
                # with heat maps a page shows no stored crop: only the thumbnail, the top member's
                # (reading every member's crop was half the report's time)
                crop_rows = block_rows[:, :1] if heat else block_rows
                crops = self.atlas.read_crops("crop", crop_rows).reshape(*crop_rows.shape, *thumbs.shape[1:])
                boxes = self.atlas.read_crops("box", block_rows).reshape(*block_rows.shape, 4)
                heats = (self.atlas.read_crops("heat", block_rows).reshape(*block_rows.shape, -1) if heat else None)
            for c in range(first, stop):
                if tap in self.rendered:
                    valid = rows_all[c] >= 0
                    # the thumbnail: the top member's crop (a mean of crops was a blur that looked alike)
                    figures.png(crops[c - first][0] if valid[0] else thumbs[c - first],
                                self.site / "img" / safe(tap) / f"t{c}.png")
                    shown = (crops[c - first][valid[: crops.shape[1]]], {n: v[c][valid] for n, v in members.items()},
                             boxes[c - first][valid], kind, heats[c - first][valid] if heats is not None else None)
                examples = (None if histograms is None else
                            ({n: v[c] for n, v in samples.items()} if samples is not None else None, histograms[c]))
                self.build_concept(tap, c, usage, share, importance, class_matrix, tree, source_mats, target_mats,
                                   shown, purity, part, examples)
        # index pages
        pages = max(1, -(-k // PAGE))
        how = ("sorted by importance: the largest Gamma to a class" if importance is not None else
               "sorted by size: this tap has no GIG to the classes (gig.pairs)")
        purity_summary = None
        finite = purity[np.isfinite(purity)] if purity is not None else []
        if len(finite):  # no concept of the tap has shown members: no purity to summarise
            purity_summary = {"median": np.median(finite), "low": np.quantile(finite, .25),
                              "high": np.quantile(finite, .75), "pure": int((finite >= 0.8).sum()), "count": len(finite)}
        for p in range(pages):
            rows = []
            for c in order[p * PAGE : (p + 1) * PAGE]:
                drives = ([int(j) for j in np.argsort(-class_matrix[c])[:3] if class_matrix[c, j] > 0]
                          if class_matrix is not None else [])
                pure = purity is not None and np.isfinite(purity[c])
                rows.append({"background": self._background(tap, c), "concept": int(c), "usage": usage[c], "share": share[c],
                             "importance": None if importance is None else importance[c], "drives": drives,
                             "purity": purity[c] if pure else None, "part": self._part_name(part[c]) if pure else ""})
            self._write(f"tap/{safe(tap)}/p{p}.html", "tap.html", f"{tap}: concepts", 2, tap=tap, k=k, how=how,
                        page=p, pages=pages, rendered=tap in self.rendered, purity_summary=purity_summary, rows=rows)

    def _background(self, tap: str, c: int) -> float | None:
        """The share of concept ``c``'s shown iERF mass on the background, where it is half or more
        (a background concept: its purity names no part); None otherwise."""
        share = self.background.get(tap)
        return float(share[c]) if share is not None and np.isfinite(share[c]) and share[c] >= 0.5 else None

    def _part_name(self, index: int) -> str:
        from gig_dist.toy.world import PART_NAMES

        return PART_NAMES[int(index)]

    def _pairs(self) -> list[tuple[str, str]]:
        from gig_dist.stages.pairs import gig_pairs

        return gig_pairs(self.config, list(self.store.taps))

    def build_concept(self, tap: str, c: int, usage, share, importance, class_matrix, tree, source_mats, target_mats,
                      shown, purity, part, examples=None) -> None:
        members = None
        histogram = None
        counts = examples[1] if examples is not None else None
        if shown is not None:
            crops, found, boxes, kind, heats = shown
            count = len(found["image"])
            side = int(round(np.sqrt(heats.shape[1]))) if heats is not None else 0
            members = {"count": count, "kind": kind, "size": crops.shape[1] if len(crops) else 0, "shown": [
                {"image": int(found["image"][j]), **self.image_facts.get(int(found["image"][j]), {}),
                 "value": found["value"][j], "context": self._context(int(found["image"][j]), boxes[j]),
                 "contour": figures.contour_svg(heats[j].reshape(side, side)) if heats is not None else "",
                 "top": top_share(counts, float(found["value"][j])) if counts is not None else None}
                for j in range(count)]}
            if count and heats is None:  # a store made before the heat maps: its overlaid crops
                figures.png(np.concatenate(list(crops), axis=1), self.site / "img" / safe(tap) / f"m{c}.png")
            members["overlaid"] = heats is None
        sampled = quantiles = None
        if counts is not None:
            sample = examples[0]
            if sample is not None and shown is not None:
                valid = np.flatnonzero(sample["image"] >= 0)
                tiles = [self._example(tap, int(sample["image"][j]), int(sample["position"][j]),
                                       float(sample["value"][j]), counts) for j in valid]
                sampled = [t for t in tiles[:8] if t is not None]
                picks = quantile_picks(np.asarray([float(sample["value"][j]) for j in valid]), counts)
                quantiles = [{"q": q, **tiles[i]} for q, i in zip(QUANTILES, picks) if i >= 0 and tiles[i] is not None]
            marks = [(float(v), f"{q:.0%}") for q, v in zip(QUANTILES, quantile_values(counts))]
            histogram = figures.histogram_svg(counts, HISTOGRAM_EDGES, marks)
        drives = None
        if class_matrix is not None:
            drives = [(int(j), class_matrix[c, j]) for j in np.argsort(-class_matrix[c])[:5] if class_matrix[c, j] > 0]
        pure = purity is not None and np.isfinite(purity[c])
        self._write(
            f"concept/{safe(tap)}/{c}.html", "concept.html", f"{tap}: concept {c}", 2, tap=tap, concept=c,
            usage=usage[c], share=share[c], importance=None if importance is None else importance[c], members=members,
            histogram=histogram, sampled=sampled, quantiles=quantiles,
            purity=purity[c] if pure else None, part=self._part_name(part[c]) if pure else "",
            background=self._background(tap, c),
            tree=self._tree(c, tree),
            sources=[(source, strongest(column(matrix, c), 6)) for (source, _), matrix in source_mats.items()],
            targets=[(target, strongest(row(matrix, c), 6)) for (_, target), matrix in target_mats.items()],
            drives=drives)

    def _read_image_facts(self, images: np.ndarray) -> None:
        """Dataset label, prediction and counted class of each image listed (a unit at a time)."""
        from gig_dist.store import ImageRange

        images = np.asarray(images)
        wanted = np.setdiff1d(np.unique(images[images >= 0]), list(self.image_facts))
        meta = self.store.family(MetaSection)
        unit = self.store.facts.images_per_unit
        names = self.class_names
        for start in np.unique(wanted // unit) * unit:
            r = ImageRange(int(start), int(min(start + unit, self.store.num_images)))
            classes = meta.graph_classes(r, self.by)
            _, prediction = meta.read_status(r)
            for i in wanted[(wanted >= r.start) & (wanted < r.stop)]:
                p, cls = int(prediction[i - r.start]), int(classes[i - r.start])
                self.image_facts[int(i)] = {"label": self.run.dataset_label(int(i)) or "unlabelled",
                                            "prediction": names[p] if 0 <= p < len(names) else "",
                                            "class": cls}  # the graph class it counts for

    def _picture(self, image: int) -> np.ndarray | None:
        """Write image ``image`` as the model saw it (img/image/<i>.jpg) once; its pixels, or None
        where it cannot be read now (the file moved)."""
        try:
            array = self.run.image(image)
        except StoreError:
            self.pictures[image] = None
            return None
        if image not in self.pictures:
            # at least the model's resolution: member crops are cut from it (_context)
            figures.jpeg(array, self.site / "img" / "image" / f"{image}.jpg", side=max(160, *array.shape[:2]))
            self.pictures[image] = array.shape[:2]
        return array

    def _context(self, image: int, box: np.ndarray) -> dict[str, Any] | None:
        """A member's whole image with its crop's box, as CSS percentages of the picture, and the
        crop itself cut from the same picture at the model's resolution (CSS offsets for a view of
        ``VIEW`` px: the box fills it)."""
        if image not in self.pictures:
            self._picture(image)
        size = self.pictures[image]
        if size is None or box[0] < 0:
            return None
        (h, w), (y0, x0, y1, x1) = size, (int(v) for v in box)
        zoom = VIEW / max(y1 - y0, x1 - x0, 1)
        return {"ratio": h / w, "top": 100 * y0 / h, "left": 100 * x0 / w, "height": 100 * (y1 - y0) / h,
                "width": 100 * (x1 - x0) / w, "native": {
                    "size": f"{w * zoom:.1f}px {h * zoom:.1f}px", "offset": f"-{x0 * zoom:.1f}px -{y0 * zoom:.1f}px",
                    "pixels": y1 - y0, "pixelated": zoom > 1}}

    def _example(self, tap: str, image: int, position: int, value: float, counts: np.ndarray) -> dict[str, Any] | None:
        """A random example: the region of its image around its position's cell (3 cells, at
        least a quarter of the image), the cell outlined; its label, prediction, code and the
        code's percentile among the concept's uses."""
        if image not in self.pictures:
            self._picture(image)
        size = self.pictures.get(image)
        if size is None:
            return None
        (h, w), (_, rows, cols) = size, self.store.taps[tap]
        cell_h, cell_w = h / rows, w / cols
        cy, cx = (position // cols + 0.5) * cell_h, (position % cols + 0.5) * cell_w
        side = min(max(3 * max(cell_h, cell_w), min(h, w) / 4), h, w)
        y0, x0 = min(max(cy - side / 2, 0), h - side), min(max(cx - side / 2, 0), w - side)
        box = np.asarray([y0, x0, y0 + side, x0 + side]).round().astype(int)
        context = self._context(image, box)
        cell = {"top": 100 * (cy - cell_h / 2 - box[0]) / side, "left": 100 * (cx - cell_w / 2 - box[1]) / side,
                "height": 100 * cell_h / side, "width": 100 * cell_w / side}
        return {"image": image, **self.image_facts.get(image, {}), "value": value, "context": context, "cell": cell,
                "percentile": percentile(counts, value)}

    def build_images(self) -> None:
        """A page per attributed image: its prediction, and per tap its concepts where they are,
        with their GIG toward its class."""
        for image in self.images:
            image = int(image)
            picture = self._picture(image)
            found = self.run.image_summary(image, top=6)
            taps = []
            for tap, concepts in found["taps"].items():
                shown = []
                for entry in concepts:
                    name = f"img/image/{image}/{safe(tap)}_{entry['concept']}.png"
                    if picture is not None:
                        from gig_dist.read import highlight

                        figures.png(np.round(highlight(picture, entry["map"]) * 255).astype(np.uint8),
                                    self.site / name, scale=max(1, 128 // max(picture.shape[:2])))
                    shown.append({**entry, "picture": name if picture is not None else None})
                taps.append((tap, shown))
            self._write(f"image/{image}.html", "image.html", f"image {image}", 1, found=found, taps=taps,
                        picture=picture is not None, facts=self.image_facts.get(image, {}))

    @staticmethod
    def _tree(c: int, tree: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """Where concept ``c`` sits in the bisecting split tree (None: the dictionary has none)."""
        if "tree/leaf" not in tree:
            return None
        leaf, parent, children = tree["tree/leaf"], tree["tree/parent"], tree["tree/children"]
        node = int(np.flatnonzero(leaf == c)[0])

        def leaves(n: int) -> list[int]:
            found, stack = [], [n]
            while stack and len(found) < 8:
                m = stack.pop()
                if leaf[m] >= 0:
                    found.append(int(leaf[m]))
                else:
                    stack += [int(children[m][1]), int(children[m][0])]
            return found

        p = int(parent[node])
        if p < 0:
            return {"root": True}
        sibling = int(children[p][0] if children[p][1] == node else children[p][1])
        size = tree.get("tree/size")
        return {"root": False, "size": int(size[p]) if size is not None else None, "leaf": bool(leaf[sibling] >= 0),
                "sibling": leaves(sibling)}

    def build_classes(self) -> None:
        if not self.gig.has_graphs():
            self.summary.missing.append("class graphs (run the graphs stage)")
            return
        if self.attributed is None:
            self.summary.missing.append("class graphs (not built yet)")
            return
        self.layout = "dot" if shutil.which("dot") else "layered"
        self.summary.graph_layout = self.layout
        for c in self.attributed:  # a class without attributed images has an empty graph: no page
            self.build_class(c, self.graphs[c])

    def build_class(self, c: int, graph: dict[str, Any]) -> None:
        title = f"{'dataset class' if self.by == 'dataset' else 'class'} {c}: {self.graph_names[c]}"
        if graph.get("empty") or not graph["edges"]:
            self._write(f"class/{c}.html", "class.html", title, 1, empty=graph.get("empty") or "no edges",
                        examples=self._examples(c))
            return
        svg, self.layout = figures.class_graph_svg(self.site, graph, self.graph_names, self.layout)
        shared = [{"tap": n["tap"], "concept": n["concept"],
                   "names": ", ".join(n.get("shared_with_names", map(str, n["shared_with"])))}
                  for n in graph["nodes"] if n.get("shared")]
        how = ("drawn by Graphviz dot" if self.layout == "dot" else
               "drawn by gig-dist's layered layout (Graphviz dot was not found)")
        edges = [{"source": tuple(e["source"]), "target": tuple(e["target"]), "weight": e["weight"],
                  "level": e.get("level", 0)} for e in graph["edges"]]
        edges.sort(key=lambda e: (-e["level"], -e["weight"]))  # from the lowest tap up to the class
        self._write(f"class/{c}.html", "class.html", title, 1, empty=None, images=graph.get("images", "?"),
                    examples=self._examples(c),
                    gamma=graph.get("gamma", "dataset"), how=how, svg=svg, shared=shared, edges=edges,
                    class_name=self.graph_names[c])

    def _examples(self, c: int) -> list[dict[str, Any]]:
        """The attributed images that count for graph class ``c`` (each with a page)."""
        return [{"image": int(i), **self.image_facts[int(i)]} for i in self.images
                if self.image_facts.get(int(i), {}).get("class") == c and self.pictures.get(int(i))]

    def build_index(self) -> None:
        from gig_dist.read import coverage_summary, label_summary, stage_states

        store = self.store
        meta = store.family(MetaSection)
        codes = store.family(CodesSection, self.dictionary)
        stats, taps = {}, []
        for tap in self.taps:
            stats[tap] = codes.summary(tap, self.concepts.count(tap)) if tap in codes.taps() else {}
            pure = self.purity.get(tap)
            taps.append({"tap": tap, "k": self.concepts.count(tap), "stats": stats[tap], "top": self.top.get(tap, []) if tap in self.rendered else [],
                         "purity": np.nanmedian(pure["purity"]) if pure is not None else None})
        gig = self.gig.summary() if self.taps else {}
        stages = [{"key": key, "state": "complete" if s["complete"] else "incomplete",
                   "seconds": store.record(key).seconds,
                   "methods": "; ".join(f"{what}: {method}" for what, method in store.record(key).methods.items())}
                  for key, s in stage_states(store).items()]
        self._write(
            "index.html", "index.html", "gig-dist run", 0, url=store.url, dictionary=self.dictionary,
            missing=sorted(set(self.summary.missing)), counts=meta.image_counts(), labels=label_summary(store),
            coverage=coverage_summary(store), skipped=meta.skipped_images(limit=100), taps=taps,
            recall=part_recall(self.purity) if self.purity else None,
            gig=[{"mean_gap": None, "median_gap": None, "mean_kept": None, **g} for g in gig.values()],
            stages=stages, plots=self._plots(stats, gig), evaluation=self._evaluation(), sweep=self._sweep(),
            panels=self._panels(), classes=self.attributed or [],
            by_class=[(c, self._examples(c)) for c in (self.attributed or [])],
            unattributed=len(self.graph_names) - len(self.attributed) if self.attributed is not None else 0,
            class_kind="dataset's" if self.by == "dataset" else "model's",
            config=yaml.safe_dump(store.manifest.config, sort_keys=False))

    def _plots(self, stats: dict[str, dict], gig: dict[str, dict]) -> list[dict[str, str]]:
        sizes = {t: self.atlas.usage(t) for t in self.taps if t in self.atlas.taps()}
        gaps = {}
        for key, g in gig.items():
            pair = tuple(g["pair"])
            limit = self.config.gig.images or self.store.num_images
            values = np.concatenate([self.gig.read_gaps(pair, u)[: min(u.stop, limit) - u.start].ravel()
                                     for u in self.store.units() if u.start < limit])
            values = values[np.isfinite(values) & (values > 0)]
            if len(values):
                gaps[key.replace("__", " -> ")] = values
        return figures.index_plots(self.site, {t: stats.get(t, {}) for t in self.taps}, sizes, gaps)

    def _panels(self) -> list[tuple[str, str]]:
        """The panels of registered stages that declare one (``Stage.report_panel``) and finished."""
        from gig_dist.stages import registry

        records, found = self.store.manifest.stages, []
        for stage in registry.STAGES:
            record = records.get(stage.key(self.config))
            if record is not None and record.finished:
                panel = stage.report_panel(self.run)
                if panel:
                    found.append(panel)
        return found

    def _sweep(self) -> dict[str, Any] | None:
        """``gig-dist sweep``'s points, where it ran: the Pareto plots and the table."""
        from gig_dist.sweep import _mean, plot_sweep, sweep_levels, sweep_table

        if not sweep_levels(self.store):
            return None
        rows = sweep_table(self.store)
        (self.site / "img").mkdir(exist_ok=True)
        plot_sweep(rows, self.site / "img" / "sweep.png")
        head = ["dictionary", "K / C", "lambda_rel", "R^2", "mean l0", "C-Ins - C-Del", "by count", "purity",
                "1-2 member concepts", "part recall", "gap", "kept", "seconds"]
        body = []
        for point in rows:
            taps = point["taps"].values()

            def mean(name, taps=taps):
                return _mean([entry.get(name) for entry in taps])

            body.append([point["method"], point["k_multiplier"], point["lambda_rel"], mean("r2"), mean("mean_l0"),
                         mean("score"), mean("count_score"), mean("purity"), mean("tiny_concepts"),
                         point["part_recall"], point["gap"], point["kept"], sum(point["seconds"].values())])
        return {"images": rows[0]["images"], "head": head, "rows": body}

    def _evaluation(self) -> dict[str, Any] | None:
        """``gig-dist evaluate``'s results, where it ran: each pair's mean insertion and deletion
        curves per ordering, the AUC scores, and the toy world's ground truth."""
        from gig_dist.kernels.evaluation import ORDERINGS
        from gig_dist.stages.evaluate import summarize, summarize_ground

        section = self.store.family(EvaluationSection, self.dictionary)
        pairs = [p for p in self._pairs() if section.has(p)]
        if not pairs:
            return None
        images = 0
        plotted = []
        for pair in pairs:
            sums, counts = 0.0, 0
            for r in self.store.units():
                got = section.read(pair, r)
                evaluated = np.isfinite(got["insertion"].reshape(len(r), -1)).any(1)
                if evaluated.any():
                    images = max(images, r.start + int(np.flatnonzero(evaluated).max()) + 1)
                curves = np.stack([got["insertion"], got["deletion"]]).astype(np.float64)
                curves = curves.reshape(2, -1, *curves.shape[-2:])  # (2, image [x target], ordering, fraction)
                seen = np.isfinite(curves).all(axis=(0, 2, 3))
                sums = sums + curves[:, seen].sum(1)
                counts += int(seen.sum())
            if counts:
                plotted.append(figures.evaluation_curves(self.site, pair, sums / counts, counts))
        scores = summarize(self.store, self.dictionary, pairs, images)
        ground = summarize_ground(self.store, self.dictionary, images, self.config.evaluate.top_concepts)
        if ground is not None:
            ground = {"accuracy": ground["accuracy"], "rows": [
                (variant, label, cells) for variant, pixels in ground["pixels"].items()
                for label, cells in [("pixels", pixels)] + [(f"{tap} / {ordering}", entry[variant][ordering])
                                                            for tap, entry in ground["taps"].items()
                                                            for ordering in entry[variant]]]}
        return {"figures": plotted, "scores": scores, "orderings": ORDERINGS, "ground": ground,
                "nan": (float("nan"), float("nan"), 0)}


def part_recall(purity: dict[str, dict[str, Any]], threshold: float = 0.8) -> dict[str, Any]:
    """The share of part types that some concept (of any tap) covers with purity >= threshold."""
    from gig_dist.toy.world import NUM_PARTS

    return metrics.part_recall([(found["purity"], found["part"]) for found in purity.values()], NUM_PARTS, threshold)


def build_report(url: str, site: str | os.PathLike[str], dictionary: str | None = None) -> ReportSummary:
    return Report(url, Path(site), dictionary).build()
