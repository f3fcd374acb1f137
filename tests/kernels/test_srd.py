"""SRD sharing ratios, relevance conservation and iERFs (method.md section 2)."""

import logging

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from gig_dist.kernels.ierf import gradient_ierf, ierf
from gig_dist.kernels.srd import SRD, SRDUnsupported
from gig_dist.toy.model import ToyResNet, load_toy_model

pytestmark = pytest.mark.fast


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms, so folded biases and scales are far from trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


MODELS = {
    "resnet18": lambda: _randomise_bn(torchvision.models.resnet18(weights=None)),
    "resnet50": lambda: _randomise_bn(torchvision.models.resnet50(weights=None)),
    "toy": lambda: load_toy_model(),
}


@pytest.fixture(scope="module", params=list(MODELS))
def decomposed(request):
    torch.manual_seed(1)
    model = MODELS[request.param]()
    images = torch.randn(2, 3, 64, 64)
    return model, images, SRD(model).decompose(images)


def _nodes(d):
    yield d.stem
    for block in d.blocks:
        yield block.final
        yield from block.inner


def test_ratios_into_every_target_sum_to_one(decomposed):
    _, _, d = decomposed
    count = 0
    for node in _nodes(d):
        total = sum(mu.sum(1) for mu in node.mu)  # (N, L)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-4)
        count += 1
    assert count > 5
    pool = d.pool.share.sum(1)
    assert torch.allclose(pool, torch.ones_like(pool), atol=1e-4)


def test_decomposition_reproduces_the_forward_pass(decomposed):
    model, images, d = decomposed
    with torch.no_grad():
        assert torch.allclose(d.logits, model(images), atol=1e-4, rtol=1e-4)


def test_relevance_is_conserved_from_the_logit_to_the_pixels(decomposed):
    _, _, d = decomposed
    classes = d.logits.argmax(1)
    logit = d.logits[torch.arange(2), classes]
    assert torch.allclose(d.top_relevance(classes).sum((1, 2, 3)), logit, rtol=1e-5, atol=1e-5)
    for tap, r in d.relevance(classes).items():
        assert torch.allclose(r.sum((1, 2)), logit, rtol=1e-3, atol=1e-4), tap
    pixels = d.pixel_relevance(classes)
    assert torch.allclose(pixels.sum((1, 2)), logit, rtol=1e-3, atol=1e-4)
    assert pixels.shape == (2, 64, 64)


