"""What an image file declares before a pixel is decoded: format, size, channels and
sample size (PNG IHDR, BMP info header, WebP VP8/VP8L/VP8X, JPEG start of frame, TIFF
IFD0), and a JPEG's EXIF orientation.

Read from the raw bytes with ``struct`` only, so the runtime can refuse an image whose
decoding would not fit the pixel cap or the memory budget before OpenCV allocates it
(runtime/imageio.py). A malformed header gives None, never an exception.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# from "not an image at all".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

EXIF_ORIENTATION_TAG = 0x0112
_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_BITS, _TIFF_SAMPLES = 256, 257, 258, 277


@dataclass(frozen=True)
class ImageHeader:
    """What an image file declares before any pixel is decoded."""

    kind: str
    width: int
    height: int
    channels: int
    bytes_per_sample: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(head: bytes) -> ImageHeader | None:
    """Size, channels and sample size from the first bytes of a PNG, BMP, WebP, JPEG or TIFF file.

    None when the format is not recognised or the header is cut short. JPEG and
    TIFF may need more than the first bytes: pass the whole file for them.
    """
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            width, height, depth, colour = struct.unpack_from(">IIBB", head, 16)
            channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(colour, 4)
            return ImageHeader("PNG", width, height, channels, 2 if depth > 8 else 1)
        if head.startswith(b"BM"):
            (info_size,) = struct.unpack_from("<I", head, 14)
            if info_size == 12:
                width, height, _, bits = struct.unpack_from("<HHHH", head, 18)
            else:
                width, height, _, bits = struct.unpack_from("<iiHH", head, 18)
            return ImageHeader("BMP", abs(width), abs(height), 4 if bits == 32 else 3, 1)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp_header(head)
        if head.startswith(b"\xff\xd8\xff"):
            return scan_jpeg(head).header
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return tiff_header(head)
    except struct.error:
        return None
    return None


def _webp_header(head: bytes) -> ImageHeader | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", head, 26)
        return ImageHeader("WebP", width & 0x3FFF, height & 0x3FFF, 3, 1)
    if chunk == b"VP8L" and head[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", head, 21)
        return ImageHeader("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4, 1)
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return ImageHeader("WebP", width, height, 4 if head[20] & 0x10 else 3, 1)
    return None


def tiff_header(tiff: bytes) -> ImageHeader | None:
    tags = _tiff_tags(tiff, (_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_BITS, _TIFF_SAMPLES))
    if _TIFF_WIDTH not in tags or _TIFF_HEIGHT not in tags:
        return None
    bits = tags.get(_TIFF_BITS, 8)
    return ImageHeader("TIFF", tags[_TIFF_WIDTH], tags[_TIFF_HEIGHT], max(1, min(tags.get(_TIFF_SAMPLES, 1), 4)),
                       1 if bits <= 8 else 2 if bits <= 16 else 4)


def sniff(head: bytes) -> str | None:
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


# --------------------------------------------------------------------------- JPEG and TIFF structure


@dataclass(frozen=True)
class JpegScan:
    orientation: int
    complete: bool
    header: ImageHeader | None


def scan_jpeg(data: bytes) -> JpegScan:
    """Walk the JPEG marker segments up to the first scan.

    Returns the EXIF orientation (1..8, 1 when absent or malformed: a broken tag
    must not make a good photo unreadable), whether an end-of-image marker follows
    the scan data, and the size of the start-of-frame segment. Inside entropy-coded
    data every 0xFF byte is stuffed (FF00) or a restart marker (FFD0-FFD7), so FFD9
    after the start of scan is the real end; searching only after the scan start
    ignores the FFD9 of an EXIF thumbnail.
    """
    orientation = 1
    header: ImageHeader | None = None
    offset = 2
    size = len(data)
    while offset + 4 <= size:
        if data[offset] != 0xFF:
            return JpegScan(orientation, False, header)  # broken segment structure; let the decoder judge
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            offset += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            return JpegScan(orientation, False, header)
        length = struct.unpack_from(">H", data, offset + 2)[0]
        if length < 2:
            return JpegScan(orientation, False, header)
        if marker == 0xDA:  # start of scan
            return JpegScan(orientation, data.find(b"\xff\xd9", offset + 2 + length) != -1, header)
        segment = data[offset + 4: offset + 2 + length]
        # Start of frame: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and header is None and len(segment) >= 6:
            precision, height, width, components = struct.unpack_from(">BHHB", segment)
            header = ImageHeader("JPEG", width, height, 1 if components == 1 else 3, 2 if precision > 8 else 1)
        if marker == 0xE1 and orientation == 1 and segment.startswith(b"Exif\x00\x00"):
            orientation = _tiff_tags(segment[6:], (EXIF_ORIENTATION_TAG,)).get(EXIF_ORIENTATION_TAG, 1)
            orientation = orientation if 1 <= orientation <= 8 else 1
        offset += 2 + length
    return JpegScan(orientation, False, header)


def _tiff_tags(tiff: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """The first value of each ``wanted`` SHORT/LONG tag of IFD0 of a TIFF structure.

    Tags that are absent, of another type, or malformed are left out: a broken tag
    must not make a readable image unreadable.
    """
    found: dict[int, int] = {}
    try:
        if tiff[:2] == b"II":
            order = "<"
        elif tiff[:2] == b"MM":
            order = ">"
        else:
            return found
        magic, ifd_offset = struct.unpack_from(order + "HI", tiff, 2)
        if magic != 42:
            return found
        (count,) = struct.unpack_from(order + "H", tiff, ifd_offset)
        for i in range(count):
            entry = ifd_offset + 2 + 12 * i
            tag, value_type, n_values = struct.unpack_from(order + "HHI", tiff, entry)
            if tag not in wanted or n_values < 1 or value_type not in (3, 4):
                continue
            item = "H" if value_type == 3 else "I"  # SHORT, or LONG (written by a few tools)
            where = entry + 8
            if n_values * struct.calcsize(item) > 4:  # values stored elsewhere; the field is their offset
                (where,) = struct.unpack_from(order + "I", tiff, entry + 8)
            (found[tag],) = struct.unpack_from(order + item, tiff, where)
    except struct.error:
        pass
    return found
