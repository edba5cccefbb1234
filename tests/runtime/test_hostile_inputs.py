"""Hostile and careless inputs at the runtime boundary: files, arrays, metadata, the CLI.

Every case names its expected outcome (a typed error and what its message must say,
or a valid result) and runs under a deadline: a case that hangs fails instead of
stopping the suite. Across all of them: no untyped exception, no hang, no NaN in a
returned probability, no file contents in a message, and the CLI answers a refusal
with exactly one stderr line and exit status 2.

The corpus is generated here (FIFOs, sockets, links, crafted headers), not stored.
Property-based cases (hypothesis) run 50 examples each; set EDGEDERM_FUZZ_EXAMPLES
(e.g. 5000) for a longer run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest

from edgederm.runtime.errors import BundleError, EdgeDermError, ImageDecodeError, ImageTooLargeError, InputError
from edgederm.runtime.imageheader import read_header
from edgederm.runtime.imageio import (DEFAULT_MAX_PIXELS, as_rgb_uint8, decode_bytes_needed, decode_image, read_image,
                                      read_image_within)
from edgederm.runtime.metadata import is_non_finite_number, load_schema

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "setitimer"),
                                reason="FIFOs and interval timers are POSIX")

CASE_SECONDS = 20.0
SECRET = "root:x:0:0:root:/root:/bin/bash\n"


class Hang(Exception):
    """A case outlived its deadline (deliberately not an EdgeDermError)."""


@contextlib.contextmanager
def deadline(seconds: float = CASE_SECONDS) -> Iterator[None]:
    """Interrupt the case after ``seconds``; a blocking open() of a FIFO is interrupted too."""
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call: Callable[[], Any], seconds: float = CASE_SECONDS) -> Any:
    """The call's value, or the EdgeDermError it raised; anything else fails the case."""
    with deadline(seconds):
        try:
            return call()
        except EdgeDermError as exc:
            return exc


def check(result: Any, expected: type[Exception] | None, match: str | None) -> None:
    if expected is None:
        assert not isinstance(result, Exception), f"expected a result, got {type(result).__name__}: {result}"
        return
    assert isinstance(result, expected), f"expected {expected.__name__}, got {type(result).__name__}: {result!r}"
    message = str(result)
    assert "root:x:0" not in message, "a file's contents reached the message"
    if match:
        assert match in message, message


def _png(array_bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array_bgr)
    assert ok
    return buf.tobytes()


