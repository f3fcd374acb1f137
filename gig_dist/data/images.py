"""Decoding one image file into RGB, or a reason why it is skipped.

Grayscale, palette, CMYK, RGBA and 16-bit images are converted to RGB (alpha is dropped, as
torchvision's own ``pil_loader`` does). Missing, empty, non-image, truncated, corrupt and absurdly
large files raise :class:`SkippedImage` with a reason a person can act on; the extraction stage
records it in the store and goes on.
"""

from __future__ import annotations

import os
import warnings

from PIL import Image, UnidentifiedImageError

#: Wider or taller images are skipped: the resize to the model's input scales the short side, so
#: a 1 x 100,000 strip became a 72 x 7,200,000 tensor (2.8 GB) from a 300 KB file. Panoramas
#: stay well inside (about 6:1).
MAX_ASPECT_RATIO = 20


class SkippedImage(Exception):
    """An input that cannot be used; ``str(exc)`` is the reason stored for it."""


def allow_pixels(max_pixels: int) -> None:
    """Raise PIL's process-wide bomb limit when the configured limit is higher (never lower it)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_rgb(path: str, max_pixels: int) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB image."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise SkippedImage("file not found") from None
    except OSError as exc:
        raise SkippedImage(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise SkippedImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
                    raise SkippedImage(
                        f"too thin: {width}x{height} has an aspect ratio over {MAX_ASPECT_RATIO}:1, and resizing "
                        "its short side to the model's input would blow up its long side"
                    )
                if width * height > max_pixels:
                    raise SkippedImage(
                        f"too large: {width}x{height} = {width * height} pixels exceeds "
                        f"dataset.max_image_pixels = {max_pixels}"
                    )
                image.load()  # decode now, so truncated data fails here and not later
                return image.convert("RGB")
    except SkippedImage:
        raise
    except Image.DecompressionBombError:
        # PIL refuses to even open images over twice its own limit, before our check can run.
        raise SkippedImage(
            f"too large: over PIL's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, and "
            f"dataset.max_image_pixels = {max_pixels}"
        ) from None
    except UnidentifiedImageError:
        raise SkippedImage("not an image: no image format recognises this file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL signals truncated data with OSError ("image file is truncated") and broken
        # headers or streams with SyntaxError/ValueError/EOFError, depending on the format.
        raise SkippedImage(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None
