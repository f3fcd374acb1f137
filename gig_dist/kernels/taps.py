"""Taps: the layers whose outputs are read, and reading many of them in one forward pass.

A tap is a module name (``layer3.2``); its output gives ``H*W`` pointwise feature vectors (PFVs)
of width C per image, whatever its layout (:class:`TapLayout`): a feature map (N, C, H, W), a
channels-last map (N, H, W, C) (timm's and torchvision's Swin), tokens (N, T, D) whose last H*W
lie on the image's patch grid after ``prefix`` class and register tokens (vision transformers),
or vectors (N, C) as 1 x 1 maps. Every later stage sees PFVs on a grid.

The default taps are the outputs of a model's blocks: the residual blocks of torchvision's
CNNs (after the block's final ReLU, as in docs/method.md section 1), else the children of its trunk,
the sequence of blocks it is built around (timm's ``blocks.N`` and ``stages.N``, ViTs'
``blocks.N``, torchvision ViT's ``encoder.layers.encoder_layer_N``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import convnext, efficientnet, mobilenetv2, regnet, resnet

#: Module types whose output is a residual block output. The outermost match wins.
RESIDUAL_BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    resnet.BasicBlock,
    resnet.Bottleneck,
    mobilenetv2.InvertedResidual,
    efficientnet.MBConv,
    efficientnet.FusedMBConv,
    convnext.CNBlock,
    regnet.ResBottleneckBlock,
)


class TapError(ValueError):
    """A tap name that does not exist in the model, or a tap whose output is not a feature map."""


@dataclass(frozen=True)
class TapShape:
    """Shape of one tap's output for one image: ``channels`` x ``height`` x ``width``."""

    channels: int
    height: int
    width: int

    @property
    def positions(self) -> int:
        return self.height * self.width


#: Where models keep the sequence of blocks they are built around, tried in order.
TRUNKS = ("blocks", "stages", "encoder.layers", "layers", "features")


