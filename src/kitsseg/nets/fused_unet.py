"""The folded U-Net's forward pass on oneDNN's fused convolution kernels (CPU inference).

Why: with BatchNorm folded (:mod:`kitsseg.nets.fuse`) the light default U-Net still spends part of its CPU
time outside its convolutions, in memory-bound passes over full-resolution activation maps: the in-place
ReLU after every convolution and the copy that concatenates each skip connection with the up-sampled map
(0.27 s and 0.25 s of the 6.0 s both networks took in a cProfile run of ``segment()`` on the benchmark's
512x512x300 CT). PyTorch's oneDNN backend has convolution kernels that apply a ReLU, or add another
tensor, while they write their output (the ones ``torch.compile``'s CPU backend generates calls to).
Calling them directly removes every ReLU pass, and splitting the first convolution of each up level by
input channels removes the concatenation::

    relu(conv(cat[skip, up], [W_skip | W_up]) + b) = relu(conv(up, W_up) + (conv(skip, W_skip) + b))

where the outer convolution adds the inner one's output as it writes. Measured on this project's 2-core
CPU (``benchmarks/README.md``): the kidney network's batch of 8 slices in bf16, 121.7-123.6 ms against
130.0-132.5 ms under autocast (best of 25 interleaved rounds, two runs).

These operators (``torch.ops.mkldnn._convolution_pointwise``) are not public API. So :func:`fused_forward`
builds the fused network only where they exist, for the architecture it knows (a
:class:`~kitsseg.nets.model.UNet` whose norms were folded away, transposed-convolution up-sampling), and
checks it against the module itself at the stage's own input size (256x256 for the kidney network, 128x256 for
the tumor band: oneDNN picks its kernels by shape, so a check on another size would not test the kernels
inference uses) before handing it out. Anywhere else (CUDA, a torch without oneDNN, instance norm, bilinear
up-sampling, an operator whose signature changed, ``KITSSEG_FUSED_CONV=0``) inference runs the ordinary
module, with the same results up to float rounding; so does a stage whose fused network raises on a real batch
(``kitsseg.inference.predict._StageRunner`` drops it, and the report's ``network_engine`` says why).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .. import env
from .fuse import tensor_fingerprint
from .model import UNet

#: ``KITSSEG_FUSED_CONV=0`` runs the ordinary module (for comparisons, or if the fused path misbehaves).
ENV = env.FUSED_CONV

#: Largest difference from the module's logits the self-check accepts, relative to their largest value:
#: bf16 rounds to 8 significant bits, and the split convolution rounds its partial sum once more.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05}


class _Unsupported(Exception):
    """The model is not an architecture the fused forward reproduces."""


@dataclass(frozen=True)
class _Conv:
    """One convolution's weights in the compute dtype and channels-last layout, and its padding."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    padding: int

    @classmethod
    def of(
        cls, conv: nn.Module, dtype: torch.dtype, channels: slice | None = None, bias: bool = True
    ) -> _Conv:
        if (
            not isinstance(conv, nn.Conv2d)
            or conv.stride != (1, 1)
            or conv.dilation != (1, 1)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
            or conv.kernel_size not in ((3, 3), (1, 1))
            or conv.padding != (conv.kernel_size[0] // 2,) * 2
        ):
            raise _Unsupported(f"not a plain 3x3 or 1x1 same-size convolution: {conv}")
        weight = conv.weight.detach()
        if channels is not None:
            weight = weight[:, channels]
        weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
        b = conv.bias.detach().to(dtype) if bias and conv.bias is not None else None
        return cls(weight, b, conv.kernel_size[0] // 2)

    def __call__(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        p = [self.padding, self.padding]
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, p, [1, 1], [1, 1], 1, "relu" if relu else "none", [], ""
        )

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``relu(conv(x) + other)``, the addition and the ReLU applied as the output is written."""
        p = [self.padding, self.padding]
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, p, [1, 1], [1, 1], 1, "add", None, "relu", [], ""
        )


def _conv_pair(block: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The two convolutions of a folded ``DoubleConv`` (conv, ReLU, conv, ReLU once identities go)."""
    layers = [m for m in block.children() if not isinstance(m, nn.Identity)]
    kinds = [type(m) for m in layers]
    if kinds != [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU]:
        raise _Unsupported(
            f"a level is {[k.__name__ for k in kinds]}, not conv-relu-conv-relu (unfolded norm?)"
        )
    return cast(nn.Conv2d, layers[0]), cast(nn.Conv2d, layers[2])


def _double_conv(block: nn.Module, dtype: torch.dtype) -> tuple[_Conv, _Conv]:
    first, second = _conv_pair(block)
    return _Conv.of(first, dtype), _Conv.of(second, dtype)


def _check_pool(pool: nn.Module) -> None:
    if not (
        isinstance(pool, nn.MaxPool2d)
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
    ):
        raise _Unsupported(f"not a 2x2 max-pool: {pool}")


class FusedUNet:
    """A folded :class:`~kitsseg.nets.model.UNet` run on oneDNN's fused kernels in ``dtype``.

    Callable like the module (``(N, C, H, W)`` in, logits ``(N, 1, H, W)`` out, in ``dtype``); inference
    only (no autograd). Build it with :func:`fused_forward`, which also checks it.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        if not isinstance(model, UNet):
            raise _Unsupported(f"not a kitsseg UNet: {type(model).__name__}")
        self.dtype = dtype
        self.inc = _double_conv(model.inc, dtype)
        self.downs: list[tuple[_Conv, _Conv]] = []
        for down in model.downs:
            levels = cast(nn.Sequential, down)
            _check_pool(levels[0])
            self.downs.append(_double_conv(levels[1], dtype))
        self.ups: list[tuple[torch.Tensor, torch.Tensor | None, _Conv, _Conv, _Conv]] = []
        for up in model.ups:
            up_layer, block = cast(nn.Module, up.up), cast(nn.Module, up.conv)
            if not isinstance(up_layer, nn.ConvTranspose2d):
                raise _Unsupported("only transposed-convolution up-sampling is fused")
            if up_layer.stride != (2, 2) or up_layer.kernel_size != (2, 2):
                raise _Unsupported(f"not a 2x2 stride-2 up-convolution: {up_layer}")
            conv, second = _conv_pair(block)
            half = conv.in_channels // 2
            self.ups.append(
                (
                    up_layer.weight.detach().to(dtype),
                    None if up_layer.bias is None else up_layer.bias.detach().to(dtype),
                    _Conv.of(conv, dtype, slice(0, half)),  # skip channels come first in the concatenation
                    _Conv.of(conv, dtype, slice(half, None), bias=False),
                    _Conv.of(second, dtype),
                )
            )
        self.head = _Conv.of(model.head, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        for conv in self.inc:
            y = conv(y, relu=True)
        skips = [y]
        for convs in self.downs:
            y = F.max_pool2d(skips[-1], 2)
            for conv in convs:
                y = conv(y, relu=True)
            skips.append(y)
        y = skips.pop()
        for up_weight, up_bias, from_skip, from_up, second in self.ups:
            upsampled = F.conv_transpose2d(y, up_weight, up_bias, stride=2)
            y = from_up.plus(upsampled, from_skip(skips.pop(), relu=False))
            y = second(y, relu=True)
        return self.head(y, relu=False)


def fused_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused kernels can be used on ``device``: CPU, oneDNN present and enabled, not switched off.

    ``torch.backends.mkldnn.enabled = False`` (a user keeping oneDNN out, e.g. to compare against another
    backend) is respected: the fused kernels are oneDNN's.
    """
    if not env.fused_conv_enabled():
        return False
    mkldnn = torch.backends.mkldnn
    if torch.device(device).type != "cpu" or not mkldnn.is_available() or not mkldnn.enabled:
        return False
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    return op is not None and hasattr(op, "binary")


def fused_forward(
    model: nn.Module, device: torch.device | str, bf16: bool, input_size: tuple[int, int] | None = None
) -> FusedUNet | None:
    """A checked :class:`FusedUNet` for the folded, eval-mode ``model``, or ``None`` to run the module.

    ``input_size``: the ``(height, width)`` inference feeds the network (the stage's ``input_size``); the
    self-check runs at that size, on one slice. ``None`` checks on a small square (``2 ** (depth + 1)``
    pixels a side), for a network without a fixed input size.

    ``None`` when :func:`fused_available` says no, when the architecture is not one the fused forward
    reproduces, or when the fused network's logits on a random input of that size differ from the module's
    (under the same precision: autocast for bf16) by more than the tolerance, or raise. Built and checked
    once per model, precision and size while the model's tensors stay unchanged.
    """
    if not fused_available(device):
        return None
    dtype = torch.bfloat16 if bf16 else torch.float32
    size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
    fingerprint = tensor_fingerprint(model)
    built = _BUILT.setdefault(model, {})
    cached = built.get((dtype, size))
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    fused: FusedUNet | None
    try:
        fused = FusedUNet(model, dtype)
        ok = _agrees(model, fused, bf16, size)
    except (_Unsupported, RuntimeError, TypeError, AttributeError, IndexError):
        fused, ok = None, False
    result = fused if ok else None
    built[(dtype, size)] = (fingerprint, result)
    return result


#: Fused networks per module, dtype and checked input size, with the fingerprint of the tensors they were
#: built from.
_BUILT: weakref.WeakKeyDictionary[
    nn.Module,
    dict[tuple[torch.dtype, tuple[int, int] | None], tuple[tuple[tuple[int, int], ...], FusedUNet | None]],
] = weakref.WeakKeyDictionary()


def _agrees(model: nn.Module, fused: FusedUNet, bf16: bool, size: tuple[int, int] | None) -> bool:
    """Whether ``fused`` gives the module's logits on one random slice of ``size`` (default: small).

    One slice: the check runs the module once at full size per stage and process, which is what it costs
    (oneDNN chooses kernels by the spatial shape; a batch that still breaks them is caught at run time).
    """
    config = cast(UNet, model).config
    height, width = size if size is not None else (2 ** (config.depth + 1),) * 2
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((1, config.in_channels, height, width), generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            expected = model(x).float()
        got = fused(x).float()
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return False
    scale = float(expected.abs().max()) + 1e-6
    return float((got - expected).abs().max()) <= _TOLERANCE[fused.dtype] * scale
