"""``gig-dist report``: a static site of a run, opened from disk with no server and no network.

    index.html                      the run: config, images, per tap K / R^2 / l0, per pair
                                    completeness and kept fraction, timings, plots; tap and
                                    class links
    tap/<tap>/p<N>.html             concepts of a tap sorted by importance, ``PAGE`` a page
    concept/<tap>/<k>.html          members on their images, split-tree neighbours, top GIG
                                    sources and targets, the classes it drives, purity (toy)
    class/<c>.html                  the class's concept graph, drawn by Graphviz ``dot`` when it
                                    is installed (nodes are thumbnails linking to concept pages),
                                    else by a layered layout of gig-dist's own (the page says which)
    img/...                         PNG thumbnails, member strips and plots beside the pages

It reads the store through its sections, and only what it shows: a tap's concepts a block at a
time, and for each concept its own members. Whatever stage is missing is named on the page that
would show it; the rest is built.
"""

from __future__ import annotations

import html
import io
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from gig_dist.kernels import metrics
from gig_dist.kernels.gig import LOGITS
from gig_dist.kernels.graphs import column, row, strongest
from gig_dist.kernels.metrics import concept_purity
from gig_dist.stages.base import level_of
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

#: Concepts per index page.
PAGE = 256
#: Concepts read per block while building.
BLOCK = 1024

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
a{color:#0645ad;text-decoration:none} a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
img.thumb{width:48px;height:48px;image-rendering:pixelated;vertical-align:middle}
img.big{width:96px;height:96px;image-rendering:pixelated}
.strip{display:flex;flex-wrap:wrap;gap:8px} .strip figure{margin:0;font-size:12px;text-align:center}
.note{color:#666;font-size:90%} .missing{color:#a33} nav{margin-bottom:1em}
figure.member img{width:112px;height:112px;image-rendering:pixelated}
"""

#: Marks the page with the number of images that failed to load (read by the tests' browser).
CHECK = ("<script>addEventListener('load',()=>{const b=[...document.images].filter(i=>!i.complete||"
         "i.naturalWidth===0).length;document.body.dataset.brokenImages=b;});</script>")


@dataclass
class ReportSummary:
    site: Path
    pages: int = 0
    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)
    graph_layout: str = ""


def _png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, optimize=False, compress_level=1)


def _page(title: str, body: str, depth: int) -> str:
    home = "../" * depth + "index.html"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><nav><a href='{home}'>run summary</a></nav>"
            f"<h1>{html.escape(title)}</h1>{body}{CHECK}</body></html>")


def safe(name: str) -> str:
    """A tap or class name as a file name."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


class Report:
    def __init__(self, url: str, site: Path, dictionary: str | None = None) -> None:
        from gig_dist.config import config_model

        self.store = RunStore.open(url)
        self.config = config_model().model_validate(self.store.manifest.config)
        self.dictionary = dictionary or level_of(self.config)
        self.site = Path(site).resolve()
        self.summary = ReportSummary(self.site)
        facts = self.store.facts
        self.class_names = list(facts.class_names) + [str(c) for c in range(len(facts.class_names), facts.num_outputs)]
        self.atlas = self.store.family(AtlasSection, self.dictionary)
        self.gig = self.store.family(GIGSection, self.dictionary)
        self.concepts = self.store.family(ConceptsSection, self.dictionary)
        self.taps = [t for t in self.store.taps if self.concepts.has(t)] if self.dictionary in self.store.dictionaries() else []
        self.rendered = [t for t in self.taps if t in self.atlas.taps() and self.atlas.has_render(t)]
        self.purity: dict[str, dict[str, Any]] = {}

    # -- helpers -----------------------------------------------------------------------------------

    def _write(self, relative: str, text: str) -> None:
        path = self.site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
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
        return f"<a href='{'../' * depth}class/{c}.html'>{html.escape(self.class_names[c])}</a>"

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
        for tap in self.taps:
            self.build_tap(tap)
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
        order = np.argsort(-(importance if importance is not None else usage.astype(float)), kind="stable")
        tree = self.concepts.arrays(tap)
        sources = [p for p in self._pairs() if p[1] == tap and self.gig.has_matrix(p)]
        targets = [p for p in self._pairs() if p[0] == tap and p[1] != LOGITS and self.gig.has_matrix(p)]
        # concept pairs may be stored sparse (gig.dense_matrix_mib): a page reads one column or row
        source_mats = {p: self.gig.read_matrix(p, sparse=True).tocsc() for p in sources}
        target_mats = {p: self.gig.read_matrix(p, sparse=True) for p in targets}
        if tap in self.rendered:
            rows_all = self.atlas.rows(tap)
            members = self.atlas.members(tap)
            classes = self._classes_of(members["image"])
            kind = str(self.atlas.read_crops("kind", rows_all[rows_all >= 0][:1])[0]) if (rows_all >= 0).any() else ""
        for first in range(0, k, BLOCK):  # thumbnails and concept pages, a block at a time
            stop = min(first + BLOCK, k)
            shown = None
            if tap in self.rendered:
                thumbs = self.atlas.thumbs(tap, slice(first, stop))
                block_rows = rows_all[first:stop]
                crops = self.atlas.read_crops("crop", block_rows).reshape(*block_rows.shape, *thumbs.shape[1:])
            for c in range(first, stop):
                if tap in self.rendered:
                    _png(thumbs[c - first], self.site / "img" / safe(tap) / f"t{c}.png")
                    valid = rows_all[c] >= 0
                    shown = (crops[c - first][valid], {n: v[c][valid] for n, v in members.items()},
                             [classes.get(int(i), "") for i in members["image"][c][valid]], kind)
                self.build_concept(tap, c, usage, share, importance, class_matrix, tree, source_mats, target_mats,
                                   shown, purity, part)
        # index pages
        pages = max(1, -(-k // PAGE))
        for p in range(pages):
            shown = order[p * PAGE : (p + 1) * PAGE]
            rows = []
            for c in shown:
                drives = ""
                if class_matrix is not None:
                    top = [int(j) for j in np.argsort(-class_matrix[c])[:3] if class_matrix[c, j] > 0]
                    drives = ", ".join(self.class_link(j, 2) for j in top)
                pure = (f"{purity[c]:.2f} ({self._part_name(part[c])})" if purity is not None and np.isfinite(purity[c])
                        else "")
                rows.append(f"<tr><td>{self.concept_link(tap, int(c), 2)}</td><td>{usage[c]}</td><td>{share[c]:.4f}</td>"
                            f"<td>{'' if importance is None else f'{importance[c]:.4g}'}</td><td>{drives}</td>"
                            f"<td>{pure}</td></tr>")
            pager = " ".join(f"<a href='p{q}.html'>{q + 1}</a>" if q != p else f"<b>{q + 1}</b>" for q in range(pages))
            how = ("sorted by importance: the largest Gamma to a class" if importance is not None else
                   "sorted by size: this tap has no GIG to the classes (gig.pairs)")
            notes = "" if tap in self.rendered else (
                "<p class='missing'>no atlas for this tap yet (run the members and atlas stages): no pictures</p>")
            summary = ""
            if purity is not None:
                finite = purity[np.isfinite(purity)]
                summary = (f"<p>purity (share of shown iERF mass on one ground-truth part): median "
                           f"{np.median(finite):.2f}, quartiles {np.quantile(finite, .25):.2f} to "
                           f"{np.quantile(finite, .75):.2f}; {int((finite >= 0.8).sum())} of {len(finite)} "
                           f"concepts at 0.8 or more</p>")
            body = (f"<p>{k} concepts, {how}. Page {p + 1} of {pages}: {pager}</p>{notes}{summary}"
                    "<table><tr><th>concept</th><th>size (PFVs)</th><th>l0 share</th><th>importance</th>"
                    f"<th>drives classes</th><th>purity</th></tr>{''.join(rows)}</table>")
            self._write(f"tap/{safe(tap)}/p{p}.html", _page(f"{tap}: concepts", body, 2))

    def _part_name(self, index: int) -> str:
        from gig_dist.toy.world import PART_NAMES

        return PART_NAMES[int(index)]

    def _pairs(self) -> list[tuple[str, str]]:
        from gig_dist.stages.pairs import gig_pairs

        return gig_pairs(self.config, list(self.store.taps))

    def build_concept(self, tap: str, c: int, usage, share, importance, class_matrix, tree, source_mats, target_mats,
                      shown, purity, part) -> None:
        parts = [f"<p>size {usage[c]} PFVs (l0 share {share[c]:.4f})"
                 + (f", importance {importance[c]:.4g}" if importance is not None else "") + "</p>"]
        if shown is None:
            parts.append("<p class='missing'>no members shown: the members and atlas stages have not run</p>")
        else:
            crops, members, labels, kind = shown
            if len(crops) == 0:
                parts.append("<p>this concept has no members: no decomposed PFV uses it</p>")
            else:
                _png(np.concatenate(list(crops), axis=1), self.site / "img" / safe(tap) / f"m{c}.png")
                figures = []
                for j in range(len(crops)):
                    figures.append(f"<figure class='member'><div style='width:112px;height:112px;overflow:hidden'>"
                                   f"<img src='../../img/{safe(tap)}/m{c}.png' style='width:{112 * len(crops)}px;"
                                   f"height:112px;margin-left:-{112 * j}px;max-width:none' alt='member {j}'></div>"
                                   f"<figcaption>image {int(members['image'][j])}<br>{html.escape(labels[j])}<br>code "
                                   f"{members['value'][j]:.3g}</figcaption></figure>")
                parts.append(f"<h2>members</h2><p class='note'>the {len(crops)} PFVs with the largest code value "
                             f"for it, each cropped around its iERF ({kind}; {crops.shape[1]}px crops, bright where "
                             "the iERF is strong)</p>" f"<div class='strip'>{''.join(figures)}</div>")
        if purity is not None and np.isfinite(purity[c]):
            parts.append(f"<p>purity {purity[c]:.2f}: the share of the shown iERF mass on "
                         f"{self._part_name(part[c])}, its most covered ground-truth part</p>")
        parts.append(self._tree_html(tap, c, tree))
        for (source, _), matrix in source_mats.items():
            parts.append(f"<h2>top sources at {source}</h2><p>" + " ".join(
                f"{self.concept_link(source, j, 2)} ({v:.3g})" for j, v in strongest(column(matrix, c), 6)) + "</p>")
        for (_, target), matrix in target_mats.items():
            parts.append(f"<h2>top targets at {target}</h2><p>" + " ".join(
                f"{self.concept_link(target, j, 2)} ({v:.3g})" for j, v in strongest(row(matrix, c), 6)) + "</p>")
        if class_matrix is not None:
            top = [int(j) for j in np.argsort(-class_matrix[c])[:5] if class_matrix[c, j] > 0]
            parts.append("<h2>classes it drives</h2><p>" + (", ".join(
                f"{self.class_link(j, 2)} ({class_matrix[c, j]:.3g})" for j in top) or "none (no positive Gamma)") + "</p>")
        self._write(f"concept/{safe(tap)}/{c}.html", _page(f"{tap}: concept {c}", "".join(parts), 2))

    def _classes_of(self, images: np.ndarray) -> dict[int, str]:
        """The class name (by label, else prediction) of each image listed, read a unit at a time."""
        from gig_dist.store import ImageRange

        wanted = np.unique(images[images >= 0])
        found: dict[int, str] = {}
        unit = self.store.facts.images_per_unit
        for start in np.unique(wanted // unit) * unit:
            r = ImageRange(int(start), int(min(start + unit, self.store.num_images)))
            classes = self.store.family(MetaSection).image_classes(r)
            for i in wanted[(wanted >= r.start) & (wanted < r.stop)]:
                cls = int(classes[i - r.start])
                found[int(i)] = self.class_names[cls] if cls >= 0 else "unlabelled"
        return found

    def _tree_html(self, tap: str, c: int, tree: dict[str, np.ndarray]) -> str:
        if "tree/leaf" not in tree:
            return ""
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
            return "<h2>split tree</h2><p>the root: the only concept</p>"
        sibling = int(children[p][0] if children[p][1] == node else children[p][1])
        size = tree.get("tree/size")
        return ("<h2>split tree</h2><p>a leaf of bisecting k-means; its parent node"
                + (f" ({int(size[p])} samples)" if size is not None else "") + " split into it and its sibling "
                + ("concept " if leaf[sibling] >= 0 else "subtree, whose first concepts are ")
                + " ".join(self.concept_link(tap, j, 2) for j in leaves(sibling)) + "</p>")

    def build_classes(self) -> None:
        if not self.gig.has_graphs():
            self.summary.missing.append("class graphs (run the graphs stage)")
            return
        self.layout = "dot" if shutil.which("dot") else "layered"
        self.summary.graph_layout = self.layout
        for c in range(len(self.class_names)):
            try:
                graph = self.gig.read_graph(c)
            except StoreError:
                self.summary.missing.append("class graphs (not built yet)")
                return
            self.build_class(c, graph)

    def build_class(self, c: int, graph: dict[str, Any]) -> None:
        name = self.class_names[c]
        if graph.get("empty") or not graph["edges"]:
            body = f"<p>empty graph: {html.escape(graph.get('empty') or 'no edges')}</p>"
            self._write(f"class/{c}.html", _page(f"class {c}: {name}", body, 1))
            return
        svg = self._draw(graph)
        svg = svg[svg.index("<svg"):]  # inline: drop the XML prologue
        shared = [n for n in graph["nodes"] if n.get("shared")]
        listing = "".join(f"<li>{self.concept_link(n['tap'], n['concept'], 1)}: shared with "
                          f"{html.escape(', '.join(n.get('shared_with_names', map(str, n['shared_with']))))}</li>"
                          for n in shared)
        how = ("drawn by Graphviz dot" if self.layout == "dot" else
               "drawn by gig-dist's layered layout (Graphviz dot was not found)")
        gamma = graph.get("gamma", "dataset")
        body = (f"<p>{graph.get('images', '?')} attributed images of the class; lower levels from the {gamma} "
                f"Gamma. Edge widths follow Gamma on one scale per level; orange nodes are shared with other "
                f"classes. {how}. Click a node for its concept.</p>"
                f"<div id='graph'>{svg}</div>"
                f"<h2>shared concepts</h2><ul>{listing or '<li>none</li>'}</ul>")
        self._write(f"class/{c}.html", _page(f"class {c}: {name}", body, 1))

    def _draw(self, graph: dict[str, Any]) -> str:
        """The graph as SVG: nodes are concept thumbnails linking to concept pages."""
        nodes = [(n["tap"], n["concept"]) for n in graph["nodes"]]
        shared = {(n["tap"], n["concept"]) for n in graph["nodes"] if n.get("shared")}
        if self.layout == "dot":
            lines = ["digraph G {", "rankdir=BT; node [shape=box, label=\"\", fixedsize=true, width=0.7, height=0.8,"
                     " fontsize=9, imagescale=true];",
                     f"cls [shape=ellipse, width=1.4, fixedsize=false, label=\"{self.class_names[graph['class']]}\"];"]
            for tap, k in nodes:
                image = self.site / "img" / safe(tap) / f"t{k}.png"
                picture = f'image="{image}", ' if image.exists() else ""
                colour = "orange" if (tap, k) in shared else "gray40"
                lines.append(f'"{tap}:{k}" [{picture}xlabel="{tap}:{k}", color="{colour}", penwidth=2, '
                             f'URL="../concept/{safe(tap)}/{k}.html", target="_top", tooltip="{tap}:{k}"];')
            for edge in graph["edges"]:
                source = f'"{edge["source"][0]}:{edge["source"][1]}"'
                target = "cls" if edge["target"][0] == "class" else f'"{edge["target"][0]}:{edge["target"][1]}"'
                lines.append(f"{source} -> {target} [penwidth={0.5 + 4 * edge.get('relative', 1):.2f}];")
            lines.append("}")
            done = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines), capture_output=True, text=True,
                                  cwd=self.site, check=False)
            if done.returncode == 0:
                # dot writes the absolute image paths it was given: relative to the class page instead
                return done.stdout.replace(f"{self.site / 'img'}/", "../img/")
            self.layout = "layered"
        return self._layered_svg(graph, nodes, shared)

    def _layered_svg(self, graph, nodes, shared) -> str:
        levels = ["class", *graph["taps"]]
        rows: dict[str, list[tuple[str, int]]] = {tap: [n for n in nodes if n[0] == tap] for tap in graph["taps"]}
        width = max(1, max(len(r) for r in rows.values())) * 90 + 40
        position = {("class", graph["class"]): (width / 2, 30)}
        for level, tap in enumerate(levels[1:], start=1):
            for i, node in enumerate(rows[tap]):
                position[node] = ((i + 0.5) * (width / max(len(rows[tap]), 1)), 30 + level * 110)
        height = 30 + len(levels) * 110
        parts = [f"<svg xmlns='http://www.w3.org/2000/svg' xmlns:xlink='http://www.w3.org/1999/xlink' "
                 f"width='{width}' height='{height}'>"]
        for edge in graph["edges"]:
            x1, y1 = position[(edge["source"][0], edge["source"][1])]
            x2, y2 = position[(edge["target"][0], edge["target"][1])]
            parts.append(f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='#888' "
                         f"stroke-width='{0.5 + 4 * edge.get('relative', 1):.2f}'/>")
        x, y = position[("class", graph["class"])]
        parts.append(f"<text x='{x}' y='{y}' text-anchor='middle'>{html.escape(self.class_names[graph['class']])}</text>")
        for tap, k in nodes:
            x, y = position[(tap, k)]
            colour = "orange" if (tap, k) in shared else "#555"
            parts.append(f"<a xlink:href='../concept/{safe(tap)}/{k}.html' target='_top'><g class='node'>"
                         f"<rect x='{x - 26}' y='{y - 26}' width='52' height='52' fill='white' stroke='{colour}' "
                         f"stroke-width='2'/><image xlink:href='../img/{safe(tap)}/t{k}.png' x='{x - 24}' y='{y - 24}' "
                         f"width='48' height='48'/><text x='{x}' y='{y + 38}' font-size='10' "
                         f"text-anchor='middle'>{tap}:{k}</text></g></a>")
        parts.append("</svg>")
        return "".join(parts)

    def build_index(self) -> None:
        from gig_dist.read import coverage_summary, label_summary, stage_states

        store = self.store
        counts = store.family(MetaSection).image_counts()
        skipped = store.family(MetaSection).skipped_images(limit=100)
        parts = [f"<p>store <code>{html.escape(store.url)}</code>; dictionary {html.escape(self.dictionary)}</p>"]
        if self.summary.missing:
            parts.append("<p class='missing'>missing: " + "; ".join(sorted(set(self.summary.missing))) + "</p>")
        parts.append(f"<h2>images</h2><p>{counts['total']} images: {counts['processed']} processed, "
                     f"{counts['skipped']} skipped, {counts['pending']} pending</p>")
        labels = label_summary(store)
        parts.append(f"<p>labels: {html.escape(labels['description'])}</p><ul>" + "".join(
            f"<li>{name}: {c['images']} images over {c['classes']} of {c['of_classes']} classes</li>"
            for name, c in coverage_summary(store).items()) + "</ul>")
        if skipped:
            parts.append("<table><tr><th>skipped</th><th>path</th><th>reason</th></tr>" + "".join(
                f"<tr><td>{s['index']}</td><td>{html.escape(s['path'])}</td><td>{html.escape(s['reason'])}</td></tr>"
                for s in skipped) + "</table>")
        parts.append("<h2>concepts per tap</h2><table><tr><th>tap</th><th>K</th><th>R^2</th><th>mean l0</th>"
                     "<th>l0 ratio</th><th>purity (median)</th></tr>")
        codes = store.family(CodesSection, self.dictionary)
        stats = {}
        for tap in self.taps:
            c = codes.summary(tap, self.concepts.count(tap)) if tap in codes.taps() else {}
            stats[tap] = c
            pure = self.purity.get(tap)
            median = f"{np.nanmedian(pure['purity']):.2f}" if pure is not None else ""
            parts.append(f"<tr><td><a href='tap/{safe(tap)}/p0.html'>{tap}</a></td><td>{self.concepts.count(tap)}</td>"
                         f"<td>{_fmt(c.get('r2'))}</td><td>{_fmt(c.get('mean_l0'))}</td><td>{_fmt(c.get('l0_ratio'))}</td>"
                         f"<td>{median}</td></tr>")
        parts.append("</table>")
        if self.purity:
            recall = part_recall(self.purity)
            parts.append(f"<p>part recall: {recall['covered']} of {recall['parts']} part types have a concept of "
                         f"purity 0.8 or more ({recall['recall']:.2f})</p>")
        gig = self.gig.summary() if self.taps else {}
        if gig:
            parts.append("<h2>GIG per pair</h2><table><tr><th>pair</th><th>images</th><th>mean gap</th>"
                         "<th>median gap</th><th>kept (mean)</th></tr>" + "".join(
                             f"<tr><td>{g['pair'][0]} &rarr; {g['pair'][1]}</td><td>{g['images']}</td>"
                             f"<td>{_fmt(g.get('mean_gap'))}</td><td>{_fmt(g.get('median_gap'))}</td>"
                             f"<td>{_fmt(g.get('mean_kept'))}</td></tr>" for g in gig.values()) + "</table>")
        states = stage_states(store)
        parts.append("<h2>stages</h2><table><tr><th>stage</th><th>state</th><th>seconds</th><th>method</th></tr>"
                     + "".join(
            f"<tr><td>{key}</td><td>{'complete' if s['complete'] else 'incomplete'}</td>"
            f"<td>{store.record(key).seconds:.1f}</td><td>"
            + html.escape("; ".join(f"{what}: {method}" for what, method in store.record(key).methods.items()))
            + "</td></tr>"
            for key, s in states.items()) + "</table>")
        parts.append(self._plots(stats, gig))
        parts.append(self._evaluation())
        parts.append(self._sweep())
        parts.append(self._panels())
        if self.gig.has_graphs():
            parts.append("<h2>classes</h2><p>" + " ".join(self.class_link(c, 0) for c in range(len(self.class_names)))
                         + "</p>")
        parts.append("<h2>config</h2><pre>" + html.escape(yaml.safe_dump(store.manifest.config, sort_keys=False))
                     + "</pre>")
        self._write("index.html", _page("gig-dist run", "".join(parts), 0))

    def _plots(self, stats: dict[str, dict], gig: dict[str, dict]) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figures = []
        taps = [t for t in self.taps if stats.get(t, {}).get("r2") is not None]
        if taps:
            fig, ax = plt.subplots(figsize=(4, 3))
            for t in taps:
                ax.scatter(stats[t]["l0_ratio"], stats[t]["r2"], label=t)
            ax.set_xlabel("l0 ratio")
            ax.set_ylabel("R^2")
            ax.legend(fontsize=7)
            figures.append(("r2_l0.svg", fig, "R^2 against the l0 ratio per tap"))
        sizes = {t: self.atlas.usage(t) for t in self.taps if t in self.atlas.taps()}
        if sizes:
            fig, ax = plt.subplots(figsize=(4, 3))
            for t, u in sizes.items():
                ax.hist(np.log10(np.maximum(u, 1)), bins=30, histtype="step", label=t)
            ax.set_xlabel("log10 concept size (PFVs using it)")
            ax.legend(fontsize=7)
            figures.append(("sizes.svg", fig, "distribution of concept sizes"))
        gaps = {}
        for key, g in gig.items():
            pair = tuple(g["pair"])
            limit = self.config.gig.images or self.store.num_images
            values = np.concatenate([self.gig.read_gaps(pair, u)[: min(u.stop, limit) - u.start].ravel()
                                     for u in self.store.units() if u.start < limit])
            values = values[np.isfinite(values) & (values > 0)]
            if len(values):
                gaps[key.replace("__", " -> ")] = values
        if gaps:
            fig, ax = plt.subplots(figsize=(4, 3))
            for key, values in gaps.items():
                ax.hist(np.log10(values), bins=30, histtype="step", label=key)
            ax.set_xlabel("log10 relative completeness gap")
            ax.legend(fontsize=6)
            figures.append(("gaps.svg", fig, "distribution of completeness gaps"))
        out = [self._figure(name, fig, html.escape(caption), html.escape(caption)) for name, fig, caption in figures]
        return "<h2>plots</h2>" + "".join(out) if out else ""

    def _figure(self, name: str, fig, alt: str, caption: str) -> str:
        """Write a matplotlib figure as ``img/<name>`` (SVG) and return its ``<figure>``."""
        import matplotlib.pyplot as plt

        buffer = io.StringIO()
        fig.tight_layout()
        fig.savefig(buffer, format="svg")
        plt.close(fig)
        (self.site / "img").mkdir(exist_ok=True)
        (self.site / "img" / name).write_text(buffer.getvalue())
        return (f"<figure style='display:inline-block'><img src='img/{name}' alt='{alt}'>"
                f"<figcaption>{caption}</figcaption></figure>")


    def _panels(self) -> str:
        """The panels of registered stages that declare one (``Stage.report_panel``) and finished."""
        from gig_dist.read import Run
        from gig_dist.stages import registry

        records, run, found = self.store.manifest.stages, None, []
        for stage in registry.STAGES:
            record = records.get(stage.key(self.config))
            if record is None or not record.finished:
                continue
            run = run or Run(self.store, self.dictionary)
            panel = stage.report_panel(run)
            if panel:
                found.append(f"<h2>{html.escape(panel[0])}</h2>{panel[1]}")
        return "".join(found)

    def _sweep(self) -> str:
        """``gig-dist sweep``'s points, where it ran: the Pareto plots and the table."""
        from gig_dist.sweep import _mean, plot_sweep, sweep_levels, sweep_table

        if not sweep_levels(self.store):
            return ""
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

            body.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in (
                point["method"], point["k_multiplier"], point["lambda_rel"], mean("r2"), mean("mean_l0"),
                mean("score"), mean("count_score"), mean("purity"), mean("tiny_concepts"), point["part_recall"],
                point["gap"], point["kept"], sum(point["seconds"].values()))) + "</tr>")
        return ("<h2>sweep (<code>gig-dist sweep</code>)</h2><p>each point a dictionary level of this run: its K and "
                f"lambda, {rows[0]['images']} images decomposed, attributed and evaluated; values are means over the "
                "source taps. The dashed line is the Pareto front of score against sparsity.</p>"
                "<img src='img/sweep.png' alt='sweep: score against l0, purity against K, cost against K' "
                "style='max-width:100%'><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
                + "".join(body) + "</table>")

    def _evaluation(self) -> str:
        """``gig-dist evaluate``'s results, where it ran: each pair's mean insertion and deletion
        curves per ordering, the AUC scores, and the toy world's ground truth."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from gig_dist.kernels.evaluation import ORDERINGS, fractions
        from gig_dist.stages.evaluate import summarize, summarize_ground

        section = self.store.family(EvaluationSection, self.dictionary)
        pairs = [p for p in self._pairs() if section.has(p)]
        if not pairs:
            return ""
        images = 0
        out = ["<h2>evaluation (<code>gig-dist evaluate</code>)</h2><p>mean curves over the evaluated images: the "
               "class probability (to the logits) or <i>max_q &lt;a_q, v_m&gt;</i> over its full value (between "
               "taps) as the concepts an ordering ranks first are inserted (solid) or deleted (dashed)</p>"]
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
            if not counts:
                continue
            mean = sums / counts  # (2, O, F)
            fig, ax = plt.subplots(figsize=(4, 3))
            x = fractions(mean.shape[-1] - 1)
            for o, ordering in enumerate(ORDERINGS):
                line, = ax.plot(x, mean[0, o], label=ordering)
                ax.plot(x, mean[1, o], linestyle="--", color=line.get_color())
            ax.set_xlabel("fraction of the image's concepts")
            ax.set_title(f"{pair[0]} -> {pair[1]} ({counts})", fontsize=9)
            ax.legend(fontsize=7)
            out.append(self._figure(f"eval_{safe(pair[0])}__{safe(pair[1])}.svg", fig, f"{pair[0]} to {pair[1]}",
                                    f"{pair[0]} &rarr; {pair[1]}"))
        scores = summarize(self.store, self.dictionary, pairs, images)
        nan = (float("nan"), float("nan"), 0)
        out.append("<table><tr><th>ordering</th>" + "".join(f"<th>{html.escape(key)}</th>" for key in scores)
                   + "</tr>" + "".join(
                       f"<tr><td>{ordering}</td>" + "".join(
                           "<td>{:+.3f} &plusmn; {:.3f} ({})</td>".format(*found[ordering]["score"])
                           + " <small>by count {:+.3f}</small>".format(found[ordering].get("count_score", nan)[0])
                           for found in scores.values()) + "</tr>" for ordering in ORDERINGS)
                   + "<tr><td>sparsity</td>" + "".join(
                       "<td>R<sup>2</sup> {}, l0 {}, {} active per image</td>".format(
                           *(("-" if v is None else f"{v:{spec}}") for v, spec in (
                               (found["sparsity"]["r2"], ".3f"), (found["sparsity"]["mean_l0"], ".1f"),
                               (found["sparsity"]["active_per_image"], ".0f"))))
                       for found in scores.values()) + "</tr>"
                   + "</table><p>cells: AUC<sub>ins</sub> &minus; AUC<sub>del</sub> by fraction of the image's active "
                     "concepts, mean &plusmn; 95 % interval over images (between taps, an image's targets averaged "
                     "first); by count: the mean of ins(k) &minus; del(k) over the first k = 1, 2, 4, ..., 32 "
                     "concepts. Dictionaries compare fairly at matched sparsity only.</p>")
        ground = summarize_ground(self.store, self.dictionary, images, self.config.evaluate.top_concepts)
        if ground is not None:
            accuracy = ground["accuracy"]
            out.append(f"<h3>ground truth (toy world)</h3><p>model accuracy {accuracy['image']:.3f} on the images, "
                       f"{accuracy['with distractor']:.3f} with a distractor object of another class</p>"
                       "<table><tr><th>image</th><th>tap / concepts</th><th>own object</th><th>distractor</th>"
                       "<th>background</th></tr>")
            for variant, pixels in ground["pixels"].items():
                rows = [("pixels", pixels)] + [(f"{tap} / {ordering}", entry[variant][ordering])
                                               for tap, entry in ground["taps"].items()
                                               for ordering in entry[variant]]
                out.extend(f"<tr><td>{variant}</td><td>{label}</td>" + "".join(
                    "<td>{:.3f} &plusmn; {:.3f}</td>".format(*cells[region][:2]) if cells[region][2] else "<td>-</td>"
                    for region in ("own object", "distractor", "background")) + "</tr>" for label, cells in rows)
            out.append("</table><p>the share of the iERF mass of the class's top concepts by GIG (and of random "
                       "active concepts) on each region, against each region's share of the pixels</p>")
        return "".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def part_recall(purity: dict[str, dict[str, Any]], threshold: float = 0.8) -> dict[str, Any]:
    """The share of part types that some concept (of any tap) covers with purity >= threshold."""
    from gig_dist.toy.world import NUM_PARTS

    return metrics.part_recall([(found["purity"], found["part"]) for found in purity.values()], NUM_PARTS, threshold)


def build_report(url: str, site: str | os.PathLike[str], dictionary: str | None = None) -> ReportSummary:
    return Report(url, Path(site), dictionary).build()


__all__ = ["ReportSummary", "build_report", "part_recall"]
