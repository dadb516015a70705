"""Image decoding and the fixed preprocessing policy shared by shards, training and scoring.

Policy, applied in this order by :func:`preprocess`:

1. Decode fully with Pillow, so that a truncated file raises instead of being padded
   with grey (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False).
2. Apply the EXIF orientation tag, so that a photo taken in portrait is stored upright.
3. Convert to 3-channel 8-bit RGB. Transparent pixels are composited onto
   :data:`ALPHA_BACKGROUND` (white, the usual backdrop of cut-out product photos).
   Grayscale, palette, CMYK and 16-bit grayscale images are converted.
4. Take the central square whose side is the shorter image side and scale it to
   ``size`` x ``size`` with bicubic filtering. This equals resizing the shorter side
   to ``size`` and centre-cropping the longer one, and small images are enlarged.

Shards store the result as a quality-95 JPEG (:func:`encode_jpeg`). Training and
scoring turn it into a tensor in [-1, 1] with :func:`image_to_tensor`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ALPHA_BACKGROUND = (255, 255, 255)
JPEG_QUALITY = 95
RESAMPLE = Image.Resampling.BICUBIC

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageDecodeError(ValueError):
    """Error for an input that cannot be used as an image: empty, not an image, truncated, or too small.

    Attributes:
        key: The name of the input, usually its object key or path.
        reason: A short lowercase description that ends up in the rejects list.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"cannot use {key!r} as an image: {reason}")
        self.key = key
        self.reason = reason


def decode_image(data: bytes, name: str, draft_size: int = 0, min_side: int = 1) -> Image.Image:
    """Decode image bytes into an upright RGB image.

    Args:
        data: The encoded file contents (JPEG, PNG, or any format Pillow reads).
        name: The object key or path, used in error messages.
        draft_size: When above 0, a large JPEG is decoded at a reduced scale whose
            shorter side is still at least this many pixels. This makes decoding
            multi-megapixel photos several times faster.
        min_side: Reject the image when the shorter side of its stored size, before
            any draft scaling, is below this many pixels.

    Returns:
        The decoded image in mode ``RGB`` with EXIF orientation applied.

    Raises:
        ImageDecodeError: If the data is empty, not an image, too small, truncated,
            corrupt, or in a colour mode that cannot be converted to RGB.
    """
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another library switched this global on. Truncated files would then decode
        # with grey padding and end up in the training data.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True. Set it back to False")

    with _decode_errors(name, len(data)):
        img = Image.open(io.BytesIO(data))
    if min(img.size) < min_side:
        shorter = min(img.size)
        raise ImageDecodeError(name, f"too small: shorter side is {shorter} px, minimum is {min_side} px")
    with _decode_errors(name, len(data)):
        if draft_size > 0 and img.format == "JPEG":
            img.draft(None, (draft_size, draft_size))
        img.load()

    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(name, f"invalid EXIF orientation data: {exc}") from None
    return _to_rgb(img, name)


@contextlib.contextmanager
def _decode_errors(name: str, size: int) -> Iterator[None]:
    """Turn Pillow's errors while opening or decoding into ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        raise ImageDecodeError(name, f"not an image file ({size} bytes in no format Pillow reads)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(name, f"too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt data as OSError, and some broken headers
        # of other formats as SyntaxError or ValueError.
        raise ImageDecodeError(name, f"corrupt or truncated image data: {exc}") from None


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto the background."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling, which
        # would turn almost every 16-bit photo white.
        levels = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), mode="L")

    has_alpha = img.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(name, f"cannot convert colour mode {img.mode!r} to RGB: {exc}") from None


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the central square of an image to ``size`` x ``size`` pixels.

    The square's side is the shorter image side, so the result equals resizing the
    shorter side to ``size`` and centre-cropping the longer side. When the longer
    side has an odd number of extra pixels, the extra pixel is cut on the right or
    bottom.

    Args:
        img: The source image. The result has the same mode.
        size: Side of the output square in pixels.

    Returns:
        A new image of exactly ``size`` x ``size`` pixels.
    """
    if size < 1:
        raise ValueError(f"invalid image size {size}: expected a positive number of pixels")
    width, height = img.size
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return img.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))


def preprocess(data: bytes, name: str, size: int, min_side: int = 1) -> Image.Image:
    """Decode, orient, convert and crop one image with the module's fixed policy.

    Args:
        data: The encoded file contents.
        name: The object key or path, used in error messages.
        size: Side of the square output in pixels.
        min_side: Inputs whose shorter side is below this many pixels before any
            scaling are rejected.

    Returns:
        An RGB image of ``size`` x ``size`` pixels.

    Raises:
        ImageDecodeError: If the input is unreadable or smaller than ``min_side``.
    """
    return resize_and_crop(decode_image(data, name, draft_size=size, min_side=min_side), size)


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Encode an RGB image as a baseline JPEG without metadata.

    The same pixels and quality always give the same bytes with one Pillow and
    libjpeg build, which keeps shard builds reproducible.
    """
    if img.mode != "RGB":
        raise ValueError(f"encode_jpeg expects an RGB image, got mode {img.mode!r}. Call decode_image first")
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an RGB image to a float32 tensor of shape [3, H, W] scaled to [-1, 1]."""
    # Shard-building workers never call this, and importing torch there costs each Ray
    # worker about 1 s and 600 MB of resident memory (measured with torch 2.14.1).
    import torch

    if img.mode != "RGB":
        raise ValueError(
            f"image_to_tensor expects an RGB image, got mode {img.mode!r}. Call decode_image first"
        )
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # [H, W, 3]
    return pixels.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)
