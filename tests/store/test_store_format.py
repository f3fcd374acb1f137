"""The store format page (docs/store.md) is normative: every array of a real run matches one of
its rows, by path, dimension names and dtype."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from gig_dist import pipeline
from gig_dist.store import RunStore
from tests.conftest import toy_config, zgroup

DOC = Path(__file__).resolve().parents[2] / "docs" / "store.md"
DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "int16": "<i2", "int32": "<i4", "int64": "<i8",
          "uint8": "|u1", "bool": "|b1", "string": "string"}


def documented() -> list[tuple[re.Pattern, list[tuple[str, ...]], str]]:
    """(path pattern, the allowed dimension tuples, dtype) per row of the page's array table."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 4 or not cells[0].startswith("`") or cells[2] not in DTYPES:
            continue
        path = cells[0].strip("`")
        pattern = re.escape(path)
        for name, value in (("<tap>", r"[^/]+"), ("<level>", r"[^/]+"), ("<pair>", r"[^/]+__[^/]+"),
                            ("<stage>", r"[a-z]+")):
            pattern = pattern.replace(re.escape(name), value, 1).replace(re.escape(name), r"[^/]+")
        dims = [tuple(d.strip().replace("`", "") for d in option.split(","))
                for option in cells[1].replace("\\|", "|").split("|")]
        rows.append((re.compile(pattern + "$"), dims, DTYPES[cells[2]]))
    return rows


def dims_match(documented_dims: tuple[str, ...], actual: tuple[str, ...], path: str) -> bool:
    level_stage = path.split("/")[1:] if path.startswith("progress/") else []
    expected = []
    for d in documented_dims:
        d = d.replace("<tap>", path.split("/")[1] if path.startswith("pfv/") else "<tap>")
        if level_stage and "<level>" in d:
            d = d.replace("<level>", level_stage[0]).replace("<stage>", level_stage[1])
        expected.append(d)
    return tuple(expected) == tuple(actual)


def dtype_of(array: zarr.Array) -> str:
    return "string" if "str" in str(array.dtype).lower() else np.dtype(array.dtype).str


CONSOLIDATIONS: list[str] = []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    url = tmp_path_factory.mktemp("format") / "run.zarr"
    consolidate = RunStore.consolidate
    with pytest.MonkeyPatch.context() as patch:  # counts the run's consolidations (see the last test)
        patch.setattr(RunStore, "consolidate", lambda store: (CONSOLIDATIONS.append(store.url), consolidate(store)))
        return pipeline.run(toy_config("dataset.toy.num_images=32", "gig.images=2", "evaluate.images=2",
                                       "evaluate.targets=2", "evaluate.steps=4"), url, until="evaluate").url


def test_every_array_of_a_run_is_documented(finished):
    rows = documented()
    assert len(rows) > 60, "the page's table was not read"
    group = zgroup(finished)
    arrays = {path: node for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    assert any(p.startswith("eval/") for p in arrays) and any(p.startswith("atlas/") for p in arrays)
    undocumented = []
    for path, array in sorted(arrays.items()):
        actual = tuple(array.metadata.dimension_names or ())
        matches = [row for row in rows if row[0].match(path)]
        if not any(dtype_of(array) == dtype and any(dims_match(d, actual, path) for d in dims)
                   for _, dims, dtype in matches):
            undocumented.append(f"{path} {actual} {dtype_of(array)}"
                                + (f" (rows for the path: {[(r[1], r[2]) for r in matches]})" if matches else ""))
    assert not undocumented, "arrays not in docs/store.md:\n" + "\n".join(undocumented)


def test_the_manifest_and_the_group_attributes_are_as_documented(finished):
    group = zgroup(finished)
    manifest = group.attrs["gig_dist"]
    text = DOC.read_text()
    for key in manifest:
        assert f"`{key}`" in text, f"manifest key {key!r} is not in docs/store.md"
    for path, node in group.members(max_depth=None):
        for key in node.attrs:
            assert f"`{key}`" in text, f"attribute {key!r} of {path} is not in docs/store.md"


def test_a_run_consolidates_its_metadata_once_at_the_end_listing_every_array(finished):
    """Consolidating lists every node of the store, and the next manifest write drops it again:
    once per run, not once per stage (2.8 s a stage in a store of 14 dictionary levels)."""
    assert CONSOLIDATIONS == [finished]
    consolidated = zarr.open_group(finished, mode="r", use_consolidated=True)
    listed = {path for path, node in consolidated.members(max_depth=None) if isinstance(node, zarr.Array)}
    actual = {path for path, node in zgroup(finished).members(max_depth=None) if isinstance(node, zarr.Array)}
    assert listed == actual and any(p.startswith("eval/") for p in listed)
