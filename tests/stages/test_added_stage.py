"""A stage as a newcomer adds it: one module (this one) holding its config section, its store
family, its stage and worker, and one ``registry.register`` call. Nothing else in the package
changes, and the config, the pipeline's keep/redo plan, ``gig-dist plan``, ``inspect`` and the
report all pick it up from the registry."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import Field

from gig_dist import pipeline
from gig_dist.settings import ConfigError, Section
from gig_dist.stages import registry
from gig_dist.stages.base import (
    Progress,
    Sizes,
    Stage,
    StageWorker,
    UnitReport,
    WorkUnit,
)
from gig_dist.store import (
    PROCESSED,
    ArraySpec,
    Facts,
    ImageRange,
    MetaSection,
    RunStore,
)
from gig_dist.store.section import Section as StoreSection
from gig_dist.store.types import per_image_spec
from tests.conftest import toy_config, zgroup

# -- the newcomer's module ----------------------------------------------------------------------


class MeanLogitConfig(Section):
    #: Multiplies every mean.
    scale: float = Field(default=1.0, gt=0)


class MeanLogitFamily(StoreSection):
    """The stage's store family: ``mean_logit/value`` (image)."""

    def __init__(self, store: RunStore) -> None:
        super().__init__(store, "mean_logit")

    @staticmethod
    def specs(facts: Facts) -> list[ArraySpec]:
        """Its arrays' specs, from the run's facts (a plan has no store yet)."""
        return [per_image_spec(facts, "mean_logit/value", (), "float32", np.nan, ())]

    def values(self) -> np.ndarray:
        return self.read("value", ImageRange(0, self.store.num_images))


class MeanLogitStage(Stage):
    name = "mean_logit"
    reads = ("extract",)
    result_keys: ClassVar[tuple[str, ...]] = ("extract.dtype", "mean_logit.")
    config_section = "mean_logit"
    config_model = MeanLogitConfig
    family = MeanLogitFamily

    def specs(self, facts: Facts, sizes: Sizes) -> list[ArraySpec]:
        return MeanLogitFamily.specs(facts)

    def open_worker(self, device: str) -> StageWorker:
        return MeanLogitWorker(self)

    @classmethod
    def summary(cls, store: RunStore, key: str) -> dict[str, Any] | None:
        values = store.family(MeanLogitFamily).values()
        return {"mean logit (over images)": f"{np.nanmean(values):.4f}"}

    @classmethod
    def report_panel(cls, run: Any) -> tuple[str, str] | None:
        values = run.store.family(MeanLogitFamily).values()
        return "mean logit", f"<p class='mean-logit'>{np.nanmean(values):.4f} over {np.isfinite(values).sum()} images</p>"


class MeanLogitWorker(StageWorker):
    def __init__(self, stage: MeanLogitStage) -> None:
        self.store = stage.open_store()
        self.scale = stage.settings.scale
        self.family = stage.family_of(self.store)

    def run(self, unit: WorkUnit, progress: Progress | None = None) -> UnitReport:
        r = ImageRange(unit.start, unit.stop)
        meta = self.store.family(MetaSection)
        status, _ = meta.read_status(r)
        means = np.where(status == PROCESSED, np.nanmean(meta.read_logits(r), axis=1) * self.scale, np.nan)
        self.family.write("value", r, means.astype(np.float32))
        return UnitReport(unit.index, len(r), 0)


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture
def added():
    registry.register(MeanLogitStage, after="extract")
    try:
        yield MeanLogitStage
    finally:
        registry.unregister("mean_logit")


def test_the_added_stages_section_validates_and_leaves_with_it(added):
    assert toy_config("mean_logit.scale=2").mean_logit.scale == 2
    assert toy_config().mean_logit.scale == 1.0
    with pytest.raises(ConfigError, match=r"mean_logit.scal: unknown key \(did you mean 'scale'\?\)"):
        toy_config("mean_logit.scal=2")
    with pytest.raises(ConfigError, match="mean_logit.scale"):
        toy_config("mean_logit.scale=-1")
    registry.unregister("mean_logit")
    with pytest.raises(ConfigError, match="mean_logit: unknown key"):
        toy_config("mean_logit.scale=2")
    registry.register(MeanLogitStage, after="extract")  # for the fixture's unregister


def test_register_refuses_a_second_stage_of_one_name_and_unknown_inputs(added):
    with pytest.raises(ValueError, match="registered already"):
        registry.register(MeanLogitStage)

    class Orphan(MeanLogitStage):
        name = "orphan"
        reads = ("nowhere",)
        config_model = None

    with pytest.raises(ValueError, match="reads nowhere"):
        registry.register(Orphan)


def test_an_added_stage_runs_resumes_redoes_and_is_shown(added, tmp_path, capsys):
    from gig_dist.cli import build_parser, main

    config = toy_config("dataset.toy.num_images=20", "mean_logit.scale=2")
    report = pipeline.run(config, tmp_path / "run.zarr", until="mean_logit")
    assert [s.stage for s in report.stages] == ["extract", "mean_logit"]
    logits = zgroup(report.url)["meta/logits"][:]
    assert np.allclose(zgroup(report.url)["mean_logit/value"][:], 2 * logits.mean(axis=1))
    assert zgroup(report.url)["mean_logit/value"].metadata.dimension_names == ("image",)
    assert "mean_logit/value" in RunStore.open(report.url).nodes  # declared by the driver, so owned

    again = pipeline.run(config, tmp_path / "run.zarr", until="mean_logit")
    assert [d.action for d in again.decisions] == ["keep", "keep"]
    assert build_parser().parse_args(["run", "--until", "mean_logit"]).until == "mean_logit"
    # its own key decides its results: a new scale redoes it and keeps extraction
    rescaled = pipeline.run(toy_config("dataset.toy.num_images=20", "mean_logit.scale=3"), tmp_path / "run.zarr",
                            until="mean_logit")
    assert [d.action for d in rescaled.decisions] == ["keep", "redo"]
    assert np.allclose(zgroup(report.url)["mean_logit/value"][:], 3 * logits.mean(axis=1))
    # an upstream key redoes it too
    redo = pipeline.run(toy_config("dataset.toy.num_images=20", "mean_logit.scale=3", "extract.dtype=float32"),
                        tmp_path / "run.zarr", until="mean_logit")
    assert [d.action for d in redo.decisions] == ["redo", "redo"]

    # inspect prints its summary under its line, and --json carries it
    assert main(["inspect", str(tmp_path / "run.zarr")]) == 0
    printed = capsys.readouterr().out
    assert f"mean logit (over images): {3 * logits.mean():.4f}" in printed
    assert main(["inspect", "--json", str(tmp_path / "run.zarr")]) == 0
    said = json.loads(capsys.readouterr().out)["summaries"]
    assert list(said) == ["mean_logit"]

    # the report's index shows its panel
    from gig_dist.report import build_report

    build_report(report.url, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert "<h2>mean logit</h2>" in index and f"{3 * logits.mean():.4f} over 20 images" in index


def test_the_plan_sizes_an_added_stage(added):
    from gig_dist.plan import make_plan

    plan = make_plan(toy_config("dataset.toy.num_images=20"), until="mean_logit")
    stage = next(s for s in plan.stages if s.key == "mean_logit")
    assert [(a.path, a.shape) for a in stage.arrays] == [("mean_logit/value", (20,))]


def test_every_registered_stage_declares_its_config_section_and_store_family():
    from gig_dist.config import Config

    for stage in registry.STAGES:
        assert stage.config_section in Config.model_fields, stage.name
        assert stage.family is not None and stage.family.__module__.startswith("gig_dist.store."), stage.name
