"""The report (a static site) in a real browser, `gig-dist show`, and what they do with partial runs.

The browser is Debian's headless Chromium (`apt-get install chromium`; `.ci/run` installs it)."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gig_dist import open_run, pipeline
from gig_dist.cli import main
from gig_dist.report import build_report
from gig_dist.store import AtlasSection, ConceptsSection, GIGSection, RunStore
from tests.conftest import toy_config, zgroup

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    url = pipeline.run(toy_config("gig.images=16", "atlas.members=4", "atlas.crop=24"), root / "run.zarr").url
    # One concept without members (as a concept no decomposed PFV uses would be).
    store = RunStore.open(url, mode="r+")
    g = zgroup(store, "r+")
    g["atlas/bisecting_kmeans/layer3.1/row"][5] = -1
    g["atlas/bisecting_kmeans/layer3.1/member/image"][5] = -1
    summary = build_report(url, root / "site")
    return store, summary


def _browser(page: Path, *extra: str) -> subprocess.CompletedProcess:
    assert CHROMIUM, "the report test needs Debian's chromium (apt-get install chromium), as .ci/run installs"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", *extra,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


def _links_resolve(site: Path) -> int:
    """Every link and image of the site is a file of the site, and no page is blank (a heading
    and text beyond it); how many links were checked."""
    checked = 0
    for page in site.rglob("*.html"):
        text = page.read_text()
        words = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)>.*?</\1>", " ", text, flags=re.S)).split()
        assert "<h1>" in text and len(words) > 8, (page, words)
        for target in re.findall(r"""(?:href|src|xlink:href)=['"]([^'"#]+)['"]""", text):
            if target.startswith(("http:", "https:", "data:", "javascript:")):
                pytest.fail(f"{page} refers outside the site: {target}")
            assert (page.parent / target).resolve().is_file(), (page, target)
            checked += 1
    return checked


def test_every_link_and_image_of_the_site_resolves(finished):
    store, summary = finished
    assert summary.missing == [] and summary.pages > 10
    assert _links_resolve(summary.site) > 100
    # a page per attributed image (gig.images = 16), each linked from the index, by class
    assert sorted(int(p.stem) for p in (summary.site / "image").glob("*.html")) == list(range(16))
    index = (summary.site / "index.html").read_text()
    assert all(f"href='image/{i}.html'" in index for i in range(16))
    # a concept page shows each member's whole image, with its crop's box
    run = open_run(store.url)
    members = run.members("layer2.1", 3)
    page = (summary.site / "concept/layer2.1/3.html").read_text()
    assert all(f"img/image/{i}.jpg" in page for i in members["image"])
    shown, rest = page.split("<h2>its code values</h2>")
    assert shown.count("<span style='top:") == len(members["image"])
    # each member: its iERF outlined on its whole image, and its crop cut from the image undimmed,
    # the box filling the view (no member strip of overlaid crops is written)
    assert shown.count("<svg class='contour'") == len(members["image"])
    assert not (summary.site / "img/layer2.1/m3.png").exists()
    atlas = store.family(AtlasSection, "bisecting_kmeans")
    y0, x0, y1, x1 = atlas.read_crops("box", atlas.rows("layer2.1")[3][:1])[0]
    zoom = 112 / max(y1 - y0, x1 - x0)
    assert f"background-position:-{x0 * zoom:.1f}px -{y0 * zoom:.1f}px" in shown
    assert f"background-size:{64 * zoom:.1f}px {64 * zoom:.1f}px" in shown
    # its code histogram, examples at its quantiles and random examples (up to 8 of the kept sample)
    examples = run.examples("layer2.1", 3)
    assert examples["histogram"].sum() == run.store.family(AtlasSection, "bisecting_kmeans").usage("layer2.1")[3]
    used = np.flatnonzero(examples["histogram"])
    assert "<svg class='histogram'" in rest and rest.count("<rect ") == used[-1] - used[0] + 1  # first to last used bin
    quantiles, randoms = rest.split("<h2>random examples</h2>")
    assert quantiles.count("<figure class='member'>") == 5
    assert randoms.count("<figure class='member'>") == min(8, len(examples["sample"]["image"]))
    for i, v in zip(examples["sample"]["image"][:8], examples["sample"]["value"][:8]):
        assert f"code {v:.3g}<br>image {i}:" in randoms


def test_classes_without_attributed_images_get_no_page_and_no_link(tmp_path):
    """A model of 1,000 classes and 32 attributed images gave 1,000 class pages, most of them
    empty, and the index linked them all."""
    url = pipeline.run(toy_config("dataset.toy.num_images=8", "store.images_per_unit=4", "store.images_per_chunk=4",
                                  "gig.images=4", "report.enabled=false"), tmp_path / "run.zarr").url
    summary = build_report(url, tmp_path / "site")
    pages = sorted(int(p.stem) for p in (summary.site / "class").glob("*.html"))
    # the classes of the 4 attributed images (the interleaved toy world: 4 distinct ones)
    assert pages == sorted(set(zgroup(url)["meta/label"][:4].tolist())) and len(pages) == 4
    index = (summary.site / "index.html").read_text()
    assert "4 of the model's 8 classes have no attributed image (gig.images): no graph, no page" in index
    assert _links_resolve(summary.site) > 20


@pytest.mark.parametrize("page", ["index.html", "concept/layer3.1/0.html", "class/0.html", "tap/layer3.1/p0.html",
                                  "image/1.html"])
def test_pages_load_in_a_browser_without_a_broken_image_or_a_console_error(finished, page, tmp_path):
    store, summary = finished
    done = _browser(summary.site / page, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-broken-images="0"' in done.stdout, page
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"error|uncaught|failed", line, re.I)], console
    if page.startswith("class/"):
        graph = store.family(GIGSection, "bisecting_kmeans").read_graph(0)
        # the class graph is drawn: one node (a concept thumbnail linking to its page) per concept
        assert done.stdout.count('class="node"') >= len(graph["nodes"]) > 0
        assert done.stdout.count("<image") >= len(graph["nodes"])
    if page.startswith("image/"):
        # per tap, each concept's region on the picture, loaded (broken images are counted above)
        found = open_run(store.url).image_summary(1, top=6)
        shown = sum(len(concepts) for concepts in found["taps"].values())
        assert done.stdout.count("class=\"map\"") == shown > 0
    # no page is blank: a heading and text beyond it
    body = re.sub(r"<[^>]+>", " ", done.stdout.split("<body", 1)[1])
    assert "<h1>" in done.stdout and len(body.split()) > 20, page
    shot = tmp_path / "shot.png"
    taken = _browser(summary.site / page, f"--screenshot={shot}", "--window-size=1000,800")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000


#: Appended to a copy of a class page: counts the graph's nodes whose label's box misses the node's frame.
LABELS = ("<script>addEventListener('load',()=>{let off=0,n=0;for(const g of document.querySelectorAll('svg g.node')){"
          "const t=g.querySelector('text'),f=g.querySelector('polygon,rect,ellipse');if(!t||!f)continue;n++;"
          "const a=t.getBoundingClientRect(),b=f.getBoundingClientRect();"
          "if(a.right<b.left||a.left>b.right||a.bottom<b.top||a.top>b.bottom)off++;}"
          "document.body.dataset.nodes=n;document.body.dataset.labelsOff=off;});</script>")


@pytest.mark.parametrize("layout", ["dot", "layered"])
def test_the_class_graphs_node_labels_sit_on_their_nodes_and_edges_carry_values(finished, tmp_path, layout,
                                                                               monkeypatch):
    """Graphviz's xlabels sat half a node to the left, between the nodes; edges had no values."""
    store, summary = finished
    site = summary.site
    if layout == "layered":
        monkeypatch.setattr(shutil, "which", lambda name: None)  # as where Graphviz is not installed
        site = build_report(store.url, tmp_path / "site").site
    text = (site / "class/0.html").read_text()
    graph = store.family(GIGSection, "bisecting_kmeans").read_graph(0)
    checked = site / "class/_labels.html"
    checked.write_text(text.replace("</body>", LABELS + "</body>"))
    try:
        done = _browser(checked, "--dump-dom")
    finally:
        checked.unlink()
    nodes = int(re.search(r'data-nodes="(\d+)"', done.stdout).group(1))
    assert nodes >= len(graph["nodes"]) > 0 and 'data-labels-off="0"' in done.stdout, done.stdout[-500:]
    # every edge's Gamma: in a table below the drawing, and on hover (an SVG title)
    assert text.count("<tr><td>") >= len(graph["edges"]) and f"{graph['edges'][0]['weight']:.3g}" in text
    assert "Gamma" in re.search(r"<svg.*</svg>", text, re.S).group(0).split("<title>", 1)[-1]
    assert 'width="100%"' in text or "width='100%'" in text  # the drawing scales to the page


