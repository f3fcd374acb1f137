"""The report's figures: PNG thumbnails and member strips, the index's plots and evaluation curves
(matplotlib ``Figure`` objects, never pyplot: building a report in a notebook leaves its backend
and open figures alone), and the class graphs as SVG (Graphviz ``dot`` where installed, else a
layered layout of gig-dist's own)."""

from __future__ import annotations

import html
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gig_dist.report.pages import safe


def png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, optimize=False, compress_level=1)


def jpeg(picture: np.ndarray, path: Path, side: int = 160) -> None:
    """An image (H, W, 3) in [0, 1] as a JPEG whose longer side is ``side`` (small images are
    enlarged with square pixels, large ones reduced smoothly)."""
    image = Image.fromarray(np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8))
    scale = side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    image = image.resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=85)


def contour_svg(heat: np.ndarray, level: float = 0.5) -> str:
    """An iERF's outline at ``level`` of its peak, as an SVG drawn over its whole image (a
    viewBox of 0..100 on both axes, stretched to the picture): the heat map (uint8, 255 at the
    peak, over the whole input) is contoured by contourpy (matplotlib's own contouring)."""
    import contourpy

    side_y, side_x = heat.shape
    z = np.pad(heat.astype(np.float64) / 255.0, 1)  # closed outlines where the mass reaches the edge
    lines = contourpy.contour_generator(z=z, line_type=contourpy.LineType.Separate).lines(level)
    paths = []
    for line in lines:
        if len(line) < 2:
            continue
        points = " ".join(f"{100 * (x - 0.5) / side_x:.1f},{100 * (y - 0.5) / side_y:.1f}" for x, y in line)
        paths.append(f"<polyline points='{points}'/>")
    return ("<svg class='contour' viewBox='0 0 100 100' preserveAspectRatio='none'>" + "".join(paths) + "</svg>"
            if paths else "")


def histogram_svg(counts: np.ndarray, edges: np.ndarray, marks: list[tuple[float, str]] = ()) -> str:
    """A concept's code histogram as an inline SVG: the bins from the first to the last used,
    bar heights by count, the bins' edges below, and ``marks`` (value, label) as ticks above."""
    used = np.flatnonzero(counts)
    if not len(used):
        return ""
    lo, hi = int(used[0]), int(used[-1]) + 1
    shown = counts[lo:hi]
    width, height, bar = 360, 90, 360 / len(shown)
    peak = shown.max()
    parts = [f"<svg class='histogram' width='{width}' height='{height + 34}' viewBox='0 -14 {width} {height + 34}'>"]
    for i, n in enumerate(shown):
        h = height * n / peak
        low = 0.0 if lo + i == 0 else edges[lo + i - 1]
        high = edges[lo + i] if lo + i < len(edges) else float("inf")
        parts.append(f"<rect x='{i * bar:.1f}' y='{height - h:.1f}' width='{max(bar - 1, 1):.1f}' height='{h:.1f}'>"
                     f"<title>codes in [{low:.3g}, {high:.3g}): {int(n)}</title></rect>")
    def x_of(value: float) -> float:
        b = int(np.searchsorted(edges, value, side="right")) - lo
        return (min(max(b, 0), len(shown) - 1) + 0.5) * bar
    at: dict[float, list[str]] = {}  # marks in one bin share a line and a label ("75/90%")
    for value, label in marks:
        if np.isfinite(value):
            at.setdefault(round(x_of(value), 1), []).append(label.rstrip("%"))
    for x, labels in at.items():
        parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='-4' y2='{height}' class='mark'/>"
                     f"<text x='{x:.1f}' y='-6' text-anchor='middle'>{html.escape('/'.join(labels))}%</text>")
    first = 0.0 if lo == 0 else edges[lo - 1]
    last = edges[hi - 1] if hi - 1 < len(edges) else float("inf")
    parts.append(f"<text x='0' y='{height + 14}'>{first:.3g}</text>"
                 f"<text x='{width}' y='{height + 14}' text-anchor='end'>{last:.3g}</text>"
                 f"<text x='{width / 2}' y='{height + 14}' text-anchor='middle'>code value (log bins)</text></svg>")
    return "".join(parts)


