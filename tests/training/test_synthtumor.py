"""Synthetic tumors: labels exactly where the tumor is, inside the kidney, of the requested size and look.

Most tests use flat phantoms (kidney 150 HU, background 0 HU, window 0..255 HU) so the blend weight of every
pixel can be read back from the change in intensity; one test checks the noise matching on real KiTS19
slices where ``../shared/data`` is present.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from kitsseg.errors import InvalidImageError, InvalidOptionError
from kitsseg.training.synthtumor import SynthTumorConfig, synthesize_tumors, synthesize_tumors_detailed

HU = 1.0 / 255.0
KIDNEY_HU = 150.0
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL_SLICES = SHARED_DATA / "real-slices" / "kits19_slices_512.npz"

#: A config without randomness in the grey level: hypo exactly 50 HU below the parenchyma, no texture.
FLAT = SynthTumorConfig(
    prob=1.0,
    max_tumors=1,
    mode_probs=(1.0, 0.0, 0.0, 0.0),
    hypo_hu=(50.0, 50.0),
    texture_hu=(0.0, 0.0),
    match_noise=False,
    necrosis_prob=0.0,
)


def phantom(
    n: int = 8,
    size: int = 128,
    radii: tuple[float, float] = (30.0, 20.0),
    noise_hu: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` slices with one elliptical kidney (semi-axes ``radii`` pixels) in the middle, no tumor."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    kidney = (((yy - c) / radii[0]) ** 2 + ((xx - c) / radii[1]) ** 2 <= 1.0).float()
    kidney = kidney.expand(n, 1, size, size).clone()
    image = kidney * (KIDNEY_HU * HU)
    if noise_hu:
        gen = torch.Generator().manual_seed(seed)
        image = (image + torch.randn(image.shape, generator=gen) * noise_hu * HU).clamp(0.0, 1.0)
    return image, kidney, torch.zeros_like(kidney)


def run(image, kidney, tumor, config, spacing=1.5625, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return synthesize_tumors_detailed(image, kidney, tumor, spacing, gen, config)


def test_label_is_exactly_where_the_blend_weight_reaches_one_half() -> None:
    """A flat tumor of known level: alpha = change / (tumor - old) at every pixel; label <=> alpha >= 0.5."""
    image, kidney, tumor = phantom(n=12)
    config = SynthTumorConfig(**{**FLAT.to_dict(), "exophytic_fraction": 0.5, "diameter_mm": (5.0, 40.0)})
    new_image, new_kidney, new_tumor, records = run(image, kidney, tumor, config)
    assert len(records) == 12
    target = (KIDNEY_HU - 50.0) * HU
    alpha = (new_image - image) / (target - image)  # target differs from both 0 and 150 HU
    labelled = new_tumor > 0.5
    assert labelled.any()
    assert bool((alpha[labelled] >= 0.5 - 1e-4).all())
    assert bool((alpha[~labelled] < 0.5 + 1e-4).all())
    assert bool((alpha >= -1e-6).all())
    assert bool((alpha <= 1.0 + 1e-6).all())
    # A tumor counts as kidney + tumor; nothing else is added to the kidney mask.
    assert torch.equal(new_kidney, torch.maximum(kidney, new_tumor))
    # The edge is soft: some pixels are partly blended but not labelled.
    assert bool(((alpha > 0.05) & (alpha < 0.45) & ~labelled).any())


def test_each_tumor_touches_the_kidney_and_endophytic_ones_lie_inside() -> None:
    image, kidney, tumor = phantom(n=16)
    for exo, seed in ((0.0, 1), (1.0, 2)):
        config = SynthTumorConfig(**{**FLAT.to_dict(), "exophytic_fraction": exo, "diameter_mm": (5.0, 20.0),
                                     "max_tumors": 2})
        _, _, new_tumor, records = run(image, kidney, tumor, config, seed=seed)
        assert len(records) >= 16
        outside = []
        for z in range(16):
            lab = new_tumor[z, 0].numpy() > 0.5
            comps, count = ndimage.label(lab)
            assert count >= 1
            for i in range(1, count + 1):
                part = comps == i
                assert (part & (kidney[z, 0].numpy() > 0.5)).any(), "a tumor away from the kidney"
                outside.append((part & (kidney[z, 0].numpy() < 0.5)).sum() / part.sum())
        if exo == 0.0:
            assert max(outside) <= 0.05, "endophytic tumors must lie inside the kidney"
        else:
            assert np.mean(outside) > 0.25, "exophytic tumors must stick out of the kidney"


@pytest.mark.parametrize("spacing", [1.0, 1.5625])
def test_equivalent_diameter_of_the_label_matches_the_request(spacing: float) -> None:
    """One tumor per slice in a large kidney: the label's equivalent diameter is the sampled one, in range."""
    n = 48
    image, kidney, tumor = phantom(n=n, size=160, radii=(70.0, 60.0))
    config = SynthTumorConfig(**{**FLAT.to_dict(), "exophytic_fraction": 0.0, "diameter_mm": (5.0, 40.0)})
    _, _, new_tumor, records = run(image, kidney, tumor, config, spacing=spacing, seed=3)
    assert len(records) == n
    measured = []
    for rec in records:
        area_px = float(new_tumor[rec.slice_index].sum())
        diameter = 2.0 * math.sqrt(area_px / math.pi) * spacing
        measured.append(diameter)
        # Pixel discretisation: within 12 % or 1.5 pixels of the sampled diameter.
        assert abs(diameter - rec.diameter_mm) <= max(0.12 * rec.diameter_mm, 1.5 * spacing)
        assert 5.0 - 1.5 * spacing <= diameter <= 40.0 * 1.12
    # Log-uniform: both ends of the range are drawn.
    assert min(measured) < 9.0
    assert max(measured) > 25.0


