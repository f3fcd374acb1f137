import pytest
import torch
import torchvision

from gig_dist.kernels.taps import (
    TapError,
    capture,
    pfvs,
    probe_model,
    resolve_taps,
    tap_shapes,
)
from gig_dist.toy.model import ToyResNet

pytestmark = pytest.mark.fast

RESNET50_STAGES = {"layer1": (256, 56, 3), "layer2": (512, 28, 4), "layer3": (1024, 14, 6), "layer4": (2048, 7, 3)}
RESNET18_STAGES = {"layer1": (64, 56, 2), "layer2": (128, 28, 2), "layer3": (256, 14, 2), "layer4": (512, 7, 2)}


@pytest.mark.parametrize(("name", "stages"), [("resnet18", RESNET18_STAGES), ("resnet50", RESNET50_STAGES)])
def test_resnet_tap_shapes_without_a_dataset(name, stages):
    model = torchvision.models.get_model(name, weights=None)
    taps = resolve_taps(model, None)
    expected = {
        f"{stage}.{block}": (channels, size, size)
        for stage, (channels, size, blocks) in stages.items()
        for block in range(blocks)
    }
    assert taps == list(expected)  # forward order, every residual block
    shapes = tap_shapes(model, taps, (224, 224))
    assert {t: (s.channels, s.height, s.width) for t, s in shapes.items()} == expected


def test_toy_taps_and_output_count():
    model = ToyResNet().eval()
    taps = resolve_taps(model, None)
    assert taps == ["layer1.0", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    shapes, outputs = probe_model(model, taps, (64, 64))
    assert (shapes["layer1.0"].channels, shapes["layer1.0"].height) == (64, 32)
    assert (shapes["layer3.1"].channels, shapes["layer3.1"].positions) == (256, 64)
    assert outputs == 8


def test_unknown_tap_lists_valid_names():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(TapError) as info:
        resolve_taps(model, ["layer1.0", "layer5.0"])
    message = str(info.value)
    assert "'layer5.0'" in message and "did you mean" in message
    assert "layer1.0, layer1.1, layer2.0" in message and "layer4.1" in message


def test_duplicate_taps_rejected():
    with pytest.raises(TapError, match="more than once"):
        resolve_taps(ToyResNet(), ["layer1.0", "layer1.0"])


def test_any_module_name_is_a_valid_tap():
    model = torchvision.models.resnet18(weights=None)
    assert resolve_taps(model, ["layer2.1.conv1", "avgpool"]) == ["layer2.1.conv1", "avgpool"]


def test_model_without_residual_blocks_needs_explicit_taps():
    model = torchvision.models.vgg11(weights=None)
    with pytest.raises(TapError, match="name the taps"):
        resolve_taps(model, None)


def test_one_forward_reads_every_tap_and_pfv_layout_is_row_major():
    torch.manual_seed(0)
    model = ToyResNet().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        with capture(model, ["layer1.0", "layer3.1"]) as outputs:
            logits = model(x)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        layer1 = model.layer1[0](stem)
    assert torch.equal(outputs["layer1.0"], layer1)
    assert logits.shape == (3, 8)
    vectors = pfvs(layer1)  # (N, H*W, C)
    assert vectors.shape == (3, 32 * 32, 64)
    h, w = 5, 17
    assert torch.equal(vectors[1, h * 32 + w], layer1[1, :, h, w])


def test_convert_runs_before_inplace_ops_change_the_tap():
    # bn1 is followed by an in-place ReLU: without a copy in the hook the tap would be rectified.
    model = ToyResNet().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with capture(model, ["bn1"], convert=lambda t: t.clone()) as outputs:
            model(x)
        expected = model.bn1(model.conv1(x))
    assert (outputs["bn1"] < 0).any()
    assert torch.allclose(outputs["bn1"], expected)
