"""A minimal PNG encoder (zlib + struct, no Pillow) and the per-app cache of drawn images.

Every simulated image is a deterministic picture of (seed, index): two colours derived from a
hash, drawn as a diagonal gradient with a checker overlay, so different results look different
and the same URL always serves the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections import OrderedDict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(width: int, height: int, rows: list[bytes]) -> bytes:
    """Encode 8-bit RGB `rows` (each `3 * width` bytes, top to bottom) as a PNG file."""
    if len(rows) != height or any(len(row) != 3 * width for row in rows):
        raise ValueError("rows do not match the image size")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    raw = b"".join(b"\x00" + row for row in rows)  # filter type 0 (None) on every row
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def draw_image(seed: int, index: int, side: int) -> bytes:
    """The PNG of result `index` for `seed`: `side` x `side` pixels."""
    side = max(side, 1)
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    first, second = digest[0:3], digest[3:6]
    cell = max(side // 8, 1)
    rows: list[bytes] = []
    for y in range(side):
        row = bytearray()
        for x in range(side):
            mix = (x + y) / (2 * side)
            checker = ((x // cell) + (y // cell)) % 2
            for a, b in zip(first, second, strict=True):
                value = a + (b - a) * mix
                row.append(int(value * 0.8) if checker else int(value))
        rows.append(bytes(row))
    return encode_png(side, side, rows)


def data_url(png: bytes) -> str:
    """`data:image/png;base64,...`: a PNG inline in a JSON answer (directive `base64`)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class PngCache:
    """Drawn images by (seed, index), oldest evicted first; one per app."""

    def __init__(self, side: int, max_entries: int = 256) -> None:
        self._side = side
        self._max_entries = max_entries
        self._images: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, seed: int, index: int) -> bytes:
        key = (seed, index)
        image = self._images.get(key)
        if image is None:
            image = draw_image(seed, index, self._side)
            self._images[key] = image
            while len(self._images) > self._max_entries:
                self._images.popitem(last=False)
        return image
