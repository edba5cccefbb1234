"""Image decoding and validation at the SDK's boundary: everything becomes HxWx3 uint8 RGB.

A device app hands the runtime either a file (``read_image``), encoded bytes from a
camera or a network (``decode_image``) or a numpy array it already has
(``as_rgb_uint8``). Whatever arrives, the model sees the same thing: a C-contiguous
HxWx3 uint8 array in RGB order. Anything that cannot become that raises a typed
error (:class:`ImageDecodeError` for files and bytes, :class:`InputError` for arrays)
that says what was received, what was expected and how to fix it; no ``cv2.error``
escapes.

Decisions:

- Files are read by ``runtime/files.py`` (regular files only, size checked before
  reading, never blocking) and decoded with ``cv2.imdecode`` rather than
  ``cv2.imread``, so paths with non-ASCII characters work on every platform and a
  pipe, a device, a link loop or an empty file each get their own message. No
  message shows a file's bytes: the file may be a link to a secret.
- The size is read from the header (PNG IHDR, JPEG start of frame, TIFF IFD0, BMP
  info header, WebP VP8/VP8L/VP8X) before decoding and checked against a pixel cap
  and, when given, the bytes the decode may take (:func:`decode_bytes_needed`). An
  image over either is decoded at 1/2, 1/4 or 1/8 size with OpenCV's reduced modes
  when the caller's model works at that scale anyway; otherwise it is refused with
  :class:`ImageTooLargeError` and the numbers. JPEG is reduced inside libjpeg (a
  1/8 decode takes 1/64 of the memory); the other formats are decoded whole and then
  resized, so for them only the cap on the result is relieved, not the memory. A
  file of a supported format whose header gives no size is refused: its decoder
  would need one, and the cap could not apply.
- A reduced decode reads colour at 8 bits (OpenCV's reduced modes), so 16-bit
  images are then reduced by OpenCV's truncation rather than the rounding below.
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

import math
import os
from dataclasses import dataclass
from typing import Callable, NoReturn

import cv2
import numpy as np

from .errors import ImageDecodeError, ImageTooLargeError, InputError
from .files import read_regular_file, regular_file_size
from .imageheader import ImageHeader, read_header, scan_jpeg, sniff, tiff_header

__all__ = [
    "read_image", "read_image_within", "decode_image", "as_rgb_uint8", "read_header", "ImageHeader", "DecodedImage",
    "SUPPORTED_FORMATS", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_FILE_BYTES",
]

#: What the fix of a decode error recommends; OpenCV may decode a few more.
SUPPORTED_FORMATS = "JPEG (.jpg/.jpeg), PNG, TIFF, BMP or WebP"

#: Pixels an image may declare before it is refused (or decoded at reduced size).
#: 100 MP is above any dermatoscope or phone camera and far below a decompression bomb.
DEFAULT_MAX_PIXELS = 100_000_000

#: Largest image file read; an uncompressed 100 MP 16-bit RGB TIFF is 600 MB.
DEFAULT_MAX_FILE_BYTES = 1 << 30

# Decoding at 1/2, 1/4, 1/8 of the size: the factors OpenCV's IMREAD_REDUCED_* offer.
_REDUCTIONS = {1: cv2.IMREAD_UNCHANGED,
               2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
               4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
               8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION}

# Leading bytes of the formats named in SUPPORTED_FORMATS, to tell "corrupt PNG"


# PIL modes whose raw array is not pixels in RGB(A)/gray order (palette indices,
# ink amounts, other colour spaces): PIL itself converts them to RGB.
_PIL_CONVERT_TO_RGB = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa", "La")


@dataclass(frozen=True)
class DecodedImage:
    """An image read for a model: the pixels, the size the file declared and the reduction used."""

    image: np.ndarray
    width: int
    height: int
    reduction: int = 1

    @property
    def note(self) -> str | None:
        if self.reduction == 1:
            return None
        h, w = self.image.shape[:2]
        return (f"image {self.width}x{self.height} decoded at 1/{self.reduction} size ({w}x{h}) to fit the pixel cap "
                "or memory budget; the model works at a smaller scale, and masks and heatmaps are at the decoded size")


# --------------------------------------------------------------------------- public


def read_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
               budget_bytes: int | None = None) -> np.ndarray:
    """Read an image file as a C-contiguous HxWx3 uint8 RGB array.

    Honours the EXIF orientation of JPEG files. Raises :class:`ImageDecodeError`
    (naming the file) when the path is missing, a directory, a pipe or device,
    empty, truncated, not an image, or has a pixel layout the runtime cannot use;
    :class:`ImageTooLargeError` before decoding when the header declares more than
    ``max_pixels`` pixels or a decode that would need more than ``budget_bytes``.
    """
    return read_image_within(path, max_pixels=max_pixels, budget_bytes=budget_bytes).image


def read_image_within(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                      budget_bytes: int | None = None, working_max_side: int | None = None,
                      max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> DecodedImage:
    """Read an image for a model that works at ``working_max_side`` px on its longer side.

    The header's size is checked before decoding. An image over ``max_pixels`` or
    whose decode would need more than ``budget_bytes`` is decoded at 1/2, 1/4 or
    1/8 of its size (OpenCV's reduced decoding) when the reduced image still has
    at least ``working_max_side`` px on its longer side; otherwise it is refused
    with :class:`ImageTooLargeError` giving the numbers. ``None`` (a model that
    works at full resolution) never reduces.
    """
    name = os.fspath(path)

    def refuse(problem: str, fix: str) -> NoReturn:
        raise ImageDecodeError(name, problem, fix)

    data = read_regular_file(name, max_file_bytes, refuse)
    return _decode(np.frombuffer(data, dtype=np.uint8), name, max_pixels, budget_bytes, working_max_side)


def image_file_size(path: str | os.PathLike[str]) -> int:
    """Bytes of image file ``path``, refusing what :func:`read_image` refuses (pipes, devices, ...)."""
    name = os.fspath(path)

    def refuse(problem: str, fix: str) -> NoReturn:
        raise ImageDecodeError(name, problem, fix)

    return regular_file_size(name, refuse, DEFAULT_MAX_FILE_BYTES)


def decode_image(data: bytes | bytearray | memoryview, name: str = "<bytes>", *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, budget_bytes: int | None = None) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) as HxWx3 uint8 RGB.

    ``name`` is only used in error messages (say, the file name a camera reported).
    The pixel cap and budget apply as in :func:`read_image`.
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
    return _decode(buffer, name, max_pixels, budget_bytes, None).image


def as_rgb_uint8(image: object, name: str = "image") -> np.ndarray:
    """Validate a caller's array and return it as C-contiguous HxWx3 uint8 RGB.

    The array is taken to be in RGB(A) order already (arrays from ``cv2.imread``
    are BGR: convert them with ``cv2.cvtColor(x, cv2.COLOR_BGR2RGB)`` or use
    :func:`read_image`). An HxWx3 uint8 C-contiguous array is returned as is, without
    a copy. HxW and HxWx1 are replicated to three channels, HxWx2 (gray + alpha)
    keeps the gray, HxWx4 drops alpha, uint16 is scaled to 0..255. Float, bool and
    other integer arrays are refused with :class:`InputError`: guessing whether a
    float image is on a 0..1 or 0..255 scale would silently change what the model
    sees. A PIL image is converted by PIL when its raw array is not RGB(A) or gray
    (CMYK, palette, YCbCr, ...); PIL is never imported here.
    """
    if not isinstance(image, np.ndarray):
        if _is_pil_image(image):
            image = _pil_to_array(image, name)
        elif hasattr(image, "__array_interface__") or hasattr(image, "__array__"):
            image = np.asarray(image)
        else:
            raise InputError(
                f"{name}: received {type(image).__name__}; expected a numpy array of shape "
                "HxWx3, dtype uint8 (RGB)"
            )
    array: np.ndarray = image
    received = f"received shape {array.shape}, dtype {array.dtype}"
    expected = "expected HxWx3 uint8 RGB (HxW gray, HxWx4 RGBA and uint16 are converted)"

    if array.dtype.hasobject or array.dtype.fields is not None:
        raise InputError(f"{name}: {received}; {expected}. Fix: build the image as a numeric array "
                         "(np.asarray(x, dtype=np.uint8))")
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
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name}: {received}; {expected}")
    if array.dtype.kind == "u" and array.dtype.itemsize in (1, 2) and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # big-endian 16-bit (PIL "I;16B", FITS, ...)
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


def _is_pil_image(image: object) -> bool:
    """Duck-typed, so the runtime does not import PIL to recognise its images."""
    return (isinstance(getattr(image, "mode", None), str) and callable(getattr(image, "convert", None))
            and hasattr(image, "size") and hasattr(image, "__array_interface__"))


def _pil_to_array(image: object, name: str) -> np.ndarray:
    mode: str = getattr(image, "mode")
    if mode in _PIL_CONVERT_TO_RGB:
        try:
            image = image.convert("RGB")  # type: ignore[attr-defined]
        except Exception as exc:  # a PIL error class cannot be named without importing PIL
            raise InputError(f"{name}: a PIL image in mode {mode!r} could not be converted to RGB ({exc}); "
                             "fix: convert it yourself, image.convert('RGB')") from exc
    return np.asarray(image)


# --------------------------------------------------------------------------- decoding


def _decode(data: np.ndarray, name: str, max_pixels: int, budget_bytes: int | None,
            working_max_side: int | None) -> DecodedImage:
    if data.size == 0:
        raise ImageDecodeError(name, "file is empty (0 bytes)", "re-copy or re-export the image")
    head = data[:16].tobytes()
    kind = sniff(head)

    orientation = 1
    header: ImageHeader | None
    if kind == "JPEG":
        jpeg = scan_jpeg(data.tobytes())
        orientation, header = jpeg.orientation, jpeg.header
        if not jpeg.complete:
            raise ImageDecodeError(
                name,
                f"truncated JPEG ({data.size} bytes, no end-of-image marker FFD9 after the image data)",
                "the file was cut short (interrupted transfer or write); copy or export it again",
            )
    else:
        header = read_header(data[:64].tobytes()) if kind != "TIFF" else tiff_header(data.tobytes())
    if kind is not None and (header is None or header.pixels == 0):
        # Every decoder of these formats needs the size first; without it the pixel cap could not apply.
        problem = "no image size in it" if header is None else f"it declares {header.width}x{header.height} pixels"
        raise ImageDecodeError(name, f"corrupt {kind} header: {problem}", f"export the image again as {SUPPORTED_FORMATS}")
    reduction = _choose_reduction(header, data.size, name, max_pixels, budget_bytes, working_max_side)

    try:
        decoded = cv2.imdecode(data, _REDUCTIONS[reduction])
    except cv2.error as exc:
        raise ImageDecodeError(name, f"OpenCV could not decode it ({_first_line(exc)})",
                               f"re-export it as {SUPPORTED_FORMATS}") from exc
    if decoded is None:
        if kind is None:
            raise ImageDecodeError(name, f"not a decodable image ({_describe_bytes(head)})",
                                   f"supported formats: {SUPPORTED_FORMATS}")
        raise ImageDecodeError(
            name,
            f"corrupt or truncated {kind} data ({data.size} bytes) that OpenCV could not decode",
            f"export the image again as {SUPPORTED_FORMATS}",
        )

    def fail(problem: str) -> NoReturn:
        raise ImageDecodeError(name, f"decoded to shape {decoded.shape}, dtype {decoded.dtype}: {problem}")

    try:
        rgb = _apply_orientation(_to_rgb_uint8(decoded, bgr_order=True, fail=fail), orientation)
    except cv2.error as exc:
        raise ImageDecodeError(name, f"OpenCV failed converting the pixels ({_first_line(exc)})") from exc
    if header is None and rgb.shape[0] * rgb.shape[1] > max_pixels:
        # A format outside SUPPORTED_FORMATS (OpenCV reads a few more): its size is known only now.
        raise ImageTooLargeError(name, f"decoded to {rgb.shape[1]}x{rgb.shape[0]} pixels, over the cap of "
                                 f"{max_pixels} pixels", f"re-export it as {SUPPORTED_FORMATS} at a smaller size",
                                 rgb.shape[1], rgb.shape[0], rgb.nbytes)
    width, height = (header.width, header.height) if header else (rgb.shape[1], rgb.shape[0])
    return DecodedImage(rgb, width, height, reduction)


def decode_bytes_needed(header: ImageHeader, reduction: int, file_bytes: int) -> int:
    """Bytes decoding takes at its peak: the file, the decoder's output and its copy, the RGB result.

    Measured with OpenCV 4.x/5.x: a full decode peaks near twice the decoded size
    (the codec's buffer and the returned array). JPEG decodes at reduced size
    inside libjpeg; other formats are decoded whole, as colour, then resized.
    """
    full = header.pixels * header.channels * header.bytes_per_sample
    out = math.ceil(header.width / reduction) * math.ceil(header.height / reduction) * 3
    if reduction == 1:
        return file_bytes + 2 * full + out
    if header.kind == "JPEG":
        return file_bytes + 3 * out
    return file_bytes + header.pixels * 3 * header.bytes_per_sample + 2 * out


def _choose_reduction(header: ImageHeader | None, file_bytes: int, name: str, max_pixels: int,
                      budget_bytes: int | None, working_max_side: int | None) -> int:
    """1 when the image fits; else the smallest reduction that fits and keeps the working scale."""
    if header is None:
        return 1  # a format without a parsed header: OpenCV's own pixel limit applies
    smallest = 1
    for reduction in _REDUCTIONS:
        if reduction > 1 and (working_max_side is None
                              or math.ceil(max(header.width, header.height) / reduction) < working_max_side):
            break
        smallest = reduction
        decoded_pixels = header.pixels if reduction == 1 or header.kind != "JPEG" else \
            math.ceil(header.width / reduction) * math.ceil(header.height / reduction)
        need = decode_bytes_needed(header, reduction, file_bytes)
        if decoded_pixels <= max_pixels and (budget_bytes is None or need <= budget_bytes):
            return reduction
    need = decode_bytes_needed(header, 1, file_bytes)
    limits = [f"the cap of {max_pixels} pixels" if header.pixels > max_pixels else ""]
    if budget_bytes is not None and need > budget_bytes:
        limits.append(f"the decode budget of {budget_bytes} bytes ({budget_bytes / 2**20:.0f} MiB)")
    over = " and ".join(x for x in limits if x) or "the limits"
    if working_max_side is None:
        scale = "the model works at full resolution, so it cannot be decoded at reduced size"
    elif smallest == max(_REDUCTIONS):
        scale = "decoded at 1/8 size it would not fit either" + (
            "" if header.kind == "JPEG" else f" ({header.kind} is decoded whole before it is reduced)")
    elif smallest == 1:
        scale = f"decoded at 1/2 size it would be under the {working_max_side} px a side the model works at"
    else:
        scale = (f"decoded at 1/{smallest} size it would not fit either, and any smaller it would be under the "
                 f"{working_max_side} px a side the model works at")
    raise ImageTooLargeError(
        name,
        f"the {header.kind} header declares {header.width}x{header.height} pixels ({header.pixels / 1e6:.0f} MP, "
        f"{header.channels} channels), which would take {need} bytes ({need / 2**20:.0f} MiB) to decode: over "
        f"{over}; {scale}",
        f"downscale the image before sending it (at most {math.isqrt(max_pixels)} px a side), or raise "
        "max_pixels / memory_budget if this size is genuine",
        header.width, header.height, need,
    )


def _describe_bytes(head: bytes) -> str:
    # The bytes themselves are never shown: the file may be a link to a secret, and
    # the message may travel to a remote client or a log.
    printable = sum(1 for b in head if 32 <= b < 127 or b in (9, 10, 13))
    if head and printable == len(head):
        return "it looks like text"
    return "no JPEG, PNG, TIFF, BMP or WebP signature at its start"


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
