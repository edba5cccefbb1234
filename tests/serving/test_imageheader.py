"""Image sizes read from headers, against what OpenCV decodes, for every format the runtime takes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgederm.runtime.errors import ImageDecodeError
from edgederm.serve.imageheader import image_size


@pytest.mark.parametrize("ext, params, kind", [
    (".png", [], "PNG"), (".jpg", [], "JPEG"), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "JPEG"),
    (".tiff", [], "TIFF"), (".bmp", [], "BMP"), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], "WebP"),
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], "WebP"),  # quality > 100: lossless (VP8L)
])
@pytest.mark.parametrize("width, height", [(37, 23), (1, 300), (4097, 2)])
def test_header_size_matches_the_decoded_image(ext, params, kind, width, height):
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(ext, image, params)
    assert ok
    data = encoded.tobytes()
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    assert image_size(data) == (kind, decoded.shape[1], decoded.shape[0]) == (kind, width, height)


@pytest.mark.parametrize("data, match", [
    (b"", "not a JPEG"),
    (b"hello world, not an image", r"not a JPEG .* \(first bytes 68 65 6c"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "cut short"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "cut short"),
    (b"\xff\xd8\xff\xda\x00\x08", "without a start-of-frame segment"),
])
def test_unreadable_headers_are_typed_errors(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        image_size(data, "upload")
