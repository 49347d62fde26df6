"""BatchNorm folding: the folded network computes the same function with no BatchNorm left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kitsseg.nets.fuse import foldable_pairs, fuse_conv_bn
from kitsseg.nets.model import UNet, UNetConfig


def _trained_looking_unet(config: UNetConfig) -> UNet:
    """A tiny U-Net whose BatchNorms have non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    net = UNet(config)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_folded_unet_gives_the_same_output(upsample: str) -> None:
    net = _trained_looking_unet(UNetConfig(base_width=4, depth=2, norm="batch", upsample=upsample))
    x = torch.randn(3, 1, 32, 32)
    fused = fuse_conv_bn(net)
    with torch.inference_mode():
        expected, got = net(x), fused(x)
    assert expected.abs().max() > 0.1  # a non-trivial output, so agreement means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # 2 convolutions per DoubleConv, (1 + 2 * depth) DoubleConvs, each now with a bias
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 2 * (1 + 2 * 2)
    assert all(c.bias is not None for c in convs)


def test_input_model_is_not_modified() -> None:
    net = _trained_looking_unet(UNetConfig(base_width=4, depth=2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n_pairs = len(foldable_pairs(net))
    fuse_conv_bn(net)
    assert len(foldable_pairs(net)) == n_pairs == 10
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)


def test_nothing_to_fold_returns_the_model_itself() -> None:
    net = UNet(UNetConfig(base_width=4, depth=2, norm="none")).eval()
    assert fuse_conv_bn(net) is net
    inst = UNet(UNetConfig(base_width=4, depth=2, norm="instance")).eval()
    assert fuse_conv_bn(inst) is inst  # instance norm depends on the input: not foldable


def test_training_mode_is_refused() -> None:
    net = UNet(UNetConfig(base_width=4, depth=2))
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(net)
    net.eval()
    net.inc[1].train()  # one BatchNorm still in training mode
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(net)


# ------------------------------------------------------------------------ the folded model in inference


def test_inference_model_is_folded_cached_and_refreshed_when_weights_change() -> None:
    from kitsseg.inference.predict import inference_model

    net = _trained_looking_unet(UNetConfig(base_width=4, depth=2))
    first = inference_model(net)
    assert first is not net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in first.modules())
    assert first.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert inference_model(net) is first  # same unchanged model: folded once
    with torch.no_grad():
        net.inc[1].running_mean.add_(0.25)  # an in-place change (as training or load_state_dict make)
    second = inference_model(net)
    assert second is not first
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(second(x), net(x), atol=1e-4, rtol=1e-4)


def test_inference_model_leaves_the_thread_count_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Folding is a library call: it must not change PyTorch's process-wide thread count, even briefly."""
    from kitsseg.inference.predict import inference_model

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    folded = inference_model(_trained_looking_unet(UNetConfig(base_width=4, depth=2)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # it did fold
    assert calls == []


def test_predict_runs_the_folded_model_and_leaves_the_bundle_alone() -> None:
    import numpy as np

    from kitsseg.inference.predict import predict_volume
    from kitsseg.inference.preprocess import window
    from oracle import make_bundle

    net = _trained_looking_unet(UNetConfig(base_width=4, depth=2))
    with torch.no_grad():
        net.head.weight.mul_(50.0)  # logits well away from 0, so few voxels sit on the threshold
        net.head.bias.fill_(-0.3)  # (where every channel is 0 after ReLU the logit is this bias)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ct = np.random.default_rng(0).uniform(-100, 300, size=(3, 64, 64)).astype(np.float32)
    pred = predict_volume(ct, make_bundle(net, None, kidney_size=(64, 64)), batch_size=2)
    with torch.inference_mode():
        prob = torch.sigmoid(net(window(torch.from_numpy(ct)[:, None], 0, 255)))[:, 0].numpy()
    clear = np.abs(prob - 0.5) > 1e-4  # folding changes logits by ~1e-6: only borderline voxels may flip
    assert clear.mean() > 0.99
    assert 0.05 < (prob > 0.5).mean() < 0.95  # a mask with both values, so agreement means something
    np.testing.assert_array_equal(pred.kidney_tumor_mask[clear], (prob > 0.5)[clear])
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert set(pred.detail_timings) == {"prepare", "kidney_net", "tumor_net"}
    assert 0 < pred.detail_timings["kidney_net"] <= pred.timings["kidney"]


def test_native_bf16_detection_and_the_emulated_bf16_note(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import kitsseg.inference.predict as predict
    from oracle import constant_unet, make_bundle

    assert isinstance(predict.native_bf16("cpu"), bool)
    assert predict.native_bf16("meta") is False
    monkeypatch.setattr(predict, "_cpu_flags", lambda: frozenset({"avx512f"}))
    assert predict.native_bf16("cpu") is False  # AVX-512 without BF16 only emulates bf16
    ct = np.zeros((2, 64, 64), dtype=np.float32)
    pred = predict.predict_volume(ct, make_bundle(constant_unet(10.0), None), bf16=True)
    assert pred.kidney_tumor_mask.all()
    assert any("emulated" in n for n in pred.notes)
    assert not any(
        "emulated" in n for n in predict.predict_volume(ct, make_bundle(constant_unet(10.0), None)).notes
    )
