from pathlib import Path

import pytest

from gig_dist.config import load_config
from gig_dist.kernels.taps import resolve_taps
from gig_dist.models.loading import build_model, resolve_transform

pytestmark = pytest.mark.fast

CONFIGS = sorted((Path(__file__).parent.parent / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_validate_against_their_model(path):
    config = load_config(path)
    # The architecture (not the weights, which would download) must have the configured taps.
    model = build_model(config.model.model_copy(update={"weights": None}))
    assert resolve_taps(model, config.taps)
    assert resolve_transform(config).crop == 224


def test_imagenet_example_uses_the_four_stage_outputs():
    config = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "imagenet-resnet50.yaml")
    assert config.taps == ("layer1.2", "layer2.3", "layer3.5", "layer4.2")


def test_imagenet_example_keeps_the_papers_concept_settings():
    config = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "imagenet-resnet50.yaml")
    assert (config.sample.per_image, config.concepts.k_multiplier, config.decompose.lambda_rel) == (1, 8, 0.1)


def test_the_v1_config_is_the_papers_weights_and_preprocessing():
    v1 = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "imagenet-resnet50-v1.yaml")
    v2 = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "imagenet-resnet50.yaml")
    assert v1.model.weights == "IMAGENET1K_V1" and v2.model.weights == "IMAGENET1K_V2"
    transform = resolve_transform(v1)
    assert (transform.resize, transform.crop) == (256, 224)
    assert transform.mean == (0.485, 0.456, 0.406) and transform.std == (0.229, 0.224, 0.225)
    # Everything else is the same run.
    assert v1.model_copy(update={"model": v2.model, "transform": v2.transform}) == v2
    text = (Path(__file__).parent.parent / "jobs" / "configs" / "imagenet-resnet50.yaml").read_text()
    assert "the paper's default" not in text and "departs from the paper" in text


def test_the_toy_world_sets_its_own_sample_count_and_lambda():
    from gig_dist.config import TOY_LAMBDA_REL, TOY_SAMPLES_PER_IMAGE

    toy = load_config(None)
    assert (toy.sample.per_image, toy.decompose.lambda_rel) == (TOY_SAMPLES_PER_IMAGE, TOY_LAMBDA_REL)
    # Explicit values win, and other datasets keep the paper's.
    assert load_config(None, ["sample.per_image=3", "decompose.lambda_rel=0.2"]).sample.per_image == 3
    folder = load_config(None, ["dataset.kind=imagefolder", "dataset.path=/x"])
    assert (folder.sample.per_image, folder.decompose.lambda_rel) == (1, 0.1)
