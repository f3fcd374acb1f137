"""The toy classifier: a small ResNet assembled from torchvision's own ``Bottleneck`` blocks.

It keeps torchvision's ResNet attribute names (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layerN``, ``avgpool``, ``fc``) and its block structure (downsampling 1x1-conv + BN skips at the
first block of a stage, identity skips after), so every code path written for ResNet50 runs on it.

64x64 input -> layer1 64 x 32 x 32 -> layer2 128 x 16 x 16 -> layer3 256 x 8 x 8 -> 8 logits.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from gig_dist.toy.world import NUM_CLASSES

#: (planes, blocks, stride) per stage; output channels are planes * Bottleneck.expansion (4).
TOY_STAGES: tuple[tuple[int, int, int], ...] = ((16, 1, 1), (32, 2, 2), (64, 2, 2))
STEM_WIDTH = 32
WEIGHTS_FILE = "toy_resnet.pt"


class ToyResNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = STEM_WIDTH
        for stage, (planes, blocks, stride) in enumerate(TOY_STAGES, start=1):
            layer, in_channels = _make_stage(in_channels, planes, blocks, stride)
            self.add_module(f"layer{stage}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, len(TOY_STAGES) + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_stage(in_channels: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    layers = [Bottleneck(in_channels, planes, stride=stride, downsample=downsample)]
    layers += [Bottleneck(out_channels, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_channels


def shipped_weights_path() -> Path:
    """Path of the trained toy weights that ship inside the package."""
    return Path(str(resources.files("gig_dist.toy").joinpath(WEIGHTS_FILE)))


def load_toy_model(weights: str | Path | None = "shipped") -> ToyResNet:
    """The toy model in eval mode, with the shipped weights, a local state dict, or random init."""
    model = ToyResNet()
    if weights is not None:
        path = shipped_weights_path() if weights == "shipped" else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"toy model weights not found at {path}; train them with `python -m gig_dist.toy.train`"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
