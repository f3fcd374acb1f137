"""Relevance-weighted PFV sampling (method.md section 3) and stored iERFs of given PFVs."""

import numpy as np
import pytest
import torch

from gig_dist import pipeline
from gig_dist.kernels.sampling import draw_positions, grad_x_act
from gig_dist.store import SKIPPED, RunStore
from gig_dist.toy.model import load_toy_model
from tests.conftest import assert_stores_equal, toy_config, zgroup


def test_draws_are_distinct_and_follow_the_scores():
    rng = np.random.default_rng(0)
    counts = np.zeros(4)
    for _ in range(4000):
        (position,) = draw_positions(np.array([0.0, 1.0, -5.0, 3.0]), 1, rng)
        counts[position] += 1
    assert counts[0] == counts[2] == 0
    assert counts[3] / counts.sum() == pytest.approx(0.75, abs=0.03)
    drawn = draw_positions(np.arange(10.0), 5, rng)
    assert len(set(drawn.tolist())) == 5 and 0 not in drawn


def test_positive_scores_come_first_then_uniform():
    drawn = draw_positions(np.array([0.0, 2.0, 0.0, 0.0, 1.0]), 4, np.random.default_rng(1))
    assert set(drawn[:2].tolist()) == {1, 4} and len(set(drawn.tolist())) == 4


def test_no_positive_score_means_uniform():
    rng = np.random.default_rng(2)
    seen = {int(draw_positions(np.full(6, -1.0), 1, rng)[0]) for _ in range(200)}
    assert seen == set(range(6))


def test_grad_x_act_is_gradient_times_activation():
    model = load_toy_model()
    x = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([3, 5])
    scores = grad_x_act(model, x, ["layer2.1"], classes)["layer2.1"]
    activation = {}
    handle = model.layer2[1].register_forward_hook(lambda m, i, o: activation.setdefault("a", o))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[[0, 1], classes].sum(), activation["a"])
    assert torch.allclose(scores, (grad * activation["a"]).sum(1), atol=1e-5)


