"""The tensor operations behind :mod:`kitsseg.training.synthtumor`, each a small pure function.

Outline harmonics, separable Gaussian blur and the noise probe, the kidney depth map and the centre search
on 2 x 2 cells, flat patch indices, and the mass effect. They take tensors and plain numbers (never the
config), so :mod:`.synthtumor` reads as the model of a tumor and this module as its arithmetic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: Harmonics of the outline's radial distortion (k = 1 would only shift the centre). Amplitudes fall as
#: (2 / k)^2: a strong k = 4 term makes squares, which renal masses are not.
_HARMONICS = (2, 3, 4)
_HARMONIC_WEIGHTS = tuple((2.0 / k) ** 2 for k in _HARMONICS)

#: Endophytic tumors are centred at least this many radii deep in the kidney (so they lie inside it).
_ENDO_DEPTH = 1.0


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian blur of ``(T, A, A)``; the result is ``len(kernel) - 1`` smaller.

    Two batched products with a banded matrix (``band[i + j, i] = kernel[j]``): on a CPU much faster than
    a one-channel ``conv2d`` on these small patches.
    """
    size = x.shape[-1] - len(kernel) + 1
    band = torch.zeros(x.shape[-1], size, dtype=x.dtype, device=x.device)
    i = torch.arange(size, device=x.device)
    for j, value in enumerate(kernel.tolist()):
        band[i + j, i] = value
    return band.T @ x @ band


