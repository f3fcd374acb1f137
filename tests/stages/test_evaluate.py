"""Concept insertion and deletion: the metrics on cases whose answer is known, and the stage."""

import numpy as np
import pytest
import torch
from torch import nn

from gig_dist.kernels.evaluation import (
    auc,
    class_probability,
    curves,
    mean_interval,
    rank,
)
from gig_dist.store import (
    CodesSection,
    ConceptsSection,
    EvaluationSection,
    GIGSection,
    MetaSection,
)


class MeanHead(nn.Module):
    """logits = W . (mean over positions of x): concept 0 alone drives class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[8.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def _codes():
    # 4 positions (2 x 2), every position uses each of the 4 concepts (identity dictionary).
    index = torch.arange(4).repeat(4, 1)
    value = torch.ones(4, 4)
    return index, value, torch.eye(4)


@pytest.mark.fast
def test_deleting_the_one_concept_that_drives_the_class_drops_it_at_once():
    head, (index, value, V) = MeanHead(), _codes()
    forward = lambda x: class_probability(0)(head(x))  # noqa: E731
    right = np.array([0, 1, 2, 3])
    ins, dele = curves(forward, index, value, V, (4, 2, 2), right, steps=4)
    uniform = 1 / 3
    full = float(torch.softmax(torch.tensor([8.0, 0, 0]), 0)[0])
    assert ins[0] == pytest.approx(uniform) and dele[-1] == pytest.approx(uniform)  # no codes at all
    assert ins[-1] == pytest.approx(full) and dele[0] == pytest.approx(full)  # every code
    assert dele[1] == pytest.approx(uniform)  # the first quarter deleted is concept 0: the class drops at once
    assert ins[1] == pytest.approx(full)  # inserting it alone restores it at once
    scores = {}
    for name, order in {"right": right, "reversed": right[::-1], "middle": np.array([1, 0, 2, 3]),
                        "last": np.array([1, 2, 3, 0])}.items():
        i, d = curves(forward, index, value, V, (4, 2, 2), order, steps=4)
        scores[name] = (auc(i) - auc(d), auc(i))
    assert all(scores["right"][0] > s[0] for name, s in scores.items() if name != "right"), scores
    assert scores["reversed"][1] < scores["right"][1]  # insertion: the reversed ordering scores worse


@pytest.mark.fast
def test_rank_and_interval():
    assert rank(np.array([0.5, 2.0, 2.0, -1.0]), np.array([0, 1, 2, 3])).tolist() == [1, 2, 0, 3]
    mean, half, n = mean_interval(np.array([1.0, 2.0, 3.0, np.nan]))
    assert (mean, n) == (2.0, 3) and half == pytest.approx(1.96 * 1.0 / np.sqrt(3))


# -- the stage and the command ---------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from gig_dist import pipeline  # noqa: E402
from gig_dist.config import ConfigError  # noqa: E402
from gig_dist.store import RunStore  # noqa: E402
from tests.conftest import toy_config, zgroup  # noqa: E402

CLI = [sys.executable, "-m", "gig_dist.cli"]
SMALL = ("gig.images=32", "gig.pairs=[[layer2.1,layer3.1],[layer3.1,logits]]")


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return pipeline.run(toy_config(*SMALL), root / "run.zarr", until="graphs").url


def _evaluate(url, *extra, env=None):
    return subprocess.run([*CLI, "evaluate", url, "--images", "32", "--json", *extra], capture_output=True, text=True,
                          env=env)


def test_evaluate_writes_curves_whose_ends_are_the_full_and_the_empty_codes(attributed, tmp_path):
    import shutil

    url = str(tmp_path / "run.zarr")
    shutil.copytree(attributed, url)
    (tmp_path / "run.report").mkdir()  # a report built before: evaluate says how to show the evaluation there
    (tmp_path / "run.report" / ".gig-dist-report").write_text(url)
    done = _evaluate(url)
    assert done.returncode == 0, done.stderr
    assert f"the report at {tmp_path / 'run.report'} was built before this evaluation: gig-dist report {url} adds it" \
        in done.stderr
    found = json.loads(done.stdout)
    assert found["images"] == 32
    found = found["results"]["bisecting_kmeans"]
    assert set(found) == {"layer2.1 -> layer3.1", "layer3.1 -> logits"}
    store = RunStore.open(url)
    section = store.family(EvaluationSection, "bisecting_kmeans")
    for pair in (("layer3.1", "logits"), ("layer2.1", "layer3.1")):
        got = section.read(pair, store.units()[0])
        ins, dele = got["insertion"].astype(np.float64), got["deletion"].astype(np.float64)
        assert np.isfinite(ins).any()
        # inserting everything and deleting nothing are both the full reconstruction; inserting
        # nothing and deleting everything both the empty one: equal in every ordering
        np.testing.assert_allclose(ins[..., -1], dele[..., 0], rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(ins[..., 0], dele[..., -1], rtol=1e-6, equal_nan=True)
        if pair[1] == "logits":
            assert np.nanmin(ins) >= 0 and np.nanmax(ins) <= 1
        else:
            np.testing.assert_allclose(ins[..., -1][np.isfinite(ins[..., -1])], 1.0, rtol=1e-5)  # normalised
        # the absolute form: k = 0 is the empty reconstruction, k past the active concepts the full one
        counts_in, counts_del = got["count_insertion"].astype(np.float64), got["count_deletion"].astype(np.float64)
        np.testing.assert_allclose(counts_in[..., 0], ins[..., 0], rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(counts_del[..., 0], dele[..., 0], rtol=1e-6, equal_nan=True)
        active = got["active"]
        done_rows = np.flatnonzero(active >= 0)
        assert len(done_rows) and (active[done_rows] > 0).all()
        few = done_rows[active[done_rows] <= 32]
        np.testing.assert_allclose(counts_in[few][..., -1], ins[few][..., -1], rtol=1e-6, equal_nan=True)
    score = found["layer3.1 -> logits"]
    assert all(score[o]["score"][2] == 32 for o in ("gig", "random", "code_mass", "grad_x_code"))
    assert all(score[o]["count_score"][2] == 32 for o in ("gig", "random", "code_mass", "grad_x_code"))
    # between taps, one value per image (its targets averaged), not one per image x target
    assert found["layer2.1 -> layer3.1"]["gig"]["score"][2] == 32
    sparsity = score["sparsity"]
    assert 0.8 < sparsity["r2"] <= 1 and 0 < sparsity["mean_l0"] < 64 and sparsity["active_per_image"] > 1
    # The run's other stages were kept, and evaluate is not part of a default run.
    assert "evaluate" not in [k.split("/")[-1] for k in RunStore.open(attributed).manifest.stages]
    check_ground_truth(store, json.loads(done.stdout)["ground_truth"]["bisecting_kmeans"])
    # The report shows the curves, the scores and the ground truth.
    from gig_dist.report import build_report

    build_report(url, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert "evaluation (<code>gig-dist evaluate</code>)" in index and "ground truth (toy world)" in index
    for pair in ("layer3.1__logits", "layer2.1__layer3.1"):
        assert f"img/eval_{pair}.svg" in index and (tmp_path / "site" / "img" / f"eval_{pair}.svg").stat().st_size
    mean, half, n = score["gig"]["score"]
    assert f"{mean:+.3f} &plusmn; {half:.3f} ({n})" in index


def check_ground_truth(store, summary):
    """The toy world's ground truth as stored, against what it claims: shares that sum to one,
    the model's own predictions, and one image's masses recomputed from per-position iERFs."""
    import torch

    from gig_dist.data.sources import ImageLoader
    from gig_dist.kernels.srd import SRD
    from gig_dist.models.loading import build_model, resolve_transform
    from gig_dist.store import ImageRange

    r = ImageRange(0, 32)  # the evaluated images (two store units)
    section = store.family(EvaluationSection, "bisecting_kmeans")
    assert section.ground_taps() == ["layer3.1"]  # the taps with a GIG pair to the classes
    got = section.read_ground(r, ["layer3.1"])
    mass, active, pixels = got["layer3.1/mass"][:32], got["layer3.1/active"][:32], got["pixels"][:32]
    _, labels = store.family(MetaSection).read_index(r)
    _, predictions = store.family(MetaSection).read_status(r)
    assert np.allclose(pixels.sum(-1), 1) and (pixels[:, 0, 1] == 0).all() and (pixels[:, 1, 1] > 0).all()
    assert (got["prediction"][:32, 0] == predictions[:32]).all()
    assert ((got["distractor"][:32] >= 0) & (got["distractor"][:32] != labels[:32])).all()
    defined = np.isfinite(mass[..., 0])
    assert defined.mean() > 0.9 and (active[defined] > 0).all()
    # each concept's iERF sums to one (SRD conserves relevance), so do the mean shares
    assert np.allclose(mass[defined].sum(-1), 1, atol=1e-4)
    assert (mass[:, 0, :, 1][defined[:, 0]] == 0).all()  # no distractor, no mass on one
    # One image by hand: the class's top concepts by the class matrix, active in the image, each
    # the code-weighted sum of its positions' iERFs, split by the object mask.
    config = toy_config(*SMALL)
    model = build_model(config.model).eval()
    loader = ImageLoader(resolve_transform(config), config.dataset.max_image_pixels, 1)
    row = 5
    scene = loader.load_scene(store.family(MetaSection).path(row), False)
    d = SRD(model).decompose(scene.image[None])
    matrix = store.family(GIGSection, "bisecting_kmeans").read_matrix(("layer3.1", "logits"))
    top = [k for k in np.argsort(-matrix[:, labels[row]], kind="stable")[:3] if matrix[k, labels[row]] > 0]
    index, value = store.family(CodesSection, "bisecting_kmeans").read("layer3.1", store.units()[0])
    index, value = index[row], value[row]
    present = [k for k in top if (index == k).any()]
    every = d.ierf("layer3.1", torch.arange(len(index))[None])[0].double().numpy()  # (P, H, W)
    shares = []
    for k in present:
        u = np.where(index == k, value, 0).sum(1)
        ierf = np.einsum("p,pxy->xy", u / u.sum(), every)
        own = scene.object_mask == 1
        shares.append([ierf[own].sum(), 0.0, ierf[~own].sum()])
    assert active[row, 0, 0] == len(present)
    np.testing.assert_allclose(mass[row, 0, 0], np.mean(shares, 0), atol=1e-4)
    # The summary: accuracy from the stored predictions, means of the stored masses.
    assert summary["images"] == 32
    assert summary["accuracy"]["image"] == pytest.approx((predictions[:32] == labels[:32]).mean())
    assert summary["taps"]["layer3.1"]["with distractor"]["gig top"]["own object"][0] == pytest.approx(
        np.nanmean(mass[:, 1, 0, 0]), rel=1e-5)
    assert "purity" in summary["taps"]["layer3.1"] and 0 <= summary["part_recall"]["class_top"] <= 1


def test_evaluating_only_the_gig_ordering_gives_its_curves_and_leaves_the_others_nan(attributed, tmp_path):
    """``evaluate.orderings=[gig]`` (what each sweep point computes) gives the same GIG curves as
    the full evaluation, bit for bit, and no curves for the other orderings."""
    import shutil

    tables = {}
    for name, extra in (("all", ()), ("gig", ("evaluate.orderings=[gig]",))):
        url = str(tmp_path / f"{name}.zarr")
        shutil.copytree(attributed, url)
        pipeline.run(toy_config(*SMALL, "evaluate.images=16", "evaluate.ground_truth=false", *extra), url,
                     until="evaluate")
        store = RunStore.open(url)
        tables[name] = {pair: store.family(EvaluationSection, "bisecting_kmeans").read(pair, store.units()[0])
                        for pair in (("layer3.1", "logits"), ("layer2.1", "layer3.1"))}
    for pair, full in tables["all"].items():
        mine = tables["gig"][pair]
        for name in ("insertion", "deletion", "count_insertion", "count_deletion"):
            assert np.isfinite(full[name][..., 0, :]).sum() > 16
            np.testing.assert_array_equal(mine[name][..., 0, :], full[name][..., 0, :])
            assert np.isfinite(full[name][..., 1:, :]).any() and not np.isfinite(mine[name][..., 1:, :]).any()


def test_evaluate_names_a_dictionary_the_run_does_not_have(attributed):
    done = subprocess.run([*CLI, "evaluate", attributed, "--dict", "sae"], capture_output=True, text=True)
    assert done.returncode == 2 and "no finished GIG for dictionary sae" in done.stderr
    assert "it has bisecting_kmeans" in done.stderr


def test_evaluate_refuses_taps_it_cannot_evaluate_before_any_work(attributed):
    for taps, message in ((["nowhere"], "'nowhere' is not a tap of this run"),
                          (["layer1.0"], "tap layer1.0 has no GIG pair")):
        done = subprocess.run([*CLI, "evaluate", attributed, "--taps", *taps], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    # the model, data and other stages are the run's: evaluate does not change them (a model
    # override would otherwise redo the whole store)
    done = subprocess.run([*CLI, "evaluate", attributed, "-o", "model.name=resnet18"], capture_output=True, text=True)
    assert done.returncode == 2 and "takes only evaluate.* settings, got model.name=resnet18" in done.stderr
    assert "eval" not in zgroup(attributed)


def test_evaluate_refuses_images_without_gig(attributed):
    with pytest.raises(ConfigError, match="evaluate.images = 40 reaches past gig.images = 32"):
        pipeline.run(toy_config(*SMALL, "evaluate.images=40"), attributed, until="evaluate")


@pytest.mark.slow  # a resume check of about half a minute, beside the run-wide ones; `pytest -m slow` runs it
def test_sigkill_during_evaluation_resumes_to_the_same_tables(attributed, tmp_path):
    import shutil

    first, second = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    shutil.copytree(attributed, first)
    shutil.copytree(attributed, second)
    clean = _evaluate(first)
    killed = _evaluate(second, env=dict(os.environ, GIG_DIST_FAILPOINT="evaluate.before_commit:2"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _evaluate(second)
    assert resumed.returncode == 0 and json.loads(resumed.stdout) == json.loads(clean.stdout)


def test_a_baseline_dictionary_flows_through_the_pipeline_into_its_own_level(attributed, tmp_path):
    """Plain k-means shares the run's PFVs and samples, gets its own concepts, codes, GIG and
    graphs under `kmeans/`, and is evaluated beside the paper's dictionary."""
    import shutil

    url = str(tmp_path / "run.zarr")
    shutil.copytree(attributed, url)
    report = pipeline.run(toy_config(*SMALL, "concepts.method=kmeans"), url, until="graphs")
    actions = {d.key: d.action for d in report.decisions}
    assert actions["extract"] == actions["sample"] == "keep" and actions["kmeans/concepts"] == "new"
    store = RunStore.open(url)
    assert sorted(store.dictionaries()) == ["bisecting_kmeans", "kmeans"]
    assert store.family(GIGSection, "kmeans").has_graphs() and store.family(ConceptsSection, "kmeans").fit("layer3.1")["k"] == 64
    done = _evaluate(url, "--dict", "bisecting_kmeans", "--dict", "kmeans")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert set(results) == {"bisecting_kmeans", "kmeans"}
    assert results["kmeans"]["layer3.1 -> logits"]["gig"]["score"][2] == 32
    # the fit's loss curve is stored, and inspect shows its ends
    shown = subprocess.run([*CLI, "inspect", url], capture_output=True, text=True).stdout
    section = shown.split("dictionary kmeans")[1]
    curve = store.family(ConceptsSection, "kmeans").arrays("layer3.1")["loss"]
    assert len(curve) > 1 and f"training loss {curve[0]:.4g} -> {curve[-1]:.4g}" in section


