import numpy as np
import pytest
import torch

from gig_dist.toy.model import ToyResNet, load_toy_model
from gig_dist.toy.train import heldout_accuracy
from gig_dist.toy.world import CLASSES, NUM_PARTS, render, render_batch, toy_label

pytestmark = pytest.mark.fast


def test_images_are_a_pure_function_of_seed_and_index():
    a_image, a_mask, a_label = render(3, 17)
    b_image, b_mask, b_label = render(3, 17)
    assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask) and a_label == b_label
    other, _, _ = render(4, 17)
    assert not np.array_equal(a_image, other)


def test_label_without_rendering_matches_render():
    assert [toy_label(0, i) for i in range(50)] == [render(0, i)[2] for i in range(50)]


def test_masks_hold_exactly_the_parts_of_the_class():
    images, masks, labels = render_batch(0, range(64))
    assert images.shape == (64, 64, 64, 3) and images.min() >= 0 and images.max() <= 1
    for mask, label in zip(masks, labels):
        expected = {part + 1 for part, _, _ in CLASSES[label].parts}
        present = set(np.unique(mask).tolist()) - {0}
        # Parts may overlap, but every part of the class is visible and nothing else is drawn.
        assert present == expected
        assert 0.02 < (mask > 0).mean() < 0.6
    assert masks.max() <= NUM_PARTS


def test_classes_share_parts():
    part_sets = [{p for p, _, _ in c.parts} for c in CLASSES]
    shared = [i for i, s in enumerate(part_sets) if any(s & t for j, t in enumerate(part_sets) if j != i)]
    assert len(shared) == len(CLASSES)
    assert len({frozenset(s) for s in part_sets}) == len(CLASSES)  # combinations are distinct


def test_model_uses_torchvision_bottlenecks_with_downsampling():
    from torchvision.models.resnet import Bottleneck

    model = ToyResNet()
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 5
    assert sum(b.downsample is not None for b in blocks) == 3
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 8)


def test_shipped_weights_reach_95_percent_on_held_out_world():
    accuracy = heldout_accuracy(load_toy_model(), num_images=512)
    assert accuracy >= 0.95, accuracy


def test_a_distractor_leaves_the_labelled_object_whole_and_is_of_another_class():
    from gig_dist.toy.world import render_scene

    for index in range(40):
        clean, scene = render_scene(0, index), render_scene(0, index, distractor=True)
        assert np.array_equal(clean.image, render(0, index)[0]) and clean.distractor == -1
        assert scene.label == clean.label and scene.distractor not in (-1, scene.label)
        own = scene.object_mask == 1
        # the labelled object is drawn last, with the same random draws: the same pixels and parts
        assert np.array_equal(own, clean.object_mask == 1)
        assert np.array_equal(scene.image[own], clean.image[own])
        assert np.array_equal(scene.part_mask[own], clean.part_mask[own])
        other = scene.object_mask == 2
        assert other.any() and set(np.unique(scene.part_mask[other])) <= {p + 1 for p, _, _ in
                                                                           CLASSES[scene.distractor].parts}
        # outside both objects the background is the clean image's
        background = scene.object_mask == 0
        assert np.array_equal(scene.image[background], clean.image[background])
