"""`kitsseg train DATA_DIR -o RUN_DIR`: train the kidney and tumor U-Nets on a KiTS19-layout folder.

Parses options into a :class:`kitsseg.training.config.TrainConfig`, calls :func:`kitsseg.training.train.train`
and renders its progress events with rich. Under torchrun (``torchrun --nproc_per_node=N -m kitsseg train
...``) only rank 0 prints.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..errors import InvalidOptionError
from ._app import app, console, one_line, warn_if_oversubscribed

if TYPE_CHECKING:
    from ..training.train import TrainResult

_ARCH_DEFAULTS = {"base_width": 16, "depth": 4, "norm": "batch", "upsample": "transpose"}


class ModelChoice(str, enum.Enum):
    kidney = "kidney"
    tumor = "tumor"
    both = "both"


class NormChoice(str, enum.Enum):
    batch = "batch"
    instance = "instance"
    none = "none"


class UpsampleChoice(str, enum.Enum):
    transpose = "transpose"
    bilinear = "bilinear"


class AmpChoice(str, enum.Enum):
    auto = "auto"
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


def _parse_window(text: str) -> tuple[float, float]:
    """``"LO,HI"`` -> ``(lo, hi)``; a bad value is an :class:`InvalidOptionError` (one red line, exit 2)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InvalidOptionError(
            f"--hu-window: expected LO,HI in HU (e.g. 0,255 or -200,300), got {text!r}"
        ) from None
    if not hi > lo:
        raise InvalidOptionError(f"--hu-window: HI must be above LO, got {text!r}")
    return lo, hi


@app.command("train")
def train_command(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Run folder: checkpoints, logs, split.json, weights.pt.",
            show_default=False,
        ),
    ],
    data_dir: Annotated[
        Path | None,
        typer.Argument(
            metavar="DATA_DIR",
            help="Dataset in KiTS19 layout: case_XXXXX/imaging.nii.gz + segmentation.nii.gz. With --config: "
            "the folder of the config's slice sets (overrides its data_root).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[ModelChoice, typer.Option("--model", help="Stages to train.")] = ModelChoice.both,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Maximum epochs per stage.")] = 50,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Slices per batch (per process).")
    ] = 16,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate.")] = 1e-4,
    dice_weight: Annotated[
        float, typer.Option("--dice-weight", min=0.0, max=1.0, help="lambda in (1-lambda)*BCE + lambda*Dice.")
    ] = 0.5,
    val_fraction: Annotated[
        float,
        typer.Option("--val-fraction", min=0.0, max=1.0, help="Fraction of cases held out for validation."),
    ] = 0.1,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split, initialisation, data order, augmentation.")
    ] = 0,
    base_width: Annotated[
        int, typer.Option("--base-width", min=1, help="U-Net channels of the first level.")
    ] = 16,
    depth: Annotated[int, typer.Option("--depth", min=1, max=7, help="U-Net poolings.")] = 4,
    norm: Annotated[
        NormChoice, typer.Option("--norm", help="Normalisation after each convolution.")
    ] = NormChoice.batch,
    upsample: Annotated[
        UpsampleChoice, typer.Option("--upsample", help="Up-sampling.")
    ] = UpsampleChoice.transpose,
    paper_config: Annotated[
        bool,
        typer.Option("--paper-config", help="The paper's U-Net (64 channels, depth 4, no norm, transpose)."),
    ] = False,
    hu_window: Annotated[
        str,
        typer.Option(
            "--hu-window", metavar="LO,HI", help="HU window mapped to [0, 1] (the starter model's: 0,255)."
        ),
    ] = "0,255",
    tumor_neg_ratio: Annotated[
        float,
        typer.Option(
            "--tumor-neg-ratio", min=0.0, help="Tumor-free kidney slices per tumor slice, per epoch."
        ),
    ] = 1.0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in RUN_DIR (fresh start if empty).")
    ] = False,
    patience: Annotated[
        int, typer.Option("--patience", min=1, help="Early stopping: epochs without better val Dice.")
    ] = 10,
    workers: Annotated[
        int, typer.Option("--workers", "-j", min=0, help="Processes for the slice cache and data loading.")
    ] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    amp: Annotated[
        AmpChoice, typer.Option("--amp", help="Mixed precision (auto: bf16/fp16 on CUDA, off on CPU).")
    ] = AmpChoice.auto,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads per process.")] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", min=1, help="At most N training/validation batches per epoch (smoke tests)."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Slice cache folder, shareable between runs (default RUN_DIR/cache)."
        ),
    ] = None,
    kidney_weights: Annotated[
        Path | None,
        typer.Option(
            "--kidney-weights",
            help="With --model tumor: weights file whose kidney model completes the bundle.",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Name stored in the weights (default kitsseg-RUN_DIR).")
    ] = None,
    recipe_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A training recipe (JSON, e.g. configs/starter.json: the shipped weights' recipe) on real "
            "slice sets; resumes each stage from RUN_DIR and exports RUN_DIR/weights.pt.",
        ),
    ] = None,
) -> None:
    """Train the kidney and tumor U-Nets (the seed paper's recipe) and export RUN_DIR/weights.pt."""
    _check_folder_option("-o", output)
    _check_folder_option("--cache-dir", cache_dir)
    if recipe_file is not None:
        warn_if_oversubscribed(threads)
        if data_dir is not None:  # the slice sets must not receive the run's files either
            _check_run_folder(data_dir, output, None, None)
        _train_recipe(recipe_file, data_dir, output, model.value, threads)
        return
    if data_dir is None:
        raise InvalidOptionError("give DATA_DIR (a KiTS19-layout folder) or --config RECIPE.json")
    from ..nets.model import UNetConfig
    from ..training.config import TrainConfig
    from ..training.distributed import is_main_process
    from ..training.train import train

    window = _parse_window(hu_window)
    warn_if_oversubscribed(threads)
    _check_run_folder(data_dir, output, cache_dir, kidney_weights)
    if not 0.0 < val_fraction < 1.0:
        raise InvalidOptionError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    arch = {"base_width": base_width, "depth": depth, "norm": norm.value, "upsample": upsample.value}
    if paper_config:
        changed = [f"--{k.replace('_', '-')}" for k, v in arch.items() if v != _ARCH_DEFAULTS[k]]
        if changed:
            raise InvalidOptionError(f"--paper-config fixes the architecture; drop {', '.join(changed)}")
        unet = UNetConfig.paper()
    else:
        unet = UNetConfig(in_channels=1, **arch)  # type: ignore[arg-type]
    config = TrainConfig(
        model=model.value,  # type: ignore[arg-type]
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        dice_weight=dice_weight,
        val_fraction=val_fraction,
        seed=seed,
        unet=unet,
        hu_window=window,
        tumor_neg_ratio=tumor_neg_ratio,
        cache_dir=cache_dir,
        resume=resume,
        patience=patience,
        workers=workers,
        device=device,
        amp=amp.value,  # type: ignore[arg-type]
        threads=threads,
        max_steps=max_steps,
        kidney_weights=kidney_weights,
        name=name,
    )
    if not is_main_process():
        train(data_dir, output, config)
        _end_distributed_process()
        return
    with _Display() as display:
        result = train(data_dir, output, config, on_event=display.event)
    _summary(result)
    _end_distributed_process()


