"""Decoding and validation at the boundary: every failure is a typed error naming the file."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgederm.runtime.errors import ImageDecodeError, InputError
from edgederm.runtime.imageio import as_rgb_uint8, decode_image, read_image


# --------------------------------------------------------------------------- helpers


def _test_image(height: int = 40, width: int = 60) -> np.ndarray:
    """RGB image whose orientation is recognisable: a red block at the top left."""
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    image[:10, :20] = (250, 10, 10)
    return image


def _jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _exif_app1(orientation: int, byte_order: str = "MM", value_type: int = 3, tail: bytes = b"") -> bytes:
    """An APP1 segment holding a minimal EXIF TIFF structure: IFD0 with one entry."""
    e = ">" if byte_order == "MM" else "<"
    if value_type == 3:  # SHORT, left-aligned in the 4-byte value field
        value_field = struct.pack(e + "HH", orientation, 0)
    else:  # LONG
        value_field = struct.pack(e + "I", orientation)
    tiff = (
        byte_order.encode()
        + struct.pack(e + "HI", 42, 8)  # magic, offset of IFD0
        + struct.pack(e + "H", 1)  # one entry
        + struct.pack(e + "HHI", 0x0112, value_type, 1)
        + value_field
        + struct.pack(e + "I", 0)  # no next IFD
        + tail
    )
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _with_segment(jpeg: bytes, segment: bytes) -> bytes:
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]


def _reference_decode(data: bytes) -> np.ndarray:
    """OpenCV's own orientation handling (IMREAD_COLOR applies EXIF), as RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _write_png(path: Path, array_bgr_order: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", array_bgr_order)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


# --------------------------------------------------------------------------- file errors


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no_such_lesion.jpg"
    with pytest.raises(ImageDecodeError, match="file does not exist") as info:
        read_image(path)
    assert "no_such_lesion.jpg" in str(info.value)
    assert info.value.path == str(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "images.jpg"
    folder.mkdir()
    with pytest.raises(ImageDecodeError, match="directory") as info:
        read_image(folder)
    assert "images.jpg" in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=re.escape("file is empty (0 bytes)")) as info:
        read_image(path)
    assert "empty.jpg" in str(info.value)


