"""Image decoding and validation at the SDK's boundary: everything becomes HxWx3 uint8 RGB.

A device app hands the runtime either a file (``read_image``), encoded bytes from a
camera or a network (``decode_image``) or a numpy array it already has
(``as_rgb_uint8``). Whatever arrives, the model sees the same thing: a C-contiguous
HxWx3 uint8 array in RGB order. Anything that cannot become that raises a typed
error (:class:`ImageDecodeError` for files and bytes, :class:`InputError` for arrays)
that says what was received, what was expected and how to fix it; no ``cv2.error``
escapes.

Decisions:

- Files are read with ``np.fromfile`` and decoded with ``cv2.imdecode`` rather than
  ``cv2.imread``, so paths with non-ASCII characters work on every platform and an
  empty or unreadable file gets its own message.
- Decoding uses ``cv2.IMREAD_UNCHANGED`` so the true channel count and bit depth
  are seen (and reported when unsupported). That flag makes OpenCV skip the EXIF
  orientation, so the orientation tag of JPEG files is parsed here (a small APP1 /
  TIFF-IFD reader, both byte orders) and applied exactly as OpenCV's
  ``IMREAD_COLOR`` would; the tests check the eight orientations against it. The
  behaviour therefore does not depend on the OpenCV version. Orientation tags of
  other formats (TIFF, PNG eXIf, WebP) are not applied: dermatoscopes and phones
  write JPEG, and those tags are rare there.
- A JPEG whose entropy-coded data is not followed by the end-of-image marker
  (FFD9) is refused as truncated, even when a decoder could fill the missing rows
  with grey: a half-transferred lesion photo must not be classified.
- Alpha is dropped, not composited: dermoscopy and clinical photos carry no
  meaningful transparency, and compositing onto any background colour would invent
  pixels the camera never saw. Gray + alpha keeps the gray.
- 16-bit images are reduced to 8 bits by ``round(x / 257)``, which maps 0 -> 0 and
  65535 -> 255 exactly (``x >> 8`` would bias every value down by half a level).
- Gray images are replicated to three channels.
"""
from __future__ import annotations

import os
import struct
from typing import Callable, NoReturn

import cv2
import numpy as np

from .errors import ImageDecodeError, InputError

__all__ = ["read_image", "decode_image", "as_rgb_uint8", "SUPPORTED_FORMATS"]

#: What the fix of a decode error recommends; OpenCV may decode a few more.
SUPPORTED_FORMATS = "JPEG (.jpg/.jpeg), PNG, TIFF, BMP or WebP"

# Leading bytes of the formats named in SUPPORTED_FORMATS, to tell "corrupt PNG"
# from "not an image at all".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

_EXIF_ORIENTATION_TAG = 0x0112


# --------------------------------------------------------------------------- public


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as a C-contiguous HxWx3 uint8 RGB array.

    Honours the EXIF orientation of JPEG files. Raises :class:`ImageDecodeError`
    (naming the file) when the file is missing, a directory, empty, truncated, not
    an image, or has a pixel layout the runtime cannot use.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageDecodeError(
            name, "file does not exist", f"check the path (working directory: {os.getcwd()!r})"
        )
    if os.path.isdir(name):
        raise ImageDecodeError(name, "path is a directory, not an image file", "pass the path of one image file")
    try:
        data = np.fromfile(name, dtype=np.uint8)
    except OSError as exc:
        raise ImageDecodeError(name, f"file cannot be read ({exc.strerror or exc})", "check the file's permissions") from exc
    return _decode(data, name)


def decode_image(data: bytes | bytearray | memoryview, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) as HxWx3 uint8 RGB.

    ``name`` is only used in error messages (say, the file name a camera reported).
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ImageDecodeError(
                name,
                f"received an array of shape {data.shape} and dtype {data.dtype}; expected encoded bytes",
                "pass the file's bytes, or use as_rgb_uint8() for a decoded pixel array",
            )
        buffer = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buffer = np.frombuffer(data, dtype=np.uint8)
    else:
        raise ImageDecodeError(
            name,
            f"received {type(data).__name__}; expected bytes of an encoded image",
            "pass open(path, 'rb').read() or use read_image(path)",
        )
    return _decode(buffer, name)


