"""Gallery of real KiTS19 tumors beside synthetic ones from ``kitsseg.training.synthtumor`` (a dev script).

Writes ``docs/images/tumor-gallery.png``: crops of 100 mm (64 pixels of 1.5625 mm, the model grid) shown as
the model sees them (window 0..255 HU). The upper blocks are real tumors from
``../shared/data/real-slices/kits19_slices_512.npz``; the lower blocks are synthetic tumors painted into the
tumor-free kidneys of the same slices (a kidney without tumor in a slice: the other side, or a pole). Every
block is shown twice, as is and with its tumor label outlined, so one can judge both the look and where the
label goes.

Slices are first resampled to 1.5625 mm pixels (``F.interpolate(mode="area")`` by ``spacing / 1.5625``)
so synthetic tumors have realistic sizes in pixels.

Usage: ``python scripts/tumor_gallery.py [--data NPZ] [--out PNG] [--seed N] [--columns N] [--stats]``.
``--stats`` also prints, for real tumors and synthetic ones (15-40 mm, defaults), percentiles of the tumor
mean minus the parenchyma mean, the tumor's std and its fine-noise level (the numbers quoted in
``docs/synthetic-tumors.md``). Pillow is used for the PNG and the captions when installed; otherwise the
PNG is written with numpy + zlib, uncaptioned.
"""

from __future__ import annotations

import argparse
import io
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from kitsseg.io.atomic import write_bytes_atomic
from kitsseg.training.synthtumor import SynthTumorConfig, synthesize_tumors_detailed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real-slices" / "kits19_slices_512.npz"
DEFAULT_OUT = REPO / "docs" / "images" / "tumor-gallery.png"
GRID_MM = 1.5625  # the model grid's pixel
CROP = 64  # panel side in pixels (100 mm)
HOST = 112  # side of the window a synthetic tumor is painted in
SCALE = 2  # panel magnification in the PNG
OUTLINE = (255, 40, 40)
SIZE_BINS = 4


@dataclass
class Panel:
    grey: np.ndarray  # (CROP, CROP) float in [0, 1]
    label: np.ndarray  # (CROP, CROP) bool: tumor
    caption: str