def test_evaluate_computes_again_the_gig_a_compacted_store_deleted(tmp_path):
    """The reduction deletes the per-source GIG once a block is whole (here all 40 images); the GIG
    ordering then comes from the attribute stage's computation run again, and gives the curves
    that the kept GIG gives."""
    import shutil

    whole = ("gig.images=40", "gig.pairs=[[layer2.1,layer3.1],[layer3.1,logits]]")
    kept = str(tmp_path / "kept.zarr")
    pipeline.run(toy_config(*whole, "gig.keep_image_attributions=true"), kept, until="graphs")
    compact = str(tmp_path / "compact.zarr")
    shutil.copytree(kept, compact)
    pipeline.run(toy_config(*whole), compact, until="graphs")  # reduce again, deleting the per-source GIG
    store = RunStore.open(compact)
    pair = ("layer2.1", "layer3.1")
    assert not store.family(GIGSection, "bisecting_kmeans").has_vectors(pair, store.units()[0])
    assert RunStore.open(kept).family(GIGSection, "bisecting_kmeans").has_vectors(pair, store.units()[0])
    evaluate = ("evaluate.images=16", "evaluate.ground_truth=false")
    pipeline.run(toy_config(*whole, "gig.keep_image_attributions=true", *evaluate), kept, until="evaluate")
    pipeline.run(toy_config(*whole, *evaluate), compact, until="evaluate")
    for pair in (("layer3.1", "logits"), ("layer2.1", "layer3.1")):
        a = RunStore.open(kept).family(EvaluationSection, "bisecting_kmeans").read(pair, store.units()[0])
        b = store.family(EvaluationSection, "bisecting_kmeans").read(pair, store.units()[0])
        gig = 0  # the GIG ordering (kernels.evaluation.ORDERINGS)
        for name in ("insertion", "deletion"):
            left, right = a[name][..., gig, :], b[name][..., gig, :]
            assert np.isfinite(left).sum() > 16, (pair, name)
            np.testing.assert_allclose(right, left, rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=f"{pair} {name}")