def as_rgb_uint8(image: object, name: str = "image") -> np.ndarray:
    """Validate a caller's array and return it as C-contiguous HxWx3 uint8 RGB.

    The array is taken to be in RGB(A) order already (arrays from ``cv2.imread``
    are BGR: convert them with ``cv2.cvtColor(x, cv2.COLOR_BGR2RGB)`` or use
    :func:`read_image`). An HxWx3 uint8 C-contiguous array is returned as is, without
    a copy. HxW and HxWx1 are replicated to three channels, HxWx2 (gray + alpha)
    keeps the gray, HxWx4 drops alpha, uint16 is scaled to 0..255. Float, bool and
    other integer arrays are refused with :class:`InputError`: guessing whether a
    float image is on a 0..1 or 0..255 scale would silently change what the model
    sees.
    """
    if not isinstance(image, np.ndarray):
        if hasattr(image, "__array_interface__") or hasattr(image, "__array__"):
            image = np.asarray(image)  # e.g. a PIL image
        else:
            raise InputError(
                f"{name}: received {type(image).__name__}; expected a numpy array of shape "
                "HxWx3, dtype uint8 (RGB)"
            )
    array: np.ndarray = image
    received = f"received shape {array.shape}, dtype {array.dtype}"
    expected = "expected HxWx3 uint8 RGB (HxW gray, HxWx4 RGBA and uint16 are converted)"

    if array.ndim not in (2, 3):
        raise InputError(f"{name}: {received}; {expected}. An image has 2 or 3 dimensions; "
                         "for a batch, pass the images one by one")
    if array.size == 0:
        raise InputError(f"{name}: {received}, which is empty; {expected}")
    if array.dtype == np.bool_:
        raise InputError(f"{name}: {received}; {expected}. A boolean mask is not an image; "
                         "fix: (mask * 255).astype(np.uint8) if you mean black/white")
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(_float_message(array, name, received))
    if array.dtype not in (np.uint8, np.uint16):
        lo, hi = int(array.min()), int(array.max())
        fix = ("fix: x.astype(np.uint8)" if 0 <= lo and hi <= 255
               else "fix: rescale the values to 0..255 and cast with .astype(np.uint8)")
        raise InputError(f"{name}: {received} with range [{lo}, {hi}]; {expected}. {fix}")

    def fail(problem: str) -> NoReturn:
        raise InputError(f"{name}: {received}; {problem}")

    try:
        return _to_rgb_uint8(array, bgr_order=False, fail=fail)
    except cv2.error as exc:
        raise InputError(f"{name}: {received}; OpenCV failed converting it ({_first_line(exc)})") from exc


# --------------------------------------------------------------------------- decoding


def _decode(data: np.ndarray, name: str) -> np.ndarray:
    if data.size == 0:
        raise ImageDecodeError(name, "file is empty (0 bytes)", "re-copy or re-export the image")
    head = data[:16].tobytes()
    kind = _sniff(head)

    orientation = 1
    if kind == "JPEG":
        raw = data.tobytes()
        orientation, complete = _jpeg_orientation_and_completeness(raw)
        if not complete:
            raise ImageDecodeError(
                name,
                f"truncated JPEG ({data.size} bytes, no end-of-image marker FFD9 after the image data)",
                "the file was cut short (interrupted transfer or write); copy or export it again",
            )

    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(name, f"OpenCV could not decode it ({_first_line(exc)})",
                               f"re-export it as {SUPPORTED_FORMATS}") from exc
    if decoded is None:
        if kind is None:
            raise ImageDecodeError(
                name,
                f"not a decodable image (first bytes {_describe_bytes(head)})",
                f"supported formats: {SUPPORTED_FORMATS}",
            )
        raise ImageDecodeError(
            name,
            f"corrupt or truncated {kind} data ({data.size} bytes) that OpenCV could not decode",
            f"export the image again as {SUPPORTED_FORMATS}",
        )

    def fail(problem: str) -> NoReturn:
        raise ImageDecodeError(name, f"decoded to shape {decoded.shape}, dtype {decoded.dtype}: {problem}")

    try:
        rgb = _to_rgb_uint8(decoded, bgr_order=True, fail=fail)
        return _apply_orientation(rgb, orientation)
    except cv2.error as exc:
        raise ImageDecodeError(name, f"OpenCV failed converting the pixels ({_first_line(exc)})") from exc


def _sniff(head: bytes) -> str | None:
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _describe_bytes(head: bytes) -> str:
    shown = head[:8]
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in shown)
    return f"{shown.hex(' ')} {text!r}"


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


# --------------------------------------------------------------------------- pixels