def test_hypo_is_darker_and_hyper_brighter_than_the_parenchyma() -> None:
    """Each mode's mean inside the tumor (away from the soft edge) lies in its documented HU range."""
    image, kidney, tumor = phantom(n=16, size=160, radii=(70.0, 60.0), noise_hu=12.0)
    means = {}
    for mode, probs in (("hypo", (1, 0, 0, 0)), ("hyper", (0, 0, 1, 0)), ("noncontrast", (0, 0, 0, 1))):
        config = SynthTumorConfig(prob=1.0, max_tumors=1, mode_probs=probs, exophytic_fraction=0.0,
                                  necrosis_prob=0.0, texture_hu=(0.0, 0.0), diameter_mm=(15.0, 30.0))
        new_image, _, new_tumor, records = run(image, kidney, tumor, config, seed=4)
        assert {r.mode for r in records} == {mode}
        labelled = new_tumor[:, 0].numpy() > 0.5
        core = ndimage.binary_erosion(labelled, iterations=2, structure=np.ones((1, 3, 3)))
        means[mode] = float(new_image[:, 0][torch.from_numpy(core)].mean()) * 255.0
    assert KIDNEY_HU - 80.0 - 2.0 <= means["hypo"] <= KIDNEY_HU - 20.0 + 2.0
    assert KIDNEY_HU + 10.0 - 2.0 <= means["hyper"] <= KIDNEY_HU + 40.0 + 2.0
    assert 20.0 - 2.0 <= means["noncontrast"] <= 40.0 + 2.0


