"""The store package on its own: ownership and foreign data, specs, the manifest; the shared
statistics; the dictionary interface. Fast: no model runs here."""

import json

import fsspec
import numpy as np
import pytest
import zarr
from sklearn.base import clone

from gig_dist.kernels.dictionaries import make_dictionary
from gig_dist.kernels.dictionaries.base import NotFittedError
from gig_dist.kernels.dictionaries.bisecting_kmeans import BisectingKMeansDictionary
from gig_dist.kernels.metrics import (
    completeness_gap,
    gap_summary,
    reconstruction_stats,
    reconstruction_summary,
)
from gig_dist.store import (
    ArraySpec,
    CodesSection,
    Facts,
    Manifest,
    MetaSection,
    RunStore,
    StageRecord,
    StoreError,
)

pytestmark = pytest.mark.fast

FACTS = Facts(num_images=10, images_per_unit=4, images_per_chunk=2, zstd_level=1, taps={"t": (3, 2, 2)},
              num_outputs=5, class_names=["a", "b"], input_size=8)


def make_store(url: str) -> RunStore:
    assert not RunStore.claim(url, overwrite=False)  # (the pipeline holds a lease first; not needed here)
    return RunStore.create(url, Manifest(0, "creating", config={"x": 1}), FACTS, [f"p{i}" for i in range(10)],
                           np.arange(10) % 2, np.arange(10) % 2)


def test_create_marks_first_and_reopens_with_a_typed_manifest(tmp_path):
    store = make_store(str(tmp_path / "run.zarr"))
    again = RunStore.open(store.url)
    assert again.manifest.state == "ready" and again.manifest.config == {"x": 1}
    assert again.facts == FACTS and again.units()[-1].stop == 10
    assert again.family(MetaSection).read_index(again.units()[1]) == (["p4", "p5", "p6", "p7"], pytest.approx([0, 1, 0, 1]))
    assert RunStore.claim(store.url, overwrite=False) is True  # a ready store is resumed, not replaced
    manifest = Manifest.from_json(json.loads(json.dumps(again.manifest.to_json())))
    assert manifest == again.manifest


