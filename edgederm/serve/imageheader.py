"""An encoded image's width and height from its header, without decoding it.

A server must refuse a 60000x60000 PNG before OpenCV allocates 10 GB for it, so the
dimensions are read from the bytes that declare them: PNG's IHDR chunk, JPEG's
start-of-frame segment, TIFF's first image directory, BMP's info header and WebP's
VP8/VP8L/VP8X chunk. An image whose header cannot be read is refused too: what the
server cannot size, it does not decode.
"""
from __future__ import annotations

import struct

from edgederm.runtime.errors import ImageDecodeError
from edgederm.runtime.imageio import SUPPORTED_FORMATS

__all__ = ["image_size"]

# JPEG start-of-frame markers (C0..CF) except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes, name: str = "<bytes>") -> tuple[str, int, int]:
    """``(format, width, height)`` of encoded image bytes; ImageDecodeError when unreadable."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(data, name)
        if data.startswith(b"\xff\xd8\xff"):
            return _jpeg(data, name)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff(data, name)
        if data.startswith(b"BM"):
            return _bmp(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data, name)
    except (struct.error, IndexError):
        raise ImageDecodeError(name, f"the image header is cut short ({len(data)} bytes)",
                               "send the whole file") from None
    shown = data[:8]
    raise ImageDecodeError(name, f"not a {SUPPORTED_FORMATS} image (first bytes {shown.hex(' ') or 'none'})",
                           "send the file's bytes as the camera or the disk has them")


def _png(data: bytes, name: str) -> tuple[str, int, int]:
    width, height = struct.unpack_from(">II", data, 16)  # first, so a short header reads as cut short
    if data[12:16] != b"IHDR":
        raise ImageDecodeError(name, "PNG without an IHDR chunk first", "export the image again as PNG")
    return "PNG", width, height


def _jpeg(data: bytes, name: str) -> tuple[str, int, int]:
    pos = 2
    while True:
        while data[pos] == 0xFF and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        if data[pos] != 0xFF:
            raise ImageDecodeError(name, f"corrupt JPEG: no marker at byte {pos}", "export the image again")
        marker = data[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            raise ImageDecodeError(name, "JPEG without a start-of-frame segment before its image data",
                                   "export the image again")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF_MARKERS:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return "JPEG", width, height
        pos += 2 + length


def _tiff(data: bytes, name: str) -> tuple[str, int, int]:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (count,) = struct.unpack_from(order + "H", data, ifd)
    found: dict[int, int] = {}
    for index in range(count):
        tag, kind = struct.unpack_from(order + "HH", data, ifd + 2 + 12 * index)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = "H" if kind == 3 else "I"
            found[tag] = struct.unpack_from(order + fmt, data, ifd + 2 + 12 * index + 8)[0]
    if 256 not in found or 257 not in found:
        raise ImageDecodeError(name, "TIFF whose first directory has no ImageWidth/ImageLength",
                               "export the image again")
    return "TIFF", found[256], found[257]


def _bmp(data: bytes) -> tuple[str, int, int]:
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack_from("<HH", data, 18)
    else:
        width, height = struct.unpack_from("<ii", data, 18)
    return "BMP", abs(width), abs(height)  # negative height: rows stored top-down


def _webp(data: bytes, name: str) -> tuple[str, int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack_from("<HH", data, 26)
        return "WebP", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        (bits,) = struct.unpack_from("<I", data, 21)
        return "WebP", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8X":
        raw = data[24:30]
        if len(raw) < 6:
            raise struct.error
        return "WebP", 1 + int.from_bytes(raw[:3], "little"), 1 + int.from_bytes(raw[3:], "little")
    raise ImageDecodeError(name, f"WebP with an unknown first chunk {chunk!r}", "export the image again")
