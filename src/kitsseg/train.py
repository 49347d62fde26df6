"""Training both U-Nets with the seed paper's recipe: checkpoints, exact resume, DDP, export.

The recipe (seed paper, section 2.1.1): loss ``(1 - lambda) * BCE + lambda * Dice`` with lambda = 0.5,
Adam, the learning rate reduced when the validation loss stops improving, Gaussian initialisation (done by
:class:`kitsseg.model.UNet`), 50 epochs with early stopping. The kidney model learns kidney+tumor on every
slice that shows either; the tumor model learns tumor on the per-case half-height band. Unlike the paper,
the tumor model also sees kidney slices without tumor (``tumor_neg_ratio`` of them per positive, drawn
anew each epoch): trained on positives only it answers "tumor" on every slice it is shown.

Two entry points share one loop:

* :func:`train` takes a KiTS19-layout folder: slice cache, case-level split, both stages, export.
* :func:`train_stage` takes :class:`~kitsseg.data.SliceSet` s (arrays of windowed, resized slices) and trains,
  validates and checkpoints one stage; :func:`export_weights` writes the weights file. Scripts that build
  their own slices (the starter model is trained on real 2D slices) use these two.

Exact resume: everything random in an epoch (data order, negatives drawn, augmentation) is derived from
``(seed, stage, epoch, rank)``, and ``last.pt`` holds the model, optimizer, scheduler, scaler, counters and
RNG states after each epoch. So stopping after epoch k and resuming gives the same weights as never stopping.
Training checkpoints hold only tensors and plain containers and are read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .atomic import atomic_output, write_text_atomic
from .augment import AugmentConfig
from .checkpoint import StageModel, load_bundle, save_bundle
from .data import (
    SPLIT_FILE,
    SliceSet,
    Split,
    check_split,
    find_cases,
    fingerprint,
    make_split,
    read_split,
    write_json_atomic,
    write_split,
)
from .distributed import DistContext, distributed
from .errors import DatasetError, InvalidOptionError, KitssegError
from .model import UNet, UNetConfig
from .preprocess import BAND_FRACTION, KIDNEY_INPUT, TUMOR_INPUT

Stage = Literal["kidney", "tumor"]
STAGES: tuple[Stage, ...] = ("kidney", "tumor")
STATE_FORMAT = "kitsseg-train-state/1"
BEST_FORMAT = "kitsseg-best-model/1"
LAST, BEST, LOG = "last.pt", "best.pt", "log.jsonl"
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


@dataclass
class StageResult:
    """What one stage's training produced."""

    stage: Stage
    out_dir: Path
    best_epoch: int
    best_dice: float
    epochs_completed: int
    stopped_early: bool
    input_size: tuple[int, int]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST

    @property
    def last_path(self) -> Path:
        return self.out_dir / LAST

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG

    def stage_model(self, threshold: float = 0.5) -> StageModel:
        """The best model of this stage, ready for :func:`export_weights`."""
        return load_best(self.out_dir, threshold=threshold)


@dataclass
class TrainResult:
    """What :func:`train` produced: per-stage results, the exported weights, the split and cache used."""

    run_dir: Path
    weights_path: Path | None
    stages: dict[str, StageResult]
    split: Split
    cache_dir: Path
    cache_built: bool
    eig_bounds: tuple[float, float]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- devices


def resolve_device(spec: str, ctx: DistContext | None = None) -> torch.device:
    """The device of this process: ``spec`` as :func:`kitsseg.device.select_device` reads it, and under
    torchrun on CUDA the GPU numbered ``LOCAL_RANK``."""
    from .device import select_device

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


# --------------------------------------------------------------------------------------------- data