def test_fine_noise_matches_the_image_grain() -> None:
    """A synthetic tumor is as noisy as the kidney it sits in (no smooth-patch shortcut for the model)."""
    for noise_hu in (6.0, 20.0):
        image, kidney, tumor = phantom(n=16, size=160, radii=(70.0, 60.0), noise_hu=noise_hu)
        config = SynthTumorConfig(prob=1.0, max_tumors=1, texture_hu=(0.0, 0.0), exophytic_fraction=0.0,
                                  necrosis_prob=0.0, diameter_mm=(25.0, 35.0))
        new_image, _, new_tumor, _ = run(image, kidney, tumor, config, seed=5)
        lab = new_tumor[:, 0].numpy() > 0.5
        flat = np.ones((1, 3, 3))
        core = torch.from_numpy(ndimage.binary_erosion(lab, iterations=3, structure=flat))[:, None]
        paren = ndimage.binary_erosion(kidney[:, 0].numpy() > 0.5, iterations=2, structure=flat)
        paren = torch.from_numpy(paren & ~ndimage.binary_dilation(lab, iterations=3, structure=flat))[:, None]
        lap = new_image - 0.25 * (
            torch.roll(new_image, 1, 2) + torch.roll(new_image, -1, 2) + torch.roll(new_image, 1, 3)
            + torch.roll(new_image, -1, 3)
        )
        ratio = float(lap[core].std()) / float(lap[paren].std())
        assert 0.75 < ratio < 1.3, (noise_hu, ratio)


def test_inputs_are_not_modified_and_outputs_are_new() -> None:
    image, kidney, tumor = phantom(n=6, noise_hu=10.0)
    tumor[0, 0, 60:64, 60:64] = 1.0
    copies = [t.clone() for t in (image, kidney, tumor)]
    outs = synthesize_tumors(image, kidney, tumor, 1.5625, torch.Generator().manual_seed(0),
                             SynthTumorConfig(prob=1.0, mass_effect_prob=1.0))
    for before, after, out in zip(copies, (image, kidney, tumor), outs, strict=True):
        assert torch.equal(before, after)
        assert out.data_ptr() != after.data_ptr()
    assert not torch.equal(outs[0], image)


def test_same_seed_same_result_other_seed_other_result() -> None:
    image, kidney, tumor = phantom(n=8, noise_hu=10.0)
    config = SynthTumorConfig(prob=0.7, mass_effect_prob=0.5)
    a = synthesize_tumors(image, kidney, tumor, 1.5625, torch.Generator().manual_seed(11), config)
    b = synthesize_tumors(image, kidney, tumor, 1.5625, torch.Generator().manual_seed(11), config)
    c = synthesize_tumors(image, kidney, tumor, 1.5625, torch.Generator().manual_seed(12), config)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_slices_without_kidney_are_untouched() -> None:
    image, kidney, tumor = phantom(n=6, noise_hu=10.0)
    empty = [1, 4]
    kidney[empty] = 0.0
    image[empty] = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(1))
    new = synthesize_tumors(image, kidney, tumor, 1.5625, torch.Generator().manual_seed(0),
                            SynthTumorConfig(prob=1.0, mass_effect_prob=1.0))
    for before, after in zip((image, kidney, tumor), new, strict=True):
        assert torch.equal(before[empty], after[empty])
    assert all(float(new[2][z].sum()) > 0 for z in (0, 2, 3, 5))


def test_prob_zero_is_the_identity() -> None:
    image, kidney, tumor = phantom(n=4, noise_hu=10.0)
    new = synthesize_tumors(image, kidney, tumor, 1.5625, torch.Generator().manual_seed(0),
                            SynthTumorConfig(prob=0.0))
    for before, after in zip((image, kidney, tumor), new, strict=True):
        assert torch.equal(before, after)
        assert before is not after


def test_tumors_stay_inside_the_image_and_off_existing_tumor() -> None:
    """A kidney cut by the image border: labels never reach the border; existing tumor is kept."""
    image, kidney, tumor = phantom(n=16, size=96, radii=(30.0, 20.0))
    kidney[..., :, 60:] = 0.0  # shift: kidney touches column 0 after the roll below
    kidney = torch.roll(kidney, -40, dims=3)
    image = kidney * (KIDNEY_HU * HU)
    tumor[..., 40:50, 5:10] = kidney[..., 40:50, 5:10]
    config = SynthTumorConfig(prob=1.0, diameter_mm=(20.0, 40.0), exophytic_fraction=1.0)
    _, new_kidney, new_tumor, records = run(image, kidney, tumor, config, seed=6)
    assert records
    assert float(new_tumor[..., :, 0].sum()) == float(tumor[..., :, 0].sum())
    assert float(new_tumor[..., 0, :].sum()) == 0.0
    assert float(new_tumor[..., -1, :].sum()) == 0.0
    assert torch.equal(torch.maximum(new_tumor, tumor), new_tumor)
    assert torch.equal(torch.maximum(new_kidney, kidney), new_kidney)


