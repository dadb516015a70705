"""Tests for anomaly.data.preprocess: decoding, colour conversion, orientation and cropping."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from anomaly.data.preprocess import (
    ALPHA_BACKGROUND,
    ImageDecodeError,
    decode_image,
    encode_jpeg,
    image_to_tensor,
    preprocess,
    resize_and_crop,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def assert_close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> None:
    assert len(pixel) == len(expected)
    difference = max(abs(a - b) for a, b in zip(pixel, expected))
    assert difference <= tolerance, f"{pixel} is not close to {expected}"


Colour = tuple[int, int, int]


def two_halves(width: int, height: int, left: Colour, right: Colour) -> Image.Image:
    img = Image.new("RGB", (width, height), right)
    img.paste(left, (0, 0, width // 2, height))
    return img


def test_decode_real_photo(car_photos: Path) -> None:
    path = car_photos / "whole" / "whole_0001.jpg"
    img = decode_image(path.read_bytes(), str(path))
    assert img.mode == "RGB"
    assert img.size == Image.open(path).size


def test_preprocess_real_photos_are_square_rgb(car_photos: Path) -> None:
    for path in sorted((car_photos / "damaged").glob("*.jpg"))[:5]:
        img = preprocess(path.read_bytes(), path.name, 64)
        assert img.mode == "RGB"
        assert img.size == (64, 64)


def test_truncated_jpeg_rejected(car_photos: Path) -> None:
    data = (car_photos / "whole" / "whole_0002.jpg").read_bytes()
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data[: len(data) // 2], "cut.jpg")
    assert caught.value.key == "cut.jpg"
    assert caught.value.reason.startswith("corrupt or truncated image data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_missing_only_end_marker() -> None:
    data = encode(two_halves(64, 48, RED, BLUE), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[:-40], "tail.jpg")


def test_zero_byte_file_rejected() -> None:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"", "empty.jpg")
    assert caught.value.reason == "empty file (0 bytes)"


def test_text_file_named_jpg_rejected() -> None:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"this is a claim note, not a photo\n", "note.jpg")
    assert caught.value.reason.startswith("not an image file")
    assert "note.jpg" in str(caught.value)


def test_refuses_when_truncated_loading_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(Image.new("RGB", (8, 8)), "PNG"), "x.png")


def test_rgba_png_composited_on_background() -> None:
    img = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 20, 30))  # opaque blue left half
    img.paste((0, 255, 0, 128), (20, 0, 40, 10))  # half-transparent green strip
    out = decode_image(encode(img, "PNG"), "rgba.png")
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == BLUE
    assert out.getpixel((30, 20)) == ALPHA_BACKGROUND
    assert_close(out.getpixel((30, 5)), (127, 255, 127), tolerance=2)


def test_palette_png_with_transparency() -> None:
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.paste(0, (0, 0, 10, 20))
    out = decode_image(encode(img, "PNG", transparency=0), "palette.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == ALPHA_BACKGROUND
    assert out.getpixel((15, 2)) == (200, 10, 10)


def test_grayscale_becomes_three_equal_channels() -> None:
    out = decode_image(encode(Image.new("L", (30, 20), 100), "JPEG"), "gray.jpg")
    assert out.mode == "RGB"
    red, green, blue = out.getpixel((10, 10))
    assert red == green == blue
    assert abs(red - 100) <= 2


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    img = Image.new("I;16", (16, 16), 40000)
    out = decode_image(encode(img, "PNG"), "depth16.png")
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (156, 156, 156)  # 40000 / 257 rounded


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(img, "JPEG", quality=95), "cmyk.jpg")
    assert out.mode == "RGB"
    assert_close(out.getpixel((16, 16)), RED)


@pytest.mark.parametrize(
    ("orientation", "size", "top_left", "bottom_right"),
    [
        (1, (80, 40), RED, BLUE),
        (3, (80, 40), BLUE, RED),  # rotated 180 degrees: red ends on the right
        (6, (40, 80), RED, BLUE),  # rotate 90 clockwise: the red left half becomes the top
        (8, (40, 80), BLUE, RED),  # rotate 90 counter-clockwise: the red left half becomes the bottom
    ],
)
def test_exif_orientation_applied(
    orientation: int, size: tuple[int, int], top_left: Colour, bottom_right: Colour
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(two_halves(80, 40, RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, "rotated.jpg")
    assert out.size == size
    width, height = size
    assert_close(out.getpixel((2, 2)), top_left)
    assert_close(out.getpixel((width - 3, height - 3)), bottom_right)


def test_exif_rotation_survives_preprocess() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(two_halves(120, 60, RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())
    out = preprocess(data, "rotated.jpg", 32)
    assert out.size == (32, 32)
    # The 60 x 120 upright image is cropped to its central 60 x 60 square, whose top
    # half is red and bottom half blue.
    assert_close(out.getpixel((16, 3)), RED)
    assert_close(out.getpixel((16, 28)), BLUE)


def test_resize_and_crop_keeps_centre() -> None:
    # The central square spans x = 50 to 250. The bands stop 10 px short of it,
    # beyond the reach of the bicubic filter at this scale.
    img = Image.new("RGB", (300, 200), GREEN)
    img.paste(RED, (0, 0, 40, 200))
    img.paste(BLUE, (260, 0, 300, 200))
    out = resize_and_crop(img, 64)
    assert out.size == (64, 64)
    colours = np.asarray(out).reshape(-1, 3)
    assert np.abs(colours.astype(int) - GREEN).max() <= 2, "the side bands must be cropped away"


def test_resize_and_crop_enlarges_small_portrait() -> None:
    img = Image.new("RGB", (20, 50), RED)
    img.paste(BLUE, (0, 0, 20, 15))
    out = resize_and_crop(img, 40)
    assert out.size == (40, 40)
    assert_close(out.getpixel((20, 20)), RED)


def test_too_small_rejected_by_original_size() -> None:
    data = encode(Image.new("RGB", (20, 100)), "JPEG")
    with pytest.raises(ImageDecodeError) as caught:
        preprocess(data, "tiny.jpg", 64, min_side=32)
    assert caught.value.reason == "too small: shorter side is 20 px, minimum is 32 px"


def test_large_jpeg_drafted_but_min_side_uses_original() -> None:
    img = two_halves(2000, 1200, RED, BLUE)
    data = encode(img, "JPEG", quality=90)
    out = preprocess(data, "large.jpg", 64, min_side=1000)
    assert out.size == (64, 64)
    assert_close(out.getpixel((8, 32)), RED)
    assert_close(out.getpixel((56, 32)), BLUE)
    full = resize_and_crop(decode_image(data, "large.jpg"), 64)
    difference = np.abs(np.asarray(out, dtype=int) - np.asarray(full, dtype=int))
    assert difference.mean() < 2.0


def test_encode_jpeg_is_deterministic() -> None:
    img = preprocess(encode(two_halves(90, 70, RED, BLUE), "PNG"), "x.png", 48)
    first = encode_jpeg(img)
    assert first == encode_jpeg(img)
    assert first[:3] == b"\xff\xd8\xff"
    assert decode_image(first, "roundtrip.jpg").size == (48, 48)


def test_encode_jpeg_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        encode_jpeg(Image.new("L", (8, 8)))


def test_image_to_tensor_scales_to_unit_range() -> None:
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((3, 1), (255, 255, 255))
    img.putpixel((0, 1), (255, 0, 0))
    tensor = image_to_tensor(img)
    assert tensor.shape == (3, 2, 4)
    assert tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert tensor[:, 1, 3].tolist() == [1.0, 1.0, 1.0]
    assert tensor[:, 1, 0].tolist() == [1.0, -1.0, -1.0]
