"""Choosing which PFVs of an image go into concept discovery (docs/method.md section 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from gig_dist.kernels.taps import TapLayout, as_feature_map, capture


def draw_positions(scores: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct positions out of ``len(scores)``, with probability proportional to
    ``max(score, 0)`` (NaN counts as 0); uniform where no score is positive. Positions with a
    positive score come first when fewer of them than ``count`` exist."""
    weights = np.maximum(np.nan_to_num(scores, nan=0.0), 0.0).astype(np.float64)
    positions = len(weights)
    count = min(count, positions)
    positive = np.flatnonzero(weights > 0)
    if positive.size == 0:
        return rng.choice(positions, size=count, replace=False)
    if positive.size <= count:
        rest = np.setdiff1d(np.arange(positions), positive)
        return np.concatenate([rng.permutation(positive), rng.choice(rest, size=count - positive.size, replace=False)])
    return rng.choice(positions, size=count, replace=False, p=weights / weights.sum())


def grad_x_act(model: nn.Module, images: torch.Tensor, taps: Sequence[str], classes: torch.Tensor,
               layouts: Mapping[str, TapLayout | None] | None = None) -> dict[str, torch.Tensor]:
    """``<dy_c / da_p, a_p>`` for every PFV of every tap: {tap: (N, H, W)}, one backward pass.
    ``layouts``: each tap's output layout (tokens: the prefix tokens get no score)."""
    layouts = layouts or {}
    x = images.detach()
    with torch.enable_grad(), capture(model, taps) as outputs:
        logits = model(x.requires_grad_(True))
        raw = [outputs[tap] for tap in taps]
        grads = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), raw)
    found = {}
    for tap, g, a in zip(taps, grads, raw):
        layout = layouts.get(tap)
        found[tap] = (as_feature_map(tap, g, layout) * as_feature_map(tap, a, layout)).sum(1).detach()
    return found