def _level_bytes(url: str, dictionary: str) -> dict[str, bytes]:
    from pathlib import Path

    found = {}
    for family in ("concepts", "codes", "gig", "atlas"):
        root = Path(url) / family / dictionary
        found.update({str(p.relative_to(url)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    return found


def test_a_baseline_run_with_another_lambda_leaves_the_papers_level_and_its_evaluation_alone(attributed, tmp_path):
    """After `run -o concepts.method=kmeans` with another lambda, `evaluate --dict
    bisecting_kmeans` re-decomposed the paper's dictionary under k-means' lambda (its layer3.1 l0
    went from 4.93 to 3.76) and redid attribute through the atlas without a word."""
    import shutil

    url = str(tmp_path / "run.zarr")
    shutil.copytree(attributed, url)
    before = _level_bytes(url, "bisecting_kmeans")
    pipeline.run(toy_config(*SMALL, "concepts.method=kmeans", "decompose.lambda_rel=0.2"), url, until="graphs")
    assert _level_bytes(url, "bisecting_kmeans") == before
    done = subprocess.run([*CLI, "evaluate", url, "--images", "16", "--dict", "bisecting_kmeans"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    plan = next(line for line in done.stdout.splitlines() if line.startswith("bisecting_kmeans: "))
    # every stage the level had is kept (the fixture stopped before the atlas, which runs now)
    assert plan == ("bisecting_kmeans: extract keep, sample keep, concepts keep, decompose keep, attribute keep, "
                    "reduce keep, graphs keep, members new, atlas new, evaluate new"), plan
    after = _level_bytes(url, "bisecting_kmeans")
    assert {k: after.get(k) for k in before} == before
    kmeans = RunStore.open(url).manifest.dictionary_config("kmeans")
    assert kmeans["decompose"]["lambda_rel"] == 0.2
    assert RunStore.open(url).manifest.dictionary_config("bisecting_kmeans")["decompose"]["lambda_rel"] == 0.05


def test_evaluate_after_a_redo_without_ground_truth_reads_no_empty_groups(attributed, tmp_path):
    """A redo with evaluate.ground_truth=false deleted the ground-truth arrays but left their
    empty groups, which the next read listed: `has no array eval/<dict>/ground/pixels`."""
    import shutil

    url = str(tmp_path / "run.zarr")
    shutil.copytree(attributed, url)
    assert _evaluate(url, "--images", "16").returncode == 0
    again = _evaluate(url, "--images", "16", "-o", "evaluate.ground_truth=false")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["ground_truth"] == {}
    store = RunStore.open(url)
    assert not store.has("eval/bisecting_kmeans/ground")  # the redo took its groups with its arrays


@pytest.mark.fast
def test_the_concepts_each_fraction_counts_round_halves_to_even():
    """By hand: 5 active concepts at fractions 0, 0.1, ..., 1 are 0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5,
    4, 4.5, 5 concepts: halves to the even neighbour (a half-up recomputation differed by up to
    0.011 at the 0.5 point); 7 concepts at 0, 0.5, 1: 0, 3.5 -> 4, 7."""
    from gig_dist.kernels.evaluation import counts

    assert counts(10, 5).tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5]
    assert counts(2, 7).tolist() == [0, 4, 7] and counts(2, 5).tolist() == [0, 2, 5]
    # the curves insert exactly that many: concept i drives class 0 only through its own code
    index, value, dictionary = _codes()
    head = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4) * 8)
    inserted, _ = curves(lambda x: (head(x.mean(dim=(2, 3))) > 0).sum(1).double(), index, value, dictionary, (4, 2, 2),
                         np.array([0, 1, 2]), steps=4)
    assert inserted.tolist() == [0, 1, 2, 2, 3]  # 3 concepts: 0, 0.75, 1.5 -> 2, 2.25, 3


@pytest.mark.fast
def test_the_absolute_form_inserts_the_first_k_concepts_whatever_their_number():
    from gig_dist.kernels.evaluation import COUNTS, count_grid, count_score

    assert COUNTS == (0, 1, 2, 4, 8, 16, 32)
    assert count_grid(5).tolist() == [0, 1, 2, 4, 5, 5, 5]
    ins = np.array([0.1, 0.5, 0.6, 0.8, 0.9, 0.9, 0.9])
    dele = np.array([0.9, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1])
    assert count_score(ins, dele) == pytest.approx(np.mean([0.1, 0.3, 0.6, 0.8, 0.8, 0.8]))


# -- matched sparsity and the sweep -----------------------------------------------------------------


def _clustered(n=600, c=12, k=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(k, c)))
    X = centres[rng.integers(0, k, n)] * rng.uniform(0.5, 2, (n, 1)) + 0.3 * np.abs(rng.normal(size=(n, c)))
    return X.astype(np.float32)


@pytest.mark.fast
@pytest.mark.parametrize(("metric", "target"), [("l0", 2.0), ("l0", 3.5), ("r2", 0.9)])
def test_matched_lambda_reaches_the_target_sparsity_on_the_pfvs(metric, target):
    from gig_dist.kernels.dictionaries.kmeans import KMeansDictionary
    from gig_dist.stages.coding import matched_lambda, sparsity_of

    X = _clustered()
    fitted = KMeansDictionary(24, seed=0).fit(X)
    arrays = fitted.fitted_arrays()

    def coder_for(lam):
        return KMeansDictionary.from_arrays(arrays, lambda_rel=lam)

    lam, reached = matched_lambda(coder_for, X, metric, target)
    assert reached == pytest.approx(target, rel=0.02)
    assert sparsity_of(coder_for(lam), X, metric) == pytest.approx(reached)
    # the search's direction: a larger lambda is sparser (and less faithful)
    assert sparsity_of(coder_for(lam * 2), X, metric) < reached


@pytest.mark.fast
def test_matched_top_k_is_the_smallest_k_whose_sae_reaches_the_r2():
    from gig_dist.kernels.dictionaries.sae import SparseAutoencoderDictionary
    from gig_dist.stages.coding import matched_top_k, sparsity_of

    X = _clustered(n=400)
    fits = {}

    def fit_for(k):
        fits[k] = SparseAutoencoderDictionary(16, seed=0, top_k=k, steps=150).fit(X)
        return fits[k]

    target = 0.8
    k, reached = matched_top_k(fit_for, X, target, largest=8)
    assert reached >= target or k == 8
    assert sparsity_of(fits[k], X, "r2") == reached
    if k > 1 and k - 1 in fits:
        assert sparsity_of(fits[k - 1], X, "r2") < target
    # a top-k SAE's codes have at most k concepts per PFV
    assert sparsity_of(fits[k], X, "l0") <= k


@pytest.mark.fast
def test_match_targets_and_the_pareto_front():
    from gig_dist.sweep import pareto, parse_target

    assert parse_target("l0=5") == ("l0", 5.0) and parse_target("R^2=0.9") == ("r2", 0.9)
    for bad in ("l0", "l1=3", "r2=1.5", "l0=-1", "l0=nan"):
        with pytest.raises(ConfigError, match="--match"):
            parse_target(bad)
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.65), (0.5, 0.1)]
    assert pareto(points) == [4, 0, 1]


