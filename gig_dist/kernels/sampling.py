"""Choosing which PFVs of an image go into concept discovery (method.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gig_dist.kernels.taps import as_feature_map, capture


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


def grad_x_act(model: nn.Module, images: torch.Tensor, taps: Sequence[str], classes: torch.Tensor) -> dict[str, torch.Tensor]:
    """``<dy_c / da_p, a_p>`` for every PFV of every tap: {tap: (N, H, W)}, one backward pass."""
    x = images.detach()
    with torch.enable_grad(), capture(model, taps) as outputs:
        logits = model(x.requires_grad_(True))
        maps = [as_feature_map(tap, outputs[tap]) for tap in taps]
        grads = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), maps)
    return {tap: (g * a).sum(1).detach() for tap, g, a in zip(taps, grads, maps)}
