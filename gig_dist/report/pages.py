"""The report's pages: Jinja2 templates (``templates/``) rendered with the values the builder
reads through the run. A template is written over many indented lines for reading; the loader
joins it into one line (a newline and the indentation after it are dropped), so the pages are as
compact as hand-written HTML and every space in them is written on purpose."""

from __future__ import annotations

import html
import re
from typing import Any

import jinja2

#: Concepts per index page.
PAGE = 256

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
a{color:#0645ad;text-decoration:none} a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
img.thumb{width:48px;height:48px;image-rendering:pixelated;vertical-align:middle}
img.big{width:96px;height:96px;image-rendering:pixelated}
.strip{display:flex;flex-wrap:wrap;gap:8px} .strip figure{margin:0;font-size:12px;text-align:center}
.note{color:#666;font-size:90%} .missing{color:#a33} nav{margin-bottom:1em}
figure.member img{width:112px;height:112px;image-rendering:pixelated}
.ctx{position:relative;display:inline-block;width:112px;margin-right:4px} .ctx img{width:112px;height:100%;display:block}
.ctx span{position:absolute;border:2px solid #f80;box-sizing:border-box}
.ctx svg.contour{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}
svg.contour polyline{fill:none;stroke:#0ff;stroke-width:1.2px;vector-effect:non-scaling-stroke}
.native{position:relative;width:112px;height:112px;background-repeat:no-repeat;flex:none}
.native.px{image-rendering:pixelated} .native span{position:absolute;border:2px solid #0ff;box-sizing:border-box}
svg.histogram rect{fill:#5a7fb8} svg.histogram text{font-size:10px;fill:#444} svg.histogram line.mark{stroke:#c40;stroke-width:1}
.pair{display:flex} img.map{width:128px;image-rendering:pixelated;display:block} figure.cell{max-width:150px} img.photo{width:224px;image-rendering:pixelated} img.small{width:64px;image-rendering:pixelated;vertical-align:middle}
"""

#: Marks the page with the number of images that failed to load (read by the tests' browser).
CHECK = ("<script>addEventListener('load',()=>{const b=[...document.images].filter(i=>!i.complete||"
         "i.naturalWidth===0).length;document.body.dataset.brokenImages=b;});</script>")


def safe(name: str) -> str:
    """A tap or class name as a file name."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def fmt(value: Any) -> str:
    """A table cell: ``-`` for no value, 3 significant digits for a float."""
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class _OneLine(jinja2.PackageLoader):
    def get_source(self, environment, template):
        source, filename, uptodate = super().get_source(environment, template)
        return re.sub(r"\n[ \t]*", "", source), filename, uptodate


_ENV = jinja2.Environment(loader=_OneLine("gig_dist.report", "templates"), autoescape=False,
                          undefined=jinja2.StrictUndefined)
_ENV.filters.update(
    esc=html.escape,  # HTML with quotes escaped, as html.escape does (not markupsafe's &#39;)
    f=lambda value, spec: format(value, spec),
    spec=lambda value, spec: "-" if value is None else format(value, spec),
    fmt=fmt,
    safe_name=safe,
)


def render(template: str, **values: Any) -> str:
    """A page (or a section) from its template."""
    return _ENV.get_template(template).render(style=STYLE, check=CHECK, **values)
