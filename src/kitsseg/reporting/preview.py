"""A PNG montage of the axial slices that matter, with the labels drawn over the CT.

A quick look tells whether a segmentation is plausible (kidney in the right place, not flipped) before
anyone opens a viewer; peers' tools offer the same (TotalSegmentator ``--preview``). Slices are shown in
the radiological view of the internal frame: anterior at the top, the patient's right on the image's left.
Half of the panels go to the slices with the most tumor, the rest to the slices with the most kidney.

The PNG is encoded here with the standard library (:func:`png_bytes`), so the preview needs no imaging
package beyond numpy.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..io.atomic import atomic_output

#: Soft-tissue display window in HU (level 40, width 400).
DISPLAY_WINDOW = (-160.0, 240.0)
#: Overlay colours (RGB) and opacity.
KIDNEY_RGB = (0, 200, 0)
TUMOR_RGB = (230, 0, 0)
ALPHA = 0.45


def pick_slices(labels: np.ndarray, n: int = 6) -> list[int]:
    """Up to ``n`` slice indices, in ascending order: the most tumor first, then the most kidney.

    Without any label, ``n`` evenly spaced slices, so the preview still shows where the model looked.
    """
    labels = np.asarray(labels)
    n_slices = labels.shape[0]
    n = max(1, min(int(n), n_slices))
    tumor = np.count_nonzero(labels == 2, axis=(1, 2))
    kidney = np.count_nonzero(labels > 0, axis=(1, 2))
    chosen: list[int] = []
    n_tumor = (n + 1) // 2 if tumor.any() else 0
    for z in np.argsort(-tumor, kind="stable")[:n_tumor]:
        if tumor[z] > 0:
            chosen.append(int(z))
    for z in np.argsort(-kidney, kind="stable"):
        if len(chosen) >= n or kidney[z] == 0:
            break
        if int(z) not in chosen:
            chosen.append(int(z))
    if not chosen:
        chosen = [int(round(z)) for z in np.linspace(0, n_slices - 1, n)]
    return sorted(set(chosen))


def render_slice(
    ct_slice: np.ndarray, label_slice: np.ndarray, window: tuple[float, float] = DISPLAY_WINDOW
) -> np.ndarray:
    """One RGB uint8 image: windowed CT in grey, kidney green, tumor red (alpha-blended)."""
    lo, hi = window
    grey = np.clip((np.asarray(ct_slice, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value, colour in ((1, KIDNEY_RGB), (2, TUMOR_RGB)):
        where = label_slice == value
        rgb[where] = (1.0 - ALPHA) * rgb[where] + ALPHA * np.asarray(colour, dtype=np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def montage(images: list[np.ndarray], columns: int = 3, gap: int = 4) -> np.ndarray:
    """Tile equally sized RGB images into a grid with a black gap between them."""
    h, w = images[0].shape[:2]
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    canvas = np.zeros((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = img
    return canvas


def png_bytes(rgb: np.ndarray) -> bytes:
    """An ``(height, width, 3)`` uint8 image as the bytes of an 8-bit RGB PNG file (no filtering, zlib).

    The three chunks a PNG needs (``IHDR``, ``IDAT``, ``IEND``), each with its CRC-32; every row starts
    with filter type 0. A montage compresses well this way (flat black gaps, smooth CT).
    """
    image = np.ascontiguousarray(rgb, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected a (height, width, 3) RGB image, got shape {image.shape}")
    height, width = image.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_preview(
    ct_hu: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    n: int = 6,
    *,
    window: tuple[float, float] = DISPLAY_WINDOW,
) -> Path:
    """Write a PNG montage of ``n`` slices of ``ct_hu`` (HU, ``(z, row, col)``) with ``labels`` drawn over.

    Written atomically (temporary file in the destination folder, then rename). Returns the path.
    """
    ct_hu = np.asarray(ct_hu)
    labels = np.asarray(labels)
    if ct_hu.shape != labels.shape or ct_hu.ndim != 3:
        raise ValueError(f"CT {ct_hu.shape} and labels {labels.shape} must be the same 3D (z, row, col) grid")
    path = Path(path)
    slices = pick_slices(labels, n)
    image = montage([render_slice(ct_hu[z], labels[z], window) for z in slices])
    started = False  # a failure before the temporary file exists is the folder's fault
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = png_bytes(image)
        with atomic_output(path) as tmp:
            started = True
            tmp.write_bytes(data)
    except OSError as exc:
        hint = "" if started else "; choose a writable folder"
        raise OutputError(f"cannot write the preview {path}: {exc.strerror or exc}{hint}") from exc
    return path