def test_the_manifest_as_json_is_a_copy_of_every_field():
    import dataclasses

    manifest = Manifest(3, "ready", config={"a": {"b": [1, 2]}}, facts={"taps": {"t": [3, 2, 2]}},
                        stages={"x/concepts": StageRecord("f", {"extract": "e"}, 3, {"k": [1.5]}, True, 2.5,
                                                          {"by": "x/decompose", "fingerprint": "g", "images": 4},
                                                          {"relevance": "srd"})},
                        nodes={"codes/x": {"kind": "group", "owner": "x/decompose"}},
                        dictionaries={"x": {"concepts": {"k": {"t": 4}}}})
    found = manifest.to_json()
    assert found == json.loads(json.dumps(dataclasses.asdict(manifest)))
    found["stages"]["x/concepts"]["methods"]["relevance"] = "changed"
    found["dictionaries"]["x"]["concepts"]["k"]["t"] = 9
    assert manifest.stages["x/concepts"].methods == {"relevance": "srd"}  # nothing shared
    assert manifest.dictionaries["x"]["concepts"]["k"]["t"] == 4 and Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("prefix", ["memory://bucket/prefix", "local"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_keys_under_a_prefix_are_refused_and_kept(tmp_path, prefix, overwrite):
    url = str(tmp_path / "prefix") if prefix == "local" else f"{prefix}-{overwrite}"
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe(f"{root}/USER_DATA.csv", b"keep,me\n")
    with pytest.raises(StoreError, match=r"not a gig-dist run store \(USER_DATA.csv\)"):
        RunStore.claim(url, overwrite)
    assert fs.cat_file(f"{root}/USER_DATA.csv") == b"keep,me\n"


@pytest.mark.parametrize("where", ["memory://bucket/ours", "local"])
def test_overwrite_of_a_store_holding_a_foreign_key_deletes_nothing(tmp_path, where):
    url = str(tmp_path / "run.zarr") if where == "local" else where
    store = make_store(url)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/meta/NOTES.txt", b"mine")
    kind, found = RunStore.inspect_prefix(url)
    assert kind == "foreign" and found == ["meta/NOTES.txt"]
    with pytest.raises(StoreError, match="meta/NOTES.txt"):
        RunStore.claim(url, overwrite=True)
    assert fs.cat_file(f"{root}/meta/NOTES.txt") == b"mine" and RunStore.open(store.url).num_images == 10


def test_overwrite_of_our_own_store_starts_afresh_on_memory(tmp_path):
    url = "memory://bucket/fresh"
    make_store(url)
    assert RunStore.claim(url, overwrite=True) is False
    assert RunStore.inspect_prefix(url) == ("empty", [])


def test_a_finished_runs_subgroup_is_not_a_store(tmp_path):
    store = make_store(str(tmp_path / "run.zarr"))
    with pytest.raises(StoreError, match="without gig-dist's marker"):
        RunStore.claim(f"{store.url}/meta", overwrite=True)
    assert RunStore.open(store.url).family(MetaSection).read_index(store.units()[0])[0] == ["p0", "p1", "p2", "p3"]


def test_arrays_are_deleted_only_by_their_owner_and_only_whole(tmp_path):
    store = make_store(str(tmp_path / "run.zarr"))
    spec = ArraySpec("extra/values", (10, 3), "float32", ("image", "channel"), (4, 3), fill_value=0.0)
    store.ensure_arrays("mine", [spec])
    store.ensure_arrays("mine", [spec])  # idempotent
    with pytest.raises(StoreError, match="not written by other"):
        store.delete("extra/values", "other")
    (tmp_path / "run.zarr" / "extra" / "values" / "README").write_text("a user's note")
    with pytest.raises(StoreError, match="README, not ours"):
        store.delete("extra/values", "mine")
    (tmp_path / "run.zarr" / "extra" / "values" / "README").unlink()
    store.delete("extra/values", "mine")
    assert not store.has("extra/values")


def test_specs_become_arrays_with_dimension_names_and_grow_only_when_allowed(tmp_path):
    store = make_store(str(tmp_path / "run.zarr"))
    grow = ArraySpec("g/a", (10, 2), "int32", ("image", "slot"), (4, 2), fill_value=-1, growable=True)
    fixed = ArraySpec("g/b", (10, 2), "int32", ("image", "slot"), (4, 2), fill_value=-1)
    store.ensure_arrays("s", [grow, fixed])
    section = store.section("g")
    section.write("a", store.units()[0], np.ones((4, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="not a work unit"):
        section.write("a", store.units()[0].__class__(1, 5), np.ones((4, 2), dtype=np.int32))
    store.ensure_arrays("s", [ArraySpec("g/a", (10, 5), "int32", ("image", "slot"), (4, 5), fill_value=-1,
                                        growable=True)])
    assert section.read("a", store.units()[0]).tolist() == [[1, 1, -1, -1, -1]] * 4
    with pytest.raises(StoreError, match="rerun with --overwrite"):
        store.ensure_arrays("s", [ArraySpec("g/b", (10, 5), "int32", ("image", "slot"), (4, 5))])
    assert zarr.open_array(store.url + "/g/a", mode="r").metadata.dimension_names == ("image", "slot")


def test_reset_stage_clears_the_record_before_the_arrays(tmp_path):
    store = make_store(str(tmp_path / "run.zarr"))
    store.ensure_arrays("s", [ArraySpec("s/x", (10,), "int8", ("image",), (4,))])
    store.begin_stage("s", StageRecord("abc", units=3))
    store.mark_unit_done("s", 1)
    assert store.done_units("s").tolist() == [False, True, False]
    store.reset_stage("s", store.owned_arrays("s"))
    reopened = RunStore.open(store.url)
    assert reopened.record("s").fingerprint is None and not reopened.has("s/x") and len(reopened.done_units("s")) == 0


def test_completeness_gap_is_relative_and_undefined_without_change():
    gap = completeness_gap(np.array([1.1, 2.0, 5.0, np.nan]), np.array([1.0, 0.0, np.nan, 1.0]))
    assert gap[0] == pytest.approx(0.1) and np.isnan(gap[1:]).all()
    assert gap_summary(gap) == {"targets": 1, "mean_gap": pytest.approx(0.1), "median_gap": pytest.approx(0.1),
                                "max_gap": pytest.approx(0.1)}
    assert gap_summary(np.array([np.nan]))["mean_gap"] is None


def test_r2_from_unit_statistics_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    dictionary = np.eye(4, dtype=np.float32)
    x = np.abs(rng.normal(size=(12, 4))).astype(np.float32)
    index = np.argsort(-x, axis=1)[:, :2].astype(np.int32)  # keep the two largest channels
    value = np.take_along_axis(x, index, 1)
    units = [reconstruction_stats(x[s : s + 6], index[s : s + 6], value[s : s + 6], dictionary,
                                  np.full(6, 2), 2, 2) for s in (0, 6)]
    summary = reconstruction_summary(np.stack([u[0] for u in units]), np.stack([u[1] for u in units]), 4)
    kept = np.zeros_like(x)
    np.put_along_axis(kept, index, value, 1)
    expected = 1 - ((x - kept) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert summary["r2"] == pytest.approx(expected, rel=1e-6) and summary["mean_l0"] == 2 and summary["pfvs"] == 12


def test_dictionary_interface_follows_the_estimator_contract():
    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(size=(300, 8))).astype(np.float32)
    dictionary = make_dictionary("bisecting_kmeans", n_concepts=6, lambda_rel=0.05)
    with pytest.raises(NotFittedError):
        dictionary.encode(X)
    with pytest.raises(NotFittedError):
        dictionary.decode(np.zeros((1, 1), dtype=np.int32), np.zeros((1, 1)))
    assert dictionary.fit(X) is dictionary
    assert dictionary.dictionary_.shape == (6, 8)
    assert np.allclose(np.linalg.norm(dictionary.dictionary_, axis=1), 1, atol=1e-5)
    assert len(dictionary.tree_.parent) == 11
    index, value = dictionary.encode(X)
    X_hat = dictionary.decode(index, value)
    assert X_hat.shape == X.shape and ((X - X_hat) ** 2).sum() < ((X - X.mean(0)) ** 2).sum()
    # Rebuilt from its stored arrays, with the encode parameters of another stage: the same codes.
    again = BisectingKMeansDictionary.from_arrays(dictionary.fitted_arrays(), lambda_rel=0.05)
    assert all(np.array_equal(a, b) for a, b in zip(again.encode(X), (index, value)))
    params = dictionary.get_params()
    assert params["n_concepts"] == 6 and clone(dictionary).set_params(seed=3).get_params()["seed"] == 3
    with pytest.raises(ValueError, match="unknown dictionary 'ica'"):
        make_dictionary("ica")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_on_a_memory_prefix_with_foreign_keys_refuses_and_deletes_nothing(overwrite):
    from gig_dist import pipeline
    from tests.conftest import toy_config

    url = f"memory://bucket/user-{overwrite}"
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/USER_DATA.csv", b"precious\n")
    with pytest.raises(StoreError, match="USER_DATA.csv"):
        pipeline.run(toy_config("dataset.toy.num_images=4"), url, overwrite=overwrite)
    assert fs.find(root) == [f"{root}/USER_DATA.csv"] and fs.cat_file(f"{root}/USER_DATA.csv") == b"precious\n"


def test_a_run_of_an_older_store_format_is_kept_unless_overwritten(tmp_path):
    url = str(tmp_path / "old.zarr")
    group = zarr.open_group(url, mode="w")
    group.attrs["gig_dist"] = {"format_version": 2, "config": {}}  # what gig-dist wrote before format 3
    group.create_array("pfv/layer1.0", shape=(4,), dtype="f2")
    with pytest.raises(StoreError, match="store format 2; this gig-dist writes format 3"):
        RunStore.claim(url, overwrite=False)
    assert (tmp_path / "old.zarr" / "pfv" / "layer1.0" / "zarr.json").exists()
    with pytest.raises(StoreError, match="store format 2; this gig-dist reads format 3"):
        RunStore.open(url)
    assert RunStore.claim(url, overwrite=True) is False and RunStore.inspect_prefix(url) == ("empty", [])


def test_a_code_value_that_float16_cannot_hold_is_refused_not_stored_as_inf(tmp_path):
    """decompose.value_dtype = float16 stores values up to 65,504; a larger one would become inf
    without a word, so the write is refused naming the tap and the images, and nothing is written."""
    from gig_dist.store.codes import code_specs

    store = make_store(str(tmp_path / "run.zarr"))
    store.ensure_arrays("decompose", code_specs(FACTS, "d", {"t": 6}, 2, "float16"))
    r = store.units()[0]
    index = np.zeros((4, 4, 2), dtype=np.int32)
    value = np.ones((4, 4, 2), dtype=np.float32)
    stats, total = np.zeros(7), np.zeros(3)
    value[1, 2, 0] = 1e5
    with pytest.raises(StoreError, match=r"tap t, images 0:4: a code value of 1e\+05 does not fit the store's float16"):
        store.family(CodesSection, "d").write(r, "t", index, value, stats, total)
    assert (store.family(CodesSection, "d").read("t", r)[0] == -1).all()  # nothing written
    value[1, 2, 0] = 6e4
    store.family(CodesSection, "d").write(r, "t", index, value, stats, total)
    assert store.family(CodesSection, "d").read("t", r)[1][1, 2, 0] == np.float16(6e4)


def test_a_key_is_ours_only_when_a_listed_node_owns_it():
    from gig_dist.store.ownership import is_own_key

    nodes = {"pfv": {"kind": "group", "owner": "extract"}, "pfv/t": {"kind": "array", "owner": "extract"},
             "meta/s": {"kind": "array", "owner": "extract"}}
    hexa = "0123456789abcdef" * 2
    ours = ["zarr.json", "pfv/zarr.json", "pfv/t/zarr.json", "pfv/t/c/0/12/3", "meta/s/c", f"pfv/t/zarr.{hexa}.partial",
            f"pfv/t/c/0/0/{7}.{hexa}.partial", "gig-dist.lease/000000000003", "gig-dist.lease"]
    theirs = ["meta/zarr.json", "pfv/t/comments.txt", "pfv/t/c/notes.txt", "pfv/t/c/0/x", "pfv/t/cache/0",
              "pfv/u/zarr.json", "user_group/zarr.json", "user_group/x/c/0", "pfv/t/zarr.json.bak",
              f"pfv/t/notes.{hexa}.partial", "gig-dist.lease/notes", "pfv/c/0"]
    assert [k for k in ours if not is_own_key(k, nodes)] == []
    assert [k for k in theirs if is_own_key(k, nodes)] == []


def _users_data(url: str, kind: str) -> dict[str, bytes]:
    """Something a user put inside a run store, and its keys with their bytes."""
    fs, root = fsspec.core.url_to_fs(url)
    if kind == "group":
        group = zarr.open_group(url, mode="a", use_consolidated=False).create_group("user_group")
        group.create_array("x", shape=(10,), dtype="f8")[:] = 1
    elif kind == "note in an array":
        fs.pipe_file(f"{root}/pfv/layer1.0/comments.txt", b"look at image 3")
    else:  # a stray zarr.json: a group a user made by hand inside ours
        fs.makedirs(f"{root}/meta/mine", exist_ok=True)
        fs.pipe_file(f"{root}/meta/mine/zarr.json", b'{"zarr_format": 3, "node_type": "group"}')
    fs.invalidate_cache()
    return {key: fs.cat_file(key) for key in fs.find(root) if "user_group" in key or "comments" in key or "/mine/" in key}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("kind", ["group", "note in an array", "stray zarr.json"])
def test_overwrite_keeps_a_users_data_inside_a_run_store(tmp_path, where, kind, request):
    from gig_dist import pipeline
    from tests.conftest import toy_config

    if where == "s3":
        url = f"{request.getfixturevalue('s3_server').bucket('own-' + kind.replace(' ', '-').replace('.', ''))}/r.zarr"
    else:
        url = str(tmp_path / "r.zarr")
    config = toy_config("dataset.toy.num_images=8", "store.images_per_unit=4")
    pipeline.run(config, url, until="extract")
    theirs = _users_data(url, kind)
    assert theirs
    with pytest.raises(StoreError, match="not a gig-dist run store"):
        pipeline.run(config, url, overwrite=True, until="extract")
    fs, _ = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    assert {key: fs.cat_file(key) for key in theirs} == theirs
    assert RunStore.open(url).family(MetaSection).image_counts()["processed"] == 8  # the run is whole too


def test_zarrs_partial_files_of_our_arrays_are_ours_and_go_with_them(tmp_path):
    """A SIGKILL while zarr writes leaves ``<name>.<hex>.partial``: --overwrite, and a redo that
    deletes the array, refused it as foreign."""
    from gig_dist import pipeline
    from tests.conftest import toy_config

    url = str(tmp_path / "r.zarr")
    config = toy_config("dataset.toy.num_images=8", "store.images_per_unit=4")
    pipeline.run(config, url, until="sample")
    for partial in ("pfv/layer1.0/zarr.0123456789abcdef0123456789abcdef.partial",
                    "samples/layer1.0/vector/c/0/0/0.fedcba9876543210fedcba9876543210.partial"):
        (tmp_path / "r.zarr" / partial).write_bytes(b"half a write")
    assert RunStore.inspect_prefix(url) == ("ours", [])
    pipeline.run(toy_config("dataset.toy.num_images=8", "store.images_per_unit=4", "sample.seed=3"), url,
                 until="sample")  # redoes sample: deletes its arrays, the partial with them
    assert not (tmp_path / "r.zarr" / "samples/layer1.0/vector/c/0/0").exists() or not list(
        (tmp_path / "r.zarr" / "samples/layer1.0/vector/c/0/0").glob("*.partial"))
    pipeline.run(config, url, overwrite=True, until="extract")
    assert not (tmp_path / "r.zarr" / "pfv/layer1.0/zarr.0123456789abcdef0123456789abcdef.partial").exists()
    assert not (tmp_path / "r.zarr" / "samples").exists()
