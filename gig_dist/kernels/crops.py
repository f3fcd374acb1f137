"""Crops of an image around an iERF's mass, with the iERF overlaid (pure numpy and PIL)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def ierf_box(ierf: np.ndarray, min_side: int, spread: float = 4.0) -> tuple[int, int, int, int]:
    """A square box (y0, x0, y1, x1) centred on the iERF's mass, ``spread`` standard deviations
    wide, at least ``min_side``, moved (not cut) to lie inside the image."""
    height, width = ierf.shape
    mass = np.clip(ierf, 0, None).astype(np.float64)
    total = mass.sum()
    if total <= 0:
        return 0, 0, height, width
    ys, xs = np.mgrid[0:height, 0:width]
    cy, cx = (mass * ys).sum() / total, (mass * xs).sum() / total
    sigma = np.sqrt((mass * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum() / total / 2)
    side = int(np.clip(round(spread * sigma), min_side, min(height, width)))
    y0 = int(np.clip(round(cy - side / 2), 0, height - side))
    x0 = int(np.clip(round(cx - side / 2), 0, width - side))
    return y0, x0, y0 + side, x0 + side


def overlay(image: np.ndarray, ierf: np.ndarray, floor: float = 0.3) -> np.ndarray:
    """The image (H, W, 3) in [0, 1] dimmed where the iERF is weak: brightness ``floor`` at zero
    mass, full at the iERF's maximum."""
    peak = ierf.max()
    heat = np.clip(ierf / peak, 0, 1) if peak > 0 else np.zeros_like(ierf)
    return image * (floor + (1 - floor) * heat[..., None])


def member_crop(image: np.ndarray, ierf: np.ndarray, size: int, min_side: int) -> tuple[np.ndarray, tuple]:
    """The overlaid crop (size, size, 3) uint8 of ``image`` around ``ierf``, and its box."""
    y0, x0, y1, x1 = box = ierf_box(ierf, min_side)
    shown = overlay(image[y0:y1, x0:x1], ierf[y0:y1, x0:x1])
    picture = Image.fromarray(np.round(np.clip(shown, 0, 1) * 255).astype(np.uint8))
    return np.asarray(picture.resize((size, size), Image.BILINEAR)), box


#: Side of the stored iERF heat map of a member (its whole input, area-averaged).
HEAT_SIDE = 32


def heat_map(ierf: np.ndarray, side: int = HEAT_SIDE) -> np.ndarray:
    """The iERF's positive mass over the whole input, area-averaged to (side, side), as uint8
    relative to its peak (255): what a reader draws as a contour on the whole image."""
    mass = np.clip(np.asarray(ierf, dtype=np.float32), 0, None)
    small = np.asarray(Image.fromarray(mass, mode="F").resize((side, side), Image.BOX))
    peak = small.max()
    return np.round(255 * small / peak).astype(np.uint8) if peak > 0 else np.zeros((side, side), np.uint8)
