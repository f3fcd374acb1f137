"""Decoding one image file into RGB, or a reason why it is skipped.

Grayscale, palette, CMYK and RGBA images are converted to RGB (alpha is dropped, as
torchvision's own ``pil_loader`` does); 16-bit images are scaled to 8 bits (PIL's own conversion
clips them: 99.5 % of a typical 16-bit photo would become white). Missing, empty, special
(FIFOs, devices), non-image, truncated, corrupt and absurdly large files, and any other failure
to decode one file, raise :class:`SkippedImage` with a reason a person can act on; the
extraction stage records it beside the image's path in the store and goes on.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from gig_dist.data.files import special_kind

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
        found = os.stat(path)
    except FileNotFoundError:
        raise SkippedImage("file not found") from None
    except (OSError, ValueError) as exc:
        raise SkippedImage(f"cannot read file: {getattr(exc, 'strerror', None) or exc}") from None
    kind = special_kind(found.st_mode)
    if kind:  # never opened: reading a FIFO would wait forever, a device would never end
        raise SkippedImage(f"not a regular file: {kind}")
    if found.st_size == 0:
        raise SkippedImage("empty file (0 bytes)")
    return _decode(path, max_pixels)


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an image's bytes (an object read from object storage) as :func:`open_rgb` does a file."""
    if not data:
        raise SkippedImage("empty object (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels)


def _decode(source: str | io.BytesIO, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
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
                return _as_rgb(image)
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
    except Exception as exc:  # noqa: BLE001 - one file's decoder failing in any way skips that file
        # e.g. a header that PIL parses into a float size raises TypeError deep in a decoder.
        raise SkippedImage(f"cannot decode: {type(exc).__name__}: {exc}") from None


def _as_rgb(image: Image.Image) -> Image.Image:
    """RGB of any mode; integer images of more than 8 bits scaled to 8 bits, not clipped."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise SkippedImage("32-bit integer pixels outside 0..65535: no known scale to 8 bits")
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535  # 0..65535 -> 0..255, rounded
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise SkippedImage("floating-point pixels (PIL mode F): no known range to scale to 8 bits")
    return image.convert("RGB")