def _on_object_rate(store: RunStore) -> dict[str, float]:
    """Share of sampled PFVs whose cell centre lies on an object pixel of the part mask."""
    masks = zgroup(store)["meta/part_mask"][:]
    size = masks.shape[-1]
    rates = {}
    for tap, (_, h, w) in store.taps.items():
        positions = zgroup(store)[f"samples/{tap}/position"][:].reshape(len(masks), -1)
        images = np.repeat(np.arange(len(masks)), positions.shape[1])
        flat = positions.reshape(-1)
        cy = ((flat // w + 0.5) * size / h).astype(int)
        cx = ((flat % w + 0.5) * size / w).astype(int)
        rates[tap] = float((masks[images, cy, cx] > 0).mean())
    return rates


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    runs = {}
    for method in ("srd", "uniform"):
        config = toy_config("dataset.toy.num_images=256", f"sample.method={method}", "sample.per_image=2")
        runs[method] = RunStore.open(pipeline.run(config, root / f"{method}.zarr", until="sample").url)
    return runs


def test_srd_samples_fall_on_objects_far_more_often_than_uniform(sampled):
    srd, uniform = _on_object_rate(sampled["srd"]), _on_object_rate(sampled["uniform"])
    for tap in srd:
        assert srd[tap] > 2.0 * uniform[tap], (tap, srd[tap], uniform[tap])
    assert np.mean(list(srd.values())) > 4 * np.mean(list(uniform.values()))


def test_sampled_vectors_are_the_stored_pfvs(sampled):
    store = sampled["srd"]
    for tap in ("layer1.0", "layer3.1"):
        positions = zgroup(store)[f"samples/{tap}/position"][:]
        vectors = zgroup(store)[f"samples/{tap}/vector"][:]
        pfvs = zgroup(store)[f"pfv/{tap}/value"][:]
        assert positions.shape == (256, 2) and (positions >= 0).all()
        assert (positions[:, 0] != positions[:, 1]).all()
        expected = pfvs[np.arange(256)[:, None], positions]
        assert np.array_equal(vectors, expected)
        scores = zgroup(store)[f"samples/{tap}/relevance"][:]
        chosen = np.take_along_axis(scores, positions.astype(np.int64), axis=1)
        assert (chosen > 0).mean() > 0.95  # drawn where the relevance is positive


def test_srd_relevance_maps_sum_to_the_predicted_logit(sampled):
    store = sampled["srd"]
    logits = zgroup(store)["meta/logits"][:]
    predicted = logits[np.arange(len(logits)), zgroup(store)["meta/prediction"][:]]
    for tap in store.taps:
        relevance = zgroup(store)[f"samples/{tap}/relevance"][:]
        assert np.allclose(relevance.sum(1), predicted, rtol=1e-3, atol=1e-3)


def test_draws_do_not_depend_on_how_images_are_split_into_units(tmp_path):
    small = toy_config("dataset.toy.num_images=24", "sample.method=uniform", "store.images_per_unit=4")
    large = toy_config("dataset.toy.num_images=24", "sample.method=uniform", "store.images_per_unit=12")
    a = RunStore.open(pipeline.run(small, tmp_path / "a.zarr", until="sample").url)
    b = RunStore.open(pipeline.run(large, tmp_path / "b.zarr", until="sample").url)
    for tap in a.taps:
        assert np.array_equal(zgroup(a)[f"samples/{tap}/position"][:], zgroup(b)[f"samples/{tap}/position"][:])
    other_seed = RunStore.open(pipeline.run(toy_config("dataset.toy.num_images=24", "sample.method=uniform",
                                                       "sample.seed=7"), tmp_path / "c.zarr", until="sample").url)
    assert not np.array_equal(zgroup(a)["samples/layer1.0/position"][:], zgroup(other_seed)["samples/layer1.0/position"][:])


def test_skipped_images_get_no_samples(tmp_path):
    from PIL import Image

    root = tmp_path / "data" / "cls"
    root.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={tmp_path / 'data'}")
    store = RunStore.open(pipeline.run(config, tmp_path / "run.zarr", until="sample").url)
    skipped = zgroup(store)["meta/status"][:] == SKIPPED
    positions = zgroup(store)["samples/layer2.0/position"][:]
    assert skipped.sum() == 1 and (positions[skipped] == -1).all() and (positions[~skipped] >= 0).all()
    # The progress of a unit counts its skipped images too, so the bar ends at 100%.
    from gig_dist.stages.sample import SampleStage

    stage = SampleStage(config, store.url)
    worker = stage.open_worker("cpu")
    counted = []
    unit = stage.plan(store.facts)[0]
    worker.run(unit, counted.append)
    worker.close()
    assert sum(counted) == unit.size == 4
    assert np.isnan(zgroup(store)["samples/layer2.0/vector"][:][skipped]).all()


def test_srd_sampling_where_srd_has_no_rule_runs_grad_x_act_and_says_so(tmp_path):
    """sample.method = srd on a tap that is not a block output: SRD has no rule there, so grad x
    act runs (it refused before any work until issue 23), and the run, its manifest and the
    samples say which relevance ran."""
    report = pipeline.run(toy_config("taps=[layer1.0.conv2]", "dataset.toy.num_images=8"), tmp_path / "run.zarr",
                          until="sample")
    relevance = report.stages[1].methods["relevance"]
    assert relevance.startswith("grad x act (SRD cannot run: ") and "layer1.0.conv2" in relevance, relevance
    store = RunStore.open(report.url)
    assert store.record("sample").methods == {"relevance": relevance}
    explicit = pipeline.run(toy_config("taps=[layer1.0.conv2]", "sample.method=grad_x_act", "dataset.toy.num_images=8"),
                            tmp_path / "ok.zarr", until="sample")
    assert explicit.stages[1].methods == {"relevance": "grad x act"}
    assert_stores_equal(report.url, explicit.url)  # the same draws as asking for grad x act
    assert (zgroup(store)["samples/layer1.0.conv2/position"][:] >= 0).all()
    srd = pipeline.run(toy_config("dataset.toy.num_images=8"), tmp_path / "srd.zarr", until="sample")
    assert srd.stages[1].methods == {"relevance": "srd"}

