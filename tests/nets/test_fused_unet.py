"""The fused CPU forward pass gives the module's logits, and is used only where it is right.

The networks here have random weights and BatchNorm statistics far from identity, so every fused step
(ReLU inside the convolution, the skip connection split out of the concatenation, the folded bias) has
to be right for the logits to agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kitsseg.inference.predict import inference_model, predict_volume
from kitsseg.nets import fused_unet
from kitsseg.nets.fused_unet import FusedUNet, fused_available, fused_forward
from kitsseg.nets.model import UNet, UNetConfig
from kitsseg.weights.checkpoint import StageModel, WeightsBundle

pytestmark = pytest.mark.skipif(not fused_available("cpu"), reason="this torch has no oneDNN fused kernels")


def random_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A U-Net with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = UNet(config)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def slices(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, h, w), generator=g).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "config",
    [UNetConfig(base_width=8), UNetConfig(base_width=8, norm="none"), UNetConfig(base_width=4, depth=2)],
    ids=["batchnorm", "paper-style-no-norm", "depth-2"],
)
@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 32, 96)], ids=["square", "tumor-band-like"])
def test_fp32_fused_forward_equals_the_module(config: UNetConfig, shape: tuple[int, int, int]) -> None:
    model = inference_model(random_unet(config))
    fused = fused_forward(model, "cpu", bf16=False)
    assert isinstance(fused, FusedUNet)
    x = slices(*shape)
    with torch.inference_mode():
        expected = random_unet(config)(x)  # the unfolded original: folding and fusing together
        got = fused(x)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_bf16_fused_forward_agrees_with_autocast() -> None:
    model = inference_model(random_unet(UNetConfig(base_width=8)))
    fused = fused_forward(model, "cpu", bf16=True)
    assert isinstance(fused, FusedUNet)
    x = slices(4, 64, 64)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(x).float()
        got = fused(x)
    assert got.dtype == torch.bfloat16
    scale = float(expected.abs().max())
    assert float((got.float() - expected).abs().max()) < 0.05 * scale
    # The decisions a threshold makes: logits of clearly different sign never flip.
    clear = expected.abs() > 0.05 * scale
    assert torch.equal((got.float() > 0)[clear], (expected > 0)[clear])


@pytest.mark.parametrize(
    "config", [UNetConfig(base_width=4, norm="instance"), UNetConfig(base_width=4, upsample="bilinear")]
)
def test_architectures_it_does_not_reproduce_run_the_module(config: UNetConfig) -> None:
    assert fused_forward(inference_model(random_unet(config)), "cpu", bf16=False) is None


def test_not_on_cuda_and_not_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    model = inference_model(random_unet(UNetConfig(base_width=4, depth=2)))
    assert fused_forward(model, "cuda", bf16=False) is None
    monkeypatch.setenv(fused_unet.ENV, "0")
    assert fused_forward(model, "cpu", bf16=False) is None
    monkeypatch.setenv(fused_unet.ENV, "1")
    assert isinstance(fused_forward(model, "cpu", bf16=False), FusedUNet)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # a user keeping oneDNN out
    assert not torch.backends.mkldnn.enabled
    assert fused_forward(model, "cpu", bf16=False) is None


def test_a_wrong_fused_network_is_caught_by_the_self_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the operator stopped adding its second input, the check must refuse the fused network."""
    original = fused_unet._Conv.plus

    def forgets_the_skip(self: fused_unet._Conv, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return original(self, x, torch.zeros_like(other))

    model = inference_model(random_unet(UNetConfig(base_width=4, depth=2), seed=3))
    monkeypatch.setattr(fused_unet._Conv, "plus", forgets_the_skip)
    assert fused_forward(model, "cpu", bf16=False) is None


def test_an_operator_error_falls_back_to_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: fused_unet._Conv, x: torch.Tensor, relu: bool) -> torch.Tensor:
        raise RuntimeError("mkldnn_convolution_pointwise: unsupported")

    model = inference_model(random_unet(UNetConfig(base_width=4, depth=2), seed=4))
    monkeypatch.setattr(fused_unet._Conv, "__call__", broken)
    assert fused_forward(model, "cpu", bf16=False) is None


def test_built_once_per_model_and_rebuilt_when_weights_change() -> None:
    model = inference_model(random_unet(UNetConfig(base_width=4, depth=2, norm="none"), seed=5))
    first = fused_forward(model, "cpu", bf16=False)
    assert first is not None
    assert fused_forward(model, "cpu", bf16=False) is first
    assert fused_forward(model, "cpu", bf16=True) is not first  # another precision, another network
    with torch.no_grad():
        model.head.bias.add_(3.0)
    again = fused_forward(model, "cpu", bf16=False)
    assert again is not None
    assert again is not first
    x = slices(1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-4)


