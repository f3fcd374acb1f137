"""The stage contract (``gig_dist.testing.check_stages``) over the whole registry, a stage added
from outside included: fingerprints stable, specs equal to what is written, an unchanged rerun
kept, and a SIGKILL before a unit's commit resumed to the same bits as an uninterrupted run."""

from __future__ import annotations

import pytest

from gig_dist.stages import registry
from gig_dist.testing import check_stages
from tests.conftest import toy_config
from tests.stages.test_added_stage import MeanLogitStage

# 32 images in 2 units of 16; GIG on both units (2 targets, 8 steps, one pair and the logits);
# evaluation on both, without ground truth.
CONTRACT = ("dataset.toy.num_images=32", "gig.images=32", "gig.targets=2",
            "gig.pairs=[[layer2.1,layer3.1],[layer3.1,logits]]", "evaluate.images=32", "evaluate.ground_truth=false",
            "atlas.members=2")


@pytest.mark.slow  # about 2 CPU minutes: pytest -m slow tests/stages/test_contract.py
def test_every_registered_stage_keeps_the_contract(tmp_path):
    registry.register(MeanLogitStage, after="extract")
    try:
        found = check_stages(toy_config(*CONTRACT), tmp_path, register=("tests.stages.test_added_stage:MeanLogitStage",))
    finally:
        registry.unregister("mean_logit")
    assert list(found) == ["extract", "mean_logit", *registry.stage_names()[1:]]
    for name, result in found.items():
        assert result["compared"] >= 1 and result["specs"] >= 1, (name, result)
    assert found["extract"]["killed_at_unit"] == 2  # two units: killed before the second's commit


def test_extraction_and_an_added_stage_keep_the_contract(tmp_path):
    """CI's share of the contract (the whole registry is the slow test above; each built-in stage's
    own kill test is in its module)."""
    registry.register(MeanLogitStage, after="extract")
    try:
        found = check_stages(toy_config("dataset.toy.num_images=32"), tmp_path, stages=["extract", "mean_logit"],
                             register=("tests.stages.test_added_stage:MeanLogitStage",))
    finally:
        registry.unregister("mean_logit")
    assert found["extract"]["killed_at_unit"] == 2 and found["mean_logit"]["killed_at_unit"] == 2
    assert found["mean_logit"] == {"specs": 1, "owned": 2, "killed_at_unit": 2, "units": 2, "compared": 2}  # value, progress


class Drifting(MeanLogitStage):
    """Its spec's dtype changes once a unit has run: what it declared is not what a reader is told."""

    name = "drifting"
    config_model = None
    ran = False

    def specs(self, facts, sizes):
        import dataclasses

        return [dataclasses.replace(s, dtype="float64" if Drifting.ran else s.dtype) for s in super().specs(facts, sizes)]

    def open_worker(self, device):
        worker = super().open_worker(device)
        Drifting.ran = True
        return worker


def test_the_contract_names_a_stage_whose_specs_are_not_what_it_wrote(tmp_path):
    registry.register(MeanLogitStage, after="extract")
    registry.register(Drifting, after="mean_logit")
    try:
        with pytest.raises(AssertionError, match="drifting: mean_logit/value is float32, its spec float64"):
            check_stages(toy_config("dataset.toy.num_images=16"), tmp_path, stages=["drifting"], kill=False)
    finally:
        registry.unregister("drifting")
        registry.unregister("mean_logit")
