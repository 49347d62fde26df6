"""Training on whole KiTS19 volumes, its options: :class:`TrainConfig`, the stages, device and precision.

The recipe (seed paper, section 2.1.1): loss ``(1 - lambda) * BCE + lambda * Dice`` with lambda = 0.5,
Adam, the learning rate reduced when the validation loss stops improving, Gaussian initialisation (done by
:class:`kitsseg.nets.model.UNet`), 50 epochs with early stopping. The kidney model learns kidney+tumor on
every slice that shows either; the tumor model learns tumor on the per-case half-height band. Unlike the
paper, the tumor model also sees kidney slices without tumor (``tumor_neg_ratio`` of them per positive,
drawn anew each epoch): trained on positives only it answers "tumor" on every slice it is shown.

The loop is :mod:`.loop`, the run folder's files :mod:`.runfiles`, the whole run and export :mod:`.train`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..inference.preprocess import KIDNEY_INPUT, TUMOR_INPUT
from ..nets.model import UNetConfig
from .augment import AugmentConfig

if TYPE_CHECKING:
    from .distributed import DistContext


Stage = Literal["kidney", "tumor"]
STAGES: tuple[Stage, ...] = ("kidney", "tumor")

#: Used when the training cases hold too few tumors to estimate the shape bounds (the paper's values).
PAPER_EIG_BOUNDS = (1.07, 2.8)
_STAGE_ID = {"kidney": 1, "tumor": 2}

#: ``on_event(name, info)``: progress for a display; called on rank 0 only. Names: ``cache_start``,
#: ``cache_case``, ``cache_ready``, ``stage_start``, ``step``, ``epoch_end``, ``stage_end``, ``exported``.
EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI's options map one to one).

    Attributes not obvious from their names:

    model:
        Which stages to train: ``"kidney"``, ``"tumor"`` or ``"both"`` (kidney first).
    unet:
        Architecture of both networks (default base width 16, depth 4, batch norm; ``UNetConfig.paper()``
        for the paper's network).
    hu_window:
        HU window ``(lo, hi)`` mapped to [0, 1]; the default ``(0, 255)`` is the starter model's window.
    kidney_input, tumor_input:
        Network input sizes; the defaults are the paper's. Smaller sizes are for tests.
    tumor_neg_ratio:
        Tumor-free kidney slices per tumor slice in each tumor epoch (``None``: all of them).
    cache_dir:
        Slice cache folder (default ``RUN_DIR/cache``); point several runs at one folder to share it.
    resume:
        Continue the run in ``RUN_DIR`` from its ``last.pt`` files (a fresh start when there are none).
    patience:
        Early stopping: epochs without a better validation Dice before a stage stops.
    lr_patience, lr_factor, min_lr:
        ``ReduceLROnPlateau`` on the validation loss.
    workers:
        Processes for building the slice cache and DataLoader workers (0: in the main process).
    amp:
        Mixed precision: ``"auto"`` (bf16 on CUDA where supported, else fp16 with a grad scaler; off on
        CPU), ``"bf16"``, ``"fp16"`` or ``"off"``.
    channels_last:
        NHWC memory layout (``None``: on CUDA only).
    deterministic:
        Deterministic cuDNN kernels (slower); data order and initialisation are always seeded.
    max_steps:
        At most this many training (and validation) batches per epoch: for smoke tests.
    kidney_weights:
        A weights file whose kidney model completes the exported bundle when only the tumor stage is trained.
    threads:
        CPU threads per process (``None``: PyTorch's default; under torchrun the cores are shared out).
    """

    model: Literal["kidney", "tumor", "both"] = "both"
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-4
    dice_weight: float = 0.5
    val_fraction: float = 0.1
    seed: int = 0
    unet: UNetConfig = field(default_factory=UNetConfig)
    hu_window: tuple[float, float] = (0.0, 255.0)
    kidney_input: tuple[int, int] = KIDNEY_INPUT
    tumor_input: tuple[int, int] = TUMOR_INPUT
    #: In-plane pixel spacing (mm) of the model grid, carried by the exported weights: each slice is
    #: resampled to it and centred on the kidney input (as inference does). ``"auto"``: chosen from the
    #: data, so that the median case's field of view fills the grid; ``None``: the legacy geometry.
    pixel_spacing_mm: float | Literal["auto"] | None = "auto"
    tumor_neg_ratio: float | None = 1.0
    cache_dir: Path | None = None
    cache_dtype: Literal["uint8", "float16"] = "uint8"
    resume: bool = False
    patience: int = 10
    lr_patience: int = 3
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    workers: int = 0
    device: str = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    deterministic: bool = False
    max_steps: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    kidney_weights: Path | None = None
    name: str | None = None
    version: str = "1"
    training_data: str | None = None
    license: str = "same as the training data"
    threads: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` for values no run could use (the CLI checks ranges before this)."""
        checks = [
            (
                self.model in ("kidney", "tumor", "both"),
                f"model must be kidney, tumor or both, not {self.model!r}",
            ),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (0.0 <= self.dice_weight <= 1.0, f"dice_weight must be in [0, 1], got {self.dice_weight}"),
            (0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (
                self.hu_window[1] > self.hu_window[0],
                f"hu_window must be (lo, hi) with lo < hi, got {self.hu_window}",
            ),
            (self.patience >= 1, f"patience must be at least 1, got {self.patience}"),
            (self.tumor_neg_ratio is None or self.tumor_neg_ratio >= 0, "tumor_neg_ratio must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1"),
            (
                self.amp in ("auto", "off", "bf16", "fp16"),
                f"amp must be auto, off, bf16 or fp16, not {self.amp!r}",
            ),
            (self.workers >= 0, "workers must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        step = 2**self.unet.depth
        for name, size in (("kidney_input", self.kidney_input), ("tumor_input", self.tumor_input)):
            if any(s % step for s in size):
                raise ValueError(f"{name} {tuple(size)} must be divisible by 2**depth = {step}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["unet"] = self.unet.to_dict()
        data["augment"] = self.augment.to_dict()
        for key in ("cache_dir", "kidney_weights"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    def neg_ratio(self, stage: Stage) -> float | None:
        """Negatives per positive for ``stage`` (the kidney stage trains on all its slices)."""
        return self.tumor_neg_ratio if stage == "tumor" else None


# --------------------------------------------------------------------------------------------- devices


def resolve_device(spec: str, ctx: DistContext | None = None) -> torch.device:
    """The device of this process: ``spec`` as :func:`kitsseg.nets.device.select_device` reads it, and under
    torchrun on CUDA the GPU numbered ``LOCAL_RANK``."""
    from ..nets.device import select_device

    device = select_device(spec)
    if device.type == "cuda" and ctx is not None and ctx.is_distributed:
        device = torch.device("cuda", ctx.local_rank)
    return device


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``config.amp`` on ``device`` (``None``: full float32)."""
    if config.amp == "off":
        return None
    if config.amp == "bf16":
        return torch.bfloat16
    if config.amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