@pytest.mark.fast
def test_a_dictionarys_own_parameters_count_only_for_that_dictionary():
    from gig_dist.stages.coding import encode_params, fit_params
    from gig_dist.stages.concepts import ConceptsStage

    base = toy_config()
    assert ConceptsStage.key_values(toy_config("concepts.params.sae.top_k=5")) == ConceptsStage.key_values(base)
    sae = toy_config("concepts.method=sae")
    topk = toy_config("concepts.method=sae", "concepts.params.sae.top_k=5")
    assert ConceptsStage.key_values(sae) != ConceptsStage.key_values(topk)
    assert not any(key.startswith("concepts.params") for key in ConceptsStage.key_values(sae))  # stores made before
    assert fit_params(topk)["top_k"] == 5 and "top_k" not in fit_params(base)
    # a parameter the method does not take is refused before any work, naming those it takes
    from gig_dist.stages.coding import own_param_errors

    assert own_param_errors(toy_config("concepts.method=sae", "concepts.params.sae.topk=5")) == [
        "concepts.params.sae: sae takes no parameter 'topk'; its own parameters are l1, top_k, steps, max_slots"]
    assert own_param_errors(toy_config("concepts.params.bisecting_kmeans.max_iter=5"))[0].endswith("are none")
    with pytest.raises(ConfigError, match="unknown dictionary 'ica'; the dictionaries are bisecting_kmeans, kmeans"):
        toy_config("concepts.method=ica")
    assert encode_params(topk, "layer1.0", "cpu")["top_k"] == 5  # decompose encodes as it was trained