def residual_block_names(model: nn.Module) -> list[str]:
    """Names of the outermost residual blocks, in forward (registration) order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, RESIDUAL_BLOCK_TYPES) and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def trunk_of(model: nn.Module) -> str | None:
    """The model's trunk: its first container in :data:`TRUNKS` of at least two children that
    are blocks themselves (a ``features`` of single layers, as VGG's, is no trunk)."""
    modules = dict(model.named_modules())
    for name in TRUNKS:
        trunk = modules.get(name)
        if not isinstance(trunk, (nn.Sequential, nn.ModuleList)) or len(trunk) < 2:
            continue
        if name == "features" and not all(len(list(child.children())) > 0 for child in trunk):
            continue
        return name
    return None


def block_names(model: nn.Module) -> list[str]:
    """The default taps: torchvision's residual blocks, else the children of the model's trunk."""
    blocks = residual_block_names(model)
    if blocks:
        return blocks
    trunk = trunk_of(model)
    return [f"{trunk}.{child}" for child, _ in dict(model.named_modules())[trunk].named_children()] if trunk else []


def no_blocks_message(model: nn.Module) -> str:
    """Why no default taps were found, and where to look."""
    return (f"{type(model).__name__} has no residual blocks that gig-dist recognises and no trunk of blocks (a "
            f"container named {', '.join(TRUNKS)}); name the taps in the config (taps: [...]); `gig-dist taps --all` "
            "lists every module with its output")


def resolve_taps(model: nn.Module, requested: Sequence[str] | None) -> list[str]:
    """Validate tap names against the model; ``None`` means every block output (:func:`block_names`)."""
    blocks = block_names(model)
    if requested is None:
        if not blocks:
            raise TapError(no_blocks_message(model))
        return blocks
    modules = dict(model.named_modules())
    unknown = [name for name in requested if name not in modules or name == ""]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TapError(
            f"unknown tap {', '.join(hints)} in {type(model).__name__}. Its block outputs: "
            f"{', '.join(blocks) or '(none)'}; any module name also works (`gig-dist taps --all` lists them)"
        )
    if len(set(requested)) != len(requested):
        raise TapError(f"taps are listed more than once: {list(requested)}")
    return list(requested)


@contextmanager
def capture(model: nn.Module, taps: Iterable[str], convert: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Record the outputs of ``taps`` during forward passes inside the block.

    Yields a dict filled on every forward: tap name -> output. ``convert`` runs inside the hook,
    before any later in-place op (an inplace ReLU after a BatchNorm tap, say) can change the
    tensor; extraction passes a copy-to-float16 there.
    """
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TapError(f"tap {name!r} outputs {type(output).__name__}, not a tensor")
            outputs[name] = convert(output) if convert is not None else output

        return hook

    try:
        for name in taps:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class TapLayout:
    """How a tap's output holds its PFVs: ``nchw`` (N, C, H, W), ``nhwc`` (N, H, W, C),
    ``tokens`` (N, T, D) with ``prefix`` tokens (class, registers) before an H x W patch grid
    (``grid``), or ``vector`` (N, C). :meth:`to_map` gives (N, C, H, W) for any of them;
    :meth:`from_map` the tap's own layout again (tokens take their prefix from ``like``, an
    output of the tap: it is kept apart, never mixed with the patch PFVs)."""

    kind: str = "nchw"
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)

    def to_map(self, output: torch.Tensor) -> torch.Tensor:
        if self.kind == "nchw":
            return output
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        if self.kind == "vector":
            return output[:, :, None, None]
        n, _, d = output.shape
        return output[:, self.prefix :].transpose(1, 2).reshape(n, d, *self.grid)

    def from_map(self, feature_map: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "nchw":
            return feature_map
        if self.kind == "nhwc":
            return feature_map.permute(0, 2, 3, 1)
        if self.kind == "vector":
            return feature_map.flatten(1)
        tokens = feature_map.flatten(2).transpose(1, 2)  # (N, H*W, D)
        if not self.prefix:
            return tokens
        if like is None:
            raise TapError(f"tokens with {self.prefix} prefix tokens need the tap's own output for them")
        prefix = like[:, : self.prefix].to(tokens.dtype)
        return torch.cat([prefix.expand(len(tokens), -1, -1), tokens], dim=1)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "prefix": self.prefix, "grid": list(self.grid)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TapLayout:
        return cls(data.get("kind", "nchw"), int(data.get("prefix", 0)), tuple(data.get("grid", (0, 0))))


def stored_layout(layouts: dict[str, dict[str, Any]], tap: str) -> TapLayout | None:
    """A tap's layout as a run's facts keep it (None: not kept, a map or vector read as gig-dist
    read every tap before layouts)."""
    found = layouts.get(tap)
    return TapLayout.from_json(found) if found else None


def prefix_tokens_of(model: nn.Module) -> int | None:
    """The class and register tokens a vision transformer puts before its patch tokens, where
    the model says (timm's ``num_prefix_tokens``; torchvision's ``class_token``); None elsewhere."""
    found = getattr(model, "num_prefix_tokens", None)
    if isinstance(found, int):
        return found
    if isinstance(getattr(model, "class_token", None), torch.Tensor):
        return 1
    return None


def layout_of(name: str, output: torch.Tensor, prefix_tokens: int | None = None) -> TapLayout:
    """The layout of a tap's output for one square input: 4-D maps are NCHW or NHWC by which
    two dimensions are the (equal) spatial ones (NCHW where both are); 3-D outputs are tokens, ``prefix_tokens``
    (the model's or the config's) before a square grid of patches."""
    shape = tuple(output.shape)
    if len(shape) == 2:
        return TapLayout("vector")
    if len(shape) == 4:
        _, a, b, c = shape
        if b == c:  # PyTorch's own layout, also where both would fit (C = H = W)
            return TapLayout("nchw")
        if a == b:
            return TapLayout("nhwc")
        raise TapError(f"tap {name!r} outputs shape {shape}: neither (N, C, H, W) nor (N, H, W, C) with a square "
                       "grid, for a square input")
    if len(shape) == 3:
        _, tokens, _ = shape
        prefix = prefix_tokens
        if prefix is None:
            if math.isqrt(tokens) ** 2 != tokens:
                raise TapError(f"tap {name!r} outputs {tokens} tokens, which are no square grid of patches; if some "
                               "are class or register tokens, set model.prefix_tokens")
            prefix = 0
        side = math.isqrt(max(tokens - prefix, 0))
        if prefix >= tokens or side * side != tokens - prefix:
            raise TapError(f"tap {name!r} outputs {tokens} tokens: after {prefix} prefix tokens, {tokens - prefix} do "
                           "not factor into a square grid of patches (set model.prefix_tokens to the model's class "
                           "and register tokens)")
        return TapLayout("tokens", prefix, (side, side))
    raise TapError(f"tap {name!r} outputs shape {shape}; gig-dist reads feature maps (N, C, H, W) or (N, H, W, C), "
                   "tokens (N, T, D) or vectors (N, C)")


def as_feature_map(name: str, output: torch.Tensor, layout: TapLayout | None = None) -> torch.Tensor:
    """(N, C, H, W) view of a tap output in ``layout`` (None: (N, C, H, W) maps, and (N, C)
    vectors as 1x1 maps, as gig-dist read every tap before layouts)."""
    if layout is not None:
        return layout.to_map(output)
    if output.dim() == 4:
        return output
    if output.dim() == 2:
        return output[:, :, None, None]
    raise TapError(
        f"tap {name!r} outputs shape {tuple(output.shape)}; gig-dist reads (N, C, H, W) feature maps "
        "or (N, C) vectors"
    )


def probe_model(model: nn.Module, taps: Sequence[str], input_size: tuple[int, int]) -> tuple[dict[str, TapShape], int]:
    """Per-image output shape of each tap, in the order the taps run in a forward pass, and the
    number of model outputs, from one forward pass of a blank image: no dataset needed."""
    shapes, outputs, _ = probe(model, taps, input_size)
    return shapes, outputs


@torch.no_grad()
def probe(model: nn.Module, taps: Sequence[str], input_size: tuple[int, int],
          prefix_tokens: int | None = None) -> tuple[dict[str, TapShape], int, dict[str, TapLayout]]:
    """:func:`probe_model`, and each tap's layout. ``prefix_tokens`` overrides the model's own
    count of prefix tokens for token taps."""
    device = next(model.parameters()).device
    blank = torch.zeros(1, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with capture(model, taps) as outputs:
            logits = model(blank)
    finally:
        model.train(was_training)
    silent = [name for name in taps if name not in outputs]
    if silent:
        raise TapError(f"taps {silent} never run in a forward pass of {type(model).__name__}")
    prefix = prefix_tokens if prefix_tokens is not None else prefix_tokens_of(model)
    shapes, layouts = {}, {}
    for name in outputs:  # in the order the hooks first fired: forward order
        layouts[name] = layout_of(name, outputs[name], prefix)
        _, c, h, w = layouts[name].to_map(outputs[name]).shape
        shapes[name] = TapShape(int(c), int(h), int(w))
    if not isinstance(logits, torch.Tensor):
        raise TapError(f"{type(model).__name__} returns {type(logits).__name__}, not a tensor of class scores")
    return shapes, int(logits.reshape(1, -1).shape[1]), layouts


@torch.no_grad()
def survey(model: nn.Module, names: Sequence[str], input_size: tuple[int, int],
           prefix_tokens: int | None = None) -> dict[str, tuple[TapShape, TapLayout] | str]:
    """For each module of ``names``: its PFV shape and layout as a tap, or why it is no tap (it
    never runs, runs more than once, outputs a tuple, or a shape gig-dist cannot read), from one
    forward pass of a blank image."""
    modules = dict(model.named_modules())
    seen: dict[str, list[Any]] = {name: [] for name in names}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            seen[name].append(tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__)
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    prefix = prefix_tokens if prefix_tokens is not None else prefix_tokens_of(model)
    found: dict[str, tuple[TapShape, TapLayout] | str] = {}
    for name, outputs in seen.items():
        if not outputs:
            found[name] = "never runs in a forward pass"
        elif isinstance(outputs[0], str):
            found[name] = f"outputs a {outputs[0]}, not a tensor"
        elif len(outputs) > 1:
            found[name] = f"runs {len(outputs)} times per forward pass (a shared module)"
        else:
            try:
                layout = layout_of(name, torch.empty(outputs[0], device="meta"), prefix)
                _, c, h, w = layout.to_map(torch.empty(outputs[0], device="meta")).shape
                found[name] = (TapShape(int(c), int(h), int(w)), layout)
            except TapError as exc:
                found[name] = str(exc).replace(f"tap {name!r} ", "")
    return found


def tap_shapes(model: nn.Module, taps: Sequence[str], input_size: tuple[int, int]) -> dict[str, TapShape]:
    """Per-image output shape (C, H, W) of each tap, without a dataset."""
    return probe(model, taps, input_size)[0]


def pfvs(feature_map: torch.Tensor) -> torch.Tensor:
    """Feature map (N, C, H, W) -> PFVs (N, H*W, C), positions in row-major (h, w) order."""
    n, c, h, w = feature_map.shape
    return feature_map.reshape(n, c, h * w).transpose(1, 2)