def _jpeg(array_bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", array_bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _png_chunk(kind: bytes, data: bytes, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(kind + data) ^ (0 if crc_ok else 1)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int, colour: int = 2) -> bytes:
    """A PNG signature and IHDR declaring ``width x height``, then a token IDAT and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def constant_png(width: int, height: int, rgb: tuple[int, int, int] = (120, 90, 200), rows_per_block: int = 50) -> bytes:
    """A valid ``width x height`` RGB PNG of one colour, without ever holding its pixels.

    One block of rows is deflated once and ended with a full flush, which resets the
    compressor, so the same bytes encode every block; the zlib stream's adler32 is
    computed over the repeated rows.
    """
    assert height % rows_per_block == 0
    block = (b"\x00" + bytes(rgb) * width) * rows_per_block
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    blocks = height // rows_per_block
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    stream = b"\x78\xda" + piece * blocks + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", stream) + _png_chunk(b"IEND", b""))


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose start-of-frame is rewritten to declare ``width x height``."""
    data = bytearray(_jpeg(np.full((16, 16, 3), 128, np.uint8)))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_with_size(width: int, height: int) -> bytes:
    ok, buf = cv2.imencode(".bmp", np.zeros((4, 4, 3), np.uint8))
    data = bytearray(buf.tobytes())
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def tiff_with_size(width: int, height: int) -> bytes:
    ok, buf = cv2.imencode(".tiff", np.zeros((4, 4, 3), np.uint8))
    data = bytearray(buf.tobytes())
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (count,) = struct.unpack_from(order + "H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        (tag,) = struct.unpack_from(order + "H", data, entry)
        if tag in (256, 257):  # rewritten as LONG, which holds any size
            struct.pack_into(order + "HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def webp_vp8x_with_size(width: int, height: int) -> bytes:
    payload = bytes([0, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


# --------------------------------------------------------------------------- files


def _file_cases(root: Path) -> dict[str, tuple[Path | str, type[Exception] | None, str | None]]:
    """name -> (path, expected error class or None for a valid image, text the message must hold)."""
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> Path:
        path = root / name
        path.write_bytes(data)
        return path

    fifo = root / "pipe.jpg"
    os.mkfifo(fifo)
    sock_path = root / "s.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    _open_sockets.append(sock)
    loop_a, loop_b = root / "loop_a.jpg", root / "loop_b.jpg"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    secret = write("secret.txt", SECRET.encode())
    (root / "passwd.jpg").symlink_to(secret)
    (root / "folder.png").mkdir()
    png = _png(image)
    jpeg = _jpeg(image)
    bad_crc = png[:33] + _png_chunk(b"tEXt", b"Comment\x00hi", crc_ok=False) + png[33:]
    cases: dict[str, tuple[Path | str, type[Exception] | None, str | None]] = {
        "fifo": (fifo, ImageDecodeError, "not a regular file: it is a FIFO"),
        "dev_zero": ("/dev/zero", ImageDecodeError, "not a regular file: it is a character device"),
        "dev_null": ("/dev/null", ImageDecodeError, "not a regular file: it is a character device"),
        "socket": (sock_path, ImageDecodeError, "not a regular file: it is a socket"),
        "symlink_loop": (loop_a, ImageDecodeError, "symlink loop"),
        "dangling_symlink": (root / "dangling.jpg", ImageDecodeError, "dangling symlink"),
        "symlink_to_secret": (root / "passwd.jpg", ImageDecodeError, "looks like text"),
        "missing": (root / "absent.jpg", ImageDecodeError, "does not exist"),
        "directory": (root / "folder.png", ImageDecodeError, "directory"),
        "nul_in_path": (str(root / "a\x00b.png"), ImageDecodeError, "NUL byte"),
        "path_too_long": (str(root / ("x" * 5000)), ImageDecodeError, "too long"),
        "empty": (write("empty.jpg", b""), ImageDecodeError, "empty (0 bytes)"),
        "text": (write("notes.png", b"patient notes, not pixels\n"), ImageDecodeError, "looks like text"),
        "binary_noise": (write("noise.jpg", bytes(range(256)) * 4), ImageDecodeError, "no JPEG, PNG"),
        "truncated_png": (write("cut.png", png[: len(png) // 2]), ImageDecodeError, "corrupt or truncated PNG"),
        "png_signature_only": (write("sig.png", png[:8]), ImageDecodeError, "PNG"),
        "truncated_jpeg": (write("cut.jpg", jpeg[: len(jpeg) // 2]), ImageDecodeError, "truncated JPEG"),
        "jpeg_without_end": (write("noend.jpg", jpeg[:-2]), ImageDecodeError, "truncated JPEG"),
        "png_60000": (write("huge.png", png_header_only(60000, 60000)), ImageTooLargeError, "60000x60000"),
        "png_0x0": (write("zero.png", png_header_only(0, 0)), ImageDecodeError, "0x0"),
        "png_2_31": (write("max.png", png_header_only(2**31 - 1, 2**31 - 1)), ImageTooLargeError, "x2147483647"),
        "jpeg_65535": (write("huge.jpg", jpeg_with_size(65535, 65535)), ImageTooLargeError, "65535x65535"),
        "bmp_huge": (write("huge.bmp", bmp_with_size(50000, -50000)), ImageTooLargeError, "50000x50000"),
        "tiff_huge": (write("huge.tif", tiff_with_size(100000, 100000)), ImageTooLargeError, "100000x100000"),
        "webp_huge": (write("huge.webp", webp_vp8x_with_size(16_000_000, 16_000_000)), ImageTooLargeError,
                      "16000000x16000000"),
        "png_named_jpg": (write("really_png.jpg", png), None, None),
        "jpeg_named_png": (write("really_jpeg.png", jpeg), None, None),
        "png_bad_ancillary_crc": (write("crc.png", bad_crc), None, None),
        "valid_png": (write("ok.png", png), None, None),
    }
    return cases


_open_sockets: list[socket.socket] = []


@pytest.fixture(scope="module")
def file_cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cases = _file_cases(tmp_path_factory.mktemp("hostile_files"))
    yield cases
    for sock in _open_sockets:
        sock.close()


FILE_CASE_NAMES = [
    "fifo", "dev_zero", "dev_null", "socket", "symlink_loop", "dangling_symlink", "symlink_to_secret", "missing",
    "directory", "nul_in_path", "path_too_long", "empty", "text", "binary_noise", "truncated_png", "png_signature_only",
    "truncated_jpeg", "jpeg_without_end", "png_60000", "png_0x0", "png_2_31", "jpeg_65535", "bmp_huge", "tiff_huge",
    "webp_huge", "png_named_jpg", "jpeg_named_png", "png_bad_ancillary_crc", "valid_png",
]


@pytest.mark.parametrize("name", FILE_CASE_NAMES)
def test_hostile_files(file_cases: dict[str, Any], name: str) -> None:
    path, expected, match = file_cases[name]
    result = outcome(lambda: read_image(path))
    check(result, expected, match)
    if expected is None:
        assert result.dtype == np.uint8 and result.ndim == 3 and result.shape[2] == 3 and result.flags.c_contiguous
    else:
        assert str(path)[:40] in str(result)  # the message names the file


def test_every_file_case_is_run(file_cases: dict[str, Any]) -> None:
    assert sorted(file_cases) == sorted(FILE_CASE_NAMES)


def test_a_fifo_swapped_in_after_the_check_cannot_block(tmp_path: Path) -> None:
    """The file is opened non-blocking and judged again by what was opened."""
    from edgederm.runtime import files

    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)

    def refuse(problem: str, fix: str) -> Any:
        raise ImageDecodeError(fifo, problem, fix)

    real_check = files.regular_file_size
    try:
        files.regular_file_size = lambda *a, **k: 10  # the stat "saw" a regular file
        result = outcome(lambda: files.read_regular_file(fifo, 1000, refuse), seconds=5)
    finally:
        files.regular_file_size = real_check
    check(result, ImageDecodeError, "FIFO")


# --------------------------------------------------------------------------- pixel cap and budget


def test_header_sizes_are_read_for_every_supported_format() -> None:
    image = np.zeros((30, 70, 3), np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp"):
        ok, buf = cv2.imencode(ext, image)
        assert ok
        data = buf.tobytes()
        header = read_header(data)
        assert header is not None, ext
        assert (header.width, header.height) == (70, 30), ext
    gray16 = read_header(_png(np.zeros((5, 9), np.uint16)))
    assert gray16 is not None and (gray16.channels, gray16.bytes_per_sample) == (1, 2)


def test_a_20000_px_png_under_1gib_is_refused_before_decoding_with_the_numbers(tmp_path: Path) -> None:
    """The issue's bomb: a ~1 MB PNG of 20000x20000 would take 2.4 GB to decode."""
    path = tmp_path / "bomb.png"
    path.write_bytes(constant_png(20000, 20000))
    assert path.stat().st_size < 3_000_000
    script = f"""
import os, sys
from edgederm.runtime.errors import ImageTooLargeError
from edgederm.runtime.imageio import read_image_within
try:
    read_image_within({str(path)!r}, budget_bytes=1 << 30, working_max_side=None, max_pixels=10**9)
except ImageTooLargeError as exc:
    print(str(exc))
    print(exc.width, exc.height, exc.decode_bytes)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(int(line.split()[1]) * 1024)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    message, numbers, peak = proc.stdout.strip().splitlines()
    assert "20000x20000" in message and "1073741824 bytes" in message and "MiB" in message
    width, height, need = (int(v) for v in numbers.split())
    assert (width, height) == (20000, 20000) and need > 2 * 20000 * 20000 * 3
    assert int(peak) < 300 * 2**20, "the image was decoded before it was refused"


def test_predict_file_under_1gib_refuses_the_20000_px_png_before_decoding(tiny_bundle: Path, tmp_path: Path) -> None:
    """Through the model: the budget left after the loaded model decides, and the peak stays low."""
    path = tmp_path / "bomb.png"
    path.write_bytes(constant_png(20000, 20000))
    script = f"""
from edgederm.runtime import load
from edgederm.runtime.errors import ImageTooLargeError
from edgederm.runtime.rss import peak_rss_bytes
model = load({str(tiny_bundle)!r}, precision="fp32", memory_budget="1GiB", cache=False)
model.max_image_pixels = 10**9  # so that the budget, not the pixel cap, is what refuses
try:
    model.predict_file({str(path)!r})
    print("predicted")
except ImageTooLargeError as exc:
    print(str(exc))
print(peak_rss_bytes())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    message, peak = proc.stdout.strip().splitlines()
    assert "20000x20000" in message and "decode budget" in message, message
    assert int(peak) < 2**30


def test_the_default_pixel_cap_refuses_a_20000_px_png(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(ImageTooLargeError, match=rf"20000x20000 pixels.*cap of {DEFAULT_MAX_PIXELS} pixels"):
        read_image(path)


def test_a_big_jpeg_is_decoded_at_reduced_size_when_the_model_works_smaller(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    image = cv2.resize(small, (2000, 1500), interpolation=cv2.INTER_LINEAR)  # smooth, like skin
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(image))
    # 3 MP over a 1 MP cap: 1/2 is 0.75 MP and keeps 1000 px >= the 600 px the model needs.
    read = read_image_within(path, max_pixels=1_000_000, working_max_side=600)
    assert read.reduction == 2 and read.image.shape == (750, 1000, 3)
    assert (read.width, read.height) == (2000, 1500) and "1/2" in (read.note or "")
    reference = cv2.resize(read_image(path), (1000, 750), interpolation=cv2.INTER_AREA)
    assert np.abs(read.image.astype(int) - reference).mean() < 2.0  # the same picture, at half size
    # A model at full resolution (None) or one needing 1600 px cannot take a reduced decode.
    for working in (None, 1600):
        with pytest.raises(ImageTooLargeError, match="2000x1500"):
            read_image_within(path, max_pixels=1_000_000, working_max_side=working)


def test_reduced_decode_is_chosen_by_the_budget(tmp_path: Path) -> None:
    image = np.full((1600, 1600, 3), 90, np.uint8)
    path = tmp_path / "flat.jpg"
    path.write_bytes(_jpeg(image))
    header = read_header(path.read_bytes())
    assert header is not None
    size = path.stat().st_size
    budget = decode_bytes_needed(header, 4, size)  # fits 1/4, not 1/2
    assert decode_bytes_needed(header, 2, size) > budget
    read = read_image_within(path, budget_bytes=budget, working_max_side=100)
    assert read.reduction == 4 and read.image.shape == (400, 400, 3)


def test_exif_orientation_is_kept_by_a_reduced_decode(tmp_path: Path) -> None:
    """OpenCV's reduced modes would rotate by EXIF themselves; the runtime rotates once."""
    image = np.zeros((400, 800, 3), np.uint8)
    image[:, :400] = 255  # left half white
    data = _jpeg(image)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + b"\0" * 4
    app1 = b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\x00\x00" + tiff
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data[:2] + app1 + data[2:])
    full = read_image(path)
    reduced = read_image_within(path, max_pixels=100_000, working_max_side=100)
    # 320000 px over a 100000 px cap; the 1/2 decode (80000 px) fits
    assert full.shape == (800, 400, 3) and reduced.reduction == 2 and reduced.image.shape == (400, 200, 3)
    small = cv2.resize(full, (200, 400), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - reduced.image).mean() < 8.0


# --------------------------------------------------------------------------- arrays


def _pil_cases() -> dict[str, Any]:
    Image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    return {
        "RGB": base, "RGBA": base.convert("RGBA"), "L": base.convert("L"), "LA": base.convert("LA"),
        "P": base.convert("P"), "PA": base.convert("PA"), "CMYK": base.convert("CMYK"),
        "YCbCr": base.convert("YCbCr"), "HSV": base.convert("HSV"), "1": base.convert("1"),
        "I;16": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "I": base.convert("I"),
        "F": base.convert("F"), "LAB": base.convert("LAB"),
    }


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "HSV", "1", "I;16", "I", "F", "LAB"])
def test_pil_images_of_every_mode_are_converted_or_refused(mode: str) -> None:
    image = _pil_cases()[mode]
    result = outcome(lambda: as_rgb_uint8(image))
    if mode in ("I", "F"):  # 32-bit integers and floats: the scale is the caller's to choose
        check(result, InputError, "uint8")
        return
    check(result, None, None)
    assert result.dtype == np.uint8 and result.shape == (24, 32, 3)
    if mode == "I;16":
        expected = np.repeat(np.asarray(image).astype(np.uint32)[..., None] // 257, 3, axis=2)
    else:  # what PIL itself gives as RGB (alpha dropped, palette looked up, CMYK inverted, ...)
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(result, expected), mode


def test_a_cmyk_pil_image_is_not_read_as_rgba() -> None:
    Image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cmyk = Image.fromarray(rgb).convert("CMYK")
    result = as_rgb_uint8(cmyk)
    assert np.array_equal(result, np.asarray(cmyk.convert("RGB")))
    assert result[0, 0, 0] > 150 and result[0, 0, 1] < 60  # red stays red (C, M, Y as R, G, B would be cyan-ish)


def test_predict_on_a_cmyk_pil_image_answers_as_on_its_rgb(tiny_bundle: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    rgb = cv2.resize(np.random.default_rng(6).integers(0, 256, (8, 8, 3), dtype=np.uint8), (96, 96))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    model = _model(tiny_bundle)
    got = model.predict(dermoscopy=cmyk).probabilities
    expected = model.predict(dermoscopy=np.asarray(cmyk.convert("RGB"))).probabilities
    as_rgba = model.predict(dermoscopy=np.asarray(cmyk)[..., :3]).probabilities  # what the raw array would mean
    assert got == expected and got != as_rgba


def _array_cases() -> dict[str, tuple[Any, type[Exception] | None]]:
    rng = np.random.default_rng(2)
    good = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    nan = good.astype(np.float32)
    nan[0, 0, 0] = np.nan
    structured = np.zeros((16, 16), dtype=[("r", "u1"), ("g", "u1"), ("b", "u1")])
    readonly = good.copy()
    readonly.flags.writeable = False
    return {
        "uint8_rgb": (good, None),
        "non_contiguous": (good[:, ::2], None),
        "fortran_order": (np.asfortranarray(good), None),
        "read_only": (readonly, None),
        "gray": (good[..., 0], None),
        "gray_1": (good[..., :1], None),
        "gray_alpha": (good[..., :2], None),
        "rgba": (np.dstack([good, good[..., :1]]), None),
        "uint16": (good.astype(np.uint16) * 257, None),
        "uint16_big_endian": ((good.astype(np.uint16) * 257).astype(">u2"), None),
        "float_0_1": (good / 255.0, InputError),
        "float_nan": (nan, InputError),
        "float_all_inf": (np.full((16, 16, 3), np.inf, np.float32), InputError),
        "float16": (good.astype(np.float16), InputError),
        "complex": (good.astype(np.complex64), InputError),
        "int32": (good.astype(np.int32), InputError),
        "int8_negative": ((good.astype(np.int16) - 128).astype(np.int8), InputError),
        "int64_huge": (good.astype(np.int64) * 10**12, InputError),
        "bool": (good > 128, InputError),
        "object": (good.astype(object), InputError),
        "structured": (structured, InputError),
        "five_channels": (np.zeros((16, 16, 5), np.uint8), InputError),
        "batch_4d": (good[None], InputError),
        "one_d": (good.ravel(), InputError),
        "empty": (np.zeros((0, 10, 3), np.uint8), InputError),
        "one_pixel": (np.zeros((1, 1, 3), np.uint8), InputError),
        "strip_20000x20": (np.zeros((20000, 20, 3), np.uint8), InputError),
        "list": ([[1, 2, 3]], InputError),
        "string": ("lesion.jpg", InputError),
        "bytes": (b"\x89PNG", InputError),
    }


ARRAY_CASE_NAMES = list(_array_cases())


@pytest.mark.parametrize("name", ARRAY_CASE_NAMES)
def test_hostile_arrays_through_predict(tiny_bundle: Path, name: str) -> None:
    model = _model(tiny_bundle)
    array, expected = _array_cases()[name]
    result = outcome(lambda: model.predict(dermoscopy=array))
    check(result, expected, None)
    if expected is None:
        probabilities = list(result.probabilities.values())
        assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probabilities)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


_models: dict[Path, Any] = {}


def _model(bundle: Path, fresh: bool = False) -> Any:
    """The bundle loaded once for the module (``fresh``: a model of the test's own)."""
    from edgederm.runtime import load

    if fresh:
        return load(bundle, precision="fp32", cache=False)
    if bundle not in _models:
        _models[bundle] = load(bundle, precision="fp32", cache=False)
    return _models[bundle]


def test_predict_file_decodes_a_big_jpeg_at_the_classifier_scale(tiny_bundle: Path, tmp_path: Path) -> None:
    model = _model(tiny_bundle, fresh=True)
    side = model._working_max_side()
    assert side is not None
    image = cv2.resize(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8), (2 * side, 2 * side),
                       interpolation=cv2.INTER_NEAREST)
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(image))
    model.max_image_pixels = side * side  # the full image is 4x over, a 1/2 decode fits
    result = model.predict_file(path)
    assert any("decoded at 1/2 size" in note for note in result.notes), result.notes
    assert all(math.isfinite(p) for p in result.probabilities.values())
    model.max_image_pixels = side * side // 16  # 1/8 would fit but falls below the working scale
    with pytest.raises(ImageTooLargeError, match=f"{2 * side}x{2 * side}"):
        model.predict_file(path)


# --------------------------------------------------------------------------- metadata


def _non_finite_values() -> list[Any]:
    values: list[Any] = [float("nan"), float("inf"), float("-inf"), Decimal("NaN"), Decimal("Infinity"),
                         np.array(np.nan), complex(np.nan, 0)]
    for kind in (np.float16, np.float32, np.float64, np.longdouble):
        values += [kind("nan"), kind("inf"), kind("-inf")]
    values += [np.complex64(complex(np.nan, 0)), np.complex128(complex(0, np.inf))]
    return values


@pytest.mark.parametrize("value", _non_finite_values(), ids=lambda v: f"{type(v).__name__}:{v!r}")
def test_non_finite_metadata_of_every_numeric_type_is_refused(tiny_bundle: Path, value: Any) -> None:
    model = _model(tiny_bundle)
    image = np.full((64, 64, 3), 120, np.uint8)
    result = outcome(lambda: model.predict(dermoscopy=image, metadata={"age": value}))
    check(result, InputError, "'age'")
    assert "finite" in str(result)


@pytest.mark.parametrize("value", [0, 1.5, np.float32(3.0), np.int64(7), -0.0, 1e308, True, "54", None, ""])
def test_finite_and_missing_values_are_not_taken_for_nan(value: Any) -> None:
    assert not is_non_finite_number(value)


def _metadata_cases() -> dict[str, tuple[Any, type[Exception] | None]]:
    return {
        "valid": ({"age": 54, "sex": "female", "site": "back"}, None),
        "numpy_values": ({"age": np.int32(54), "sex": np.str_("male")}, None),
        "missing_all": ({}, None),
        "none_values": ({"age": None, "sex": None, "site": None}, None),
        "nan_is_missing_in_tables": ({"age": np.float32("nan")}, None),
        "inf_age": ({"age": np.float16("inf")}, InputError),
        "huge_string": ({"sex": "x" * 10_000_000}, InputError),
        "huge_key": ({"k" * 1_000_000: 1}, InputError),
        "nested_dict": ({"sex": {"a": {"b": 1}}}, InputError),
        "list_value": ({"site": ["back", "face"]}, InputError),
        "array_value": ({"age": np.array([54, 55])}, InputError),
        "bytes_age": ({"age": b"54"}, InputError),
        "object_value": ({"age": object()}, InputError),
        "unknown_field": ({"weight": 80}, InputError),
        "mixed_key_types": ({1: "a", "b": 2}, InputError),
        "wrong_category": ({"sex": "unknown-sex"}, InputError),
        "text_age": ({"age": "fifty"}, InputError),
    }


@pytest.mark.parametrize("name", list(_metadata_cases()))
def test_hostile_metadata_is_encoded_or_refused(name: str) -> None:
    schema = load_schema("synthetic")
    record, expected = _metadata_cases()[name]
    result = outcome(lambda: schema.encode(record))
    check(result, expected, None)
    if expected is None:
        assert result.shape == (schema.dim,) and np.isfinite(result).all()
    else:
        assert len(str(result)) < 2000, "the message repeats the caller's value in full"


# --------------------------------------------------------------------------- CLI


def _cli(args: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from edgederm.cli import main

    with deadline():
        status = main(args)
    captured = capfd.readouterr()
    return status, captured.out, captured.err


CLI_REFUSALS = ["fifo", "dev_zero", "symlink_loop", "symlink_to_secret", "truncated_png", "png_60000", "empty",
                "directory", "text", "truncated_jpeg"]


@pytest.mark.parametrize("name", CLI_REFUSALS)
def test_cli_refuses_hostile_images_in_one_line(tiny_bundle: Path, file_cases: dict[str, Any], name: str,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    path, _, match = file_cases[name]
    status, out, err = _cli(["predict", str(tiny_bundle), str(path), "--precision", "fp32"], capfd)
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgederm predict: error:") and match in lines[0]
    assert "root:x:0" not in err + out and out == ""


def test_cli_fifo_manifest_is_one_line_not_a_hang(tiny_bundle: Path, tmp_path: Path, file_cases: dict[str, Any],
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")
    status, _, err = _cli(["predict", str(bundle), str(file_cases["valid_png"][0])], capfd)
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "not a regular file: it is a FIFO" in err


def test_fifo_manifest_is_a_typed_error(tmp_path: Path) -> None:
    from edgederm.runtime.bundle import read_manifest

    os.mkfifo(tmp_path / "manifest.json")
    check(outcome(lambda: read_manifest(tmp_path), seconds=5), BundleError, "not a regular file: it is a FIFO")


def test_manifest_over_the_size_limit_is_refused_before_reading(tmp_path: Path) -> None:
    from edgederm.runtime.bundle import MAX_MANIFEST_BYTES, read_manifest

    with open(tmp_path / "manifest.json", "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: no bytes written
    check(outcome(lambda: read_manifest(tmp_path)), BundleError, "over the limit")


@pytest.mark.parametrize("metadata, status, message", [
    ("{" + " " * 400 + '"age": 54, "sex": "female"}', 0, None),
    ('{"age": NaN}', 2, "finite"),
    ('{"age": ' + "[" * 100_000 + "]" * 100_000 + "}", 2, "not valid JSON"),
    ("no/such/metadata.json", 2, "does not exist"),
    ("m" * 5000, 2, "too long"),
    ("/dev/zero", 2, "not a regular file"),
])
def test_cli_metadata_text_or_path(tiny_bundle: Path, file_cases: dict[str, Any], capfd: pytest.CaptureFixture[str],
                                   metadata: str, status: int, message: str | None) -> None:
    got, out, err = _cli(["predict", str(tiny_bundle), str(file_cases["valid_png"][0]), "--metadata", metadata,
                          "--precision", "fp32", "--json"], capfd)
    assert got == status, err
    if status == 2:
        assert len(err.splitlines()) == 1 and message in err, err
    else:
        result = json.loads(out)
        assert all(math.isfinite(p) for p in result["probabilities"].values())


def test_cli_native_warnings_do_not_add_lines_to_a_refusal(tiny_bundle: Path, tmp_path: Path) -> None:
    """libpng writes its warnings to descriptor 2 itself; a refusal is still one line."""
    png = _png(np.zeros((32, 32, 3), np.uint8))
    # a bad CRC in an ancillary chunk (libpng warns) and the image data cut (refused)
    damaged = png[:33] + _png_chunk(b"tEXt", b"Comment\x00hi", crc_ok=False) + png[33:-30]
    path = tmp_path / "damaged.png"
    path.write_bytes(damaged)
    proc = subprocess.run([sys.executable, "-m", "edgederm.cli", "predict", str(tiny_bundle), str(path)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("edgederm predict: error:"), proc.stderr
    assert "libpng" not in proc.stderr and "WARN" not in proc.stderr


# --------------------------------------------------------------------------- property-based

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("EDGEDERM_FUZZ_EXAMPLES", "50")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_SEED_IMAGE = np.random.default_rng(5).integers(0, 256, (24, 20, 3), dtype=np.uint8)
_SEEDS = {"png": _png(_SEED_IMAGE), "jpeg": _jpeg(_SEED_IMAGE),
          "bmp": cv2.imencode(".bmp", _SEED_IMAGE)[1].tobytes(), "webp": cv2.imencode(".webp", _SEED_IMAGE)[1].tobytes(),
          "tiff": cv2.imencode(".tiff", _SEED_IMAGE)[1].tobytes()}


def _decodes_or_refuses(data: bytes) -> None:
    result = outcome(lambda: decode_image(data, "fuzz", max_pixels=4_000_000), seconds=30)
    if isinstance(result, Exception):
        assert isinstance(result, ImageDecodeError)
    else:
        assert result.dtype == np.uint8 and result.ndim == 3 and result.shape[2] == 3
        assert result.shape[0] * result.shape[1] <= 4_000_000


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_decode_or_refuse(data: bytes) -> None:
    _decodes_or_refuses(data)


@FUZZ
@given(st.sampled_from(sorted(_SEEDS)), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_fuzz_mutated_images_decode_or_refuse(kind: str, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_SEEDS[kind])
    for position, value in edits:
        data[position % len(data)] = value
    _decodes_or_refuses(bytes(data[: max(1, len(data) - cut % len(data))]))


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.sampled_from([0, 2, 3, 4, 6, 7]))
def test_fuzz_png_header_sizes(width: int, height: int, colour: int) -> None:
    _decodes_or_refuses(png_header_only(width, height, colour))


_metadata_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=50)
    | st.binary(max_size=10) | st.floats(width=32).map(np.float32) | st.floats(width=16).map(np.float16)
    | st.sampled_from(["female", "male", "back", "face", "", "NaN", "inf"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["age", "sex", "site", "other"]) | st.text(max_size=8), _metadata_values,
                       max_size=4))
def test_fuzz_metadata_encodes_finite_or_refuses(record: dict[str, Any]) -> None:
    schema = load_schema("synthetic")
    result = outcome(lambda: schema.encode(record))
    if isinstance(result, Exception):
        assert isinstance(result, InputError)
    else:
        assert result.shape == (schema.dim,) and np.isfinite(result).all()


@FUZZ
@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([np.float16, np.float32, np.float64, float]))
def test_fuzz_non_finite_check_agrees_with_numpy(value: float, kind: type) -> None:
    with np.errstate(over="ignore"):
        number = kind(value)
    assert is_non_finite_number(number) == (not np.isfinite(number))


def _minimal_manifest(root: Path) -> dict[str, Any]:
    import hashlib

    graph = root / "classifier.fp32.onnx"
    graph.write_bytes(b"not parsed by read_manifest")
    digest = hashlib.sha256(graph.read_bytes()).hexdigest()
    return {
        "format": "edgederm-bundle", "format_version": 1,
        "model": {"name": "m", "task": "classify", "class_names": ["a", "b"], "input_size": [32, 32]},
        "preprocess": {}, "clinical": {"temperature": 1.0, "review_threshold": 0.5},
        "stages": [{"name": "classifier", "inputs": [{"name": "x", "shape": [1, 3, 32, 32], "source": "dermoscopy"}],
                    "outputs": [{"name": "logits", "shape": [1, 2]}],
                    "graphs": {"fp32": {"file": graph.name, "sha256": digest}}}],
        "files": {graph.name: {"sha256": digest, "bytes": graph.stat().st_size}},
    }


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(st.lists(st.sampled_from(["format_version", "model", "stages", "files", "stages.0", "stages.0.graphs",
                                 "stages.0.graphs.fp32", "stages.0.graphs.fp32.file", "files.classifier.fp32.onnx",
                                 "model.class_names", "clinical"]), min_size=1, max_size=3),
       st.lists(_json_values, min_size=3, max_size=3))
def test_fuzz_manifest_parsing_is_typed(tmp_path_factory: pytest.TempPathFactory, paths: list[str],
                                        values: list[Any]) -> None:
    from edgederm.runtime.bundle import read_manifest

    root = tmp_path_factory.mktemp("fuzz_bundle")
    manifest = _minimal_manifest(root)
    for path, value in zip(paths, values):
        _set(manifest, path, value)
    (root / "manifest.json").write_text(json.dumps(manifest))
    result = outcome(lambda: read_manifest(root))
    assert not isinstance(result, Exception) or isinstance(result, BundleError)


def _set(data: Any, dotted: str, value: Any) -> None:
    """Set ``data[a][b]...`` for "a.b..." (the file name key keeps its dots)."""
    if dotted.startswith("files."):
        parts = ["files", dotted[len("files."):]]
    else:
        parts = dotted.split(".")
    for part in parts[:-1]:
        key: Any = int(part) if isinstance(data, list) and part.isdigit() else part
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return
    # An earlier path may have made a list of what this path indexes by name: then it sets nothing.
    last: Any = int(parts[-1]) if isinstance(data, list) and parts[-1].isdigit() else parts[-1]
    try:
        data[last] = value
    except (IndexError, TypeError):
        pass


# --------------------------------------------------------------------------- staging folders


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale(parent: Path, name: str, owner: dict[str, Any] | None, age_s: float = 0.0) -> Path:
    from edgederm.runtime.staging import OWNER_FILE

    folder = parent / name
    folder.mkdir()
    (folder / "graph.onnx").write_bytes(b"x" * 100)
    if owner is not None:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    if age_s:
        then = time.time() - age_s
        os.utime(folder, (then, then))
    return folder


def test_abandoned_staging_folders_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    from edgederm.runtime.staging import GRACE_SECONDS, MAX_AGE_SECONDS, remove_abandoned

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        folders = {
            "dead_owner": (_stale(tmp_path, ".quantize-dead", {"pid": _dead_pid(), "host": host}), True),
            "live_owner": (_stale(tmp_path, ".quantize-live", {"pid": sleeper.pid, "host": host}, 3 * GRACE_SECONDS), False),
            "live_owner_ancient": (_stale(tmp_path, ".quantize-ancient", {"pid": sleeper.pid, "host": host},
                                          MAX_AGE_SECONDS + 60), True),
            "no_owner_old": (_stale(tmp_path, ".quantize-old", None, GRACE_SECONDS + 60), True),
            "no_owner_new": (_stale(tmp_path, ".quantize-new", None), False),
            "garbled_owner_old": (_stale(tmp_path, ".quantize-garbled", {"pid": "x"}, GRACE_SECONDS + 60), True),
            "other_host_new": (_stale(tmp_path, ".quantize-remote", {"pid": 1, "host": host + "-other"}), False),
            "other_host_old": (_stale(tmp_path, ".quantize-remote-old", {"pid": 1, "host": host + "-other"},
                                      GRACE_SECONDS + 60), True),
            "other_prefix": (_stale(tmp_path, ".other-dead", {"pid": _dead_pid(), "host": host}), False),
        }
        link = tmp_path / ".quantize-link"
        link.symlink_to(outside, target_is_directory=True)
        removed = remove_abandoned(tmp_path, ".quantize-")
        for name, (folder, gone) in folders.items():
            assert folder.exists() != gone, name
        assert sorted(removed) == sorted(f for f, gone in folders.values() if gone)
        assert link.is_symlink() and outside.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_quantize_removes_the_staging_folder_an_interrupted_quantize_left(bundle_copy: Path, synthetic_data: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from edgederm.calibration import quantize as quantize_module
    from edgederm.runtime.staging import OWNER_FILE

    stale = _stale(bundle_copy, ".quantize-killed", {"pid": _dead_pid(), "host": socket.gethostname()})
    seen: dict[str, Any] = {}

    def interrupted(manifest: Any, calib: Any, eval_cases: Any, held_out: Any, precision: Any, settings: Any,
                    staging: Path, **kwargs: Any) -> Any:
        seen["stale_present"] = stale.exists()
        seen["owner"] = json.loads((staging / OWNER_FILE).read_text())
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_module, "_quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_module.quantize_bundle(bundle_copy, synthetic_data / "train", max_images=32, say=lambda m: None)
    assert seen == {"stale_present": False, "owner": {**seen["owner"], "pid": os.getpid()}}
    assert not list(bundle_copy.glob(".quantize-*"))


@pytest.mark.slow
def test_export_killed_mid_way_leaves_a_folder_the_next_export_removes(tmp_path: Path) -> None:
    """A real SIGKILL during export; a concurrent export's live folder survives the cleanup."""
    pytest.importorskip("torch")
    from edgederm.runtime.staging import OWNER_FILE

    script = """
import sys, torch
from torch import nn
from edgederm.export import export_bundle
from edgederm.models.base import EdgeDermModel

class Net(EdgeDermModel):
    def __init__(self):
        super().__init__(2, 32, ["a", "b"])
        self.conv = nn.Conv2d(3, 2, 1)
    def forward(self, dermoscopy):
        return self.conv(dermoscopy).mean(dim=(2, 3))

export_bundle(Net().eval(), sys.argv[1], verify=False, profile_memory=False, progress=lambda m: print(m, flush=True))
"""
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    line = child.stdout.readline()  # "exporting stage ...": the staging folder exists
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert line.startswith("exporting stage"), line
    left = list(tmp_path.glob(".bundle.partial-*"))
    assert len(left) == 1 and not out.exists()
    assert json.loads((left[0] / OWNER_FILE).read_text())["pid"] == child.pid

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = _stale(tmp_path, ".bundle.partial-live", {"pid": sleeper.pid, "host": socket.gethostname()})
        proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert not left[0].exists() and live.exists()  # the killed export's folder only
        assert sorted(p.name for p in tmp_path.glob(".bundle.partial-*")) == [live.name]
        assert not (out / OWNER_FILE).exists() and (out / "manifest.json").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
