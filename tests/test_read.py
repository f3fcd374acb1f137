"""``open_run``: what it returns equals what the store holds, and the README's notebook example runs."""

import re

import numpy as np
import pytest

import gig_dist
from gig_dist import pipeline
from tests.conftest import REPO, toy_config, zgroup

D = "bisecting_kmeans"


@pytest.fixture(scope="module")
def run_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("read")
    return pipeline.run(toy_config("dataset.toy.num_images=16", "gig.images=16"), root / "gig-dist-run.zarr").url


def test_open_run_returns_what_the_store_holds(run_url):
    run = gig_dist.open_run(run_url)
    raw = zgroup(run_url)
    table = run.images()
    assert table.sizes["image"] == 16 and (table.status == "processed").all()
    assert list(table.label.values) == list(raw["meta/label"][:]) and table.path.dtype.kind == "U"
    # The image as the model saw it: normalising it again gives the model's input.
    from gig_dist.data.sources import ImageLoader, TransformSpec

    spec = TransformSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in run.store.manifest.transform.items()})
    expected = ImageLoader(spec, 10**8, 1).load(str(raw["meta/path"][5])).image.numpy()
    shown = run.image(5)
    assert shown.shape == (64, 64, 3) and 0 <= shown.min() and shown.max() <= 1
    again = (shown.transpose(2, 0, 1) - np.asarray(spec.mean)[:, None, None]) / np.asarray(spec.std)[:, None, None]
    assert np.allclose(again, expected, atol=1e-5)
    # PFVs and dense code maps, per image.
    pfvs = run.pfvs("layer2.1", 5)
    assert pfvs.dims == ("y", "x", "channel") and np.array_equal(
        pfvs.values.reshape(-1, 128), raw["pfv/layer2.1/value"][5].astype(np.float32))
    maps = run.code_maps("layer2.1", 5)
    index, value = raw[f"codes/{D}/layer2.1/index"][5], raw[f"codes/{D}/layer2.1/value"][5]
    assert maps.dims == ("concept", "y", "x") and maps.shape == (32, 16, 16)
    position = 37
    for slot in range(index.shape[1]):
        if index[position, slot] >= 0:
            assert maps.values[index[position, slot], position // 16, position % 16] == value[position, slot]
    assert maps.values.sum() == pytest.approx(value.sum(), rel=1e-5)
    # Concepts, Gamma with named axes, class graphs.
    assert np.array_equal(run.concepts("layer3.1").values, raw[f"concepts/{D}/layer3.1/vector"][...])
    gamma = run.gamma("layer3.1", "logits")
    assert gamma.dims == ("source_concept", "class") and list(gamma.class_name.values) == run.class_names
    assert np.array_equal(gamma.values, raw[f"gig/{D}/layer3.1__logits/matrix"][...])
    between = run.gamma("layer2.1", "layer3.1")  # names without spaces; the taps as attributes
    assert between.dims == ("source_concept", "target_concept")
    assert (between.attrs["source"], between.attrs["target"]) == ("layer2.1", "layer3.1")
    assert run.graph(run.class_names[2]) == run.graph(2) and run.graph(2)["class"] == 2


def test_open_run_names_what_is_missing(run_url, tmp_path):
    run = gig_dist.open_run(run_url)
    with pytest.raises(KeyError, match="tap 'layer9' is not in this run"):
        run.concepts("layer9")
    with pytest.raises(IndexError, match=r"image 99 is outside the run \(0..15\)"):
        run.image(99)
    early = pipeline.run(toy_config("dataset.toy.num_images=16"), tmp_path / "early.zarr", until="sample").url
    with pytest.raises(gig_dist.store.StoreError, match="has no bisecting_kmeans concepts for tap 'layer3.1'"):
        gig_dist.open_run(early).concepts("layer3.1")


def test_the_guides_notebook_example_and_the_readmes_run(run_url, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    guide = (REPO / "docs" / "guides" / "reading-a-run.md").read_text()
    example = re.search(r"## Reading a run.*?```python\n(.*?)```", guide, re.S).group(1)
    monkeypatch.chdir(run_url.rsplit("/", 1)[0])  # the example opens gig-dist-run.zarr in the working directory
    namespace: dict = {}
    exec(compile(example, "reading-a-run.md", "exec"), namespace)
    assert namespace["image"].shape == (64, 64, 3) and 0 <= namespace["concept"] < 64  # K = C / 4 at layer3.1 here
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["run"].gamma("layer3.1", "logits").dims == ("source_concept", "class")


def test_a_store_recording_renamed_settings_still_reads_and_an_unknown_one_is_one_line(run_url, tmp_path):
    """A store records the config it ran with: one made before ``concepts.sae_l1`` became
    ``concepts.params.sae.l1`` is read with the key moved (inspect crashed with pydantic's
    traceback); a key no release knows is named in one line."""
    import shutil
    import subprocess
    import sys

    from gig_dist.store import RunStore

    def recorded(name: str, concepts: dict) -> str:
        url = str(tmp_path / name)
        shutil.copytree(run_url, url)
        store = RunStore.open(url, mode="r+")
        for tree in (store.manifest.config, store.manifest.dictionaries[D]):
            tree["concepts"].update(concepts)
        store.save_manifest()
        return url

    old = recorded("old.zarr", {"sae_l1": 0.05, "sae_top_k": None})
    assert gig_dist.open_run(old).config.concepts.params == {"sae": {"l1": 0.05}}
    done = subprocess.run([sys.executable, "-m", "gig_dist.cli", "inspect", old], capture_output=True, text=True)
    assert done.returncode == 0 and "bisecting_kmeans/attribute" in done.stdout, done.stderr
    strange = recorded("strange.zarr", {"colour": "red"})
    done = subprocess.run([sys.executable, "-m", "gig_dist.cli", "inspect", strange], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"invalid config (the config of bisecting_kmeans recorded in {strange})" in done.stderr and "concepts.colour: unknown key" in done.stderr
