"""The preview PNG is written without an imaging package, and reads back as the exact montage."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from kitsseg.reporting.preview import png_bytes, write_preview


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(type, payload)`` of each chunk, checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        chunks.append((kind, payload))
        pos += 12 + length
    return chunks


def _decode(data: bytes) -> np.ndarray:
    """An 8-bit RGB PNG whose rows all use filter 0 (what png_bytes writes) -> ``(h, w, 3)`` uint8."""
    chunks = _chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode(png_bytes(image)), image)


def test_png_bytes_refuses_what_is_not_rgb() -> None:
    with pytest.raises(ValueError, match=r"\(height, width, 3\)"):
        png_bytes(np.zeros((4, 4), dtype=np.uint8))


def test_write_preview_draws_the_labels(tmp_path: Path) -> None:
    ct = np.full((5, 20, 30), -1000.0, dtype=np.float32)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[2, 5:10, 5:10] = 1
    labels[2, 12:15, 20:25] = 2
    path = write_preview(ct, labels, tmp_path / "p" / "preview.png")
    pixels = _decode(path.read_bytes())
    assert (pixels[..., 1] > pixels[..., 0] + 50).any()  # green kidney
    assert (pixels[..., 0] > pixels[..., 1] + 50).any()  # red tumor
    assert [p.name for p in path.parent.iterdir()] == ["preview.png"]  # no temporary left