def test_text_file_is_not_an_image_and_fix_lists_formats(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient notes, not pixels\n")
    with pytest.raises(ImageDecodeError, match=r"not a decodable image \(it looks like text\)") as info:
        read_image(path)
    message = str(info.value)
    assert "notes.png" in message
    # The file's contents are never echoed: the message may reach a log or a remote client.
    assert "patient" not in message and "70 61 74" not in message
    for fmt in ("JPEG", "PNG", "TIFF", "BMP", "WebP"):
        assert fmt in message


def test_corrupt_png_is_named_as_png(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "broken.png", np.zeros((32, 32, 3), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:40])  # signature and part of IHDR only
    with pytest.raises(ImageDecodeError, match="corrupt or truncated PNG") as info:
        read_image(path)
    assert "broken.png" in str(info.value)


def test_truncated_jpeg_half(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = _jpeg_bytes(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated JPEG") as info:
        read_image(path)
    assert "cut.jpg" in str(info.value)


def test_jpeg_missing_only_its_end_marker_is_truncated(tmp_path: Path) -> None:
    # A decoder may fill the last rows with grey and report success; the runtime
    # refuses, because a half-transferred photo must not be classified.
    data = _jpeg_bytes(_test_image())
    assert data.endswith(b"\xff\xd9")
    path = tmp_path / "almost.jpg"
    path.write_bytes(data[:-2])
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        read_image(path)


def test_truncation_detected_despite_end_marker_inside_exif_thumbnail(tmp_path: Path) -> None:
    # EXIF may embed a thumbnail JPEG with its own FFD9; only markers after the
    # start of scan of the main image count.
    fake_thumbnail = b"\xff\xd8\xff\xd9"
    data = _with_segment(_jpeg_bytes(_test_image()), _exif_app1(1, tail=fake_thumbnail))
    path = tmp_path / "thumb.jpg"
    path.write_bytes(data[: len(data) - 30])
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        read_image(path)


def test_decode_image_errors_use_the_given_name() -> None:
    with pytest.raises(ImageDecodeError, match="camera-frame-7.*file is empty"):
        decode_image(b"", name="camera-frame-7")
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(b"GIF89a not supported here", name="upload")
    with pytest.raises(ImageDecodeError, match="expected bytes of an encoded image"):
        decode_image("lesion.jpg")  # type: ignore[arg-type]
    with pytest.raises(ImageDecodeError, match="use as_rgb_uint8"):
        decode_image(np.zeros((4, 4, 3), np.uint8))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pixels


def test_jpeg_roundtrip_is_rgb(tmp_path: Path) -> None:
    image = _test_image()
    path = tmp_path / "lesion.jpg"
    path.write_bytes(_jpeg_bytes(image))
    decoded = read_image(path)
    assert decoded.shape == (40, 60, 3) and decoded.dtype == np.uint8
    assert decoded.flags.c_contiguous
    # Red block stays red (a BGR mix-up would make it blue).
    red = decoded[2:8, 2:18].reshape(-1, 3).mean(axis=0)
    assert red[0] > 220 and red[2] < 40
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 3


def test_unicode_path(tmp_path: Path) -> None:
    path = tmp_path / "läsion_皮膚.png"
    _write_png(path, cv2.cvtColor(_test_image(), cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_image(path), _test_image())
    np.testing.assert_array_equal(decode_image(path.read_bytes()), _test_image())


def test_grayscale_png_is_replicated(tmp_path: Path) -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    decoded = read_image(_write_png(tmp_path / "gray.png", gray))
    assert decoded.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(decoded[..., c], gray)


def test_rgba_png_drops_alpha_and_keeps_colours(tmp_path: Path) -> None:
    rgba = np.zeros((5, 7, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 30  # R, G, B
    rgba[..., 3] = np.linspace(0, 255, 7).astype(np.uint8)  # alpha varies; must not matter
    bgra = rgba[..., [2, 1, 0, 3]]  # cv2 writes BGRA
    decoded = read_image(_write_png(tmp_path / "rgba.png", np.ascontiguousarray(bgra)))
    assert decoded.shape == (5, 7, 3)
    assert np.all(decoded == np.array([200, 100, 30], np.uint8))


def test_16bit_png_is_scaled_with_rounding(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 257 * 100 + 128, 257 * 100 + 129, 65535]], dtype=np.uint16)
    color16 = np.repeat(values[..., None], 3, axis=2)
    color16[..., 0] = 65535  # cv2 writes BGR: this is blue, RGB channel 2
    decoded = read_image(_write_png(tmp_path / "deep.png", color16))
    assert decoded.dtype == np.uint8
    # round(x / 257): 128/257 < 0.5 rounds down, 129/257 > 0.5 rounds up
    np.testing.assert_array_equal(decoded[0, :, 1], [0, 100, 100, 101, 255])
    np.testing.assert_array_equal(decoded[0, :, 2], 255)  # cv2's B is RGB's last channel
    gray16 = np.full((3, 4), 65535, dtype=np.uint16)
    decoded_gray = read_image(_write_png(tmp_path / "gray16.png", gray16))
    assert decoded_gray.shape == (3, 4, 3) and np.all(decoded_gray == 255)


def test_16bit_scaling_is_exact_rounding_for_every_value() -> None:
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    scaled = as_rgb_uint8(every)[..., 0]
    expected = ((every.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(x / 257)
    np.testing.assert_array_equal(scaled, expected)


def test_float_tiff_is_refused_with_pixel_type(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".tiff", np.zeros((4, 4, 3), np.float32))
    assert ok
    path = tmp_path / "hdr.tiff"
    path.write_bytes(buf.tobytes())
    with pytest.raises(ImageDecodeError, match="unsupported pixel type float32") as info:
        read_image(path)
    assert "hdr.tiff" in str(info.value)


def test_bmp_decodes(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".bmp", cv2.cvtColor(_test_image(), cv2.COLOR_RGB2BGR))
    assert ok
    path = tmp_path / "old.bmp"
    path.write_bytes(buf.tobytes())
    np.testing.assert_array_equal(read_image(path), _test_image())


# --------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("byte_order", ["MM", "II"])
def test_exif_orientation_6_rotates_clockwise(tmp_path: Path, byte_order: str) -> None:
    data = _with_segment(_jpeg_bytes(_test_image(40, 60)), _exif_app1(6, byte_order))
    path = tmp_path / f"portrait_{byte_order}.jpg"
    path.write_bytes(data)
    decoded = read_image(path)
    assert decoded.shape == (60, 40, 3)  # stored 40x60 landscape, displayed portrait
    # 90 degrees clockwise: the red block (top left, 10 rows x 20 columns) is now at
    # the top right, 20 rows x 10 columns.
    red = decoded[..., 0] > 200
    rows, cols = np.nonzero(red)
    assert rows.min() == 0 and abs(rows.max() - 19) <= 1
    assert abs(cols.min() - 30) <= 1 and cols.max() == 39


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("byte_order", ["MM", "II"])
def test_exif_orientation_matches_opencv_imread_color(orientation: int, byte_order: str) -> None:
    rng = np.random.default_rng(orientation)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = _with_segment(_jpeg_bytes(image), _exif_app1(orientation, byte_order))
    np.testing.assert_array_equal(decode_image(data), _reference_decode(data))


def test_exif_orientation_stored_as_long() -> None:
    data = _with_segment(_jpeg_bytes(_test_image(40, 60)), _exif_app1(8, "II", value_type=4))
    assert decode_image(data).shape == (60, 40, 3)


def test_malformed_exif_is_ignored_not_fatal() -> None:
    payload = b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xf0"  # IFD0 offset far past the end
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = _with_segment(_jpeg_bytes(_test_image(40, 60)), segment)
    assert decode_image(data).shape == (40, 60, 3)


# --------------------------------------------------------------------------- as_rgb_uint8


def test_as_rgb_uint8_returns_valid_input_without_copy() -> None:
    image = _test_image()
    assert as_rgb_uint8(image) is image


def test_as_rgb_uint8_makes_views_contiguous() -> None:
    image = _test_image()
    view = image[:, ::2]
    result = as_rgb_uint8(view)
    assert result.flags.c_contiguous
    np.testing.assert_array_equal(result, view)


@pytest.mark.parametrize("shape", [(6, 8), (6, 8, 1)])
def test_as_rgb_uint8_replicates_gray(shape: tuple[int, ...]) -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(shape)
    result = as_rgb_uint8(gray)
    assert result.shape == (6, 8, 3)
    np.testing.assert_array_equal(result[..., 2], gray.reshape(6, 8))


def test_as_rgb_uint8_gray_alpha_keeps_gray() -> None:
    two = np.zeros((3, 4, 2), np.uint8)
    two[..., 0] = 77
    two[..., 1] = 255
    result = as_rgb_uint8(two)
    assert result.shape == (3, 4, 3) and np.all(result == 77)


def test_as_rgb_uint8_drops_alpha_in_rgb_order() -> None:
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 128
    result = as_rgb_uint8(rgba)
    assert result.shape == (3, 4, 3)
    assert np.all(result == np.array([10, 20, 30], np.uint8))


def test_as_rgb_uint8_five_channels_refused() -> None:
    with pytest.raises(InputError, match=r"dermoscopy: received shape \(3, 4, 5\).*unsupported channel count 5"):
        as_rgb_uint8(np.zeros((3, 4, 5), np.uint8), name="dermoscopy")


def test_as_rgb_uint8_float_input_explains_the_fix() -> None:
    image = np.random.default_rng(0).random((8, 8, 3), dtype=np.float32) * 0.9 + 0.05
    with pytest.raises(InputError, match=r"clinical: received shape \(8, 8, 3\), dtype float32 with range \[0\.0") as info:
        as_rgb_uint8(image, name="clinical")
    message = str(info.value)
    assert "expected uint8" in message
    assert "(x * 255).round().astype(np.uint8)" in message


def test_as_rgb_uint8_float_nan_and_normalised_values() -> None:
    image = np.full((4, 4, 3), 0.5, np.float64)
    image[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="1 NaN/inf values"):
        as_rgb_uint8(image)
    normalised = np.full((4, 4, 3), -1.5, np.float32)
    with pytest.raises(InputError, match="already normalised"):
        as_rgb_uint8(normalised)


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.zeros((4, 4, 3), bool), "boolean mask"),
        (np.zeros((4, 4, 3), np.int64), r"dtype int64 with range \[0, 0\].*x\.astype\(np\.uint8\)"),
        (np.zeros((4,), np.uint8), "2 or 3 dimensions"),
        (np.zeros((2, 4, 4, 3), np.uint8), "2 or 3 dimensions"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_as_rgb_uint8_refusals(array: np.ndarray, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        as_rgb_uint8(array)


def test_as_rgb_uint8_refuses_non_arrays() -> None:
    with pytest.raises(InputError, match="received str"):
        as_rgb_uint8("lesion.jpg")
