"""Contrast-phase and scanner augmentation: make every training kidney look like the kidneys of clinical CT.

All real training slices are contrast-enhanced (KiTS: late arterial / nephrographic; CURVAS: portal), so a
network trained on them alone learns "the bright organ beside the spine" and misses kidneys in
non-contrast CT and in other phases. Each kidney-bearing slice is re-rendered, with the probabilities of
:class:`PhaseConfig`, as one of the phases in which clinical abdominal CT shows the kidneys:

===============  ==========================================================  =====================
phase            kidney appearance (literature values)                       rendered as
===============  ==========================================================  =====================
non-contrast     parenchyma 30-40 HU, close to muscle and bowel wall          parenchyma 20-50 HU
arterial (CMP)   bright cortex 150-250 HU, dark medulla 60-110 HU             rim 5-8 mm bright
nephrographic    homogeneous parenchyma 150-200 HU (also portal venous)      140-210 HU
excretory        parenchyma 120-180 HU, collecting system above 300 HU        core set to 255 HU
===============  ==========================================================  =====================

The parenchyma's own texture is kept (the slice's deviation from its mean inside the kidney is added back,
scaled), edges are blended over a few pixels so no outline is left to learn from, and tumors keep their
difference to the parenchyma (attenuated for non-contrast, where tumor and kidney are both near 30 HU).
Scanner variation follows: Gaussian noise of 0-20 HU (white or spatially correlated) and a sharpness change
(blur or unsharp mask). Values are in window units of the 0-255 HU window (1 HU = 1/255).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

HU = 1.0 / 255.0


@dataclass(frozen=True)
class PhaseConfig:
    """Probabilities per kidney-bearing slice (the rest keep their own phase) and scanner strengths."""

    p_noncontrast: float = 0.25
    p_arterial: float = 0.1
    p_nephrographic: float = 0.15
    p_excretory: float = 0.1
    p_noise: float = 0.5
    noise_hu: float = 20.0
    p_sharpness: float = 0.3

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _blur(m: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    return 1.0 - F.max_pool2d(1.0 - m, 2 * r + 1, stride=1, padding=r)


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=gen))


def render_phases(
    x: torch.Tensor,
    kidney: torch.Tensor,
    tumor: torch.Tensor,
    gen: torch.Generator,
    config: PhaseConfig,
    spacing_mm: float,
) -> torch.Tensor:
    """Return a new batch ``(N, 1, H, W)`` with kidneys re-rendered in a drawn phase and scanner noise.

    ``kidney`` is label > 0, ``tumor`` label 2 (float 0/1, same shape); inputs are not modified. One draw
    per slice decides the phase, in a fixed order of random numbers per slice (reproducible per seed).
    """
    out = x.float().clone()
    n = out.shape[0]
    parenchyma = (kidney * (1 - tumor)).float()
    soft = _blur(parenchyma, 5)
    soft_tu = _blur(tumor.float(), 3)
    rim_px = max(1, int(round(6.0 / spacing_mm)))
    core_px = max(1, int(round(9.0 / spacing_mm)))
    cum = torch.tensor(
        [config.p_noncontrast, config.p_arterial, config.p_nephrographic, config.p_excretory]
    ).cumsum(0)
    for i in range(n):
        draw = float(torch.rand(1, generator=gen))
        level_a, level_b, texture = _u(gen, 0, 1), _u(gen, 0, 1), _u(gen, 0.3, 1.0)
        m = parenchyma[i : i + 1]
        if m.sum() < 4 or draw >= float(cum[-1]):
            continue
        vals = out[i : i + 1][m > 0]
        mean = vals.mean()
        tex = (out[i : i + 1] - mean) * texture  # the parenchyma's own texture, scaled
        if draw < cum[0]:  # non-contrast
            target = (20 + 30 * level_a) * HU + tex * 0.5
            tu_target = target - (5 + 15 * level_b) * HU
        elif draw < cum[1]:  # arterial: corticomedullary differentiation
            cortex = m - _erode(m, rim_px) * m
            cortex = _blur(cortex, 3).clamp(0, 1)
            target = ((60 + 50 * level_a) + (150 + 100 * level_b - 60 - 50 * level_a) * cortex) * HU + tex
            tu_target = None
        elif draw < cum[2]:  # nephrographic / portal: homogeneous
            target = (140 + 70 * level_a) * HU + tex
            tu_target = None
        else:  # excretory: enhanced parenchyma, bright collecting system in the kidney's core
            blobs = (_blur(torch.randn(m.shape, generator=gen), 7) > 0).float()  # branching calyces
            core = _blur(_erode(m, core_px) * blobs, 3)
            target = (120 + 60 * level_a) * HU + tex
            target = target * (1 - core.clamp(0, 1)) + 1.0 * core.clamp(0, 1)
            tu_target = None
        s = soft[i : i + 1]
        out[i : i + 1] = out[i : i + 1] * (1 - s) + target * s
        if tu_target is not None and tumor[i].any():
            st = soft_tu[i : i + 1]
            out[i : i + 1] = out[i : i + 1] * (1 - st) + tu_target * st
    return _scanner(out, gen, config).clamp_(0.0, 1.0)


def _scanner(x: torch.Tensor, gen: torch.Generator, config: PhaseConfig) -> torch.Tensor:
    """Scanner noise (white or correlated) and sharpness (blur or unsharp mask), per slice."""
    n = x.shape[0]
    noise_on = torch.rand(n, generator=gen) < config.p_noise
    sigma = torch.rand(n, generator=gen) * config.noise_hu * HU
    correlated = torch.rand(n, generator=gen) < 0.5
    sharp_on = torch.rand(n, generator=gen) < config.p_sharpness
    sharpen = torch.rand(n, generator=gen) < 0.4
    amount = torch.rand(n, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    if correlated.any():
        smooth = _blur(noise, 3) * 3.0  # keep roughly the same standard deviation after averaging 9 pixels
        noise = torch.where(correlated.view(-1, 1, 1, 1), smooth, noise)
    # Only where the window shows tissue: air and fat sit far below 0 HU, where noise stays clipped away.
    x = x + noise * (sigma * noise_on).view(-1, 1, 1, 1) * (x > HU).to(x.dtype)
    if sharp_on.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        blurred = F.conv2d(x, (k[:, None] * k[None, :]).view(1, 1, 3, 3), padding=1)
        a = amount.view(-1, 1, 1, 1)
        sharpened = x + (x - blurred) * a
        softened = x * (1 - a) + blurred * a
        y = torch.where(sharpen.view(-1, 1, 1, 1), sharpened, softened)
        x = torch.where(sharp_on.view(-1, 1, 1, 1), y, x)
    return x