def resample(image_u8: np.ndarray, label: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A slice on the model grid: image area-averaged, labels by majority (kidney 1, tumor 2)."""
    factor = spacing / GRID_MM
    size = (round(image_u8.shape[0] * factor), round(image_u8.shape[1] * factor))
    img = torch.from_numpy(image_u8.astype(np.float32) / 255.0)[None, None]
    img = F.interpolate(img, size=size, mode="area")[0, 0].numpy()
    planes = torch.from_numpy(np.stack([label > 0, label == 2]).astype(np.float32))[None]
    planes = F.interpolate(planes, size=size, mode="area")[0].numpy() > 0.5
    out = planes[0].astype(np.uint8)
    out[planes[1]] = 2
    return img, out


def crop(a: np.ndarray, centre: tuple[float, float], side: int) -> np.ndarray:
    """A ``side`` square around ``centre``, moved to stay inside the slice (slices are larger than it)."""
    r = int(round(centre[0])) - side // 2
    c = int(round(centre[1])) - side // 2
    r = min(max(r, 0), a.shape[0] - side)
    c = min(max(c, 0), a.shape[1] - side)
    return a[r : r + side, c : c + side]


def real_panels(slices: list[tuple[np.ndarray, np.ndarray]], cases: np.ndarray, count: int) -> list[Panel]:
    """Tumor cross-sections of several cases, smallest first among those up to 45 mm, then larger ones."""
    found = []
    for (img, lab), case in zip(slices, cases, strict=True):
        comps, n = ndimage.label(lab == 2)
        for i in range(1, n + 1):
            part = comps == i
            diameter = 2.0 * np.sqrt(part.sum() / np.pi) * GRID_MM
            if diameter >= 8.0:
                found.append((diameter, int(case), img, lab, ndimage.center_of_mass(part)))
    found.sort(key=lambda t: t[0])
    chosen, used = [], set()
    # Spread over sizes: walk the sorted list in even steps, one cross-section per case.
    for idx in np.linspace(0, len(found) - 1, num=4 * count).round().astype(int):
        diameter, case, img, lab, centre = found[idx]
        if case in used:
            continue
        used.add(case)
        chosen.append(Panel(crop(img, centre, CROP), crop(lab == 2, centre, CROP),
                            f"case {case} {diameter:.0f} mm"))
        if len(chosen) == count:
            break
    return sorted(chosen, key=lambda p: float(p.caption.split()[-2]))


def host_windows(slices: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``HOST``-pixel windows around tumor-free kidney cross-sections: (image, mask of that kidney)."""
    hosts = []
    for img, lab in slices:
        comps, n = ndimage.label(lab > 0)
        for i in range(1, n + 1):
            part = comps == i
            if part.sum() < 400 or (lab[part] == 2).any():
                continue
            centre = ndimage.center_of_mass(part)
            hosts.append((crop(img, centre, HOST), crop(part, centre, HOST)))
    return hosts


def synthetic_panels(
    hosts: list[tuple[np.ndarray, np.ndarray]], count: int, seed: int, config: SynthTumorConfig
) -> list[Panel]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(hosts), generator=gen).tolist()
    picks = [hosts[i] for i in (order * (1 + count // max(1, len(hosts))))[:count]]
    image = torch.from_numpy(np.stack([p[0] for p in picks]))[:, None].float()
    kidney = torch.from_numpy(np.stack([p[1] for p in picks]))[:, None].float()
    new_image, _, new_tumor, records = synthesize_tumors_detailed(
        image, kidney, torch.zeros_like(kidney), GRID_MM, gen, config
    )
    panels = []
    for rec in sorted(records, key=lambda r: r.diameter_mm):
        z = rec.slice_index
        where = "exo" if rec.exophytic else "endo"
        panels.append(Panel(
            crop(new_image[z, 0].numpy(), (rec.row, rec.col), CROP),
            crop(new_tumor[z, 0].numpy() > 0.5, (rec.row, rec.col), CROP),
            f"{rec.diameter_mm:.0f} mm {rec.mode} {where}",
        ))
    return panels


def outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def render(panel: Panel, with_label: bool) -> np.ndarray:
    grey = np.clip(panel.grey * 255.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if with_label:
        rgb[outline(panel.label)] = OUTLINE
    return rgb.repeat(SCALE, axis=0).repeat(SCALE, axis=1)


def sheet(blocks: list[tuple[str, list[Panel], bool]], columns: int) -> tuple[np.ndarray, list]:
    """The gallery as one RGB array, and the captions to draw: ``(x, y, text)``."""
    side, gap, title_h = CROP * SCALE, 4, 22
    rows = [(title, panels[i : i + columns], lab) for title, panels, lab in blocks
            for i in range(0, len(panels), columns)]
    width = columns * side + (columns + 1) * gap
    titled = [i == 0 or rows[i][0] != rows[i - 1][0] for i in range(len(rows))]
    height = sum(title_h * t + side + gap for t in titled) + gap
    out = np.full((height, width, 3), 24, dtype=np.uint8)
    texts = []
    y = gap
    for (title, panels, lab), has_title in zip(rows, titled, strict=True):
        if has_title:
            texts.append((gap, y + 4, title, (255, 255, 255)))
            y += title_h
        for j, panel in enumerate(panels):
            x = gap + j * (side + gap)
            out[y : y + side, x : x + side] = render(panel, lab)
            texts.append((x + 2, y + 1, panel.caption, (255, 230, 0)))
        y += side + gap
    return out, texts


def encode_png(rgb: np.ndarray, texts: list) -> bytes:
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # plain numpy + zlib, no captions
        raw = b"".join(b"\x00" + row.tobytes() for row in rgb)
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        head = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(
            b"IEND", b""
        )
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for x, y, text, colour in texts:
        draw.text((x, y), text, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def interior_stats(
    img: np.ndarray, tumor: np.ndarray, kidney: np.ndarray
) -> tuple[float, float, float] | None:
    """(tumor mean - parenchyma mean, tumor std, tumor fine-noise std) in HU, 2 pixels inside the edges.

    Fine noise: robust std (1.4826 x median absolute value) of ``x - box3(x)``, a high-pass.
    """
    core = ndimage.binary_erosion(tumor, iterations=2)
    paren = ndimage.binary_erosion(kidney & ~tumor, iterations=2)
    if core.sum() < 10 or paren.sum() < 50:
        return None
    hp = img - ndimage.uniform_filter(img, 3)
    return (
        float(img[core].mean() - img[paren].mean()) * 255.0,
        float(img[core].std()) * 255.0,
        float(np.median(np.abs(hp[core]))) * 255.0 * 1.4826,
    )


def print_stats(slices: list[tuple[np.ndarray, np.ndarray]], hosts: list, seed: int) -> None:
    """Real tumor cross-sections of 15-45 mm against synthetic ones of 15-40 mm (defaults otherwise)."""
    real = []
    for img, lab in slices:
        comps, n = ndimage.label(lab == 2)
        for i in range(1, n + 1):
            part = comps == i
            if 15.0 <= 2.0 * np.sqrt(part.sum() / np.pi) * GRID_MM <= 45.0:
                real.append(interior_stats(img, part, lab == 1))
    image = torch.from_numpy(np.stack([h[0] for h in hosts]))[:, None].float()
    kidney = torch.from_numpy(np.stack([h[1] for h in hosts]))[:, None].float()
    config = SynthTumorConfig(prob=1.0, max_tumors=1, diameter_mm=(15.0, 40.0))
    new_image, _, new_tumor, records = synthesize_tumors_detailed(
        image, kidney, torch.zeros_like(kidney), GRID_MM, torch.Generator().manual_seed(seed), config
    )
    synthetic = [
        interior_stats(new_image[r.slice_index, 0].numpy(), new_tumor[r.slice_index, 0].numpy() > 0.5,
                       kidney[r.slice_index, 0].numpy() > 0.5)
        for r in records
    ]
    for name, rows in (("real", real), ("synthetic", synthetic)):
        a = np.array([r for r in rows if r is not None])
        print(f"{name:9s} n={len(a):3d}  percentiles 10/25/50/75/90 (HU):")
        for j, what in enumerate(("tumor - parenchyma", "tumor std", "tumor fine noise")):
            values = np.percentile(a[:, j], [10, 25, 50, 75, 90])
            print(f"    {what:18s} " + " ".join(f"{v:6.0f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--stats", action="store_true", help="also print real vs synthetic HU statistics")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"error: {args.data} not found (the real KiTS19 slices live in ../shared/data)")

    with np.load(args.data) as data:
        ct, labels, spacing, cases = data["image_u8"], data["label"], data["spacing_rc_mm"], data["case_id"]
    slices = [resample(ct[i], labels[i], float(spacing[i][0])) for i in range(len(ct))]
    n = 2 * args.columns
    real = real_panels(slices, cases, n)
    hosts = host_windows(slices)
    # Defaults, but the diameter range split into log-spaced bins so every size shows up in a small gallery.
    default = SynthTumorConfig()
    lo, hi = default.diameter_mm
    edges = np.geomspace(lo, hi, SIZE_BINS + 1)
    synthetic = []
    for k in range(SIZE_BINS):
        config = replace(default, prob=1.0, max_tumors=1, diameter_mm=(float(edges[k]), float(edges[k + 1])))
        synthetic += synthetic_panels(hosts, n // SIZE_BINS, args.seed + k, config)
    rgb, texts = sheet(
        [
            (f"Real KiTS19 tumors ({len(real)} cases; 100 mm crops at 1.5625 mm, window 0..255 HU)",
             real, False),
            ("Synthetic tumors (kitsseg.training.synthtumor defaults, sizes in 4 log bins of 5-40 mm) in "
             "tumor-free kidneys of the same slices", synthetic, False),
            ("Real, tumor label outlined", real, True),
            ("Synthetic, tumor label (alpha >= 0.5) outlined", synthetic, True),
        ],
        args.columns,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = encode_png(rgb, texts)
    write_bytes_atomic(args.out, png)
    print(f"wrote {args.out} ({len(png) / 1024:.0f} KiB, {len(real)} real, {len(synthetic)} synthetic, "
          f"{len(hosts)} tumor-free kidney cross-sections)")
    if args.stats:
        print_stats(slices, hosts, args.seed)


if __name__ == "__main__":
    main()