def _to_rgb_uint8(array: np.ndarray, bgr_order: bool, fail: Callable[[str], NoReturn]) -> np.ndarray:
    """Channel and depth conversion shared by decoded images and caller arrays."""
    if array.dtype not in (np.uint8, np.uint16):
        fail(f"unsupported pixel type {array.dtype}; expected 8- or 16-bit integers "
             "(floating-point HDR/EXR/TIFF images are not supported)")
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in (1, 2, 3, 4):
        fail(f"unsupported channel count {channels}; expected 1 (gray), 2 (gray+alpha), "
             "3 (RGB) or 4 (RGBA)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        fail("the image has no pixels")

    if channels == 3 and not bgr_order and array.dtype == np.uint8:
        return np.ascontiguousarray(array)  # no copy when already fine

    # Drop alpha / pick gray before the depth conversion: less to convert.
    if channels == 1:
        rgb = cv2.cvtColor(_plane(array), cv2.COLOR_GRAY2RGB)
    elif channels == 2:
        rgb = cv2.cvtColor(np.ascontiguousarray(array[:, :, 0]), cv2.COLOR_GRAY2RGB)
    elif channels == 3:
        rgb = cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if bgr_order else np.ascontiguousarray(array)
    else:
        rgb = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB if bgr_order else cv2.COLOR_RGBA2RGB)

    if rgb.dtype == np.uint16:
        # round(x / 257) in one pass, without a float copy of the image; OpenCV
        # saturates and rounds to nearest.
        rgb = cv2.convertScaleAbs(rgb, alpha=1.0 / 257.0)
    return np.ascontiguousarray(rgb)


def _plane(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array if array.ndim == 2 else array[:, :, 0])


def _float_message(array: np.ndarray, name: str, received: str) -> str:
    if np.iscomplexobj(array):
        return f"{name}: {received}; expected HxWx3 uint8 RGB with values 0..255"
    finite = np.isfinite(array)
    n_bad = int(array.size - np.count_nonzero(finite))
    if n_bad == array.size:
        return f"{name}: {received} with no finite values (all NaN/inf); expected HxWx3 uint8 RGB 0..255"
    lo = float(np.min(array, where=finite, initial=np.inf))
    hi = float(np.max(array, where=finite, initial=-np.inf))
    message = f"{name}: {received} with range [{lo:.4g}, {hi:.4g}]"
    if n_bad:
        message += f" and {n_bad} NaN/inf values"
    message += "; expected uint8 with values 0..255 (HxWx3 RGB)"
    if n_bad:
        message += ". Fix the NaN/inf values first (np.nan_to_num)"
    if 0.0 <= lo and hi <= 1.0:
        message += ". Fix: pass (x * 255).round().astype(np.uint8)"
    elif 0.0 <= lo and hi <= 255.0:
        message += ". Fix: pass x.round().astype(np.uint8)"
    else:
        message += (". The values are not on a 0..1 or 0..255 scale (already normalised?); "
                    "pass the original uint8 image: the runtime normalises it itself")
    return message


# --------------------------------------------------------------------------- EXIF


def _jpeg_orientation_and_completeness(data: bytes) -> tuple[int, bool]:
    """Walk the JPEG marker segments up to the first scan.

    Returns the EXIF orientation (1..8, 1 when absent or malformed: a broken tag
    must not make a good photo unreadable) and whether an end-of-image marker follows
    the scan data. Inside entropy-coded data every 0xFF byte is stuffed (FF00) or a
    restart marker (FFD0-FFD7), so FFD9 after the start of scan is the real end;
    searching only after the scan start ignores the FFD9 of an EXIF thumbnail.
    """
    orientation = 1
    offset = 2
    size = len(data)
    while offset + 4 <= size:
        if data[offset] != 0xFF:
            return orientation, False  # broken segment structure; let the decoder judge
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            offset += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            return orientation, False
        length = struct.unpack_from(">H", data, offset + 2)[0]
        if length < 2:
            return orientation, False
        if marker == 0xDA:  # start of scan
            return orientation, data.find(b"\xff\xd9", offset + 2 + length) != -1
        segment = data[offset + 4: offset + 2 + length]
        if marker == 0xE1 and orientation == 1 and segment.startswith(b"Exif\x00\x00"):
            orientation = _tiff_orientation(segment[6:])
        offset += 2 + length
    return orientation, False


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 of a TIFF structure; 1 when absent or invalid."""
    try:
        if tiff[:2] == b"II":
            order = "<"
        elif tiff[:2] == b"MM":
            order = ">"
        else:
            return 1
        magic, ifd_offset = struct.unpack_from(order + "HI", tiff, 2)
        if magic != 42:
            return 1
        (count,) = struct.unpack_from(order + "H", tiff, ifd_offset)
        for i in range(count):
            entry = ifd_offset + 2 + 12 * i
            tag, value_type, n_values = struct.unpack_from(order + "HHI", tiff, entry)
            if tag != _EXIF_ORIENTATION_TAG or n_values < 1:
                continue
            if value_type == 3:  # SHORT, stored left-aligned in the 4-byte value field
                (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
            elif value_type == 4:  # LONG, written by a few tools
                (value,) = struct.unpack_from(order + "I", tiff, entry + 8)
            else:
                return 1
            return int(value) if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels into display orientation (EXIF 2.3, same as OpenCV)."""
    if orientation == 1:
        return image
    if orientation == 2:
        return cv2.flip(image, 1)  # mirror left-right
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)  # mirror top-bottom
    if orientation == 5:
        return cv2.transpose(image)
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(image), -1)
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image