def test_evaluate_match_refits_each_dictionary_to_the_target_l0(attributed, tmp_path):
    """`--match l0=2` makes a level per dictionary whose codes reach l0 = 2 within 10 % at every
    tap (this small world's K = C / 4 has 16-64 concepts), and leaves the dictionaries it matched
    as they were. A dictionary needs only its fit (k-means stops after its concepts here): the
    matched level decomposes and attributes the evaluated images itself."""
    import shutil

    url = str(tmp_path / "run.zarr")
    shutil.copytree(attributed, url)
    pipeline.run(toy_config(*SMALL, "concepts.method=kmeans"), url, until="concepts")
    before = _level_bytes(url, "bisecting_kmeans")
    done = _evaluate(url, "--images", "16", "--match", "l0=2", "--dict", "bisecting_kmeans", "--dict", "kmeans")
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert set(found["results"]) == {"bisecting_kmeans@l0=2", "kmeans@l0=2"}
    store = RunStore.open(url)
    for level, entry in found["match"]["levels"].items():
        assert set(entry["taps"]) == set(store.taps)
        for tap, row in entry["taps"].items():
            assert abs(row["mean_l0"] - 2) <= 0.2 and row["within_10pct"], (level, tap, row)
            summary = store.family(CodesSection, level).summary(tap, store.family(ConceptsSection, level).count(tap))
            assert summary["mean_l0"] == pytest.approx(row["mean_l0"])
        # the level keeps the dictionary (copied, not fitted again) and changes only lambda
        assert np.array_equal(store.family(ConceptsSection, level).vectors("layer3.1"),
                              store.family(ConceptsSection, entry["from"]).vectors("layer3.1"))
        assert store.family(ConceptsSection, level).fit("layer3.1")["copied_from"] == entry["from"]
        assert store.manifest.dictionary_config(level)["decompose"]["lambda_rel"] == \
            {tap: row["lambda_rel"] for tap, row in entry["taps"].items()}
    assert _level_bytes(url, "bisecting_kmeans") == before
    # matched again: the same lambdas, every stage kept
    again = subprocess.run([*CLI, "evaluate", url, "--images", "16", "--match", "l0=2", "--dict", "kmeans"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    plan = next(line for line in again.stdout.splitlines() if line.startswith("kmeans@l0=2: concepts"))
    assert "new" not in plan and "redo" not in plan, plan
    assert "within 10%" in again.stdout and " NO" not in again.stdout


def test_sweep_resumes_after_a_kill_and_tabulates_every_point(attributed, tmp_path):
    """`gig-dist sweep`: each (dictionary, K, lambda) a level of the store; killed in the second
    point, it resumes (the first point kept whole) and writes the table and the Pareto plots."""
    import shutil

    url = str(tmp_path / "run.zarr")
    shutil.copytree(attributed, url)
    command = [*CLI, "sweep", url, "--dict", "bisecting_kmeans", "--dict", "kmeans", "--k", "0.125,0.25",
               "--lambda", "0.1", "--images", "16", "--json"]
    taps = len(RunStore.open(url).taps)
    # the concepts stage fits one unit per tap: the kill falls in the second point's fit
    env = {**os.environ, "GIG_DIST_FAILPOINT": f"concepts.before_commit:{taps + 2}"}
    killed = subprocess.run(command, capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    store = RunStore.open(url)
    first, second = "bisecting_kmeans@k=0.125,lambda=0.1", "bisecting_kmeans@k=0.25,lambda=0.1"
    assert store.manifest.stages[f"{first}/evaluate"].finished
    assert not store.manifest.stages[f"{second}/concepts"].finished
    plot = tmp_path / "sweep.png"
    done = subprocess.run([*command, "--plot", str(plot)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    plans = [line for line in done.stderr.splitlines() if line.startswith("  ")]
    assert "new" not in plans[0] and "redo" not in plans[0] and "resume" not in plans[0], plans[0]
    assert "concepts resume" in plans[1], plans[1]
    rows = json.loads(done.stdout)
    assert [row["level"] for row in rows] == [first, second, "kmeans@k=0.125,lambda=0.1", "kmeans@k=0.25,lambda=0.1"]
    store = RunStore.open(url)
    for row in rows:
        assert row["images"] == 16 and row["method"] in ("bisecting_kmeans", "kmeans")
        tap = row["taps"]["layer3.1"]
        assert tap["k"] == round(row["k_multiplier"] * 256) == store.family(ConceptsSection, row["level"]).count("layer3.1")
        assert 0 < tap["r2"] <= 1 and tap["mean_l0"] > 0 and np.isfinite(tap["score"]) and np.isfinite(tap["count_score"])
        assert tap["purity"] is not None and 0 <= tap["purity"] <= 1
        assert row["gap"] is not None and row["seconds"]["attribute"] > 0
    # the run's own level is untouched, and evaluate without --dict leaves the sweep's levels out
    assert store.manifest.dictionary_config("bisecting_kmeans")["concepts"]["k_multiplier"] == 0.25
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run([*CLI, "sweep", url, "--table-only"], capture_output=True, text=True)
    assert table.returncode == 0 and first in table.stdout and "by count" in table.stdout, table.stderr[-2000:]
    # the report shows the sweep: its Pareto plots and a row per point
    from gig_dist.report import build_report

    build_report(url, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert "gig-dist sweep" in index and (tmp_path / "site" / "img" / "sweep.png").stat().st_size > 10_000
    assert index.count("<tr><td>kmeans</td>") == 2 and index.count("<tr><td>bisecting_kmeans</td>") == 2
    # ... of the run's own level: the sweep ran last, but its levels are not the run's dictionary
    assert "dictionary bisecting_kmeans</p>" in index
    from gig_dist import open_run

    assert open_run(url).dictionary == "bisecting_kmeans"