def _noise_operator(x: torch.Tensor, combine: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """``x`` minus the mean of its 4 neighbours, on every other row and column: the noise probe.

    ``combine(centre, north, east, south, west)`` replaces that formula (e.g. to require a mask at all five).
    """
    h, w = x.shape[-2] - 1, x.shape[-1] - 1
    centre = x[..., 1:h:2, 1:w:2]
    north, south = x[..., 0 : h - 1 : 2, 1:w:2], x[..., 2 : h + 1 : 2, 1:w:2]
    west, east = x[..., 1:h:2, 0 : w - 1 : 2], x[..., 1:h:2, 2 : w + 1 : 2]
    if combine is not None:
        return combine(centre, north, east, south, west)
    return centre - 0.25 * (north + south + west + east)


@functools.lru_cache(maxsize=8)
def _noise_gain(sigma_px: float) -> float:
    """Std of :func:`_noise_operator` on unit white noise blurred by a Gaussian of ``sigma_px``."""
    kernel = _gaussian_kernel(sigma_px)
    size = 2 * len(kernel) + 5
    impulse = torch.zeros(1, size + len(kernel) - 1, size + len(kernel) - 1, dtype=torch.float64)
    impulse[0, impulse.shape[1] // 2, impulse.shape[2] // 2] = 1.0
    g = _blur(impulse, kernel.to(torch.float64))
    # The operator's response at every position (not only every other one) to one impulse.
    centre = g[:, 1:-1, 1:-1]
    around = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:]
    return float((centre - 0.25 * around).pow(2).sum().sqrt())


def _depth(kidney: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Chessboard depth of each kidney pixel (1 on its edge), counted up to ``max_depth``: ``(S, 1, h, w)``.

    Repeated 3 x 3 erosions on bool tensors (separable: four shifted ``&`` per step), cheap on a CPU;
    pixels outside the crop count as background.
    """
    s, _, h, w = kidney.shape
    x = torch.zeros(s, 1, h + 2, w + 2, dtype=torch.bool, device=kidney.device)
    x[:, :, 1:-1, 1:-1] = kidney
    depth = kidney.to(torch.uint8)
    for step in range(min(max_depth, 255) - 1):
        v = x[:, :, :-2, :] & x[:, :, 1:-1, :] & x[:, :, 2:, :]
        e = v[:, :, :, :-2] & v[:, :, :, 1:-1] & v[:, :, :, 2:]
        if step % 4 == 3 and not bool(e.any()):
            break
        depth += e
        x[:, :, 1:-1, 1:-1] = e
    return depth


def _cells(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2 x 2 cells of a bool ``(S, 1, h, w)`` mask (padded with False to even sides): (all set, any set)."""
    h, w = mask.shape[2:]
    m = F.pad(mask, (0, w % 2, 0, h % 2))
    corners = (m[..., 0::2, 0::2], m[..., 0::2, 1::2], m[..., 1::2, 0::2], m[..., 1::2, 1::2])
    # Strided views combined with & and |: much faster than all()/any() over small inner dimensions.
    return (
        corners[0] & corners[1] & corners[2] & corners[3],
        corners[0] | corners[1] | corners[2] | corners[3],
    )


def _centres(
    kid: torch.Tensor,
    free: torch.Tensor,
    origin: tuple[int, int],
    shape: tuple[int, int],
    slot: torch.Tensor,
    radius_px: torch.Tensor,
    reach_px: torch.Tensor,
    exophytic: torch.Tensor,
    u: torch.Tensor,
    pick: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer ``(row, col)`` centres in the slice and an ``ok`` flag for each tumor.

    ``kid`` (kidney) and ``free`` (kidney pixels that are not tumor) are bool ``(S, 1, h, w)`` crops of the
    slices starting at ``origin`` in slices of ``shape``; ``slot`` says which crop each tumor is in.
    Endophytic centres lie at least ``_ENDO_DEPTH * radius_px`` deep (or as deep as the slice's kidney
    allows), exophytic ones on the kidney's edge; both keep ``reach_px`` (the outline's largest radius)
    from the image border. A tumor with no admissible pixel (kidney too close to the border for its size)
    is dropped (``ok`` false); one whose preferred depth has no free pixel falls back to any free pixel.

    The search runs on 2 x 2 cells (a quarter of the work; depth is only needed to a pixel or so): a cell
    is drawn uniformly among the admissible ones with ``u``, then the first free pixel in it, starting at
    corner ``pick`` (0..3).
    """
    (r0, c0), (h, w) = origin, shape
    kid_all, kid_any = _cells(kid)
    free_all, free_any = _cells(free)
    hc, wc = kid_all.shape[2:]
    need = torch.ceil(_ENDO_DEPTH * radius_px / 2.0)
    depth = _depth(kid_all, int(need.max().clamp(min=1)))  # in cells
    max_depth = torch.where(free_all, depth, torch.zeros_like(depth)).flatten(1).amax(dim=1)
    need = torch.minimum(need, max_depth[slot].to(need.dtype)).view(-1, 1, 1)
    margin = torch.ceil(reach_px).view(-1, 1) + 1
    rr = r0 + 2 * torch.arange(hc, device=kid.device).view(1, -1)
    cc = c0 + 2 * torch.arange(wc, device=kid.device).view(1, -1)
    row_ok = (rr >= margin) & (rr + 1 <= h - 1 - margin)
    col_ok = (cc >= margin) & (cc + 1 <= w - 1 - margin)
    inside = row_ok[:, :, None] & col_ok[:, None, :]
    some = free_any[slot, 0] & inside
    where = torch.where(
        exophytic.view(-1, 1, 1), ~kid_all[slot, 0], free_all[slot, 0] & (depth[slot, 0] >= need)
    ) & some
    fallback = ~where.flatten(1).any(dim=1)
    where = torch.where(fallback.view(-1, 1, 1), some, where)
    cum = torch.cumsum(where.flatten(1), dim=1, dtype=torch.float32)
    total = cum[:, -1]
    idx = torch.searchsorted(cum, (u * total).view(-1, 1).contiguous(), right=True).view(-1)
    idx = idx.clamp(max=hc * wc - 1)
    ci, cj = idx // wc, idx % wc
    # The first free pixel of the cell, in the order pick, pick + 1, ... (mod 4) over its corners.
    order = (pick.view(-1, 1) + torch.arange(4, device=kid.device).view(1, -1)) % 4
    fr, fc = 2 * ci.view(-1, 1) + order // 2, 2 * cj.view(-1, 1) + order % 2
    padded = F.pad(free, (0, free.shape[3] % 2, 0, free.shape[2] % 2))
    is_free = padded[slot.view(-1, 1), 0, fr, fc]
    first = torch.argmax(is_free.to(torch.uint8), dim=1, keepdim=True)
    return r0 + fr.gather(1, first).view(-1), c0 + fc.gather(1, first).view(-1), total > 0


def _angles(cos1: torch.Tensor, sin1: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cos k phi, sin k phi)`` for each k in ``_HARMONICS`` from ``cos phi``, ``sin phi``: products only,
    no transcendental function per pixel."""
    cos2, sin2 = 2.0 * cos1 * cos1 - 1.0, 2.0 * sin1 * cos1
    table = {
        2: (cos2, sin2),
        3: (cos1 * (2.0 * cos2 - 1.0), sin1 * (2.0 * cos2 + 1.0)),
        4: (2.0 * cos2 * cos2 - 1.0, 2.0 * sin2 * cos2),
    }
    return [table[k] for k in _HARMONICS]


def _harmonics(
    angles: list[tuple[torch.Tensor, torch.Tensor]], amp: torch.Tensor, phase: torch.Tensor
) -> torch.Tensor:
    """``1 + sum_k amp_k cos(k phi + phase_k)`` with ``angles`` from :func:`_angles` (``(T, S, S)`` each)
    and ``amp``/``phase`` ``(T, K)``."""
    cp = (amp * torch.cos(phase)).view(amp.shape[0], -1, 1, 1)
    sp = (amp * torch.sin(phase)).view(amp.shape[0], -1, 1, 1)
    rho: torch.Tensor | float = 1.0
    for j, (ck, sk) in enumerate(angles):
        rho = rho + cp[:, j] * ck - sp[:, j] * sk
    assert isinstance(rho, torch.Tensor)  # _HARMONICS is not empty
    return rho


def _flat_patches(
    slice_of: torch.Tensor, row: torch.Tensor, col: torch.Tensor, offs: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into an ``(N, 1, H, W)`` tensor of square patches centred on ``(row, col)``, and which
    of them lie inside the slice (the others are clamped to the border and must not be written)."""
    h, w = shape
    rr = row.view(-1, 1, 1) + offs.view(1, -1, 1)
    cc = col.view(-1, 1, 1) + offs.view(1, 1, -1)
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    flat = slice_of.view(-1, 1, 1) * (h * w) + rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)
    return flat, inside


def _mass_effect(
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    slice_of: torch.Tensor,
    centre: torch.Tensor,
    radius: torch.Tensor,
    strength: torch.Tensor,
) -> None:
    """Push the surroundings of tumors outward, in place on ``out`` (image, kidney mask, tumor mask).

    Backward map on a patch of radius ``3 R`` around each tumor: a pixel at distance ``r`` shows what was at
    ``r (1 - s(r))``, ``s(r) = strength (1 - (r / 3R)^2)^2`` (zero, with zero slope, at ``3 R``): the centre
    stays, tissue near the tumor is compressed outward, nothing beyond ``3 R`` moves. Masks are resampled
    bilinearly and thresholded at 0.5, like the geometric augmentation. The caller passes at most one tumor
    per slice, so patches do not overlap.
    """
    image, kidney, tumor = out
    _, _, h, w = image.shape
    dev, dt = image.device, image.dtype
    half = math.ceil(3.0 * float(radius.max()))
    offs = torch.arange(-half, half + 1)
    row, col = torch.round(centre[:, 0]).long(), torch.round(centre[:, 1]).long()
    flat, inside = _flat_patches(slice_of, row, col, offs, (h, w))
    py = (row.view(-1, 1, 1) + offs.view(1, -1, 1)) - centre[:, 0].view(-1, 1, 1)
    px = (col.view(-1, 1, 1) + offs.view(1, 1, -1)) - centre[:, 1].view(-1, 1, 1)
    x = torch.sqrt(py * py + px * px) / (3.0 * radius.view(-1, 1, 1))
    s = torch.where(x < 1.0, strength.view(-1, 1, 1) * (1.0 - x * x) ** 2, torch.zeros_like(x))
    # The source of every pixel lies on the segment to the centre, so inside the patch: sample the patch.
    size = 2 * half + 1
    src_y = (row - centre[:, 0]).view(-1, 1, 1) + py * (1.0 - s) + half
    src_x = (col - centre[:, 1]).view(-1, 1, 1) + px * (1.0 - s) + half
    grid = torch.stack(((2.0 * src_x + 1.0) / size - 1.0, (2.0 * src_y + 1.0) / size - 1.0), dim=-1)
    flat = flat.to(dev)
    stack = torch.stack(
        (image.view(-1)[flat], kidney.view(-1)[flat].to(dt), tumor.view(-1)[flat].to(dt)), dim=1
    )
    moved = F.grid_sample(
        stack, grid.to(dev, dt), mode="bilinear", padding_mode="border", align_corners=False
    )
    where = ((s > 0) & inside).to(dev)
    idx = flat[where]
    image.view(-1)[idx] = moved[:, 0][where]
    kidney.view(-1)[idx] = (moved[:, 1][where] > 0.5).to(kidney.dtype)
    tumor.view(-1)[idx] = (moved[:, 2][where] > 0.5).to(tumor.dtype)
