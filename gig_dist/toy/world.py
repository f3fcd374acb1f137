"""The toy world: procedurally generated objects made of parts, with ground-truth part masks.

Every image is a pure function of ``(seed, index)``, so any image of any split can be made on
any worker without generating the ones before it. Each class is an object built from 2-3 parts
of a shared part vocabulary; classes share parts, so a model has to compose parts to classify.
Position, scale, colour and background texture are jittered.

The part mask labels every pixel with the part drawn on top there (0 = background), which makes
the toy world the ground truth for concept recovery.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

#: Part vocabulary. Index 0 of a mask is background, so part ``i`` is mask value ``i + 1``.
PART_NAMES: tuple[str, ...] = (
    "red disk",
    "blue square",
    "green triangle",
    "yellow ring",
    "striped bar",
    "checker patch",
    "purple cross",
    "orange diamond",
)

_PART_COLOURS = np.array(
    [
        [0.85, 0.15, 0.15],  # red disk
        [0.15, 0.30, 0.90],  # blue square
        [0.15, 0.75, 0.25],  # green triangle
        [0.95, 0.85, 0.10],  # yellow ring
        [0.95, 0.95, 0.95],  # striped bar (light stripes, dark between)
        [0.10, 0.10, 0.10],  # checker patch (dark squares, light between)
        [0.60, 0.20, 0.75],  # purple cross
        [1.00, 0.55, 0.05],  # orange diamond
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class ObjectClass:
    name: str
    #: (part index, dy, dx): part centres relative to the object centre, in units of part size.
    parts: tuple[tuple[int, float, float], ...]


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("lollipop", ((0, -0.7, 0.0), (4, 0.7, 0.0))),
    ObjectClass("cart", ((1, -0.6, 0.0), (0, 0.7, -0.6), (0, 0.7, 0.6))),
    ObjectClass("house", ((2, -0.75, 0.0), (1, 0.6, 0.0))),
    ObjectClass("target", ((3, 0.0, -0.7), (6, 0.0, 0.7))),
    ObjectClass("flag", ((5, -0.5, 0.4), (4, 0.2, -0.6), (2, 0.9, 0.4))),
    ObjectClass("signpost", ((7, -0.7, 0.0), (4, 0.7, 0.0))),
    ObjectClass("robot", ((1, -0.7, 0.0), (6, 0.6, -0.6), (7, 0.6, 0.6))),
    ObjectClass("kite", ((7, -0.5, -0.5), (5, 0.5, 0.5), (3, -0.5, 0.6))),
)

CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
NUM_CLASSES = len(CLASSES)
NUM_PARTS = len(PART_NAMES)

#: Per-channel mean and std of toy images, used to normalise model inputs.
TOY_MEAN = (0.5, 0.5, 0.5)
TOY_STD = (0.25, 0.25, 0.25)


def _part_shape(part: int, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Boolean footprint of ``part`` on a grid of offsets (dy, dx) from its centre."""
    ady, adx = np.abs(dy), np.abs(dx)
    r = np.hypot(dy, dx)
    if part == 0:  # disk
        return r <= radius
    if part == 1:  # square
        return np.maximum(ady, adx) <= radius * 0.85
    if part == 2:  # triangle, apex up
        return (dy <= radius * 0.8) & (dy >= -radius) & (adx <= (dy + radius) * 0.6)
    if part == 3:  # ring
        return (r <= radius) & (r >= radius * 0.55)
    if part == 4:  # bar, wide and short
        return (adx <= radius * 1.2) & (ady <= radius * 0.45)
    if part == 5:  # square patch (textured below)
        return np.maximum(ady, adx) <= radius * 0.8
    if part == 6:  # cross
        arm = radius * 0.3
        return ((adx <= arm) & (ady <= radius)) | ((ady <= arm) & (adx <= radius))
    if part == 7:  # diamond
        return ady + adx <= radius
    raise ValueError(f"unknown part index {part}")