def test_mass_effect_moves_image_and_masks_together() -> None:
    """Same seed with and without mass effect: same tumors; with it, the kidney edge moves and the kidney
    mask still agrees with the image (a flat phantom: mask <=> intensity above half the kidney's)."""
    image, kidney, tumor = phantom(n=8)
    base = SynthTumorConfig(**{**FLAT.to_dict(), "exophytic_fraction": 1.0, "diameter_mm": (25.0, 40.0)})
    pushed = SynthTumorConfig(**{**base.to_dict(), "mass_effect_prob": 1.0, "mass_effect": (0.3, 0.3)})
    img0, kid0, tum0, rec0 = run(image, kidney, tumor, base, seed=7)
    img1, kid1, tum1, rec1 = run(image, kidney, tumor, pushed, seed=7)
    assert [r.diameter_mm for r in rec0] == [r.diameter_mm for r in rec1]
    assert all(r.mass_effect for r in rec1)
    assert torch.equal(tum0, tum1)  # the label is painted after the push, at the same place
    far = torch.from_numpy(
        ~ndimage.binary_dilation(tum1[:, 0].numpy() > 0.5, iterations=4, structure=np.ones((1, 3, 3)))
    )[:, None]
    assert not torch.equal(kid0[far], kid1[far])
    assert torch.equal(kid1[far] > 0.5, img1[far] > 0.5 * KIDNEY_HU * HU)
    assert set(torch.unique(kid1).tolist()) <= {0.0, 1.0}