def test_an_ierf_sums_to_one_and_may_be_negative(decomposed):
    _, _, d = decomposed
    for tap in (d.srd.taps[0], d.srd.taps[len(d.srd.taps) // 2], d.srd.taps[-1]):
        positions = d.outputs[tap].shape[-1] * d.outputs[tap].shape[-2]
        maps = d.ierf(tap, torch.tensor([[0, positions - 1], [positions // 2, 1]]))
        assert maps.shape == (2, 2, 64, 64)
        assert torch.allclose(maps.sum((2, 3)), torch.ones(2, 2), atol=1e-4)
        # Negative sharing ratios reach the pixels: some iERF mass is negative, far above float32
        # rounding of values of this size (about 1e-11); measured minima -2e-6 to -1.4e-3.
        assert float(maps.min()) < -1e-6, (tap, float(maps.min()))


def _main_path_layers(model, tap):
    """(kernel, stride, padding, dilation) of every layer from the pixels to ``tap`` on the main
    path (the skip's receptive field lies inside it), read from the modules, not from SRD."""
    layers = [(model.conv1.kernel_size[0], model.conv1.stride[0], model.conv1.padding[0], 1)]
    if isinstance(model.maxpool, nn.MaxPool2d):
        mp = model.maxpool
        layers.append((mp.kernel_size, mp.stride, mp.padding, 1))
    for name, module in model.named_modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            convs = [module.conv1, module.conv2] + ([module.conv3] if isinstance(module, Bottleneck) else [])
            layers += [(c.kernel_size[0], c.stride[0], c.padding[0], c.dilation[0]) for c in convs]
            if name == tap:
                return layers
    raise AssertionError(tap)


def _receptive_box(layers, row, col, size):
    lo_r, hi_r, lo_c, hi_c = row, row, col, col
    for k, s, p, d in reversed(layers):
        lo_r, hi_r = lo_r * s - p, hi_r * s - p + (k - 1) * d
        lo_c, hi_c = lo_c * s - p, hi_c * s - p + (k - 1) * d
    return max(lo_r, 0), min(hi_r, size - 1), max(lo_c, 0), min(hi_c, size - 1)


@pytest.mark.parametrize("model_name", ["toy", "resnet18"])
def test_an_ierf_is_zero_outside_the_theoretical_receptive_field(model_name):
    torch.manual_seed(2)
    model = MODELS[model_name]()
    images = torch.randn(1, 3, 96, 96)
    d = SRD(model).decompose(images)
    for tap in (d.srd.taps[0], d.srd.taps[2]):
        height, width = d.outputs[tap].shape[-2:]
        for row, col in [(0, 0), (height // 2, width // 3), (height - 1, width - 1)]:
            maps = d.ierf(tap, torch.tensor([[row * width + col]]))[0, 0]
            r0, r1, c0, c1 = _receptive_box(_main_path_layers(model, tap), row, col, 96)
            outside = maps.clone()
            outside[r0 : r1 + 1, c0 : c1 + 1] = 0
            assert outside.abs().max() == 0, (tap, row, col)
            assert maps[r0 : r1 + 1, c0 : c1 + 1].abs().sum() > 0
            if (row, col) == (0, 0):  # the corner's box leaves most of the image out: a real restriction
                assert (r1 - r0 + 1) * (c1 - c0 + 1) < 96 * 96 / 2, (tap, r0, r1, c0, c1)


def test_batched_ierfs_equal_one_at_a_time(decomposed):
    _, _, d = decomposed
    tap = d.srd.taps[1]
    positions = torch.tensor([[3, 17, 40, 0], [5, 5, 22, 63]])
    batched = d.ierf(tap, positions)
    for image in range(2):
        for k in range(4):
            single = d.ierf(tap, positions[:, k : k + 1])[image, 0]
            assert torch.allclose(batched[image, k], single, atol=1e-6)


def test_ierfs_of_separately_decomposed_images_match_the_batch(decomposed):
    model, images, d = decomposed
    alone = SRD(model).decompose(images[1:2]).ierf(d.srd.taps[-1], torch.tensor([[0, 1]]))
    assert torch.allclose(alone[0], d.ierf(d.srd.taps[-1], torch.tensor([[0, 0], [0, 1]]))[1], atol=1e-5)


def test_a_layer_without_an_srd_rule_falls_back_to_the_gradient_iERF(caplog):
    model = load_toy_model()
    model.layer2[1].relu = nn.SiLU()
    images = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING):
        maps, kind = ierf(model, images, "layer3.0", torch.tensor([[1, 9], [20, 30]]))
    assert kind == "gradient"
    assert "no SRD rule" in caplog.text or "ReLU" in caplog.text
    assert torch.allclose(maps.sum((2, 3)), torch.ones(2, 2), atol=1e-5) and (maps >= 0).all()


def test_a_non_resnet_model_gets_gradient_iERFs():
    model = torchvision.models.efficientnet_b0(weights=None).eval()
    maps, kind = ierf(model, torch.randn(1, 3, 64, 64), "features.3.0", torch.tensor([[2, 7]]))
    assert kind == "gradient" and maps.shape == (1, 2, 64, 64)


def test_asking_srd_for_a_tap_that_is_not_a_block_output_is_an_error():
    with pytest.raises(SRDUnsupported, match=r"'layer2.0.conv2' is not one\. Block outputs: layer1.0, layer2.0"):
        ierf(load_toy_model(), torch.randn(1, 3, 64, 64), "layer2.0.conv2", torch.tensor([[0]]), method="srd")


def test_gradient_ierf_lies_within_the_receptive_field_too():
    model = load_toy_model()
    maps = gradient_ierf(model, torch.randn(1, 3, 64, 64), "layer1.0", torch.tensor([[0]]))[0, 0]
    r0, r1, c0, c1 = _receptive_box(_main_path_layers(model, "layer1.0"), 0, 0, 64)
    outside = maps.clone()
    outside[r0 : r1 + 1, c0 : c1 + 1] = 0
    assert outside.max() == 0 and maps.sum() == pytest.approx(1.0, abs=1e-5)


def test_out_of_range_positions_are_refused(decomposed):
    _, _, d = decomposed
    with pytest.raises(ValueError, match="positions must lie in"):
        d.ierf(d.srd.taps[-1], torch.tensor([[10_000]]))


def test_grouped_and_dilated_convolutions():
    torch.manual_seed(3)
    model = _randomise_bn(torchvision.models.resnext50_32x4d(weights=None))
    d = SRD(model).decompose(torch.randn(1, 3, 64, 64))
    classes = d.logits.argmax(1)
    assert torch.allclose(d.pixel_relevance(classes).sum(), d.logits[0, classes[0]], rtol=1e-3)


def test_toy_model_srd_api_is_usable_alone():
    srd = SRD(ToyResNet().eval())
    assert srd.taps == ["layer1.0", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]


def test_kernels_refuse_a_model_in_training_mode():
    """In training mode SRD conserved relevance only to a relative error of 0.83 and changed the
    BatchNorm running statistics; GIG had the same exposure."""
    from gig_dist.kernels.gig import GIG

    model = load_toy_model().train()
    running = model.bn1.running_mean.clone()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="SRD needs the model in eval mode, but ToyResNet, conv1, bn1 and others"):
        SRD(model).decompose(images)
    kernel = GIG(model, "layer2.1", "logits", torch.eye(128), (128, 16, 16))
    index = torch.arange(128).repeat(256, 1)[:, :1]
    with pytest.raises(ValueError, match="GIG needs the model in eval mode"):
        kernel.attribute(index, torch.ones(256, 1), torch.tensor([0]))
    assert torch.equal(model.bn1.running_mean, running)  # refused before any forward pass
    model.eval()
    assert SRD(model).decompose(images).relevance(torch.tensor([0, 1]))["layer1.0"].shape == (2, 32, 32)


def test_the_ierf_of_weighted_positions_is_the_weighted_sum_of_their_ierfs(decomposed):
    """SRD is linear in its starting relevance: a concept's code map over positions gives the
    code-weighted sum of its positions' iERFs (what the evaluate stage's ground truth uses)."""
    _, _, d = decomposed
    tap = d.srd.taps[1]
    h, w = d.outputs[tap].shape[-2:]
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(2, 3, h, w, generator=g) * (torch.rand(2, 3, h, w, generator=g) > 0.7)
    combined = d.ierf_of(tap, weights)
    every = d.ierf(tap, torch.arange(h * w).expand(2, -1))  # (2, HW, H_img, W_img)
    expected = torch.einsum("npq,nqxy->npxy", weights.flatten(2).to(every), every)
    assert torch.allclose(combined, expected, atol=1e-5 * expected.abs().max())
    assert torch.allclose(combined.sum((2, 3)), weights.sum((2, 3)).to(combined), rtol=1e-4)
    with pytest.raises(ValueError, match="weights must be"):
        d.ierf_of(tap, weights[:, :, :1])
