"""Stages ``concepts`` and ``decompose`` on a small toy run: what they write, checked against
independent recomputation from the store; resumption; bad input."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from gig_dist import pipeline
from gig_dist.config import ConfigError
from gig_dist.kernels.lasso import NonNegativeLassoCoder, objective
from gig_dist.stages.base import UnitFailed
from gig_dist.store import (
    CodesSection,
    ConceptsSection,
    ImageRange,
    MetaSection,
    RunStore,
    SamplesSection,
)
from tests.conftest import GIG_LIGHT_CLI, assert_stores_equal, toy_config, zgroup

CLI = [sys.executable, "-m", "gig_dist.cli"]
D = "bisecting_kmeans"
# 40 images in units of 16, K = C / 4 (16 to 64 concepts), 24 samples per image (the toy default).
SMALL = ["-o", "dataset.toy.num_images=40", "-o", "store.images_per_unit=16", "-o", "store.images_per_chunk=4",
         "-o", "extract.batch_size=8", "-o", "runtime.progress=false", "-o", "runtime.device=cpu",
         "-o", "concepts.k_multiplier=0.25", *GIG_LIGHT_CLI]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    url = pipeline.run(toy_config(), tmp_path_factory.mktemp("concepts") / "run.zarr").url
    return RunStore.open(url)


def test_concepts_are_unit_centroids_of_the_samples_with_their_split_tree(run):
    for tap, (channels, _, _) in run.taps.items():
        k = channels // 4
        samples = np.concatenate(list(run.family(SamplesSection).iter_valid(tap)))
        assert len(samples) == 40 * 24
        group = zgroup(run)[f"concepts/bisecting_kmeans/{tap}"]
        vectors, centers, size = group["vector"][...], group["center"][...], group["size"][...]
        assert vectors.shape == centers.shape == (k, channels) and size.sum() == len(samples)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert np.allclose(vectors, centers / np.linalg.norm(centers, axis=1, keepdims=True), atol=1e-6)
        # Each sample's concept: the centroids are their members' means.
        member = group["member"][...]
        assert member.shape == (40, 24) and (member >= 0).all()
        labels = member.reshape(-1)
        assert np.array_equal(np.bincount(labels, minlength=k), size)
        assert np.allclose(np.stack([samples[labels == c].mean(0) for c in range(k)]), centers, atol=1e-4)
        tree = {name: group[f"tree/{name}"][...] for name in ("parent", "children", "size", "leaf", "inertia")}
        assert len(tree["parent"]) == 2 * k - 1 and tree["size"][0] == len(samples)
        leaves = tree["leaf"] >= 0
        assert np.array_equal(tree["size"][leaves][np.argsort(tree["leaf"][leaves])], size)
        fit = run.family(ConceptsSection, D).fit(tap)
        assert fit["k"] == k and fit["samples"] == len(samples)
        assert fit["inertia"] == pytest.approx(tree["inertia"][leaves].sum())
        assert fit["inertia"] == pytest.approx(
            sum(((samples[labels == c] - centers[c]) ** 2).sum() for c in range(k)), rel=1e-4)


def test_codes_are_the_lasso_solution_of_every_pfv_and_the_summary_recomputes(run):
    for tap in run.family(CodesSection, D).taps():
        V = run.family(ConceptsSection, D).vectors(tap)
        k, channels = V.shape
        error = norm = l0 = count = 0.0
        total = np.zeros(channels)
        for r in run.units():
            pfvs = run.family(MetaSection).read_pfvs(tap, r).astype(np.float32)
            index, value = run.family(CodesSection, D).read(tap, r)
            assert index.shape[:2] == pfvs.shape[:2] and index.shape[2] == 32
            assert ((index >= -1) & (index < k)).all() and (value >= 0).all() and (value[index < 0] == 0).all()
            assert (np.diff(value, axis=2) <= 0).all()  # slots by decreasing value
            x = pfvs.reshape(-1, channels)
            dense = np.zeros((len(x), k), np.float32)
            rows, slots = np.nonzero(index.reshape(-1, 32) >= 0)
            dense[rows, index.reshape(-1, 32)[rows, slots]] = value.reshape(-1, 32)[rows, slots]
            error += ((x - dense @ V) ** 2).sum()
            norm += (x.astype(np.float64) ** 2).sum()
            total += x.sum(0)
            l0 += (dense > 0).sum()
            count += len(x)
            # The stored codes are the coder's solution for these PFVs (its
            # exactness against scikit-learn is tested in test_kmeans_lasso).
            coder = NonNegativeLassoCoder(V, lambda_rel=0.05)
            lam = coder.penalties(x[:200])
            ours = objective(x[:200], V, dense[:200], lam)
            assert np.allclose(ours, objective(x[:200], V, coder.transform(x[:200]), lam), rtol=1e-5)
        summary = run.family(CodesSection, D).summary(tap, k)
        mean = total / count
        assert summary["pfvs"] == count and summary["mean_l0"] == pytest.approx(l0 / count)
        assert summary["l0_ratio"] == pytest.approx(l0 / count / k)
        assert summary["r2"] == pytest.approx(1 - error / (norm - count * mean @ mean), rel=1e-4)
        assert summary["truncated"] == 0 and 0.5 < summary["r2"] <= 1


def test_an_image_subset_and_a_tap_subset(tmp_path):
    store = RunStore.open(pipeline.run(
        toy_config("decompose.images=20", "decompose.taps=[layer3.1]"), tmp_path / "subset.zarr", until="decompose").url)
    assert store.family(CodesSection, D).taps() == ["layer3.1"] and "codes/bisecting_kmeans/layer1.0" not in zgroup(store)
    index = zgroup(store)["codes/bisecting_kmeans/layer3.1/index"][...]
    # 20 images round up to 2 units of 16: images 0-31 decomposed, the last unit not.
    assert (index[:32, :, 0] >= 0).all() and (index[32:] == -1).all()
    assert store.family(CodesSection, D).summary("layer3.1", 64)["pfvs"] == 32 * 64
    again = pipeline.run(toy_config("decompose.images=20", "decompose.taps=[layer3.1]"), tmp_path / "subset.zarr",
                         until="decompose")
    assert [s.units_run for s in again.stages] == [0] * 4


def test_sigkill_during_decomposition_then_resume_equals_uninterrupted(run, tmp_path):
    out = tmp_path / "killed.zarr"
    env = dict(os.environ, GIG_DIST_FAILPOINT="decompose.before_commit:2")
    killed = subprocess.run([*CLI, "run", "--out", str(out), *SMALL], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert zarr.open_array(str(out / "progress" / D / "decompose"), mode="r")[:].sum() == 1
    resumed = subprocess.run([*CLI, "run", "--out", str(out), *SMALL], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "decompose: 2/3 units run, 1 already done" in resumed.stdout
    assert_stores_equal(run.url, str(out))


def test_more_concepts_than_samples_is_refused_before_any_work(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ConfigError) as refused:
        pipeline.run(toy_config("concepts.k_multiplier=8"), tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()
    # Every tap that cannot be fit is named, each with values that work (40 images x 24 samples).
    message = str(refused.value)
    assert "(4 problems)" in message
    assert ("tap layer2.0: K = 1024 concepts but the run has at most 960 samples (40 images x min(sample.per_image "
            "= 24, 256 positions)); use sample.per_image >= 26 or concepts.k_multiplier <= 7.5 or "
            "concepts.k={layer2.0: 960}") in message
    assert "tap layer3.1: K = 2048" in message and "layer1.0" not in message
    # ... and one setting for all of them, which passes every check (the per-tap proposals
    # conflicted: no per_image gives layer3.1's 8 x 8 positions K = 2048 samples)
    together = message.splitlines()[-1]
    assert together == ("  all taps at once: -o sample.per_image=512 -o 'concepts.k={layer3.0: 256, layer3.1: 256}' passes "
                        "every tap's check with at least 10 samples per concept (40 images x min(sample.per_image, "
                        "positions) samples per tap)"), together
    from gig_dist.plan import make_plan

    plan = make_plan(toy_config("concepts.k_multiplier=8", "sample.per_image=512",
                                "concepts.k={layer3.0: 256, layer3.1: 256}"))
    assert plan.problems == [] and not [w for w in plan.warnings if "members per concept" in w]


def test_the_sample_count_check_counts_the_positions_a_tap_has(tmp_path):
    # layer3.1 has 8 x 8 = 64 positions: 100 samples per image draw 64, so 40 images give 2,560
    # samples, fewer than the K = 3,072 of a multiplier of 12 (the check used to count 4,000).
    with pytest.warns(UserWarning, match=r"tap layer3.1: sample.per_image = 100 but the tap has 64 positions \(8 x 8\); "
                                         "it draws at most 64 per image"), \
            pytest.raises(ConfigError, match=r"tap layer3.1: K = 3072 concepts but the run has at most 2560 samples .*"
                                             r"use concepts.k_multiplier <= 10.0 or concepts.k=\{layer3.1: 2560\}$"):
        pipeline.run(toy_config("taps=[layer3.1]", "sample.per_image=100", "concepts.k_multiplier=12"),
                     tmp_path / "x.zarr")


def test_skipped_images_count_against_the_samples_before_any_concept_unit(tmp_path):
    from PIL import Image

    root = tmp_path / "data" / "cls"
    root.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    for i in range(5):
        (root / f"broken{i}.png").write_bytes(b"not a png")
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={tmp_path / 'data'}", "taps=[layer3.1]",
                        "sample.per_image=64", "sample.method=uniform", "concepts.k={layer3.1: 300}")
    with pytest.raises(ConfigError, match=r"tap layer3.1: K = 300 concepts but the run has 192 samples .* "
                                          r"concepts.k=\{layer3.1: 192\}"):
        pipeline.run(config, tmp_path / "run.zarr")
    store = RunStore.open(str(tmp_path / "run.zarr"))
    assert store.family(MetaSection).image_counts()["skipped"] == 5 and len(store.done_units(f"{D}/concepts")) == 0


def test_few_members_per_concept_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"layer3.1: K = 256 concepts from at most 960 samples leaves 3.8"):
        pipeline.prepare(toy_config("concepts.k_multiplier=1"), tmp_path / "x.zarr").store


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("concepts.k={layer9: 4}", r"concepts.k names taps that are not in this run: \['layer9'\]"),
        ("decompose.taps=[nope]", r"decompose.taps names taps that are not in this run: \['nope'\]"),
        ("decompose.lambda_rel={layer1.0: -1}", "decompose.lambda_rel must be non-negative"),
        ("concepts.k={layer1.0: 0}", "concepts.k must be at least 1 per tap"),
        ("decompose.max_nonzero=0", "decompose.max_nonzero = 0"),
    ],
)
def test_bad_concept_settings_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.run(toy_config(override), tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_duplicate_samples_fewer_distinct_than_k_fail_naming_the_tap(tmp_path):
    # Uniform draws from a model whose taps are all-zero give identical samples: K = 16 concepts
    # cannot be made from one distinct PFV.
    config = toy_config("sample.method=uniform", "taps=[layer1.0]")
    store = pipeline.prepare(config, tmp_path / "dup.zarr").store
    runtime = pipeline.make_runtime(config)
    from gig_dist.stages.concepts import ConceptsStage
    from gig_dist.stages.extract import ExtractStage
    from gig_dist.stages.sample import SampleStage

    runtime.run(ExtractStage(config, store.url))
    runtime.run(SampleStage(config, store.url))
    vectors = zgroup(store, "r+")["samples/layer1.0/vector"]
    for r in store.units():
        vectors[r.start : r.stop] = np.zeros((len(r), 24, 64), np.float16)
    with pytest.raises(UnitFailed, match=r"concepts unit 0 \(tap layer1.0\) failed: tap layer1.0: cannot make 16 clusters"):
        runtime.run(ConceptsStage(config, store.url))


def test_nan_pfvs_stop_decomposition_naming_the_images(tmp_path):
    config = toy_config("taps=[layer3.1]")
    store = pipeline.prepare(config, tmp_path / "nan.zarr").store
    runtime = pipeline.make_runtime(config)
    from gig_dist.stages.concepts import ConceptsStage
    from gig_dist.stages.decompose import DecomposeStage
    from gig_dist.stages.extract import ExtractStage
    from gig_dist.stages.sample import SampleStage

    for stage in (ExtractStage, SampleStage, ConceptsStage):
        runtime.run(stage(config, store.url))
    pfv = zgroup(store, "r+")["pfv/layer3.1/value"]
    block = pfv[16:32]
    block[3, 5, 7] = np.nan
    pfv[16:32] = block
    with pytest.raises(UnitFailed, match=r"images 16:32\) failed: tap layer3.1: PFVs of images \[19\] hold NaN"):
        runtime.run(DecomposeStage(config, store.url))


def test_codes_are_stored_narrow_and_read_back_as_before(tmp_path):
    """Indices take int16 while K < 32,768 (the -1 of an empty slot stays), values float16 on
    request; reads give int32 and float32 as before, equal to a float32 run's codes rounded."""
    from gig_dist.store.codes import index_dtype

    assert index_dtype(32767) == "int16" and index_dtype(32768) == "int32"
    base = ("decompose.taps=[layer3.1]",)
    wide = RunStore.open(pipeline.run(toy_config(*base), tmp_path / "f32.zarr", until="decompose").url)
    half = RunStore.open(pipeline.run(toy_config(*base, "decompose.value_dtype=float16"), tmp_path / "f16.zarr",
                                      until="decompose").url)
    raw = zgroup(wide)
    assert raw["codes/bisecting_kmeans/layer3.1/index"].dtype == np.int16
    assert raw["codes/bisecting_kmeans/layer3.1/value"].dtype == np.float32
    assert zgroup(half)["codes/bisecting_kmeans/layer3.1/value"].dtype == np.float16
    r = ImageRange(0, 16)
    index, value = wide.family(CodesSection, D).read("layer3.1", r)
    index16, value16 = half.family(CodesSection, D).read("layer3.1", r)
    assert index.dtype == np.int32 and value.dtype == np.float32 and value16.dtype == np.float32
    assert (index == index16).all() and (index[..., 0] >= 0).all() and (index == -1).any()
    assert np.array_equal(value16, value.astype(np.float16).astype(np.float32))
    # half the value bytes; the default stays float32, so stores made before keep their fingerprint
    assert half.manifest.stages[f"{D}/decompose"].fingerprint != wide.manifest.stages[f"{D}/decompose"].fingerprint
    assert "decompose.value_dtype" not in wide.manifest.stages[f"{D}/decompose"].keys