class _SliceDataset(torch.utils.data.Dataset):
    """Items ``(image, mask)`` of the given rows, as stored (uint8 or float; mask uint8).

    Pickles memory maps as their file name, so DataLoader workers started by spawn or forkserver (macOS,
    Windows, Python >= 3.14 on Linux) re-open the cache instead of receiving a copy of it.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, rows: np.ndarray) -> None:
        self.images, self.masks, self.rows = images, masks, np.asarray(rows, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("images", "masks"):
            arr = state[key]
            # only a whole mapped file (a view's offset/shape attributes describe its parent, not itself)
            if isinstance(arr, np.memmap) and arr.filename is not None and isinstance(arr.base, mmap.mmap):
                state[key] = ("memmap", str(arr.filename), int(arr.offset), tuple(arr.shape), arr.dtype.str)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in ("images", "masks"):
            value = state[key]
            if isinstance(value, tuple) and value[0] == "memmap":
                _, filename, offset, shape, dtype = value
                state[key] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = int(self.rows[i])
        image = torch.from_numpy(np.array(self.images[r]))
        mask = torch.from_numpy((np.asarray(self.masks[r]) > 0).astype(np.uint8))
        return image, mask


def _to_input(
    image: torch.Tensor, mask: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored batch -> float ``(B, 1, H, W)`` image in [0, 1] and float mask on ``device``."""
    image = image.to(device, non_blocking=True)
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    y = mask.to(device, non_blocking=True).float()
    return x.unsqueeze(1), y.unsqueeze(1)


