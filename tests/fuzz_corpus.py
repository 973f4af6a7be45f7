"""A corpus of malformed image files, built deterministically: what a 10,000-image folder really holds.

``make_corpus(folder)`` writes at least 200 files and returns, for each, whether it must be
rejected (``True``), must be accepted (``False``: unusual but valid, e.g. CMYK or 16-bit), or may
go either way (``None``: a bit-flipped JPEG can still decode).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP"}


def _encoded(fmt: str, size=(48, 40), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's signature)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@functools.lru_cache
def _png_bomb_in_full(width: int, height: int) -> bytes:
    """An RGB PNG of width x height black pixels, every row present: small on disk, 3 x width x
    height bytes once decoded (what a bomb does to memory when it is opened)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    compressor, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _gif_bomb(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b",\x00\x00\x00\x00" + \
        struct.pack("<HH", width, height) + b"\x00\x02\x02\x44\x01\x00;"


def _bmp_bomb(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\x00" * 16


def make_corpus(folder: Path) -> dict[Path, bool | None]:
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[Path, bool | None] = {}
    rng = np.random.default_rng(2024)

    def put(name: str, data: bytes, bad: bool | None) -> None:
        path = folder / name
        path.write_bytes(data)
        expected[path] = bad

    for suffix in FORMATS:  # empty files
        put(f"empty{suffix}", b"", True)
    for i in range(40):  # random bytes under every suffix
        suffix = list(FORMATS)[i % len(FORMATS)]
        put(f"random_{i:02d}{suffix}", rng.bytes(int(rng.integers(1, 5000))), True)
    for suffix, fmt in FORMATS.items():  # truncated after the first bytes, mid-header and mid-data
        data = _encoded(fmt, seed=len(expected))
        for j, cut in enumerate((4, 12, 30)):
            put(f"truncated_head_{j}{suffix}", data[:cut], True)
        for j, fraction in enumerate((0.3, 0.5, 0.7, 0.9)):
            put(f"truncated_{j}{suffix}", data[: int(len(data) * fraction)], None if fmt == "JPEG" else True)
    for i in range(30):  # bit flips inside valid files: decoders may or may not notice
        suffix, fmt = list(FORMATS.items())[i % len(FORMATS)]
        data = bytearray(_encoded(fmt, seed=100 + i))
        for position in rng.integers(len(data) // 4, len(data), 8):
            data[position] ^= 1 << int(rng.integers(0, 8))
        put(f"bitflip_{i:02d}{suffix}", bytes(data), None)
    wrong = {"text.png": b"just some text, not an image\n",
             "page.jpg": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj",
             "index.webp": b"<!doctype html><html></html>", "script.gif": b"#!/bin/sh\necho hi\n",
             "archive.bmp": b"PK\x03\x04" + bytes(60), "elf.png": b"\x7fELF" + bytes(60)}
    for name, data in wrong.items():  # not images, whatever the suffix says
        put(name, data, True)
    for suffix, fmt in FORMATS.items():  # real images under another format's suffix: accepted by content
        other = list(FORMATS)[(list(FORMATS).index(suffix) + 1) % len(FORMATS)]
        put(f"really_{fmt.lower()}{other}", _encoded(fmt, seed=7), False)
    for i, (width, height) in enumerate(((50_000, 50_000), (100_000, 2), (65_535, 65_535), (20_000, 10_000))):
        put(f"bomb_{i}.png", _png_bomb(width, height), True)
        put(f"bomb_{i}.gif", _gif_bomb(min(width, 65_535), min(height, 65_535)), True)
        put(f"bomb_{i}.bmp", _bmp_bomb(width, height), True)
    # 144 MP: over featcache's 100 MP limit, under the 179 MP at which Pillow refuses by itself; only
    # featcache's check keeps it from being decoded (432 MB)
    put("bomb_under_pillows_limit.png", _png_bomb_in_full(12_000, 12_000), True)
    for i, side in enumerate((1, 2, 5, 7)):  # too small to carry content
        put(f"tiny_{i}.png", _encoded("PNG", size=(side, side), seed=i), True)
    odd_modes = {"1": ".png", "L": ".png", "LA": ".png", "P": ".gif", "RGBA": ".webp", "I;16": ".png",
                 "CMYK": ".jpg", "I;16B": ".png"}
    for mode, suffix in odd_modes.items():  # unusual but valid: accepted
        base = Image.fromarray(np.random.default_rng(len(mode)).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        out = io.BytesIO()
        base.convert(mode).save(out, format=FORMATS[suffix])
        put(f"mode_{mode.replace(';', '_')}{suffix}", out.getvalue(), False)
    out = io.BytesIO()
    base.convert("P").save(out, format="PNG", transparency=0)  # palette with a transparent index
    put("mode_P_transparent.png", out.getvalue(), False)
    magics = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP")
    for i in range(200 - len(expected)):  # fill with more random-length garbage behind real magic bytes
        magic = magics[i % 5]
        suffix = list(FORMATS)[i % 5]
        put(f"magic_garbage_{i:02d}{suffix}", magic + rng.bytes(int(rng.integers(0, 400))), True)
    return expected
