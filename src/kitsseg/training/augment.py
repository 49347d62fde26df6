"""Batch augmentation in torch: rotation, scale, grey values and (optionally) left-right mirroring.

What varies between scans is a little rotation and scale (patient position, field of view) and the grey
values (contrast phase, scanner, the display window a dataset was exported with); those are jittered.

Left-right mirroring is off by default and an option (``p_flip``): a mirrored slice never occurs (the liver
sits on the patient's right, which the frame puts on the image's left), but the labels do not name a side, so
a mirrored slice is still a correctly labelled kidney, and mirroring is nnU-Net's default on every axis. It
is measured, not assumed: the 0.3.0 kidney network found ircad_01's left kidney far better when the slices
were mirrored (recall 0.95 against 0.68), i.e. it had learned which side of the image a kidney may be on
rather than what a kidney looks like (docs/model-card.md).

Everything runs on whole batches on the training device, so it costs a few percent of a training step even
on a CPU. All random numbers come from one ``torch.Generator`` on the CPU, drawn in a fixed order whether or
not a transform is applied, so a batch's augmentation depends only on the seed and not on the device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; each is applied to a sample with its own probability.

    Attributes
    ----------
    enabled:
        ``False`` turns augmentation off (the validation set is never augmented).
    p_spatial:
        Probability of the rotation + scale transform.
    rotate_deg:
        Rotation drawn uniformly in ``[-rotate_deg, rotate_deg]`` degrees, about the slice centre.
    scale:
        Zoom factor range (log-uniform); > 1 enlarges the anatomy.
    p_intensity:
        Probability of each of: contrast, brightness, gamma, noise (independently).
    contrast:
        Factor range around the sample's mean grey value.
    brightness:
        Offset drawn in ``[-brightness, brightness]`` (in units of the [0, 1] window).
    gamma:
        Exponent range (log-uniform) applied to the [0, 1] image.
    noise_std:
        Gaussian noise with a standard deviation drawn in ``[0, noise_std]``.
    p_flip:
        Probability of mirroring a sample left-right (image and masks). At 0 no random number is drawn for
        it, so recipes without mirroring give the same batches as before the option existed.
    """

    enabled: bool = True
    p_spatial: float = 0.75
    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    p_intensity: float = 0.5
    contrast: tuple[float, float] = (0.8, 1.25)
    brightness: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.03
    p_flip: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _log_uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(_uniform(n, math.log(lo), math.log(hi), gen))


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: ``images`` float ``(B, 1, H, W)`` in [0, 1], ``masks`` the same shape in {0, 1}.

    Returns new tensors (inputs are not modified); the masks stay binary. Geometry is applied to images
    (bilinear, zero padding, i.e. the window's low end) and masks (bilinear, then thresholded at 0.5)
    with the same sampling grid.
    """
    if not config.enabled:
        return images, masks
    b, _, h, w = images.shape
    device = images.device
    gen = generator

    # Draw everything up front, in a fixed order (reproducible whatever is applied).
    do_spatial = torch.rand(b, generator=gen) < config.p_spatial
    angle = _uniform(b, -config.rotate_deg, config.rotate_deg, gen) * (math.pi / 180.0)
    zoom = _log_uniform(b, config.scale[0], config.scale[1], gen)
    do_int = torch.rand(b, 4, generator=gen) < config.p_intensity
    contrast = _log_uniform(b, config.contrast[0], config.contrast[1], gen)
    bright = _uniform(b, -config.brightness, config.brightness, gen)
    gamma = _log_uniform(b, config.gamma[0], config.gamma[1], gen)
    sigma = _uniform(b, 0.0, config.noise_std, gen)
    noise = torch.randn(images.shape, generator=gen)
    # Drawn last and only when enabled: recipes without mirroring keep their random stream.
    do_flip = torch.rand(b, generator=gen) < config.p_flip if config.p_flip > 0 else None

    x = images
    y = masks
    if do_flip is not None and bool(do_flip.any()):
        f = do_flip.to(device).view(b, 1, 1, 1)
        x = torch.where(f, x.flip(-1), x)
        y = torch.where(f, y.flip(-1), y)
    if bool(do_spatial.any()):
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # affine_grid works in normalised coordinates ([-1, 1] across each side); a rotation in pixel
        # space on a non-square slice is diag(2/W, 2/H) @ R @ diag(W/2, H/2) there.
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = cos
        theta[:, 0, 1] = -sin * (h / w)
        theta[:, 1, 0] = sin * (w / h)
        theta[:, 1, 1] = cos
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        theta = torch.where(do_spatial[:, None, None], theta, identity)
        grid = F.affine_grid(theta.to(device=device, dtype=x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = (
            F.grid_sample(y.to(x.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            > 0.5
        )
        y = y.to(masks.dtype)

    def per_sample(v: torch.Tensor) -> torch.Tensor:
        return v.to(device=device, dtype=x.dtype).view(b, 1, 1, 1)

    on = do_int.to(device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = torch.where(on[:, 0].view(b, 1, 1, 1), (x - mean) * per_sample(contrast) + mean, x)
    x = torch.where(on[:, 1].view(b, 1, 1, 1), x + per_sample(bright), x)
    x = x.clamp(0.0, 1.0)
    x = torch.where(on[:, 2].view(b, 1, 1, 1), x.pow(per_sample(gamma)), x)
    x = torch.where(
        on[:, 3].view(b, 1, 1, 1), x + noise.to(device=device, dtype=x.dtype) * per_sample(sigma), x
    )
    return x.clamp(0.0, 1.0), y