def _part_colour(part: int, dy: np.ndarray, dx: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """RGB of ``part`` at offsets (dy, dx): flat colour, or its texture."""
    shape = dy.shape + (3,)
    if part == 4:  # stripes across the bar
        light = (np.floor(dx / 2.5).astype(int) % 2) == 0
        return np.where(light[..., None], colour, colour * 0.2)
    if part == 5:  # checkerboard
        dark = ((np.floor(dy / 3.0) + np.floor(dx / 3.0)).astype(int) % 2) == 0
        return np.where(dark[..., None], colour, 1.0 - colour)
    return np.broadcast_to(colour, shape)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus faint noise: texture without object-like structure."""
    coarse = rng.uniform(0.2, 0.8, size=(4, 4, 3)).astype(np.float32)
    # Bilinear upsampling of a 4x4 grid gives low-frequency blobs.
    grid = np.linspace(0, 3, size, dtype=np.float32)
    i0 = np.clip(np.floor(grid).astype(int), 0, 2)
    t = (grid - i0)[:, None]
    rows = coarse[i0] * (1 - t[..., None]) + coarse[i0 + 1] * t[..., None]  # (size, 4, 3)
    cols = rows[:, i0] * (1 - t.T[..., None]) + rows[:, i0 + 1] * t.T[..., None]
    noise = rng.normal(0.0, 0.04, size=(size, size, 3)).astype(np.float32)
    return cols * 0.7 + 0.15 + noise


def toy_label(seed: int, index: int) -> int:
    """The class of toy image ``index`` without rendering it."""
    return int(np.random.default_rng([seed, index]).integers(NUM_CLASSES))


@dataclass(frozen=True)
class Scene:
    """A toy image with its ground truth: ``part_mask`` (0 background, part i: i + 1) and
    ``object_mask`` (0 background, 1 the labelled object, 2 the distractor), both (H, W) uint8."""

    image: np.ndarray
    part_mask: np.ndarray
    object_mask: np.ndarray
    label: int
    distractor: int  # the distractor's class, -1 without one


def _draw_object(image: np.ndarray, part_mask: np.ndarray, object_mask: np.ndarray, rng: np.random.Generator,
                 obj: ObjectClass, centre: np.ndarray, part_radius: float, object_id: int) -> None:
    size = image.shape[0]
    span = part_radius * 2.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for part, oy, ox in obj.parts:
        cy = centre[0] + oy * span + rng.normal(0, 0.6)
        cx = centre[1] + ox * span + rng.normal(0, 0.6)
        dy, dx = ys - cy, xs - cx
        footprint = _part_shape(part, dy, dx, part_radius)
        colour = np.clip(_PART_COLOURS[part] + rng.normal(0, 0.07, size=3), 0, 1).astype(np.float32)
        image[footprint] = _part_colour(part, dy, dx, colour)[footprint]
        part_mask[footprint] = part + 1
        object_mask[footprint] = object_id


def render_scene(seed: int, index: int, size: int = IMAGE_SIZE, distractor: bool = False) -> Scene:
    """Toy image ``index`` of world ``seed``; with ``distractor``, the same image (background and
    object drawn from the same random stream) plus a smaller object of another class, drawn first
    (the labelled object stays whole on top), in the corner diagonally away from the object."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(NUM_CLASSES))  # the first draw, as in toy_label
    image = _background(rng, size)
    part_mask = np.zeros((size, size), dtype=np.uint8)
    object_mask = np.zeros((size, size), dtype=np.uint8)
    part_radius = size * rng.uniform(0.09, 0.13)
    centre = rng.uniform(0.35, 0.65, size=2) * size
    other = -1
    if distractor:
        extra = np.random.default_rng([seed, index, 1])  # its own stream: the main image is unchanged
        other = int((label + extra.integers(1, NUM_CLASSES)) % NUM_CLASSES)
        corner = np.where(centre < size / 2, 0.8, 0.2) * size + extra.normal(0, 0.02 * size, size=2)
        _draw_object(image, part_mask, object_mask, extra, CLASSES[other], corner, part_radius * 0.75, 2)
    _draw_object(image, part_mask, object_mask, rng, CLASSES[label], centre, part_radius, 1)
    return Scene(np.clip(image, 0.0, 1.0), part_mask, object_mask, label, other)


def render(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """Make toy image ``index`` of the world ``seed``.

    Returns ``(image_HWC, part_mask_HW, label)``: float32 RGB in [0, 1], uint8 part ids
    (0 = background, ``i + 1`` = ``PART_NAMES[i]``) and the class index.
    """
    scene = render_scene(seed, index, size)
    return scene.image, scene.part_mask, scene.label


def render_batch(seed: int, indices, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, H, W, 3), masks (N, H, W) and labels (N,) for ``indices`` of world ``seed``."""
    made = [render(seed, int(i), size) for i in indices]
    return (
        np.stack([m[0] for m in made]),
        np.stack([m[1] for m in made]),
        np.array([m[2] for m in made], dtype=np.int64),
    )