def new_figure(size: tuple[float, float] = (4, 3)):
    """A figure and its one axes, outside pyplot's state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def save_svg(site: Path, name: str, fig, alt: str, caption: str) -> dict[str, str]:
    """Write ``fig`` as ``img/<name>`` (SVG); what the page's ``figure`` macro shows of it."""
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    (site / "img").mkdir(exist_ok=True)
    (site / "img" / name).write_text(buffer.getvalue())
    return {"name": name, "alt": alt, "caption": caption}


def index_plots(site: Path, stats: dict[str, dict], sizes: dict[str, np.ndarray],
                gaps: dict[str, np.ndarray]) -> list[dict[str, str]]:
    """R^2 against l0 per tap, concept sizes and completeness gaps (where there is data)."""
    figures = []
    taps = [t for t, found in stats.items() if found.get("r2") is not None]
    if taps:
        fig, ax = new_figure()
        for t in taps:
            ax.scatter(stats[t]["l0_ratio"], stats[t]["r2"], label=t)
        ax.set_xlabel("l0 ratio")
        ax.set_ylabel("R^2")
        ax.legend(fontsize=7)
        figures.append(("r2_l0.svg", fig, "R^2 against the l0 ratio per tap"))
    if sizes:
        figures.append(("sizes.svg", _log_histograms({t: np.maximum(u, 1) for t, u in sizes.items()},
                                                    "log10 concept size (PFVs using it)", 7),
                        "distribution of concept sizes"))
    if gaps:
        figures.append(("gaps.svg", _log_histograms(gaps, "log10 relative completeness gap", 6),
                        "distribution of completeness gaps"))
    return [save_svg(site, name, fig, html.escape(caption), html.escape(caption)) for name, fig, caption in figures]


def _log_histograms(values: dict[str, np.ndarray], xlabel: str, legend_size: int):
    """One step histogram of log10 values per label, on one axes."""
    fig, ax = new_figure()
    for label, found in values.items():
        ax.hist(np.log10(found), bins=30, histtype="step", label=label)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=legend_size)
    return fig


def evaluation_curves(site: Path, pair: tuple[str, str], mean: np.ndarray, counts: int) -> dict[str, str]:
    """A pair's mean insertion (solid) and deletion (dashed) curves per ordering."""
    from gig_dist.kernels.evaluation import ORDERINGS, fractions

    fig, ax = new_figure()
    x = fractions(mean.shape[-1] - 1)
    for o, ordering in enumerate(ORDERINGS):
        line, = ax.plot(x, mean[0, o], label=ordering)
        ax.plot(x, mean[1, o], linestyle="--", color=line.get_color())
    ax.set_xlabel("fraction of the image's concepts")
    ax.set_title(f"{pair[0]} -> {pair[1]} ({counts})", fontsize=9)
    ax.legend(fontsize=7)
    return save_svg(site, f"eval_{safe(pair[0])}__{safe(pair[1])}.svg", fig, f"{pair[0]} to {pair[1]}",
                    f"{pair[0]} &rarr; {pair[1]}")