def test_odd_masks_sizes_and_spacings_never_fail() -> None:
    """Random speckle and blob kidneys, tiny images, 0.7-4 mm pixels, up to 3 tumors, mass effect and
    necrosis on: no exception, values stay in the window, tumor stays a subset of kidney."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(24):
        h, w = (int(v) for v in torch.randint(8, 64, (2,), generator=gen))
        n = int(torch.randint(1, 4, (1,), generator=gen))
        kidney = (torch.rand(n, 1, h, w, generator=gen) < float(torch.rand(1, generator=gen))).float()
        if trial % 2:
            kidney = torch.nn.functional.max_pool2d(kidney, 5, 1, 2)
        tumor = kidney * (torch.rand(n, 1, h, w, generator=gen) < 0.3).float()
        image = torch.rand(n, 1, h, w, generator=gen)
        spacing = 0.7 + 3.3 * float(torch.rand(1, generator=gen))
        config = SynthTumorConfig(prob=1.0, max_tumors=3, mass_effect_prob=0.5, necrosis_prob=0.5)
        new_image, new_kidney, new_tumor, _ = synthesize_tumors_detailed(
            image, kidney, tumor, spacing, gen, config
        )
        assert bool(torch.isfinite(new_image).all())
        assert bool(((new_image >= 0.0) & (new_image <= 1.0)).all())
        assert bool((new_tumor <= new_kidney).all())


def test_config_from_json_lists() -> None:
    """Recipes are JSON: lists become tuples (hashable, equal to the tuple form) and are validated."""
    config = SynthTumorConfig(**{"prob": 0.4, "diameter_mm": [5, 20], "mode_probs": [1, 0, 0, 0]})
    assert config.diameter_mm == (5, 20)
    assert config == SynthTumorConfig(prob=0.4, diameter_mm=(5, 20), mode_probs=(1, 0, 0, 0))
    assert hash(config) == hash(SynthTumorConfig(prob=0.4, diameter_mm=(5, 20), mode_probs=(1, 0, 0, 0)))
    with pytest.raises(InvalidOptionError, match="edge_mm"):
        SynthTumorConfig(**{"edge_mm": [1.0]})


def test_bad_input_gives_one_clear_error() -> None:
    image, kidney, tumor = phantom(n=2)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(InvalidOptionError, match="prob"):
        SynthTumorConfig(prob=1.5)
    with pytest.raises(InvalidOptionError, match="diameter_mm"):
        SynthTumorConfig(diameter_mm=(40.0, 5.0))
    with pytest.raises(InvalidOptionError, match="max_tumors"):
        SynthTumorConfig(max_tumors=0)
    with pytest.raises(InvalidOptionError, match="not a number"):
        SynthTumorConfig(prob="often")
    with pytest.raises(InvalidOptionError, match="spacing_mm"):
        synthesize_tumors(image, kidney, tumor, 0.0, gen, SynthTumorConfig())
    with pytest.raises(InvalidImageError, match="kidney mask shape"):
        synthesize_tumors(image, kidney[:, :, :64], tumor, 1.5, gen, SynthTumorConfig())
    with pytest.raises(InvalidImageError, match=r"\(N, 1, H, W\)"):
        synthesize_tumors(image[:, 0], kidney[:, 0], tumor[:, 0], 1.5, gen, SynthTumorConfig())


@pytest.mark.shared_data
@pytest.mark.skipif(not REAL_SLICES.is_file(), reason="needs ../shared/data/real-slices")
def test_real_kits19_slices_hypo_tumor_darker_and_as_grainy_as_the_kidney() -> None:
    """On real KiTS19 slices resampled to the model grid: hypo tumors are darker than the parenchyma and
    their fine texture has the kidney's noise level."""
    import torch.nn.functional as F

    with np.load(REAL_SLICES) as data:
        labels, ct, spacing = data["label"], data["image_u8"], data["spacing_rc_mm"]
    picked = [i for i in range(len(labels)) if (labels[i] == 1).sum() > 3000][:12]
    images, kidneys = [], []
    for i in picked:
        factor = float(spacing[i][0]) / 1.5625
        img = torch.from_numpy(ct[i].astype(np.float32) / 255.0)[None, None]
        lab = torch.from_numpy((labels[i] == 1).astype(np.float32))[None, None]
        size = (round(512 * factor),) * 2
        images.append(F.interpolate(img, size=size, mode="area")[..., :224, :224])
        kidneys.append((F.interpolate(lab, size=size, mode="area") > 0.5).float()[..., :224, :224])
    image, kidney = torch.cat(images), torch.cat(kidneys)
    config = SynthTumorConfig(prob=1.0, max_tumors=1, mode_probs=(1, 0, 0, 0), texture_hu=(0.0, 0.0),
                              exophytic_fraction=0.0, necrosis_prob=0.0, diameter_mm=(20.0, 30.0))
    new_image, _, new_tumor, records = run(image, kidney, torch.zeros_like(kidney), config, seed=8)
    assert len(records) == len(picked)

    def probe(x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:-1, 1:-1] - 0.25 * (x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2]
                                            + x[..., 1:-1, 2:])

    ratios = []
    for z in range(len(picked)):
        lab = new_tumor[z, 0].numpy() > 0.5
        core = torch.from_numpy(ndimage.binary_erosion(lab, iterations=2))
        paren = torch.from_numpy(
            ndimage.binary_erosion(kidney[z, 0].numpy() > 0.5, iterations=2)
            & ~ndimage.binary_dilation(lab, iterations=3)
        )
        assert float(new_image[z, 0][torch.from_numpy(lab)].mean()) < float(image[z, 0][paren].mean()) - 0.05
        p = probe(new_image[z, 0])
        ratios.append(float(p[core[1:-1, 1:-1]].abs().median()) / float(p[paren[1:-1, 1:-1]].abs().median()))
    assert 0.7 < float(np.median(ratios)) < 1.4, ratios
