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


def test_the_readmes_imagenet_sizes_follow_from_the_tap_shapes():
    """Every size the ImageNet guide gives for the ImageNet run, recomputed from ResNet50's tap shapes
    (the PFV figure was once off by a factor of two)."""
    import re

    from gig_dist.kernels.taps import probe_model
    from gig_dist.store import Facts
    from gig_dist.store.meta import extraction_specs

    config = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "imagenet-resnet50.yaml")
    model = build_model(config.model.model_copy(update={"weights": None}))
    shapes, classes = probe_model(model, resolve_taps(model, config.taps), (224, 224))
    facts = Facts(num_images=50_000, images_per_unit=256, images_per_chunk=16, zstd_level=1,
                  taps={t: (s.channels, s.height, s.width) for t, s in shapes.items()}, num_outputs=classes)
    pfv = sum(spec.nbytes for spec in extraction_specs(facts, "float16") if spec.path.startswith("pfv/"))
    assert pfv == 50_000 * 2 * (56 * 56 * 256 + 28 * 28 * 512 + 14 * 14 * 1024 + 7 * 7 * 2048)
    readme = (Path(__file__).parent.parent / "docs" / "guides" / "imagenet.md").read_text()
    stated = float(re.search(r"four stage outputs are about (\d+) GB of float16", readme).group(1))
    assert abs(stated * 1e9 - pfv) / pfv < 0.02, (stated, pfv / 1e9)
    per_image = float(re.search(r"before compression \((\d+\.\d) MB per image", readme).group(1))
    assert per_image == round(pfv / 50_000 / 1e6, 1)
    # The reduce matrix of layer3.5 -> layer4.2 at K = 8 x C, and the per-source GIG per pair.
    k_a, k_b = 8 * facts.taps["layer3.5"][0], 8 * facts.taps["layer4.2"][0]
    assert f"{round(k_a * k_b * 8 / 1e9)} GB for layer3.5 -> layer4.2)" in readme
    partial = 50_000 * config.gig.targets * 2_000 * 4  # float32 per-source GIG, before the reduction
    assert f"an estimated\n{round(partial / 1e9)} GB per pair" in readme or \
        f"an estimated {round(partial / 1e9)} GB per pair" in readme
