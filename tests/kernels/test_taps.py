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


class TinyViT(torch.nn.Module):
    """A vision transformer in miniature: patch embedding, a class token and a register token, a
    trunk of pre-norm blocks (``blocks.N``), a head on the class token."""

    num_prefix_tokens = 2

    def __init__(self, dim: int = 16, depth: int = 3, patch: int = 8, image: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.prefix = torch.nn.Parameter(torch.randn(1, 2, dim) * 0.1)
        self.pos = torch.nn.Parameter(torch.randn(1, 2 + (image // patch) ** 2, dim) * 0.1)
        self.blocks = torch.nn.Sequential(*[TinyBlock(dim) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.prefix.expand(len(x), -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class TinyBlock(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_layouts_of_maps_channels_last_tokens_and_vectors():
    from gig_dist.kernels.taps import TapLayout, layout_of

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    tokens = torch.cat([torch.full((2, 1, 3), -1.0), x.flatten(2).transpose(1, 2)], dim=1)  # a class token first
    assert layout_of("a", x) == TapLayout("nchw") and layout_of("a", nhwc) == TapLayout("nhwc")
    assert layout_of("a", tokens, prefix_tokens=1) == TapLayout("tokens", 1, (4, 4))
    assert layout_of("a", x.flatten(2).transpose(1, 2)) == TapLayout("tokens", 0, (4, 4))  # 16 tokens: a grid
    for layout, native in ((TapLayout("nhwc"), nhwc), (TapLayout("tokens", 1, (4, 4)), tokens)):
        assert torch.equal(layout.to_map(native), x)  # every later stage sees the same PFVs
        assert torch.equal(layout.from_map(x, like=native), native)  # and the prefix tokens come back untouched
    assert torch.equal(pfvs(TapLayout("tokens", 1, (4, 4)).to_map(tokens)), tokens[:, 1:])  # patch tokens, in order
    with pytest.raises(TapError, match="17 tokens, which are no square grid of patches; .* set model.prefix_tokens"):
        layout_of("a", tokens)
    with pytest.raises(TapError, match="after 2 prefix tokens, 15 do not factor into a square grid"):
        layout_of("a", tokens, prefix_tokens=2)


def test_a_vits_token_taps_are_its_blocks_with_their_prefix_tokens_kept_apart():
    from gig_dist.kernels.taps import TapLayout, probe

    model = TinyViT().eval()
    taps = resolve_taps(model, None)
    assert taps == ["blocks.0", "blocks.1", "blocks.2"]
    shapes, outputs, layouts = probe(model, taps, (32, 32))
    assert (shapes["blocks.1"].channels, shapes["blocks.1"].height, shapes["blocks.1"].width, outputs) == (16, 4, 4, 5)
    assert layouts["blocks.1"] == TapLayout("tokens", 2, (4, 4))


@pytest.mark.parametrize("target", ["blocks.2", "logits"])
def test_gig_cut_along_a_trunk_equals_the_whole_model_with_the_tap_replaced(target):
    """The cut runs only the blocks between the taps (and the model's own tail for the logits);
    it must give exactly the attributions of running the whole model with the source replaced,
    the image's prefix tokens held as they are."""
    from gig_dist.kernels.gig import GIG
    from gig_dist.kernels.taps import probe

    torch.manual_seed(0)
    model = TinyViT().eval()
    _, _, layouts = probe(model, ["blocks.0", "blocks.2"], (32, 32))
    V = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    index, value = torch.randint(0, 10, (16, 3)), torch.rand(16, 3)
    image = torch.randn(3, 32, 32)
    W = None if target == "logits" else V
    targets = torch.tensor([0, 3])
    found = {}
    for cut in (True, False):
        kernel = GIG(model, "blocks.0", target, V, (16, 4, 4), W, steps=32, rule="power",
                     layouts=(layouts["blocks.0"], layouts.get(target)), cut=cut)
        assert kernel.subnet.mode == ("trunk" if cut else "hook")
        found[cut] = kernel.attribute(index, value, targets, endpoints=True, image=image)
    assert torch.allclose(found[True].attribution, found[False].attribution, rtol=1e-5, atol=1e-7)
    assert torch.allclose(found[True].delta, found[False].delta, rtol=1e-6, atol=1e-8)
    assert float(found[True].gap.abs().max()) < 0.01  # completeness, with the power rule


def test_the_power_rule_restores_completeness_where_layer_norms_jump_near_the_baseline():
    """Scale-invariant layer norms make F(alpha X) jump near alpha = 0, where evenly spaced steps
    never look: the midpoint rule misses the jump at any step count, the power rule integrates it."""
    from gig_dist.kernels.gig import GIG
    from gig_dist.kernels.taps import probe

    torch.manual_seed(1)
    model = TinyViT().eval()
    _, _, layouts = probe(model, ["blocks.0"], (32, 32))
    V = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    index, value = torch.randint(0, 10, (16, 3)), 20 * torch.rand(16, 3)  # its LN jumps at alpha ~ 1e-3
    image, targets = torch.randn(3, 32, 32), torch.arange(5)
    gaps = {}
    for rule, steps in (("midpoint", 32), ("midpoint", 128), ("power", 32)):
        kernel = GIG(model, "blocks.0", "logits", V, (16, 4, 4), steps=steps, rule=rule,
                     layouts=(layouts["blocks.0"], None))
        gaps[rule, steps] = float(kernel.attribute(index, value, targets, endpoints=True, image=image).gap.abs().median())
    assert gaps["power", 32] < 0.01 < gaps["midpoint", 128] <= 2 * gaps["midpoint", 32], gaps
