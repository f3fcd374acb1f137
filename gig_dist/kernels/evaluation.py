"""Insertion and deletion of concepts (docs/method.md section 7): do the concepts an attribution ranks
first matter most to the model?

For one image at a tap with sparse codes ``U`` over concepts ``V``, an *ordering* ranks the
image's active concepts. For fractions ``f = 0, 1/F, ..., 1`` of them:

* insertion keeps only the first ``round(f n)`` concepts' codes (from zero codes up);
* deletion removes them (from the full codes down);

``round`` is numpy's, which rounds halves to the even integer (``round(0.5 * 5) = 2``,
``round(0.5 * 7) = 4``, ``round(0.3 * 5) = 2``): a recomputation that rounds halves up counts one
concept more at such points, on images with an odd number of active concepts (:func:`counts`);

the reconstruction ``X~`` of what is kept runs through the rest of the network to a readout: the
softmax probability of the class (C-Insertion / C-Deletion), or for a concept ``m`` of a later
tap ``max_q <a^b_q, v_m>`` divided by its value at full reconstruction (inter-layer). The area
under each curve is taken by the trapezoid rule; the score is ``AUC_ins - AUC_del``: high when the
first concepts carry the output.

Orderings: ``gig`` (the image's GIG to the target), ``random``, ``code_mass`` (the sum of the
concept's code values over positions) and ``grad_x_code`` (one step: the gradient at the full
reconstruction times the code, the 1-step right-rule GIG).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

ORDERINGS = ("gig", "random", "code_mass", "grad_x_code")
#: The absolute form: the first k concepts inserted or deleted, whatever an image's number of
#: active concepts (k past it counts them all). Dictionaries that use more concepts per image are
#: not favoured here as they are by fractions, where a tenth of more concepts is more concepts.
COUNTS = (0, 1, 2, 4, 8, 16, 32)


def count_grid(active: int) -> np.ndarray:
    """The concepts the absolute form inserts or deletes at each point of :data:`COUNTS`."""
    return np.minimum(np.asarray(COUNTS), active)


def count_score(insertion: np.ndarray, deletion: np.ndarray) -> np.ndarray:
    """The absolute form's score: the mean over the points k = 1, 2, 4, ..., 32 of insertion(k)
    minus deletion(k) (last axis: the COUNTS points, k = 0 left out)."""
    return (np.asarray(insertion)[..., 1:] - np.asarray(deletion)[..., 1:]).mean(axis=-1)


def fractions(steps: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, steps + 1)


def counts(steps: int, active: int) -> np.ndarray:
    """How many of ``active`` concepts each fraction inserts or deletes: ``round(f n)``, halves
    to even (numpy's rounding)."""
    return np.round(fractions(steps) * active).astype(int)


def auc(curves: np.ndarray, steps: int | None = None) -> np.ndarray:
    """Trapezoid-rule area under curves sampled at ``fractions`` (last axis)."""
    x = fractions(curves.shape[-1] - 1 if steps is None else steps)
    return np.trapezoid(curves, x, axis=-1)


def rank(scores: np.ndarray, active: np.ndarray) -> np.ndarray:
    """The active concepts by decreasing score (ties: smaller concept index first)."""
    active = np.asarray(active)
    return active[np.lexsort((active, -np.asarray(scores)[active]))]


def code_mass(index: np.ndarray, value: np.ndarray, k: int) -> np.ndarray:
    used = index >= 0
    return np.bincount(index[used], weights=value[used], minlength=k)


def random_scores(k: int, seed: int, image: int) -> np.ndarray:
    return np.random.default_rng([seed, image]).random(k)


@torch.no_grad()
def curves(forward: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor, value: torch.Tensor,
           dictionary: torch.Tensor, shape: tuple[int, int, int], order: np.ndarray, steps: int,
           batch: int = 16, kept: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Insertion and deletion curves (steps + 1,) each for one image: codes ``index``/``value``
    (P, L), concepts ``dictionary`` (K, C), tap ``shape`` (C, H, W), ``order`` of its active
    concepts; ``forward`` maps reconstructions (B, C, H, W) to readouts (B,). ``kept``: the
    numbers of concepts at each point (default: the fractions' :func:`counts`)."""
    channels, height, width = shape
    kept = counts(steps, len(order)) if kept is None else np.asarray(kept)
    position = torch.full((len(dictionary),), len(order), dtype=torch.int64, device=index.device)
    position[torch.as_tensor(np.ascontiguousarray(order), dtype=torch.int64, device=index.device)] = torch.arange(
        len(order), device=index.device)
    rank_of_slot = position[index.clamp_min(0)]  # (P, L): each slot's concept's place in the order
    live = (index >= 0) & (value != 0)
    masks = []
    for k in kept:
        first = rank_of_slot < int(k)
        masks.append(live & first)  # insertion: the first k
    for k in kept:
        masks.append(live & ~(rank_of_slot < int(k)))  # deletion: all but the first k
    mask = torch.stack(masks).to(value.dtype)  # (2F, P, L)
    vectors = dictionary[index.clamp_min(0)]  # (P, L, C)
    out = []
    for first in range(0, len(mask), batch):
        x = torch.einsum("bpl,plc->bpc", mask[first : first + batch] * value, vectors)
        x = x.transpose(1, 2).reshape(-1, channels, height, width)
        out.append(forward(x).to(torch.float64))
    readout = torch.cat(out).cpu().numpy()
    return readout[: len(kept)], readout[len(kept) :]


def class_probability(cls: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Readout of logits: the softmax probability of ``cls``."""
    return lambda logits: torch.softmax(logits.to(torch.float64), dim=1)[:, cls]


def concept_peak(vector: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Readout of a feature map (B, C, H, W): ``max_q <a_q, v_m>``."""
    return lambda a: torch.einsum("bchw,c->bhw", a, vector.to(a.dtype)).flatten(1).max(dim=1).values


def mean_interval(values: np.ndarray) -> tuple[float, float, int]:
    """Mean and the half-width of its 95 % confidence interval (normal approximation), over the
    finite values; and how many there were."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), 0
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half), len(values)


#: Object-mask values (0 background, 1 the labelled object, 2 the distractor) -> region index
#: (0 own object, 1 distractor, 2 background), the order of ``store.evaluation.GROUND_REGIONS``.
REGION_OF_OBJECT = np.array([2, 0, 1])


def concept_weights(index: np.ndarray, value: np.ndarray, concepts: np.ndarray, size: tuple[int, int],
                    width: int) -> np.ndarray:
    """Each concept's code map over an image's positions, normalised to sum 1: (width, H, W),
    rows past ``len(concepts)`` zero. ``index``/``value`` (P, L) are the image's codes; every
    concept must be active in it."""
    maps = np.zeros((max(width, len(concepts)), *size), dtype=np.float64)
    for row, k in enumerate(concepts):
        u = np.where(index == k, value, 0).sum(1)
        if not u.sum() > 0:
            raise ValueError(f"concept {k} is not active in this image")
        maps[row] = (u / u.sum()).reshape(size)
    return maps


def region_shares(maps: np.ndarray, regions: np.ndarray, count: int) -> np.ndarray:
    """The mass of each iERF map (n, H, W) on each region of ``regions`` (H, W; values
    0..count-1): (n, count), rows summing to the maps' sums."""
    return np.stack([np.bincount(regions.ravel(), weights=m.ravel(), minlength=count) for m in maps]) \
        if len(maps) else np.zeros((0, count))
