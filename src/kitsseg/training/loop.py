"""The training loop of one stage on slice sets: batches, validation, checkpoints, exact resume, DDP.

:func:`train_stage` takes :class:`~kitsseg.training.data.SliceSet` s (arrays of windowed, resized slices)
and trains, validates and checkpoints one stage; :func:`kitsseg.training.train.export_weights` writes the
weights file. Scripts that build their own slices use these two; :func:`kitsseg.training.train.train` runs
both stages on a KiTS19-layout folder.

Exact resume: everything random in an epoch (data order, negatives drawn, augmentation) is derived from
``(seed, stage, epoch, rank)``, and ``last.pt`` holds the model, optimizer, scheduler, scaler, counters and
RNG states after each epoch. So stopping after epoch k and resuming gives the same weights as never stopping.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError, InvalidOptionError, KitssegError
from ..nets.model import UNet
from .config import _STAGE_ID, STAGES, EventFn, Stage, TrainConfig, amp_dtype, resolve_device
from .data import SliceSet
from .distributed import DistContext
from .runfiles import (
    BEST,
    BEST_FORMAT,
    LAST,
    LOG,
    STATE_FORMAT,
    StageResult,
    _load_trusted,
    _save_atomic,
    _stage_meta,
    _write_log,
)

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
    from ..nets.device import torch_threads

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
