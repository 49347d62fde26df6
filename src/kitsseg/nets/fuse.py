"""Fold BatchNorm into the convolution before it, for inference.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma +
beta``, so it can be folded into the preceding convolution's weights and bias. The network then computes
the same function with one memory-bound pass less per convolution: on a CPU, where the light default
U-Net's convolutions run near the machine's throughput, these element-wise passes over full-resolution
activation maps are a large part of what separates the wall time from the compute floor
(``benchmarks/README.md``).

Only what is exactly foldable is folded: a ``Conv2d`` immediately followed, inside one ``nn.Sequential``,
by a ``BatchNorm2d`` with running statistics (the order :class:`kitsseg.nets.model.DoubleConv` uses). Instance
norm depends on the input and is left alone.
"""

from __future__ import annotations

import copy
from typing import TypeVar, cast

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

M = TypeVar("M", bound=nn.Module)


def tensor_fingerprint(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Storage and in-place version counter of every tensor of ``model``: changes when any of them does.

    Keys the caches of prepared inference copies (folded, fused), so training or ``load_state_dict``
    between two calls makes a new copy instead of serving stale weights.
    """
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def foldable_pairs(model: nn.Module) -> list[tuple[nn.Sequential, int]]:
    """``(container, index)`` of every ``Conv2d`` at ``container[index]`` followed by a foldable BatchNorm."""
    pairs = []
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module)
        for i in range(len(children) - 1):
            conv, bn = children[i], children[i + 1]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.running_mean is not None
                and bn.running_var is not None
                and bn.num_features == conv.out_channels
            ):
                pairs.append((module, i))
    return pairs


def fuse_conv_bn(model: M) -> M:
    """Return an equivalent eval-mode model with every Conv2d -> BatchNorm2d pair folded into one Conv2d.

    The input model is never modified: when there is something to fold, a deep copy is folded (the
    BatchNorm becomes ``nn.Identity``, the convolution gains a bias); when there is nothing to fold (a
    network without BatchNorm, such as the paper's U-Net) the model itself is returned. Outputs agree with
    the original in eval mode up to float rounding (about 1e-6 relative in fp32).

    Raises ``ValueError`` for a model (or any submodule) in training mode: there BatchNorm uses the
    batch's statistics, which no fixed weights can reproduce.
    """
    if any(m.training for m in model.modules()):
        raise ValueError(
            "fuse_conv_bn needs a model in eval mode (BatchNorm then uses its running statistics); "
            "call model.eval() first"
        )
    if not foldable_pairs(model):
        return model
    fused = copy.deepcopy(model)
    for container, i in foldable_pairs(fused):
        conv, bn = cast(nn.Conv2d, container[i]), cast(nn.BatchNorm2d, container[i + 1])
        container[i] = fuse_conv_bn_eval(conv, bn)
        container[i + 1] = nn.Identity()
    return fused
