"""Taps: the layers whose outputs are read, and reading many of them in one forward pass.

A tap is a module name (``layer3.2``); its output ``A^l`` (N, C, H, W) gives ``H*W`` pointwise
feature vectors (PFVs) of width C per image. The default taps are the residual block outputs
(after the block's final ReLU), as in method.md section 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

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


def residual_block_names(model: nn.Module) -> list[str]:
    """Names of the outermost residual blocks, in forward (registration) order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, RESIDUAL_BLOCK_TYPES) and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def resolve_taps(model: nn.Module, requested: Sequence[str] | None) -> list[str]:
    """Validate tap names against the model; ``None`` means every residual block output."""
    blocks = residual_block_names(model)
    if requested is None:
        if not blocks:
            raise TapError(
                f"{type(model).__name__} has no residual blocks that gig-dist recognises; "
                "name the taps in the config (taps: [...]); `gig-dist taps --all` lists every module"
            )
        return blocks
    modules = dict(model.named_modules())
    unknown = [name for name in requested if name not in modules or name == ""]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TapError(
            f"unknown tap {', '.join(hints)} in {type(model).__name__}. Valid residual block outputs: "
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


def as_feature_map(name: str, output: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) view of a tap output; (N, C) vectors count as 1x1 maps."""
    if output.dim() == 4:
        return output
    if output.dim() == 2:
        return output[:, :, None, None]
    raise TapError(
        f"tap {name!r} outputs shape {tuple(output.shape)}; gig-dist reads (N, C, H, W) feature maps "
        "or (N, C) vectors"
    )


@torch.no_grad()
def probe_model(model: nn.Module, taps: Sequence[str], input_size: tuple[int, int]) -> tuple[dict[str, TapShape], int]:
    """Per-image output shape of each tap, in the order the taps run in a forward pass, and the
    number of model outputs, from one forward pass of a blank image: no dataset needed."""
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
    shapes = {}
    for name in outputs:  # in the order the hooks first fired: forward order
        _, c, h, w = as_feature_map(name, outputs[name]).shape
        shapes[name] = TapShape(int(c), int(h), int(w))
    return shapes, int(logits.reshape(1, -1).shape[1])


def tap_shapes(model: nn.Module, taps: Sequence[str], input_size: tuple[int, int]) -> dict[str, TapShape]:
    """Per-image output shape (C, H, W) of each tap, without a dataset."""
    return probe_model(model, taps, input_size)[0]


def pfvs(feature_map: torch.Tensor) -> torch.Tensor:
    """Feature map (N, C, H, W) -> PFVs (N, H*W, C), positions in row-major (h, w) order."""
    n, c, h, w = feature_map.shape
    return feature_map.reshape(n, c, h * w).transpose(1, 2)