def test_predict_volume_gives_the_same_masks_with_and_without_fusion(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end in fp32: the fused engine runs by default and changes no voxel of either mask."""
    kidney = random_unet(UNetConfig(base_width=4, depth=2), seed=6)
    tumor = random_unet(UNetConfig(base_width=4, depth=2), seed=7)
    with torch.no_grad():  # put the thresholds where the random networks' logits are, so masks are mixed
        kidney.head.bias.sub_(0.05)
    bundle = WeightsBundle(
        kidney=StageModel(kidney, input_size=(32, 32), threshold=0.5),
        tumor=StageModel(tumor, input_size=(16, 32), threshold=0.5),
        metadata={"hu_window": [-200.0, 300.0]},
    )
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 150, size=(6, 48, 48)).astype(np.float32)
    fused = predict_volume(ct, bundle, batch_size=4, bf16=False)
    monkeypatch.setenv(fused_unet.ENV, "0")
    plain = predict_volume(ct, bundle, batch_size=4, bf16=False)
    assert fused.engine == "onednn-fused"
    assert plain.engine == "torch"
    assert 0 < fused.kidney_tumor_mask.sum() < fused.kidney_tumor_mask.size
    assert np.array_equal(fused.kidney_tumor_mask, plain.kidney_tumor_mask)
    assert np.array_equal(fused.tumor_mask, plain.tumor_mask)


def test_the_self_check_runs_at_the_stage_input_size() -> None:
    model = inference_model(random_unet(UNetConfig(base_width=4, depth=2), seed=8))
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        assert isinstance(fused_forward(model, "cpu", bf16=False, input_size=(48, 64)), FusedUNet)
        assert isinstance(fused_forward(model, "cpu", bf16=False, input_size=(48, 64)), FusedUNet)  # cached
        assert isinstance(fused_forward(model, "cpu", bf16=False, input_size=(16, 32)), FusedUNet)
    finally:
        hook.remove()
    assert shapes == [(1, 1, 48, 64), (1, 1, 16, 32)]  # one check per size, each at that size


def test_an_operator_failing_only_at_the_real_size_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check on a small square would pass a fused network that breaks on the stage's real input."""
    original = fused_unet._Conv.__call__

    def fails_on_large_maps(self: fused_unet._Conv, x: torch.Tensor, relu: bool) -> torch.Tensor:
        if x.shape[-1] > 32:
            raise RuntimeError("mkldnn: could not create a primitive descriptor")
        return original(self, x, relu)

    model = inference_model(random_unet(UNetConfig(base_width=4, depth=2), seed=9))
    monkeypatch.setattr(fused_unet._Conv, "__call__", fails_on_large_maps)
    assert isinstance(fused_forward(model, "cpu", bf16=False), FusedUNet)  # the small default check passes
    assert fused_forward(model, "cpu", bf16=False, input_size=(64, 64)) is None


def _oracle_bundle() -> WeightsBundle:
    kidney = random_unet(UNetConfig(base_width=4, depth=2), seed=6)
    tumor = random_unet(UNetConfig(base_width=4, depth=2), seed=7)
    with torch.no_grad():  # put the thresholds where the random networks' logits are, so masks are mixed
        kidney.head.bias.sub_(0.05)
    return WeightsBundle(
        kidney=StageModel(kidney, input_size=(32, 32), threshold=0.5),
        tumor=StageModel(tumor, input_size=(16, 32), threshold=0.5),
        metadata={"hu_window": [-200.0, 300.0]},
    )


def test_a_fused_network_failing_on_a_real_batch_falls_back_to_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches of 4 slices break the fused kernels (the self-check uses 1): the module takes over, the
    masks are those of the plain engine, and the report's engine says what happened."""
    bundle = _oracle_bundle()
    ct = np.random.default_rng(0).normal(40, 150, size=(6, 48, 48)).astype(np.float32)
    original = FusedUNet.__call__
    calls: list[int] = []

    def fails_on_big_batches(self: FusedUNet, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise RuntimeError("oneDNN error: could not execute a primitive\nsecond line")
        return original(self, x)

    monkeypatch.setattr(FusedUNet, "__call__", fails_on_big_batches)
    fell_back = predict_volume(ct, bundle, batch_size=4, bf16=False)
    monkeypatch.setenv(fused_unet.ENV, "0")
    plain = predict_volume(ct, bundle, batch_size=4, bf16=False)
    assert 4 in calls  # the fused network was tried on a real batch
    assert fell_back.engine.startswith("torch (onednn-fused failed on a batch")
    assert "RuntimeError: oneDNN error: could not execute a primitive second line" in fell_back.engine
    assert plain.engine == "torch"
    assert np.array_equal(fell_back.kidney_tumor_mask, plain.kidney_tumor_mask)
    assert np.array_equal(fell_back.tumor_mask, plain.tumor_mask)
