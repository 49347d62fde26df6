"""The one preprocessing geometry: slices resampled to the model's pixel spacing and centred on its grid.

The training slice sets and inference must give the network identical inputs for the same slice, including
non-square slices and anisotropic pixels; probabilities must come back to the slice's own pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kitsseg.inference.predict import predict_volume
from kitsseg.inference.preprocess import SliceGrid
from kitsseg.training.slicesets import slices_to_grid
from oracle import band_pass_unet, make_bundle


def test_grid_size_follows_the_pixel_spacing() -> None:
    fine = SliceGrid.for_slice((512, 512), (0.5, 0.5), (256, 256), 1.0)
    assert (fine.scaled_h, fine.scaled_w, fine.top, fine.left) == (256, 256, 0, 0)
    coarse = SliceGrid.for_slice((100, 150), (3.0, 2.0), (256, 256), 1.5)
    assert (coarse.scaled_h, coarse.scaled_w) == (200, 200)  # 300 mm x 300 mm at 1.5 mm
    assert (coarse.top, coarse.left) == (28, 28)
    wide = SliceGrid.for_slice((512, 512), (1.0, 1.0), (256, 256), 1.5)  # 512 mm: cropped to 384 mm
    assert wide.scaled_h == 341
    assert wide.top < 0


def test_a_disk_keeps_its_size_in_millimetres_whatever_the_pixel_size() -> None:
    areas = []
    for spacing in (0.5, 0.8, 1.2):
        n = int(round(300 / spacing))
        yy, xx = (np.mgrid[:n, :n] + 0.5) * spacing
        disk = ((yy - 150) ** 2 + (xx - 150) ** 2 <= 40.0**2).astype(np.float32)
        g = SliceGrid.for_slice((n, n), (spacing, spacing), (256, 256), 1.5625)
        out = g.to_model(torch.from_numpy(disk)[None, None])
        areas.append(float((out >= 0.5).sum()) * 1.5625**2)
    assert max(areas) / min(areas) < 1.03
    assert abs(areas[0] - np.pi * 40.0**2) / (np.pi * 40.0**2) < 0.03


def test_to_slice_inverts_to_model_on_smooth_content() -> None:
    g = SliceGrid.for_slice((90, 140), (0.9, 0.7), (128, 128), 1.2)
    yy, xx = np.mgrid[:90, :140]
    smooth = torch.from_numpy(np.exp(-((yy - 45) ** 2 + (xx - 70) ** 2) / 800.0).astype(np.float32))[
        None, None
    ]
    back = g.to_slice(g.to_model(smooth))
    assert back.shape == smooth.shape
    assert float((back - smooth).abs().max()) < 0.03


def test_training_input_of_a_non_square_ct_equals_the_inference_input() -> None:
    """The slice set path (``slices_to_grid``) and ``predict_volume`` feed the kidney network the same
    tensor for a non-square slice with anisotropic pixels."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(-200, 400, size=(2, 70, 110)).astype(np.float32)
    spacing = (1.3, 0.9)
    net = band_pass_unet(0.2, 0.9)
    seen: list[torch.Tensor] = []
    net.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach().clone()))
    bundle = make_bundle(net, None, meta={"pixel_spacing_mm": 1.5})
    import os

    os.environ["KITSSEG_FUSED_CONV"] = "0"  # the module itself must run, so the hook sees its input
    try:
        predict_volume(hu, bundle, batch_size=2, spacing_rc=spacing)
    finally:
        del os.environ["KITSSEG_FUSED_CONV"]
    training, _, _ = slices_to_grid(
        hu, np.zeros(hu.shape, np.uint8), np.array([spacing] * 2), (0, 255), (64, 64), 1.5
    )
    inference = torch.cat(seen)
    assert inference.shape == (2, 1, 64, 64)
    torch.testing.assert_close(inference.float(), training.float(), atol=1e-3, rtol=0)  # training stores fp16


def test_spacing_aware_weights_need_the_spacing() -> None:
    bundle = make_bundle(band_pass_unet(0.2, 0.9), None, meta={"pixel_spacing_mm": 1.5})
    with pytest.raises(ValueError, match="spacing_rc"):
        predict_volume(np.zeros((1, 32, 32), np.float32), bundle)


def test_masks_come_back_on_the_slice_grid_in_the_right_place() -> None:
    # A bright disk off-centre in a non-square slice at 0.7 mm; the model grid is at 1.4 mm.
    yy, xx = (np.mgrid[:120, :90] + 0.5) * 0.7
    disk = (yy - 30) ** 2 + (xx - 40) ** 2 <= 12.0**2
    ct = np.where(disk, 150.0, -100.0).astype(np.float32)[None]
    bundle = make_bundle(band_pass_unet(0.2, 0.9), None, meta={"pixel_spacing_mm": 1.4})
    pred = predict_volume(ct, bundle, spacing_rc=(0.7, 0.7))
    mask = pred.kidney_tumor_mask[0]
    assert mask.shape == disk.shape
    # The oracle thresholds the windowed value, so the edge moves by at most about one grid pixel.
    assert 2 * (mask & disk).sum() / (mask.sum() + disk.sum()) > 0.9
    np.testing.assert_allclose(np.argwhere(mask).mean(0), np.argwhere(disk).mean(0), atol=0.5)
