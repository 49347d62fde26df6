"""Contrast-phase and scanner augmentation: each phase renders the kidney as clinical CT shows it."""

from __future__ import annotations

import numpy as np
import torch

from kitsseg.training.phases import HU, PhaseConfig, render_phases

OFF = {
    "p_noncontrast": 0.0,
    "p_arterial": 0.0,
    "p_nephrographic": 0.0,
    "p_excretory": 0.0,
    "p_noise": 0.0,
    "p_sharpness": 0.0,
}


def scene(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slices with fat (0 in the window), soft tissue at 40 HU, a 'kidney' disk at 180 HU, a tumor in it."""
    yy, xx = np.mgrid[:96, :96]
    body = (yy - 48) ** 2 + (xx - 48) ** 2 <= 44**2
    kidney = (yy - 48) ** 2 + (xx - 40) ** 2 <= 20**2
    tumor = (yy - 48) ** 2 + (xx - 52) ** 2 <= 5**2
    x = np.where(body, 40.0, -100.0)
    x = np.where(kidney, 180.0, x)
    x = np.where(tumor, 120.0, x)
    img = torch.from_numpy(np.clip(x / 255.0, 0, 1).astype(np.float32))[None, None].repeat(n, 1, 1, 1)
    k = torch.from_numpy(kidney.astype(np.float32))[None, None].repeat(n, 1, 1, 1)
    t = torch.from_numpy((tumor & kidney).astype(np.float32))[None, None].repeat(n, 1, 1, 1)
    return img, k, t


def render(
    config: PhaseConfig, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, k, t = scene()
    return render_phases(x, k, t, torch.Generator().manual_seed(seed), config, 1.0), x, k, t


def parenchyma_hu(out: torch.Tensor, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    core = torch.nn.functional.max_pool2d(1 - k, 7, stride=1, padding=3) == 0  # away from the blended edge
    m = core & (t == 0) & (torch.nn.functional.max_pool2d(t, 9, stride=1, padding=4) == 0)
    return out[m] / HU


def test_everything_off_is_the_identity_and_inputs_are_not_modified() -> None:
    out, x, k, t = render(PhaseConfig(**OFF))
    x0, _, _ = scene()
    torch.testing.assert_close(out, x0)
    torch.testing.assert_close(x, x0)


def test_non_contrast_kidney_is_near_unenhanced_soft_tissue() -> None:
    out, _x, k, t = render(PhaseConfig(**{**OFF, "p_noncontrast": 1.0}))
    hu = parenchyma_hu(out, k, t)
    assert 15 < float(hu.mean()) < 55
    body = out[(k == 0) & (out > 0.1)] / HU  # soft tissue outside the kidney is untouched
    assert abs(float(body.mean()) - 40.0) < 1.0


def test_arterial_phase_has_a_bright_cortex_and_a_darker_medulla() -> None:
    out, _x, k, t = render(PhaseConfig(**{**OFF, "p_arterial": 1.0}))
    rim = (k > 0) & (torch.nn.functional.max_pool2d(1 - k, 5, stride=1, padding=2) > 0)
    rim &= torch.nn.functional.max_pool2d(1 - k, 3, stride=1, padding=1) == 0  # inside, near the edge
    inner = torch.nn.functional.max_pool2d(1 - k, 25, stride=1, padding=12) == 0
    inner &= torch.nn.functional.max_pool2d(t, 9, stride=1, padding=4) == 0
    assert float(out[rim].mean()) - float(out[inner].mean()) > 40 * HU


def test_nephrographic_kidney_is_homogeneously_enhanced() -> None:
    out, _x, k, t = render(PhaseConfig(**{**OFF, "p_nephrographic": 1.0}))
    for i in range(out.shape[0]):  # one level per slice, drawn in 140-210 HU, flat inside the kidney
        hu = parenchyma_hu(out[i : i + 1], k[i : i + 1], t[i : i + 1])
        assert 135 < float(hu.mean()) < 215
        assert float(hu.std()) < 5


def test_excretory_phase_brightens_the_kidney_core() -> None:
    out, _x, k, t = render(PhaseConfig(**{**OFF, "p_excretory": 1.0}))
    assert float(out[(k > 0) & (t == 0)].max()) > 0.95  # contrast in the collecting system: above 240 HU


def test_noise_stays_out_of_air_and_fat_and_is_reproducible() -> None:
    cfg = PhaseConfig(**{**OFF, "p_noise": 1.0, "noise_hu": 20.0})
    a, x, k, _t = render(cfg, seed=3)
    b, *_ = render(cfg, seed=3)
    c, *_ = render(cfg, seed=4)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert float(a[x == 0].abs().max()) == 0.0
    assert float((a - x)[x > 0].std()) > 3 * HU