def class_graph_svg(site: Path, graph: dict[str, Any], class_names: list[str], layout: str) -> tuple[str, str]:
    """The graph as inline SVG whose nodes are concept thumbnails linking to concept pages, and the
    layout that drew it (``dot``, or ``layered`` where dot is missing or fails)."""
    nodes = [(n["tap"], n["concept"]) for n in graph["nodes"]]
    shared = {(n["tap"], n["concept"]) for n in graph["nodes"] if n.get("shared")}
    if layout == "dot":
        lines = ["digraph G {", "rankdir=BT; node [shape=plain, fontsize=9]; edge [arrowsize=0.6];",
                 f"cls [shape=ellipse, label=\"{class_names[graph['class']]}\", tooltip=\"{class_names[graph['class']]}\"];"]
        for tap, k in nodes:
            image = site / "img" / safe(tap) / f"t{k}.png"
            picture = (f'<TR><TD FIXEDSIZE="TRUE" WIDTH="48" HEIGHT="48"><IMG SRC="{image}" SCALE="TRUE"/></TD></TR>'
                       if image.exists() else "")
            colour = "orange" if (tap, k) in shared else "gray40"
            # an HTML-like label: the picture and the name inside the node's own frame
            lines.append(f'"{tap}:{k}" [label=<<TABLE BORDER="2" COLOR="{colour}" CELLBORDER="0" CELLSPACING="0" '
                         f'CELLPADDING="1">{picture}<TR><TD ALIGN="CENTER"><FONT POINT-SIZE="8">{tap}:{k}</FONT></TD></TR></TABLE>>, '
                         f'URL="../concept/{safe(tap)}/{k}.html", target="_top", tooltip="{tap}:{k}"];')
        for edge in graph["edges"]:
            source = f'"{edge["source"][0]}:{edge["source"][1]}"'
            target = "cls" if edge["target"][0] == "class" else f'"{edge["target"][0]}:{edge["target"][1]}"'
            lines.append(f'{source} -> {target} [penwidth={0.5 + 4 * edge.get("relative", 1):.2f}, '
                         f'tooltip="{edge_name(edge, class_names)}: Gamma {edge["weight"]:.3g}"];')
        lines.append("}")
        done = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines), capture_output=True, text=True,
                              cwd=site, check=False)
        if done.returncode == 0:
            # dot writes the absolute image paths it was given: relative to the class page instead
            svg = done.stdout.replace(f"{site / 'img'}/", "../img/")
            return _fit_width(svg[svg.index("<svg"):]), "dot"  # inline: drop the XML prologue
    return _layered_svg(graph, nodes, shared, class_names), "layered"


def edge_name(edge: dict[str, Any], class_names: list[str]) -> str:
    """``layer2.1:5 -> layer3.1:9``, or ``... -> <class name>``."""
    target = class_names[edge["target"][1]] if edge["target"][0] == "class" else f"{edge['target'][0]}:{edge['target'][1]}"
    return f"{edge['source'][0]}:{edge['source'][1]} -> {target}"


def _fit_width(svg: str) -> str:
    """The page's width, not Graphviz's points: the drawing scales (its viewBox keeps the shape)."""
    head, rest = svg.split(">", 1)
    head = re.sub(r'\s(width|height)="[^"]*"', "", head)
    return head + ' width="100%" style="max-width:100%;height:auto">' + rest


def _layered_svg(graph, nodes, shared, class_names) -> str:
    levels = ["class", *graph["taps"]]
    rows: dict[str, list[tuple[str, int]]] = {tap: [n for n in nodes if n[0] == tap] for tap in graph["taps"]}
    width = max(1, max(len(r) for r in rows.values())) * 90 + 40
    position = {("class", graph["class"]): (width / 2, 30)}
    for level, tap in enumerate(levels[1:], start=1):
        for i, node in enumerate(rows[tap]):
            position[node] = ((i + 0.5) * (width / max(len(rows[tap]), 1)), 30 + level * 110)
    height = 30 + len(levels) * 110
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' xmlns:xlink='http://www.w3.org/1999/xlink' "
             f"viewBox='0 0 {width} {height}' width='100%' style='max-width:100%;height:auto'>"]
    for edge in graph["edges"]:
        x1, y1 = position[(edge["source"][0], edge["source"][1])]
        x2, y2 = position[(edge["target"][0], edge["target"][1])]
        parts.append(f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='#888' "
                     f"stroke-width='{0.5 + 4 * edge.get('relative', 1):.2f}'><title>"
                     f"{html.escape(edge_name(edge, class_names))}: Gamma {edge['weight']:.3g}</title></line>")
    x, y = position[("class", graph["class"])]
    parts.append(f"<text x='{x}' y='{y}' text-anchor='middle'>{html.escape(class_names[graph['class']])}</text>")
    for tap, k in nodes:
        x, y = position[(tap, k)]
        colour = "orange" if (tap, k) in shared else "#555"
        parts.append(f"<a xlink:href='../concept/{safe(tap)}/{k}.html' target='_top'><g class='node'>"
                     f"<rect x='{x - 30}' y='{y - 26}' width='60' height='66' fill='white' stroke='{colour}' "
                     f"stroke-width='2'/><image xlink:href='../img/{safe(tap)}/t{k}.png' x='{x - 24}' y='{y - 24}' "
                     f"width='48' height='48'/><text x='{x}' y='{y + 35}' font-size='9' "
                     f"text-anchor='middle'>{tap}:{k}</text></g></a>")
    parts.append("</svg>")
    return "".join(parts)
