"""Synthetic kidney tumors painted into 2D CT slices: a training augmentation for small tumors.

Small renal masses are rare in KiTS (most labelled tumors are several centimetres across), so the tumor
model sees few of them and misses them. Following label-free tumor synthesis (Hu et al., CVPR 2023: a
distorted ellipsoid, a texture of scaled and smoothed Gaussian noise, location rules inside the organ) and
its kidney version (Pixel2Cancer, Lai et al. 2024), this module paints tumors of a sampled size into real
kidney slices and writes their labels, so every batch can hold small tumors of known extent.

The model, per tumor (``docs/synthetic-tumors.md`` has the reasoning and a gallery next to real tumors):

* **Shape**: an ellipse of equivalent diameter ``d`` (log-uniform in ``diameter_mm``, so small tumors are
  as common per octave as large ones), axis ratio and rotation random, its radius modulated by low
  harmonics (k = 2, 3, 4) of the polar angle: a smooth, lobulated outline.
* **Location**: endophytic tumors are centred in kidney parenchyma at least their radius deep (or as deep
  as the slice allows), so they lie inside it; exophytic ones (``exophytic_fraction``) on the kidney's
  edge, so about half lies outside. Existing tumor pixels are avoided; the label stays inside the image.
* **Attenuation**: the tumor mean is set against the slice's mean parenchyma (kidney minus tumor pixels):
  hypo-, iso- or hyper-attenuating, or an unenhanced 20-40 HU, each with its own probability.
* **Texture**: the image's own fine noise level (measured in the kidney, so a synthetic tumor is not given
  away by being smoother or noisier than its surroundings) plus coarser smoothed Gaussian noise for
  heterogeneity; large tumors may get a softer, darker necrotic centre.
* **Edge and label**: the tumor is blended in with ``alpha = sigmoid(signed distance / edge width)``, a
  soft edge without a step; the label is exactly ``alpha >= 0.5`` (the outline), written as tumor and as
  kidney (KiTS counts a tumor as kidney + tumor).
* **Mass effect** (off by default): the surrounding pixels and masks are pushed a little outward.

All random numbers come from the caller's CPU ``torch.Generator`` in a fixed order that depends only on the
batch shape, the config and the spacing, so the result is determined by the seed. The work is done on
patches around each tumor and, for the centre search, on the kidneys' bounding box in 2 x 2 cells, so a
batch of 16 slices of 256 x 256 costs about 10-20 ms of one CPU core (measured in the doc).
The tensor operations behind it (outline harmonics, blur, noise probe, centre search, mass effect) are
:mod:`.synthops`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import InvalidImageError, InvalidOptionError
from .synthops import (
    _HARMONIC_WEIGHTS,
    _HARMONICS,
    _angles,
    _blur,
    _centres,
    _flat_patches,
    _gaussian_kernel,
    _harmonics,
    _mass_effect,
    _noise_gain,
    _noise_operator,
)

__all__ = ["MODES", "SynthTumorConfig", "TumorRecord", "synthesize_tumors", "synthesize_tumors_detailed"]

#: One HU in window units: the training window maps 0..255 HU to 0..1.
HU = 1.0 / 255.0
#: Attenuation modes, in the order of ``SynthTumorConfig.mode_probs``.
MODES = ("hypo", "iso", "hyper", "noncontrast")
#: Blending weights below this (a quarter of one grey level of 8 bits) are dropped, so a tumor changes
#: only the pixels near it and nothing outside its patch.
_ALPHA_MIN = 1.0 / 1024.0
#: Fine-noise blur (pixels): CT noise resampled to the model grid is slightly correlated, not white.
_FINE_SIGMA_PX = 0.5


@dataclass(frozen=True)
class SynthTumorConfig:
    """How often, how large and how conspicuous synthetic tumors are. HU values are differences or levels
    in Hounsfield units; the module converts them to window units (1 HU = 1/255).

    Attributes
    ----------
    prob:
        Probability that a slice with kidney pixels gets tumors.
    diameter_mm:
        Equivalent diameter (of a disc with the label's area) range, sampled log-uniform.
    max_tumors:
        A painted slice gets 1..max_tumors tumors (uniform).
    aspect:
        Minor/major axis ratio range of the underlying ellipse.
    distortion:
        Largest amplitude of the k = 2 radial harmonic (k = 3, 4 get 4/9 and 1/4 of it; 0 = a plain
        ellipse): 0.15 gives gently lobulated outlines.
    exophytic_fraction:
        Fraction of tumors centred on the kidney's edge instead of inside the parenchyma.
    mode_probs:
        Probabilities of the attenuation modes ``MODES`` (hypo, iso, hyper, noncontrast); normalised.
    hypo_hu, iso_hu, hyper_hu:
        Tumor mean relative to the slice's mean parenchyma: ``hypo_hu`` below it, ``iso_hu`` around it,
        ``hyper_hu`` above it.
    noncontrast_hu:
        Absolute tumor mean of the ``noncontrast`` mode (unenhanced solid tissue).
    min_tumor_hu:
        Floor of any tumor mean (a solid or cystic mass, never fat).
    texture_hu:
        Standard deviation range of the coarse heterogeneity (smoothed Gaussian noise).
    texture_scale_mm:
        Gaussian smoothing of the coarse heterogeneity, in mm.
    match_noise:
        Add fine noise at the level measured in the slice's kidney, so the tumor is as grainy as the image.
    edge_mm:
        Width of the soft edge (the sigmoid's scale), in mm.
    necrosis_prob, necrosis_min_diameter_mm, necrosis_hu:
        Tumors at least ``necrosis_min_diameter_mm`` across get, with ``necrosis_prob``, a soft central
        region with absolute mean in ``necrosis_hu`` (only where that is darker than the tumor).
    mass_effect_prob, mass_effect:
        Probability per tumor of pushing the surroundings outward, and the push at the tumor's edge as a
        fraction of its radius.
    """

    prob: float = 0.5
    diameter_mm: tuple[float, float] = (5.0, 40.0)
    max_tumors: int = 2
    aspect: tuple[float, float] = (0.65, 1.0)
    distortion: float = 0.15
    exophytic_fraction: float = 0.4
    mode_probs: tuple[float, float, float, float] = (0.6, 0.15, 0.1, 0.15)
    hypo_hu: tuple[float, float] = (20.0, 80.0)
    iso_hu: tuple[float, float] = (-10.0, 10.0)
    hyper_hu: tuple[float, float] = (10.0, 40.0)
    noncontrast_hu: tuple[float, float] = (20.0, 40.0)
    min_tumor_hu: float = 10.0
    texture_hu: tuple[float, float] = (10.0, 35.0)
    texture_scale_mm: float = 3.0
    match_noise: bool = True
    edge_mm: tuple[float, float] = (0.5, 1.2)
    necrosis_prob: float = 0.3
    necrosis_min_diameter_mm: float = 20.0
    necrosis_hu: tuple[float, float] = (5.0, 25.0)
    mass_effect_prob: float = 0.0
    mass_effect: tuple[float, float] = (0.1, 0.3)

    def __post_init__(self) -> None:
        # Recipes come from JSON, where pairs are lists: store tuples, so the config stays hashable.
        for name, value in list(asdict(self).items()):
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        try:
            self._validate()
        except InvalidOptionError:
            raise
        except (TypeError, ValueError) as exc:  # a string or None where a number belongs
            raise InvalidOptionError(f"SynthTumorConfig: a value is not a number or pair ({exc})") from exc

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidOptionError(f"SynthTumorConfig: {message}")

        def span(name: str, lo_min: float = -math.inf) -> None:
            value = getattr(self, name)
            check(
                len(value) == 2 and all(math.isfinite(float(v)) for v in value)
                and lo_min <= float(value[0]) <= float(value[1]),
                f"{name} must be (lo, hi) with {lo_min:g} <= lo <= hi, got {value}",
            )

        for name in ("prob", "exophytic_fraction", "necrosis_prob", "mass_effect_prob"):
            value = float(getattr(self, name))
            check(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")
        check(isinstance(self.max_tumors, int) and self.max_tumors >= 1,
              f"max_tumors must be an integer >= 1, got {self.max_tumors}")
        span("diameter_mm", 1e-3)
        span("aspect", 1e-2)
        check(float(self.aspect[1]) <= 1.0, f"aspect must lie in (0, 1], got {self.aspect}")
        check(0.0 <= self.distortion <= 0.3, f"distortion must be in [0, 0.3], got {self.distortion}")
        check(len(self.mode_probs) == len(MODES) and min(self.mode_probs) >= 0 and sum(self.mode_probs) > 0,
              f"mode_probs must be {len(MODES)} non-negative numbers, not all 0, got {self.mode_probs}")
        for name in ("hypo_hu", "iso_hu", "hyper_hu", "noncontrast_hu", "necrosis_hu"):
            span(name)
        span("texture_hu", 0.0)
        span("edge_mm", 1e-3)
        span("mass_effect", 0.0)
        check(float(self.mass_effect[1]) < 0.9, f"mass_effect must stay below 0.9, got {self.mass_effect}")
        check(self.texture_scale_mm > 0, f"texture_scale_mm must be > 0, got {self.texture_scale_mm}")
        check(math.isfinite(self.min_tumor_hu), f"min_tumor_hu must be finite, got {self.min_tumor_hu}")
        check(self.necrosis_min_diameter_mm >= 0,
              f"necrosis_min_diameter_mm must be >= 0, got {self.necrosis_min_diameter_mm}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class TumorRecord:
    """One painted tumor, for galleries, logs and tests (positions in pixels of the slice)."""

    slice_index: int
    row: float
    col: float
    diameter_mm: float
    mode: str
    exophytic: bool
    mean_hu: float
    necrosis: bool
    mass_effect: bool


def synthesize_tumors(
    image: torch.Tensor,
    kidney: torch.Tensor,
    tumor: torch.Tensor,
    spacing_mm: float,
    gen: torch.Generator,
    config: SynthTumorConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paint synthetic tumors into a batch of slices; returns new ``(image, kidney, tumor)`` tensors.

    ``image`` is ``(N, 1, H, W)`` float in window units (0..1 = 0..255 HU), ``kidney`` the kidney + tumor
    mask and ``tumor`` the tumor mask (same shape, 0/1), ``spacing_mm`` the in-plane pixel size. Inputs are
    not modified; slices without kidney come back unchanged.
    """
    out_image, out_kidney, out_tumor, _ = synthesize_tumors_detailed(
        image, kidney, tumor, spacing_mm, gen, config
    )
    return out_image, out_kidney, out_tumor


@dataclass
class _Draws:
    """Every random number of one call, drawn up front in a fixed order (index = slice * max_tumors + k)."""

    slice_on: torch.Tensor
    count: torch.Tensor
    diameter_mm: torch.Tensor
    aspect: torch.Tensor
    angle: torch.Tensor
    harm_amp: torch.Tensor
    harm_phase: torch.Tensor
    exophytic: torch.Tensor
    mode: torch.Tensor
    level: torch.Tensor
    texture_hu: torch.Tensor
    edge_mm: torch.Tensor
    necrosis: torch.Tensor
    necrosis_size: torch.Tensor
    necrosis_hu: torch.Tensor
    necrosis_phase: torch.Tensor
    mass: torch.Tensor
    mass_strength: torch.Tensor
    centre_u: torch.Tensor
    centre_pick: torch.Tensor
    jitter: torch.Tensor
    noise: torch.Tensor


def _uniform(u: torch.Tensor, lo_hi: tuple[float, float]) -> torch.Tensor:
    return float(lo_hi[0]) + (float(lo_hi[1]) - float(lo_hi[0])) * u


def _patch_size(config: SynthTumorConfig, spacing_mm: float) -> tuple[int, float]:
    """Odd patch side (pixels) that holds the largest possible tumor and its soft edge; and that radius."""
    half = 0.5 * float(config.diameter_mm[1]) / spacing_mm / math.sqrt(float(config.aspect[0]))
    reach = half * (1.0 + _max_harmonic_sum(config.distortion))
    edge = 7.0 * float(config.edge_mm[1]) / spacing_mm  # sigmoid(-7) < _ALPHA_MIN
    side = 2 * math.ceil(reach + edge + 1.0) + 1
    return side, reach


def _max_harmonic_sum(distortion: float) -> float:
    return distortion * sum(_HARMONIC_WEIGHTS)


def _draw(n: int, side: int, pad: int, gen: torch.Generator, config: SynthTumorConfig) -> _Draws:
    m = config.max_tumors
    t = n * m
    h = len(_HARMONICS)
    probs = torch.tensor(config.mode_probs, dtype=torch.float64)
    cum = torch.cumsum(probs / probs.sum(), 0)[:-1].to(torch.float32)
    lo, hi = (math.log(float(v)) for v in config.diameter_mm)
    return _Draws(
        slice_on=torch.rand(n, generator=gen) < config.prob,
        count=torch.randint(1, m + 1, (n,), generator=gen),
        diameter_mm=torch.exp(_uniform(torch.rand(t, generator=gen), (lo, hi))),
        aspect=_uniform(torch.rand(t, generator=gen), config.aspect),
        angle=torch.rand(t, generator=gen) * math.pi,
        harm_amp=torch.rand(t, h, generator=gen)
        * torch.tensor([config.distortion * wk for wk in _HARMONIC_WEIGHTS]),
        harm_phase=torch.rand(t, h, generator=gen) * (2.0 * math.pi),
        exophytic=torch.rand(t, generator=gen) < config.exophytic_fraction,
        mode=torch.bucketize(torch.rand(t, generator=gen), cum, right=True),
        level=torch.rand(t, generator=gen),
        texture_hu=_uniform(torch.rand(t, generator=gen), config.texture_hu),
        edge_mm=_uniform(torch.rand(t, generator=gen), config.edge_mm),
        necrosis=torch.rand(t, generator=gen) < config.necrosis_prob,
        necrosis_size=_uniform(torch.rand(t, generator=gen), (0.35, 0.6)),
        necrosis_hu=_uniform(torch.rand(t, generator=gen), config.necrosis_hu),
        necrosis_phase=torch.rand(t, h, generator=gen) * (2.0 * math.pi),
        mass=torch.rand(t, generator=gen) < config.mass_effect_prob,
        mass_strength=_uniform(torch.rand(t, generator=gen), config.mass_effect),
        centre_u=torch.rand(t, generator=gen),
        centre_pick=torch.randint(0, 4, (t,), generator=gen),
        jitter=torch.rand(t, 2, generator=gen) - 0.5,
        noise=torch.randn(t, side + 2 * pad, side + 2 * pad, generator=gen),
    )


def _check_inputs(image: torch.Tensor, kidney: torch.Tensor, tumor: torch.Tensor, spacing_mm: float) -> None:
    if image.ndim != 4 or image.shape[1] != 1:
        raise InvalidImageError(f"synthesize_tumors: image must be (N, 1, H, W), got {tuple(image.shape)}")
    for name, mask in (("kidney", kidney), ("tumor", tumor)):
        if mask.shape != image.shape:
            raise InvalidImageError(
                f"synthesize_tumors: {name} mask shape {tuple(mask.shape)} differs from the image's "
                f"{tuple(image.shape)}"
            )
    if not image.is_floating_point():
        raise InvalidImageError(f"synthesize_tumors: image must be floating point, got {image.dtype}")
    try:
        value = float(spacing_mm)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidOptionError(f"synthesize_tumors: spacing_mm must be a positive number, got {spacing_mm}")


def synthesize_tumors_detailed(
    image: torch.Tensor,
    kidney: torch.Tensor,
    tumor: torch.Tensor,
    spacing_mm: float,
    gen: torch.Generator,
    config: SynthTumorConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[TumorRecord]]:
    """:func:`synthesize_tumors`, plus one :class:`TumorRecord` per painted tumor (for galleries and logs)."""
    _check_inputs(image, kidney, tumor, spacing_mm)
    spacing_mm = float(spacing_mm)
    n, _, h, w = image.shape
    m = config.max_tumors
    dev, dt = image.device, image.dtype
    side, _ = _patch_size(config, spacing_mm)
    coarse_kernel = _gaussian_kernel(config.texture_scale_mm / spacing_mm)
    fine_kernel = _gaussian_kernel(_FINE_SIGMA_PX)
    pad = (max(len(coarse_kernel), len(fine_kernel)) - 1) // 2
    d = _draw(n, side, pad, gen, config)

    out_image, out_kidney, out_tumor = (
        t.clone(memory_format=torch.contiguous_format) for t in (image, kidney, tumor)
    )
    row_profile = kidney.amax(dim=3)  # (N, 1, H): one pass gives which slices have kidney and where
    has_kidney = (row_profile.flatten(1).amax(dim=1) > 0.5).cpu()
    active = (
        (d.slice_on & has_kidney).view(n, 1) & (torch.arange(m).view(1, m) < d.count.view(n, 1))
    ).view(-1)
    if not bool(active.any()):
        return out_image, out_kidney, out_tumor, []
    ids = torch.nonzero(active).view(-1)
    slice_of = ids // m

    # Geometry (pixels): semi-axes a >= b chosen so the label's area is that of a disc of the drawn
    # diameter: area = pi a b mean(rho^2) and mean(rho^2) = 1 + sum(amp^2) / 2.
    amp, phase = d.harm_amp[ids], d.harm_phase[ids]
    radius = 0.5 * d.diameter_mm[ids] / spacing_mm
    q = d.aspect[ids]
    semi_a = radius / torch.sqrt(q * (1.0 + 0.5 * amp.pow(2).sum(dim=1)))
    semi_b = semi_a * q
    reach = semi_a * (1.0 + amp.sum(dim=1))

    # Work on the slices that get tumors, cropped to their kidneys' bounding box.
    slices, slot = torch.unique(slice_of, return_inverse=True)
    sl = slices.to(dev)
    rows = torch.nonzero(row_profile[sl].amax(dim=(0, 1)) > 0.5).view(-1)
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    band = kidney[sl, :, r0:r1]
    cols = torch.nonzero(band.amax(dim=(0, 1, 2)) > 0.5).view(-1)
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    kid = band[..., c0:c1] > 0.5
    free = kid & (tumor[sl, :, r0:r1, c0:c1] <= 0.5)
    free = torch.where(free.flatten(1).any(dim=1).view(-1, 1, 1, 1), free, kid)
    row, col, ok = _centres(kid, free, (r0, c0), (h, w), slot.to(dev), radius.to(dev), reach.to(dev),
                            d.exophytic[ids].to(dev), d.centre_u[ids].to(dev), d.centre_pick[ids].to(dev))
    ok = ok.cpu()
    if not bool(ok.any()):
        return out_image, out_kidney, out_tumor, []
    keep = torch.nonzero(ok).view(-1)
    ids, slice_of, slot = ids[keep], slice_of[keep], slot[keep]
    amp, phase, radius = amp[keep], phase[keep], radius[keep]
    semi_a, semi_b = semi_a[keep], semi_b[keep]
    row, col = row.cpu()[keep], col.cpu()[keep]
    centre = torch.stack((row.to(torch.float32), col.to(torch.float32)), dim=1) + d.jitter[ids]

    # Slice statistics from the parenchyma (kidney minus tumor): mean level and fine noise level (robust
    # std of a 4-neighbour high-pass, away from the kidney's edge and from clipped window ends).
    x = image[sl, :, r0:r1, c0:c1]
    free_f = free.to(dt)
    parenchyma = ((x * free_f).flatten(1).sum(dim=1) / free_f.flatten(1).sum(dim=1)).cpu()
    noise_hp = torch.zeros(len(slices))
    if config.match_noise:
        probe = _noise_operator(x).abs()
        # Probe centres deep enough that the 4 neighbours are kidney too, and not clipped by the window.
        xs = x[..., 1:-1:2, 1:-1:2]
        inner = _noise_operator(free, lambda c, n, e, s, w: c & n & e & s & w) & (xs > 0.0) & (xs < 1.0)
        probe = torch.where(inner, probe, torch.full_like(probe, float("nan"))).flatten(1)
        # Median absolute value -> std of a Gaussian (x 1.4826): robust to edges and vessels.
        noise_hp = torch.nan_to_num(torch.nanmedian(probe, dim=1).values, nan=0.0).cpu() * 1.4826

    # Tumor level (window units) per mode; the floor keeps every mode a soft-tissue or cystic mass.
    mode = d.mode[ids]
    u = d.level[ids]
    base = parenchyma[slot]
    levels = torch.stack((
        base - _uniform(u, config.hypo_hu) * HU,
        base + _uniform(u, config.iso_hu) * HU,
        base + _uniform(u, config.hyper_hu) * HU,
        _uniform(u, config.noncontrast_hu) * HU,
    ), dim=1)
    mean = levels.gather(1, mode.view(-1, 1)).view(-1).clamp(min=config.min_tumor_hu * HU)

    # Outline and soft edge on patches centred on each tumor's integer centre.
    half = side // 2
    offs = torch.arange(side, dtype=torch.float32) - half
    frac = centre - torch.stack((row, col), dim=1).to(torch.float32)
    dy = offs.view(1, -1, 1) - frac[:, 0].view(-1, 1, 1)
    dx = offs.view(1, 1, -1) - frac[:, 1].view(-1, 1, 1)
    ang = d.angle[ids].view(-1, 1, 1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    un = (cos * dx + sin * dy) / semi_a.view(-1, 1, 1)
    vn = (-sin * dx + cos * dy) / semi_b.view(-1, 1, 1)
    rn = torch.sqrt(un * un + vn * vn)
    inv = 1.0 / rn.clamp(min=1e-6)
    cos1, sin1 = un * inv, vn * inv  # cos and sin of the polar angle phi in normalised coordinates
    angles = _angles(cos1, sin1)
    rho = _harmonics(angles, amp, phase)
    # Pixels per unit of normalised radius along phi: turns (rho - rn) into an approximate distance.
    local = torch.hypot(semi_a.view(-1, 1, 1) * cos1, semi_b.view(-1, 1, 1) * sin1)
    edge_px = (d.edge_mm[ids] / spacing_mm).view(-1, 1, 1)
    alpha = torch.sigmoid((rho - rn) * local / edge_px)
    label = alpha >= 0.5
    alpha = torch.where(alpha < _ALPHA_MIN, torch.zeros_like(alpha), alpha)

    # Texture around the tumor mean, from one white-noise field per tumor: blurred a little, at the image's
    # own grain, and blurred more, for heterogeneity (one field: half the random numbers, same look).
    noise = d.noise[ids]
    c_pad = (len(coarse_kernel) - 1) // 2
    coarse = noise[:, pad - c_pad : pad + side + c_pad, pad - c_pad : pad + side + c_pad]
    # Unit std: white noise blurred by the separable g (x) g has std sqrt(sum(g^2)^2) = sum(g^2).
    coarse = _blur(coarse, coarse_kernel) / float(coarse_kernel.pow(2).sum())
    texture = mean.view(-1, 1, 1) + coarse * (d.texture_hu[ids] * HU).view(-1, 1, 1)
    if config.match_noise:
        f_pad = (len(fine_kernel) - 1) // 2
        fine = noise[:, pad - f_pad : pad + side + f_pad, pad - f_pad : pad + side + f_pad]
        fine = _blur(fine, fine_kernel) / _noise_gain(_FINE_SIGMA_PX)
        texture = texture + fine * noise_hp[slot].view(-1, 1, 1)

    # Necrosis: a softer, darker, irregular centre in some large tumors.
    nec_level = d.necrosis_hu[ids] * HU
    has_nec = d.necrosis[ids] & (d.diameter_mm[ids] >= config.necrosis_min_diameter_mm) & (nec_level < mean)
    if bool(has_nec.any()):
        size = d.necrosis_size[ids].view(-1, 1, 1)
        rho_n = _harmonics(angles, amp * 1.5, d.necrosis_phase[ids]) * size
        beta = torch.sigmoid((rho_n - rn) * local / (2.5 * edge_px)) * has_nec.view(-1, 1, 1)
        nec_tex = nec_level.view(-1, 1, 1) + 0.5 * (texture - mean.view(-1, 1, 1))
        texture = texture + beta * (nec_tex - texture)
    texture = texture.clamp(0.0, 1.0)

    # Mass effect first (it moves what is there), then the tumors are painted over it.
    # Rounds: the k-th tumor of every slice at once, so no pixel is written twice in one round.
    rounds = ids % m
    mass = d.mass[ids]
    for k in range(m):
        mi = torch.nonzero(mass & (rounds == k)).view(-1)
        if len(mi):
            _mass_effect((out_image, out_kidney, out_tumor), slice_of[mi], centre[mi], radius[mi],
                         d.mass_strength[ids][mi])

    flat, inside = _flat_patches(slice_of, row, col, offs.to(torch.long), (h, w))
    flat = flat.to(dev)
    write = (alpha > 0) & inside
    lab = label & inside
    img_flat, kid_flat, tum_flat = out_image.view(-1), out_kidney.view(-1), out_tumor.view(-1)
    for k in range(m):
        sel = torch.nonzero(rounds == k).view(-1)
        if len(sel) == 0:
            continue
        wmask = write[sel].to(dev)
        idx = flat[sel][wmask]
        a = alpha[sel].to(dev, dt)[wmask]
        old = img_flat[idx]
        img_flat[idx] = old + a * (texture[sel].to(dev, dt)[wmask] - old)
        lidx = flat[sel][lab[sel].to(dev)]
        kid_flat[lidx] = 1.0
        tum_flat[lidx] = 1.0

    records = [
        TumorRecord(int(n_), float(r_), float(c_), float(d_), MODES[int(mo)], bool(ex), float(mu) * 255.0,
                    bool(ne), bool(ma))
        for n_, (r_, c_), d_, mo, ex, mu, ne, ma in zip(
            slice_of.tolist(), centre.tolist(), d.diameter_mm[ids].tolist(), mode.tolist(),
            d.exophytic[ids].tolist(), mean.tolist(), has_nec.tolist(), mass.tolist(),
            strict=True,
        )
    ]
    return out_image, out_kidney, out_tumor, records