def _epoch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------- checkpoints


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _load_trusted(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be used
        raise KitssegError(
            f"{path}: cannot read this training checkpoint ({type(exc).__name__}: {exc}); "
            "delete it to start the stage afresh"
        ) from exc
    if not isinstance(payload, dict):
        raise KitssegError(f"{path}: not a kitsseg training checkpoint")
    return payload


def _stage_meta(stage: Stage, config: TrainConfig, input_size: tuple[int, int]) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it."""
    return {
        "stage": stage,
        "unet": config.unet.to_dict(),
        "input_size": [int(s) for s in input_size],
        "hu_window": [float(v) for v in config.hu_window],
    }


def load_best(stage_dir: str | os.PathLike[str], threshold: float = 0.5) -> StageModel:
    """The best model a stage saved (``STAGE_DIR/best.pt``) as a :class:`StageModel`."""
    path = Path(stage_dir) / BEST
    if not path.is_file():
        raise KitssegError(f"{path} does not exist: that stage has not finished an epoch yet")
    payload = _load_trusted(path)
    if payload.get("format") != BEST_FORMAT:
        raise KitssegError(f"{path}: not a kitsseg best-model checkpoint")
    meta = json.loads(payload["meta"])
    model = UNet(UNetConfig.from_dict(meta["unet"]))
    model.load_state_dict(payload["model"])
    model.eval()
    size = tuple(int(s) for s in meta["input_size"])
    extra = {"val_dice": float(payload["val_dice"]), "best_epoch": int(payload["epoch"])}
    return StageModel(model, (size[0], size[1]), threshold, extra)


# --------------------------------------------------------------------------------------------- one stage


def train_stage(
    stage: Stage,
    train_set: SliceSet,
    val_set: SliceSet,
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    ctx: DistContext | None = None,
    on_event: EventFn | None = None,
) -> StageResult:
    """Train, validate and checkpoint one stage on slice sets; resumable.

    ``train_set``/``val_set`` hold windowed, resized slices (uint8 0-255 or float [0, 1]) and masks; their
    ``positive`` flags mark the positives when ``stage == "tumor"`` (negatives are subsampled per epoch to
    ``config.tumor_neg_ratio``). Writes ``OUT_DIR/last.pt`` every epoch, ``OUT_DIR/best.pt`` when the
    validation Dice improves, and ``OUT_DIR/log.jsonl``. Under torchrun pass the job's ``ctx``; only rank 0
    writes files and calls ``on_event``. ``config.threads`` applies while the stage trains; the previous
    thread count is restored afterwards.
    """
    from .device import torch_threads

    with torch_threads(config.threads):
        return _train_stage(stage, train_set, val_set, out_dir, config, ctx=ctx, on_event=on_event)


def _train_stage(
    stage: Stage,
    train_set: SliceSet,
    val_set: SliceSet,
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    ctx: DistContext | None = None,
    on_event: EventFn | None = None,
) -> StageResult:
    """:func:`train_stage` with its thread count in effect."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    config.validate()
    ctx = ctx or DistContext()
    emit = on_event if (on_event is not None and ctx.is_main) else None
    out = Path(out_dir)
    input_size = train_set.input_size
    if val_set.input_size != input_size:
        raise DatasetError(f"train slices are {input_size} but validation slices are {val_set.input_size}")
    if any(s % 2**config.unet.depth for s in input_size):
        raise ValueError(f"input size {input_size} must be divisible by 2**depth = {2**config.unet.depth}")
    for name, s in (("training", train_set), ("validation", val_set)):
        if len(s) == 0:
            raise DatasetError(f"the {stage} stage has no {name} slices; add cases or raise --val-fraction")
        if stage == "tumor" and s.n_positive == 0:
            raise DatasetError(
                f"no {name} slice shows tumor (label 2); the tumor stage needs tumor slices on both sides "
                "of the split: check the labels, add cases, or draw another split with --seed"
            )

    device = resolve_device(config.device, ctx)
    dtype = amp_dtype(config, device)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    torch.manual_seed(config.seed)
    # torch's type overloads of Module.to omit memory_format, which it accepts (and documents)
    model = UNet(config.unet).to(device=device, memory_format=memory_format)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = _stage_meta(stage, config, input_size)

    start_epoch, best_dice, best_epoch, bad_epochs, stopped_early = 0, -math.inf, 0, 0, False
    history: list[dict[str, Any]] = []
    last = out / LAST
    if last.exists():
        if not config.resume:
            raise InvalidOptionError(
                f"{out} already holds a training run ({LAST}); pass --resume to continue it "
                "or choose another run folder"
            )
        payload = _load_trusted(last)
        if payload.get("format") != STATE_FORMAT:
            raise KitssegError(f"{last}: not a kitsseg training checkpoint")
        saved = json.loads(payload["meta"])
        if saved != meta:
            raise InvalidOptionError(
                f"{last} was trained with {saved}, but this run asks for {meta}; resume with the same "
                "--hu-window, --base-width, --depth, --norm and --upsample, or start a new run folder"
            )
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        torch.set_rng_state(payload["rng_torch"])
        if device.type == "cuda" and payload["rng_cuda"]:
            torch.cuda.set_rng_state_all(list(payload["rng_cuda"]))
        start_epoch = int(payload["epoch"])
        best_dice, best_epoch = float(payload["best_dice"]), int(payload["best_epoch"])
        bad_epochs, stopped_early = int(payload["bad_epochs"]), bool(payload["stopped_early"])
        history = json.loads(payload["history"])
        if ctx.is_main:
            _write_log(out / LOG, history)

    def result() -> StageResult:
        return StageResult(
            stage, out, best_epoch, best_dice, start_epoch, stopped_early, input_size, list(history)
        )

    if stopped_early or start_epoch >= config.epochs:
        if emit:
            emit(
                "stage_end",
                {
                    "stage": stage,
                    "best_dice": best_dice,
                    "best_epoch": best_epoch,
                    "stopped_early": stopped_early,
                    "already_done": True,
                },
            )
        return result()

    net: torch.nn.Module = model
    if ctx.is_distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    val_rows = val_set.epoch_rows(
        config.neg_ratio(stage), np.random.default_rng([config.seed, 7, _STAGE_ID[stage]])
    )
    val_rows = val_rows[ctx.rank :: ctx.world_size]
    steps_per_epoch = _steps_per_epoch(train_set, config, stage, ctx)
    if emit:
        emit(
            "stage_start",
            {
                "stage": stage,
                "start_epoch": start_epoch,
                "epochs": config.epochs,
                "steps": steps_per_epoch,
                "train_slices": len(train_set),
                "train_positive": train_set.n_positive,
                "val_slices": len(val_set),
                "device": str(device),
                "amp": str(dtype).replace("torch.", "") if dtype else "off",
                "world_size": ctx.world_size,
            },
        )

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this epoch trains with
        rows = train_set.epoch_rows(
            config.neg_ratio(stage), np.random.default_rng([config.seed, _STAGE_ID[stage], epoch])
        )
        train_loss, steps = _train_epoch(
            net,
            optimizer,
            scaler,
            train_set,
            rows,
            config,
            stage,
            epoch,
            device,
            dtype,
            memory_format,
            ctx,
            emit,
        )
        val_loss, val_dice = _validate(model, val_set, val_rows, config, device, dtype, memory_format, ctx)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise KitssegError(
                f"training diverged in epoch {epoch + 1} of the {stage} stage (train loss {train_loss}, "
                f"val loss {val_loss}); lower --lr, or resume from the last good checkpoint"
            )
        scheduler.step(val_loss)
        improved = val_dice > best_dice
        if improved:
            best_dice, best_epoch, bad_epochs = val_dice, epoch + 1, 0
        else:
            bad_epochs += 1
        stopped_early = bad_epochs >= config.patience
        start_epoch = epoch + 1
        record = {
            "stage": stage,
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_dice": val_dice,
            "lr": lr,
            "seconds": round(time.perf_counter() - t0, 3),
            "steps": steps,
            "train_slices": int(rows.size),
            "best": improved,
        }
        history.append(record)
        ctx.barrier()
        if ctx.is_main:
            if improved:
                _save_atomic(
                    {
                        "format": BEST_FORMAT,
                        "model": model.state_dict(),
                        "epoch": epoch + 1,
                        "val_dice": val_dice,
                        "meta": json.dumps(meta),
                    },
                    out / BEST,
                )
            _save_atomic(
                {
                    "format": STATE_FORMAT,
                    "meta": json.dumps(meta),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "best_dice": best_dice,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped_early": stopped_early,
                    "rng_torch": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    "history": json.dumps(history),
                    "config": json.dumps(config.to_dict()),
                },
                last,
            )
            with open(out / LOG, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        ctx.barrier()
        if emit:
            emit("epoch_end", dict(record, epochs=config.epochs, best_dice=best_dice, best_epoch=best_epoch))
        if stopped_early:
            break
    if emit:
        emit(
            "stage_end",
            {
                "stage": stage,
                "best_dice": best_dice,
                "best_epoch": best_epoch,
                "stopped_early": stopped_early,
            },
        )
    return result()


def _steps_per_epoch(train_set: SliceSet, config: TrainConfig, stage: Stage, ctx: DistContext) -> int:
    rows = train_set.epoch_rows(config.neg_ratio(stage), np.random.default_rng(0))
    per_rank = math.ceil(rows.size / ctx.world_size)
    steps = math.ceil(per_rank / config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def _train_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data: SliceSet,
    rows: np.ndarray,
    config: TrainConfig,
    stage: Stage,
    epoch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    ctx: DistContext,
    emit: EventFn | None,
) -> tuple[float, int]:
    """One pass over this epoch's rows (this rank's shard); returns the mean loss over all ranks and steps."""
    from torch.utils.data import DataLoader, DistributedSampler

    from .augment import augment_batch
    from .losses import bce_dice_loss

    dataset = _SliceDataset(data.images, data.masks, rows)
    sampler: DistributedSampler[int] = DistributedSampler(  # it yields row indices of the dataset
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(_epoch_seed(config.seed, _STAGE_ID[stage], epoch, ctx.rank))
    total = len(loader) if not config.max_steps else min(len(loader), config.max_steps)
    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    for image, mask in loader:
        if steps >= total:
            break
        x, y = _to_input(image, mask, device)
        x, y = augment_batch(x, y, config.augment, gen)
        x = x.contiguous(memory_format=memory_format)
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(x)
        loss = bce_dice_loss(logits, y, config.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().to(torch.float64)
        steps += 1
        if emit and (steps == total or steps % 5 == 0):
            emit(
                "step",
                {
                    "stage": stage,
                    "epoch": epoch + 1,
                    "step": steps,
                    "steps": total,
                    "loss": float(loss_sum) / steps,
                },
            )
    stats = ctx.all_reduce_sum(
        torch.stack([loss_sum, torch.tensor(float(steps), dtype=torch.float64, device=device)])
    )
    return float(stats[0] / max(float(stats[1]), 1.0)), steps


def _validate(
    model: torch.nn.Module,
    data: SliceSet,
    rows: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    ctx: DistContext,
) -> tuple[float, float]:
    """Validation loss (mean per slice) and pooled hard Dice over this rank's rows, summed over ranks."""
    from .losses import bce_dice_loss, dice_counts, dice_from_counts

    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, n, intersection, predicted, target
    batch = config.batch_size
    n_batches = math.ceil(rows.size / batch)
    if config.max_steps:
        n_batches = min(n_batches, config.max_steps)
    dataset = _SliceDataset(data.images, data.masks, rows)
    with torch.inference_mode():
        for b in range(n_batches):
            items = [dataset[i] for i in range(b * batch, min((b + 1) * batch, len(dataset)))]
            image = torch.stack([it[0] for it in items])
            mask = torch.stack([it[1] for it in items])
            x, y = _to_input(image, mask, device)
            x = x.contiguous(memory_format=memory_format)
            with torch.autocast(
                device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                logits = model(x)
            n = float(x.shape[0])
            sums[0] += float(bce_dice_loss(logits, y, config.dice_weight)) * n
            sums[1] += n
            sums[2:] += dice_counts(logits, y).to(device)
    ctx.all_reduce_sum(sums)
    model.train()
    n = max(float(sums[1]), 1.0)
    return float(sums[0]) / n, dice_from_counts(sums[2:].cpu())


def _write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``log.jsonl`` from the checkpoint's history (drops lines of an epoch that was not saved)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in history))


# --------------------------------------------------------------------------------------------- export


def eig_bounds_from_ratios(ratios: Sequence[float | None]) -> tuple[float, float]:
    """5th-95th percentile of tumor eigenvalue ratios, computed as ``kitsseg stats`` does.

    ``None`` stands for a degenerate (infinite) ratio. Falls back to the paper's bounds when fewer than two
    tumors were measured or the bounds are not finite.
    """
    from .shapestats import CaseShapes, ShapeStats

    values = tuple(math.inf if r is None else float(r) for r in ratios)
    if len(values) < 2:
        return PAPER_EIG_BOUNDS
    stats = ShapeStats(
        unit="voxel",
        min_voxels=10,
        largest_only=False,
        connectivity=3,
        folder="",
        cases=[CaseShapes("training cases", "", (), values, ())],
    )
    lo, hi = stats.bounds
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return PAPER_EIG_BOUNDS
    return round(float(lo), 4), round(float(hi), 4)


def export_weights(
    path: str | os.PathLike[str],
    stages: Mapping[str, StageModel],
    *,
    hu_window: tuple[float, float],
    eig_bounds: tuple[float, float],
    name: str,
    version: str = "1",
    training_data: str = "",
    license: str = "same as the training data",
    band_fraction: float = BAND_FRACTION,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a weights file (:func:`kitsseg.checkpoint.save_bundle`) with the metadata inference reads.

    ``eig_bounds`` are in voxel units (``eig_unit = "voxel"``: the covariance of voxel index coordinates,
    :func:`kitsseg.postprocess.eigenvalue_ratio`).
    """
    if "kidney" not in stages:
        raise InvalidOptionError(
            "a weights file needs a kidney model; train --model both, or pass --kidney-weights with a "
            "weights file whose kidney model should complete this one"
        )
    from . import __version__

    metadata: dict[str, Any] = {
        "name": name,
        "version": version,
        "hu_window": [float(hu_window[0]), float(hu_window[1])],
        "eig_bounds": [float(eig_bounds[0]), float(eig_bounds[1])],
        "eig_unit": "voxel",
        "band_fraction": float(band_fraction),
        "license": license,
        "training_data": training_data,
        "kitsseg_version": __version__,
        "created": time.strftime("%Y-%m-%d"),
    }
    metadata.update(extra or {})
    return save_bundle(path, dict(stages), metadata)


def kidney_from_weights(path: str | os.PathLike[str], hu_window: tuple[float, float]) -> StageModel:
    """The kidney stage of an existing weights file; its HU window must match the run's."""
    bundle = load_bundle(path, "cpu")
    if tuple(bundle.hu_window) != (float(hu_window[0]), float(hu_window[1])):
        raise InvalidOptionError(
            f"--kidney-weights {path} uses the HU window {list(bundle.hu_window)}, but this run trains with "
            f"{list(hu_window)}; both models of a weights file share one window: pass --hu-window "
            f"{bundle.hu_window[0]:g},{bundle.hu_window[1]:g} or train --model both"
        )
    return bundle.kidney


# --------------------------------------------------------------------------------------------- whole run


def train(
    data_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    on_event: EventFn | None = None,
) -> TrainResult:
    """Train the configured stages on a KiTS19-layout folder and export ``RUN_DIR/weights.pt``.

    Run folder: ``split.json``, ``config.json``, ``cache/`` (unless ``config.cache_dir``), and per stage
    ``kidney/`` and ``tumor/`` with ``last.pt``, ``best.pt``, ``log.jsonl``. Works the same in one process
    and under torchrun (one process per GPU or CPU share; rank 0 writes).
    """
    from .device import torch_threads
    from .slicecache import CacheSpec, choose_pixel_spacing, open_cache, open_or_build

    config = config or TrainConfig()
    config.validate()
    run = Path(run_dir)
    data = Path(data_dir)
    stages: list[Stage] = ["kidney", "tumor"] if config.model == "both" else [config.model]  # type: ignore[list-item]
    device = resolve_device(config.device)
    notes: list[str] = []

    with distributed(device.type) as ctx, torch_threads(_run_threads(config, ctx, device)):
        emit = on_event if ctx.is_main else None
        cases = find_cases(data)
        names = [c.name for c in cases]
        if not config.resume:
            for stage in stages:
                if (run / stage / LAST).exists():
                    raise InvalidOptionError(
                        f"{run / stage} already holds a training run; pass --resume to continue it or "
                        "choose another run folder"
                    )
        kidney_source = _kidney_source(run, stages, config)

        def prepare_split() -> Split:
            path = run / SPLIT_FILE
            if config.resume and path.exists():
                split = read_split(path)
                check_split(split, names, path)
                return split
            split = make_split(names, config.val_fraction, config.seed)
            write_split(split, path)
            write_json_atomic(run / "config.json", dict(config.to_dict(), data_dir=str(data)))
            return split

        ctx.run_on_main(prepare_split)
        split = read_split(run / SPLIT_FILE)

        cache_dir = Path(config.cache_dir) if config.cache_dir is not None else run / "cache"
        model_spacing = (
            choose_pixel_spacing(cases, config.kidney_input)
            if config.pixel_spacing_mm == "auto"
            else config.pixel_spacing_mm
        )
        spec = CacheSpec(
            pixel_spacing_mm=model_spacing,
            hu_window=(float(config.hu_window[0]), float(config.hu_window[1])),
            kidney_input=tuple(config.kidney_input),  # type: ignore[arg-type]
            tumor_input=tuple(config.tumor_input),  # type: ignore[arg-type]
            dtype=config.cache_dtype,
        )
        built = ctx.run_on_main(
            lambda: open_or_build(cases, cache_dir, spec, workers=config.workers, on_event=emit)[1]
        )
        cache = open_cache(cache_dir, spec, fingerprint(cases))
        if cache is None:
            raise DatasetError(
                f"the slice cache in {cache_dir} is missing or incomplete; delete it and rerun"
            )
        if emit:
            emit(
                "cache_ready",
                {
                    "root": str(cache_dir),
                    "built": bool(built),
                    "cases": len(cases),
                    "slices": cache.n_slices,
                    "train": len(split.train),
                    "val": len(split.val),
                },
            )

        results: dict[str, StageResult] = {}
        for stage in stages:
            results[stage] = train_stage(
                stage,
                cache.stage(stage, split.train),
                cache.stage(stage, split.val),
                run / stage,
                config,
                ctx=ctx,
                on_event=on_event,
            )

        ratios = [r for n in split.train for r in cache.case(n).get("eig_ratios", [])]
        bounds = eig_bounds_from_ratios(ratios)
        if len(ratios) < 2:
            notes.append(
                f"only {len(ratios)} tumor shape(s) measured on the training cases; eig_bounds fall back to "
                f"the paper's {list(PAPER_EIG_BOUNDS)}"
            )

        def export() -> Path:
            stage_models = {s: results[s].stage_model() for s in results}
            if "kidney" not in stage_models and kidney_source is not None:
                stage_models["kidney"] = kidney_source()
            for s, res in results.items():
                stage_models[s].extra.update(
                    {
                        "epochs_trained": res.epochs_completed,
                        "train_cases": len(split.train),
                        "val_cases": len(split.val),
                    }
                )
            training_data = config.training_data or (
                f"{len(split.train)} training and {len(split.val)} validation cases of the "
                f"KiTS19-layout dataset '{data.name}' (split.json in the run folder)"
            )
            path = export_weights(
                run / "weights.pt",
                stage_models,
                hu_window=config.hu_window,
                eig_bounds=bounds,
                name=config.name or f"kitsseg-{run.resolve().name}",
                version=config.version,
                training_data=training_data,
                license=config.license,
                extra={
                    **({} if model_spacing is None else {"pixel_spacing_mm": model_spacing}),
                    "training": {
                        "seed": config.seed,
                        "stages": sorted(results),
                        "dice_weight": config.dice_weight,
                    }
                },
            )
            if emit:
                emit("exported", {"path": str(path), "eig_bounds": list(bounds)})
            return path

        ctx.run_on_main(export)
        ctx.barrier()
    return TrainResult(run, run / "weights.pt", results, split, cache_dir, bool(built), bounds, notes)


def _run_threads(config: TrainConfig, ctx: DistContext, device: torch.device) -> int | None:
    """PyTorch's CPU threads for a run: ``config.threads``, else under torchrun on CPU the cores shared
    among this node's processes, else ``None`` (the process's setting stays)."""
    if config.threads is not None:
        return config.threads
    if ctx.is_distributed and device.type == "cpu":
        from .device import available_cores

        return max(1, available_cores() // max(1, ctx.local_world_size))
    return None


def _kidney_source(
    run: Path, stages: Sequence[Stage], config: TrainConfig
) -> Callable[[], StageModel] | None:
    """Where the kidney model of a tumor-only run's bundle comes from; fails before any training."""
    if "kidney" in stages:
        return None
    if config.kidney_weights is not None:
        path = Path(config.kidney_weights)
        kidney_from_weights(path, config.hu_window)  # check now, not after hours of training
        return lambda: kidney_from_weights(path, config.hu_window)
    if (run / "kidney" / BEST).is_file():
        return lambda: load_best(run / "kidney")
    raise InvalidOptionError(
        "--model tumor needs a kidney model for the exported weights: pass --kidney-weights PATH "
        "(a kitsseg weights file with the same --hu-window), or train the kidney stage in this run "
        "folder first (--model kidney), or use --model both"
    )