def test_a_concept_without_members_says_so(finished, tmp_path):
    store, summary = finished
    text = (summary.site / "concept/layer3.1/5.html").read_text()
    assert "this concept has no members" in text
    assert main(["show", store.url, "--tap", "layer3.1", "--concept", "5", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_show_figures_leave_a_notebooks_backend_and_pyplot_alone(finished):
    """A notebook's backend is not Agg: switching it silently stopped its ordinary plots."""
    import matplotlib
    import matplotlib.pyplot as plt

    from gig_dist import open_run

    store, _ = finished
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend
    try:
        figures = plt.get_fignums()
        run = open_run(store.url)
        concept, graph, image = run.show_concept("layer2.1", 3), run.show_class(0), run.show_image(1)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
        assert len(image.axes) > 1
        assert len(concept.axes) >= 1 and len(graph.axes) == 1
        # an arrow per edge, towards the class, with its Gamma beside it
        from matplotlib.text import Annotation

        edges = run.graph(0)["edges"]
        arrows = [a for a in graph.axes[0].texts if isinstance(a, Annotation) and a.arrow_patch is not None]
        assert len(arrows) == len(edges) > 0
        values = {a.get_text() for a in graph.axes[0].texts}
        assert all(f"{e['weight']:.2g}" in values for e in edges)
        # each node's picture is its concept's top member's crop, not the mean of its crops
        tops = {run.members(n["tap"], n["concept"])["crop"][0].tobytes() for n in run.graph(0)["nodes"]}
        drawn = [np.asarray(image.get_array()).tobytes() for image in graph.axes[0].images]
        assert drawn and all(picture in tops for picture in drawn)
    finally:
        matplotlib.use(before)


def test_show_writes_figures_and_names_the_valid_range(finished, tmp_path, capsys):
    store, _ = finished
    assert main(["show", store.url, "--tap", "layer2.1", "--concept", "3", "--out", str(tmp_path / "k.png")]) == 0
    assert main(["show", store.url, "--class", "0", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "k.png").stat().st_size > 5000 and (tmp_path / "g.png").stat().st_size > 5000
    run = open_run(store.url)
    found = run.members("layer2.1", 3)
    assert found["crop"].shape == (len(found["image"]), 24, 24, 3) and found["kind"] == "srd"
    assert (np.diff(found["value"]) <= 0).all()
    k = store.family(ConceptsSection, "bisecting_kmeans").count("layer2.1")
    for args, message in ((["--tap", "layer9", "--concept", "0"], "tap 'layer9' is not in this run"),
                          (["--tap", "layer2.1", "--concept", str(k)], f"concepts 0..{k - 1}"),
                          (["--class", "99"], "classes 0..7"),
                          (["--class", "zebra"], "unknown class 'zebra'")):
        assert main(["show", store.url, *args, "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err


def test_an_images_concepts_are_its_strongest_gig_toward_its_class(finished, tmp_path):
    """``Run.image_summary``: per tap with GIG to the classes, the concepts of the image with the
    largest |GIG| toward its target class, each value the stored per-source GIG of that image;
    the code mass is the code maps' sum. ``show --image`` draws it."""
    from gig_dist.store import ImageRange

    store, _ = finished
    run = open_run(store.url)
    attributed = run.attributed_images()
    assert attributed.tolist() == list(range(16))  # gig.images = 16
    found = run.image_summary(2, top=3)
    gig = store.family(GIGSection, "bisecting_kmeans")
    reduced = gig.read_reduced(("layer3.1", "logits"), ImageRange(2, 3))
    vectors, _, _ = gig.read_vectors(("layer3.1", "logits"), ImageRange(2, 3))
    slot = int(np.flatnonzero(reduced["target"][0] == found["target"])[0])
    per_source = {int(k): float(v) for k, v in zip(reduced["source"][0], vectors[0, slot]) if k >= 0}
    strongest = sorted(per_source, key=lambda k: -abs(per_source[k]))[:3]
    assert [c["concept"] for c in found["taps"]["layer3.1"]] == strongest
    assert [c["gig"] for c in found["taps"]["layer3.1"]] == [per_source[k] for k in strongest]
    maps = run.code_maps("layer3.1", 2).values
    for entry in found["taps"]["layer3.1"]:
        assert entry["mass"] == pytest.approx(float(maps[entry["concept"]].sum()), rel=1e-6)
        np.testing.assert_array_equal(entry["map"], maps[entry["concept"]])
    assert found["target"] == found["prediction"]  # slot 0: the prediction (slot 1: the label, where it differs)
    assert main(["show", store.url, "--image", "2", "--out", str(tmp_path / "i.png")]) == 0
    assert (tmp_path / "i.png").stat().st_size > 5000


def test_highlight_places_a_tap_cell_over_its_pixels():
    """Cell (y, x) of an h x w grid covers pixels [y H/h, (y+1) H/h) x [x W/w, (x+1) W/w): no shift."""
    from gig_dist.read import highlight

    picture = np.zeros((16, 16, 3), np.float32)
    code = np.zeros((4, 4), np.float32)
    code[1, 2] = 1.0
    shown = highlight(picture, code)
    kept = (shown == 0).all(-1) | (shown == np.array([1.0, 0.55, 0.0], np.float32)).all(-1)
    assert np.argwhere(kept).min(0).tolist() == [4, 8] and np.argwhere(kept).max(0).tolist() == [7, 11]
    assert np.allclose(shown[0, 0], 0.65)  # elsewhere washed toward white, not darkened


def test_a_partial_run_gives_a_report_of_what_exists(tmp_path):
    url = pipeline.run(toy_config(), tmp_path / "run.zarr", until="decompose").url
    summary = build_report(url, tmp_path / "site")
    assert "class graphs (run the graphs stage)" in summary.missing
    index = (summary.site / "index.html").read_text()
    assert "missing: class graphs (run the graphs stage)" in index
    assert "no members shown: the members and atlas stages have not run" in (
        summary.site / "concept/layer1.0/0.html").read_text()
    # a folder that is not a report is never deleted
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["report", url, "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_background_concepts_are_marked_and_a_tap_without_part_mass_has_no_purity_summary(finished, tmp_path,
                                                                                           monkeypatch):
    """One build, two cases. A concept whose iERF mass lies mostly off the objects read "purity
    0.09 (orange diamond)", as if it were about a part. An atlas still running (or a level whose
    members have no part masks) leaves every purity NaN at a tap: the build went on to a median of
    nothing and crashed."""
    from gig_dist.store import AtlasSection

    store, _ = finished
    real = AtlasSection.part_mass

    def mass(self, tap):
        found = real(self, tap).copy()
        if tap == "layer2.1":
            found[0] = 0.0
            found[0, 0], found[0, 3] = 10.0, 1.0  # 10 of 11 parts of its mass on the background
        if tap == "layer3.1":
            found[:] = np.nan
        return found

    monkeypatch.setattr(AtlasSection, "part_mass", mass)
    site = build_report(store.url, tmp_path / "site").site
    assert "background: 91% of the shown iERF mass falls on no object part (purity 0.09 on" in \
        (site / "concept/layer2.1/0.html").read_text()
    tap_page = (site / "tap/layer2.1/p0.html").read_text()
    row = re.search(r"<tr><td><a href='../../concept/layer2.1/0.html'>.*?</tr>", tap_page).group(0)
    assert "<td>background (91%)</td>" in row, row
    # every concept with half its mass or more on the background is marked, and only those
    patched = mass(AtlasSection(RunStore.open(store.url), "bisecting_kmeans"), "layer2.1")
    background = patched[:, 0] >= 0.5 * patched.sum(1)
    pages = "".join((site / f"tap/layer2.1/p{p}.html").read_text() for p in range(-(-len(patched) // 256)))
    assert pages.count("<td>background (") == int(background.sum()) >= 1
    assert "purity (share of shown iERF mass" in tap_page
    # the tap without part mass: built, without the purity summary
    page = (site / "tap/layer3.1/p0.html").read_text()
    assert "purity (share of shown iERF mass" not in page and "<th>purity</th>" in page
