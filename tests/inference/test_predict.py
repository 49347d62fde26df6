"""Two-stage inference with hand-set tiny U-Nets whose output is known in advance.

An untrained network gives arbitrary masks, so the tests build "oracle" networks by setting weights:
a constant network (all weights zero, head bias +-10) says foreground everywhere or nowhere, and a
band-pass network says foreground where the windowed intensity lies in ``[lo, hi)``. With them the band
placement, the kidney-slices-only rule and the resizing can be checked voxel for voxel. The networks live
in ``oracle.py``, shared with the other segment tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kitsseg.errors import InvalidImageError
from kitsseg.inference.predict import Prediction, predict_volume
from kitsseg.inference.preprocess import band_height, band_start
from kitsseg.nets.model import UNet, UNetConfig
from kitsseg.weights.checkpoint import StageModel, load_bundle
from oracle import band_pass_unet, constant_unet, make_bundle, write_oracle_weights

# ---------------------------------------------------------------------------------------------- tests


def test_all_foreground_gives_a_centred_band_at_full_resolution() -> None:
    ct = np.zeros((5, 40, 48), dtype=np.float32)  # not the model size: both resizes run
    bundle = make_bundle(constant_unet(10.0), constant_unet(10.0))
    pred = predict_volume(ct, bundle, batch_size=2)
    assert pred.kidney_tumor_mask.dtype == np.bool_
    assert pred.tumor_mask.dtype == np.bool_
    assert pred.kidney_tumor_mask.shape == ct.shape
    assert pred.kidney_tumor_mask.all()
    # The 40x48 slice is padded to 48x48 (4 rows above): the band is half of the square, centred on
    # the kidney rows 0..39 = padded rows 4..43, and reported in the slice's own rows.
    height = band_height(48)
    first = band_start(4, 43, 48) - 4
    assert pred.band == (first, height) == (8, 24)
    expected = np.zeros(ct.shape, dtype=bool)
    expected[:, 8:32, :] = True
    np.testing.assert_array_equal(pred.tumor_mask, expected)
    assert pred.tumor_slices == 5
    assert set(pred.timings) == {"kidney", "tumor"}


def test_non_square_slices_are_padded_not_stretched() -> None:
    rng = np.random.default_rng(0)
    ct = rng.uniform(-200, 400, size=(3, 40, 64)).astype(np.float32)
    square = np.full((3, 64, 64), -1000.0, dtype=np.float32)  # air: 0 after windowing, as the padding
    square[:, 12:52, :] = ct
    bundle = make_bundle(band_pass_unet(0.2, 0.9), band_pass_unet(0.2, 0.45))
    pred = predict_volume(ct, bundle)
    ref = predict_volume(square, bundle)
    np.testing.assert_array_equal(pred.kidney_tumor_mask, ref.kidney_tumor_mask[:, 12:52])
    np.testing.assert_array_equal(pred.tumor_mask, ref.tumor_mask[:, 12:52])


def test_no_kidney_means_no_tumor_run() -> None:
    ct = np.zeros((3, 64, 64), dtype=np.float32)
    pred = predict_volume(ct, make_bundle(constant_unet(-10.0), constant_unet(10.0)))
    assert not pred.kidney_tumor_mask.any()
    assert not pred.tumor_mask.any()
    assert pred.band is None
    assert pred.tumor_slices == 0
    assert any("no kidney" in n for n in pred.notes)


def test_weights_without_tumor_model_give_empty_tumor_and_a_note() -> None:
    ct = np.zeros((3, 64, 64), dtype=np.float32)
    pred = predict_volume(ct, make_bundle(constant_unet(10.0), None))
    assert pred.kidney_tumor_mask.all()
    assert not pred.tumor_mask.any()
    assert any("no tumor model" in n for n in pred.notes)


@pytest.mark.parametrize(("rows", "expected_first"), [((5, 12), 0), ((50, 60), 32), ((30, 41), 20)])
def test_tumor_runs_only_on_kidney_slices_inside_the_band(rows: tuple[int, int], expected_first: int) -> None:
    ct = np.zeros((6, 64, 64), dtype=np.float32)
    r0, r1 = rows
    ct[[1, 4], r0 : r1 + 1, 20:30] = 150.0  # "kidney" on slices 1 and 4 only
    bundle = make_bundle(band_pass_unet(0.2, 0.9), constant_unet(10.0))
    pred = predict_volume(ct, bundle, batch_size=4)
    kidney_truth = ct > 0
    np.testing.assert_array_equal(pred.kidney_tumor_mask, kidney_truth)
    assert pred.band == (expected_first, 32)
    assert pred.band[0] == band_start(r0, r1, 64)
    expected = np.zeros(ct.shape, dtype=bool)
    expected[[1, 4], expected_first : expected_first + 32, :] = True
    np.testing.assert_array_equal(pred.tumor_mask, expected)
    assert pred.tumor_slices == 2


def test_probabilities_are_resized_before_thresholding() -> None:
    # A 128x128 disk seen by a 64x64 model. Expected: the model's probabilities upsampled bilinearly, then
    # thresholded (a smooth edge); thresholding first and upsampling the mask gives 2x2 blocks instead.
    from kitsseg.inference.preprocess import resize, window

    yy, xx = np.mgrid[:128, :128]
    disk = (yy - 63.5) ** 2 + (xx - 60.0) ** 2 <= 30.0**2
    ct = np.where(disk, 150.0, 0.0).astype(np.float32)[None]
    net = band_pass_unet(0.2, 0.9)
    pred = predict_volume(ct, make_bundle(net, None))
    with torch.no_grad():
        prob = torch.sigmoid(net(resize(window(torch.from_numpy(ct)[None], 0, 255), (64, 64))))
    expected = (resize(prob, (128, 128))[0, 0] > 0.5).numpy()
    blocky = resize((prob > 0.5).float(), (128, 128), mode="nearest")[0, 0].numpy() > 0
    mask = pred.kidney_tumor_mask[0]
    np.testing.assert_array_equal(mask, expected)
    assert not np.array_equal(mask, blocky)
    assert 2 * (mask & disk).sum() / (mask.sum() + disk.sum()) > 0.95


def test_skipping_empty_slices_gives_exactly_the_full_resize() -> None:
    # The runner resizes only slices whose model-grid maximum exceeds the threshold. Slices just under,
    # at and just over it, and a non-square grid with a row band, must match resizing every slice.
    from kitsseg.inference.predict import SquarePad, _StageRunner
    from kitsseg.inference.preprocess import resize

    thr = torch.logit(torch.tensor(0.5)).item()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 16, 32, generator=gen) - 8.0  # far below the threshold
    logits[1, 0, 4, 7] = thr - 1e-4  # just under: exactly empty at full size
    logits[2, 0, 4, 7] = thr  # at the threshold (sigmoid rounding decides; must agree either way)
    logits[3, 0, 9:11, 20:22] = thr + 1e-3  # just over: a few pixels
    logits[4] = torch.randn(1, 16, 32, generator=gen) * 4.0  # busy slice
    square = SquarePad.for_shape(40, 64)
    stage = StageModel(UNet(UNetConfig(in_channels=1, base_width=4, depth=1)), (16, 32), threshold=0.5)
    runner = _StageRunner(stage, (0.0, 255.0), 4, torch.device("cpu"), False, square)
    got = runner._masks(logits, (32, 64), 20)
    probs = resize(torch.sigmoid(logits), (32, 64))[:, 0] > 0.5
    expected = square.crop_rows(probs, 20).numpy()
    assert got.dtype == np.bool_
    assert got.shape == (6, 40, 64)
    np.testing.assert_array_equal(got, expected)
    assert [bool(m.any()) for m in got[[0, 1, 3, 4]]] == [False, False, True, True]


def test_batch_size_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    ct = rng.uniform(-200, 400, size=(7, 48, 56)).astype(np.float32)
    bundle = make_bundle(band_pass_unet(0.2, 0.9), band_pass_unet(0.2, 0.45))
    a = predict_volume(ct, bundle, batch_size=1)
    b = predict_volume(ct, bundle, batch_size=16)
    np.testing.assert_array_equal(a.kidney_tumor_mask, b.kidney_tumor_mask)
    np.testing.assert_array_equal(a.tumor_mask, b.tumor_mask)
    assert a.kidney_tumor_mask.any()
    assert a.tumor_mask.any()


def test_input_is_not_modified_and_progress_is_reported() -> None:
    ct = np.full((5, 64, 64), 150.0, dtype=np.float32)
    before = ct.copy()
    calls: list[tuple[str, int, int]] = []
    predict_volume(
        ct,
        make_bundle(constant_unet(10.0), constant_unet(10.0)),
        batch_size=2,
        progress=lambda *a: calls.append(a),
    )
    np.testing.assert_array_equal(ct, before)
    assert calls[-1] == ("tumor", 5, 5)
    assert ("kidney", 5, 5) in calls
    assert ("kidney", 2, 5) in calls


def test_bf16_autocast_runs_and_agrees() -> None:
    ct = np.zeros((4, 64, 64), dtype=np.float32)
    ct[:, 30:45, 10:25] = 160.0
    bundle = make_bundle(band_pass_unet(0.2, 0.9), constant_unet(10.0))
    a = predict_volume(ct, bundle)
    b = predict_volume(ct, bundle, bf16=True)
    np.testing.assert_array_equal(a.kidney_tumor_mask, b.kidney_tumor_mask)
    np.testing.assert_array_equal(a.tumor_mask, b.tumor_mask)


def test_rejects_arrays_that_are_not_slice_stacks() -> None:
    bundle = make_bundle(constant_unet(10.0), None)
    with pytest.raises(InvalidImageError, match="slice stack"):
        predict_volume(np.zeros((64, 64), dtype=np.float32), bundle)
    with pytest.raises(ValueError, match="batch_size"):
        predict_volume(np.zeros((1, 64, 64), dtype=np.float32), bundle, batch_size=0)


def test_oracle_weights_survive_the_file_format(tmp_path: Path) -> None:
    path = write_oracle_weights(tmp_path / "w.pt")
    bundle = load_bundle(path)
    ct = np.zeros((2, 64, 64), dtype=np.float32)
    ct[:, 34:44, 10:20] = 170.0  # kidney
    ct[:, 36:40, 12:16] = 75.0  # tumor inside it
    pred = predict_volume(ct, bundle)
    assert isinstance(pred, Prediction)
    np.testing.assert_array_equal(pred.kidney_tumor_mask, ct > 0)
    np.testing.assert_array_equal(pred.tumor_mask, ct == 75.0)


# ---------------------------------------------------------------------------------------------- device


def test_select_device() -> None:
    from kitsseg.errors import DeviceError
    from kitsseg.nets.device import select_device

    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            select_device("cuda")
        with pytest.raises(DeviceError, match="no CUDA"):
            select_device("cuda:1")


def test_set_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from kitsseg.errors import DeviceError
    from kitsseg.nets.device import available_cores, default_threads, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert default_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert default_threads() == available_cores() >= 1
        with pytest.raises(DeviceError, match="at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