def _end_distributed_process() -> None:
    """Under torchrun, end the process here, past the interpreter's finalization.

    Training has returned: every file is written (atomically) and the process group destroyed. A gloo
    worker thread that PyTorch had not yet joined can still abort the interpreter's shutdown ("terminate
    called without an active exception", SIGABRT; seen once in CI on 2 cores), and torchrun then reports
    the finished run as FAILED with a non-zero exit code. Ending the process directly, after flushing
    the output, gives the run's real outcome. Single-process runs return normally.
    """
    import os
    import sys

    from ..training.distributed import env_context

    if not env_context().is_distributed:
        return
    console.file.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check_folder_option(flag: str, folder: Path | None) -> None:
    """Refuse a run or cache folder that is a file or lies under one, before anything is read.

    ``mkdir`` used to fail deep in the run with a FileExistsError or NotADirectoryError traceback (after
    the slice sets or cases were read)."""
    from ..errors import OutputError

    if folder is None:
        return
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == folder else f"lies under {part}, which is a file"
                raise OutputError(f"{flag} {folder} {where}, not a folder; give a folder for the run's files")
            return


def _check_run_folder(
    data_dir: Path, run_dir: Path, cache_dir: Path | None, kidney_weights: Path | None
) -> None:
    """Refuse a run folder or slice cache that would put this run's outputs onto what it reads.

    The run folder receives weights.pt, checkpoints, split.json, config.json and (by default) the slice
    cache, so it must be neither DATA_DIR itself nor inside one of its case folders, and the
    ``--kidney-weights`` file must not lie in it (the run rewrites its files). Symlinks and hard links
    count (:mod:`kitsseg.io.guard`). Checked before any file is read.
    """
    from ..errors import OutputError
    from ..io.guard import refuse_outputs_on_inputs, same_file
    from ..names import IMAGE_NAMES, LABEL_NAMES

    def inside(folder: Path, parent: Path) -> Path | None:
        """The first component of ``folder`` under ``parent`` (``parent`` itself if equal), else None."""
        if same_file(folder, parent):
            return parent
        try:
            rel = folder.resolve().relative_to(parent.resolve())
        except (ValueError, OSError, RuntimeError):
            return None
        return parent / rel.parts[0]

    for flag, folder in (("-o", run_dir), ("--cache-dir", cache_dir)):
        hit = None if folder is None else inside(folder, data_dir)
        if hit is None or folder is None:
            continue
        if hit == data_dir:
            raise OutputError(
                f"{flag} {folder} is the dataset folder DATA_DIR; training writes its files elsewhere, "
                "choose another folder"
            )
        if any((hit / name).exists() for name in (*IMAGE_NAMES, *LABEL_NAMES)):
            raise OutputError(
                f"{flag} {folder} lies in the case folder {hit} of DATA_DIR; inputs are never modified: "
                "choose a folder outside the dataset's cases"
            )
    if kidney_weights is not None:
        refuse_outputs_on_inputs(
            [("-o", run_dir / "weights.pt")],
            [("--kidney-weights file", kidney_weights)],
            hint="train into another folder, or copy the kidney weights elsewhere first",
        )
        if inside(kidney_weights, run_dir) is not None:
            raise OutputError(
                f"--kidney-weights {kidney_weights} lies in the run folder {run_dir}, whose files this run "
                "rewrites; copy it elsewhere first or train into another folder"
            )


class _Display:
    """Rich progress for the cache build and each stage's epochs and steps, plus one line per epoch."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Display:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def _task(self, key: str, description: str, total: int | None, completed: int = 0) -> None:
        if key in self.tasks:
            self.progress.update(
                self.tasks[key], description=description, total=total, completed=completed, info=""
            )
        else:
            self.tasks[key] = self.progress.add_task(description, total=total, completed=completed, info="")

    def event(self, name: str, info: dict[str, Any]) -> None:
        p = self.progress
        if name == "cache_start":
            self._task("cache", "slice cache", info["total"], info["reused"])
        elif name == "cache_case":
            p.update(self.tasks["cache"], completed=info["done"], info=one_line(info["case"]))
        elif name == "cache_ready":
            if "cache" in self.tasks:
                p.remove_task(self.tasks.pop("cache"))
            how = "built" if info["built"] else "reused"
            p.console.print(
                f"slice cache {how}: {info['slices']} slices from {info['cases']} cases "
                f"({info['train']} train / {info['val']} validation cases) in {one_line(info['root'])}",
                highlight=False,
                soft_wrap=True,
            )
        elif name == "stage_start":
            p.console.print(
                f"[bold]{info['stage']}[/] stage: {info['train_slices']} training slices"
                + (f" ({info['train_positive']} with tumor)" if info["stage"] == "tumor" else "")
                + f", {info['val_slices']} validation slices on {info['device']} (amp {info['amp']}, "
                f"{info['world_size']} process(es))"
                + (f", resuming after epoch {info['start_epoch']}" if info["start_epoch"] else ""),
                highlight=False,
                soft_wrap=True,
            )
            self._task("epochs", f"{info['stage']} epochs", info["epochs"], info["start_epoch"])
            self._task("steps", "steps", info["steps"])
        elif name == "step":
            p.update(
                self.tasks["steps"],
                completed=info["step"],
                total=info["steps"],
                info=f"loss {info['loss']:.4f}",
            )
        elif name == "epoch_end":
            p.update(self.tasks["epochs"], completed=info["epoch"])
            p.update(self.tasks["steps"], completed=0)
            mark = " [green]best[/]" if info["best"] else ""
            losses = f"train loss {info['train_loss']:.4f}, val loss {info['val_loss']:.4f}"
            p.console.print(
                f"{info['stage']} epoch {info['epoch']}/{info['epochs']}: {losses}, "
                f"val Dice {info['val_dice']:.4f}, lr {info['lr']:.2g}, {info['seconds']:.1f} s{mark}",
                highlight=False,
                soft_wrap=True,
            )
        elif name == "stage_end" and info.get("already_done"):
            p.console.print(
                f"{info['stage']}: already finished in this run folder "
                f"(best val Dice {info['best_dice']:.4f} at epoch {info['best_epoch']})"
                + ("" if info["stopped_early"] else "; raise --epochs to continue it"),
                highlight=False,
            )
        elif name == "stage_end" and info.get("stopped_early"):
            p.console.print(
                f"{info['stage']}: early stop, best val Dice {info['best_dice']:.4f} "
                f"at epoch {info['best_epoch']}",
                highlight=False,
            )


def _summary(result: TrainResult) -> None:
    table = Table(title="Training", title_justify="left")
    for column in ("stage", "epochs", "best epoch", "best val Dice", "stopped early"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stage, res in result.stages.items():
        table.add_row(
            stage,
            str(res.epochs_completed),
            str(res.best_epoch),
            f"{res.best_dice:.4f}",
            "yes" if res.stopped_early else "no",
        )
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {one_line(note)}", highlight=False, soft_wrap=True)
    lo, hi = result.eig_bounds
    console.print(
        f"Weights: {one_line(result.weights_path)} (tumor shape bounds {lo:.3f}-{hi:.3f}, voxel units); "
        f"use them with kitsseg segment --weights {one_line(result.weights_path)}",
        highlight=False,
        soft_wrap=True,
    )


def _train_recipe(
    recipe_file: Path, data_dir: Path | None, output: Path, model: str, threads: int | None
) -> None:
    """``--config``: run a slice-set recipe (:mod:`kitsseg.training`), then export RUN_DIR/weights.pt."""
    import torch

    from ..training.recipe import STAGES, load_recipe
    from ..training.slicetrain import train_from_config

    recipe = load_recipe(recipe_file, data_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    stages = STAGES if model == "both" else (model,)
    path = train_from_config(
        recipe,
        output,
        stages=stages,
        export_to=output / "weights.pt",
        log=lambda m: console.print(m, markup=False, soft_wrap=True),
    )
    console.print(f"weights: {path}", markup=False)
