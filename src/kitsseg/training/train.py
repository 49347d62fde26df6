"""Training both U-Nets on a KiTS19-layout folder: slice cache, case-level split, both stages, export.

:func:`train` (``kitsseg train DATA_DIR``, the library's ``kitsseg.train``) builds or opens the slice cache,
splits the cases, trains each stage with :mod:`.loop`, and writes the weights file with the tumor shape
bounds measured on the training labels (:func:`export_weights`). Works the same in one process and under
torchrun. Training on sets of real CT slices (the recipe of the shipped weights) is :mod:`.slicetrain`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DatasetError, InvalidOptionError, KitssegError
from ..inference.preprocess import BAND_FRACTION
from ..weights.checkpoint import StageModel, load_bundle, save_bundle
from .config import PAPER_EIG_BOUNDS, EventFn, Stage, TrainConfig, resolve_device
from .data import (
    SPLIT_FILE,
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
from .loop import train_stage
from .runfiles import BEST, LAST, StageResult, load_best


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


# --------------------------------------------------------------------------------------------- export


def eig_bounds_from_ratios(ratios: Sequence[float | None]) -> tuple[float, float]:
    """5th-95th percentile of tumor eigenvalue ratios, computed as ``kitsseg stats`` does.

    ``None`` stands for a degenerate (infinite) ratio. Falls back to the paper's bounds when fewer than two
    tumors were measured or the bounds are not finite.
    """
    from ..postprocess.shapestats import CaseShapes, ShapeStats

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
    """Write a weights file (:func:`~kitsseg.weights.checkpoint.save_bundle`) with the metadata for inference.

    ``eig_bounds`` are in voxel units (``eig_unit = "voxel"``: the covariance of voxel index coordinates,
    :func:`kitsseg.postprocess.components.eigenvalue_ratio`).
    """
    if "kidney" not in stages:
        raise InvalidOptionError(
            "a weights file needs a kidney model; train --model both, or pass --kidney-weights with a "
            "weights file whose kidney model should complete this one"
        )
    from .._version import __version__

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
    from ..nets.device import torch_threads
    from .slicecache import CacheSpec, choose_pixel_spacing, open_cache, open_or_build

    config = config or TrainConfig()
    config.validate()
    run = Path(run_dir)
    data = Path(data_dir)
    stages: list[Stage] = ["kidney", "tumor"] if config.model == "both" else [config.model]  # type: ignore[list-item]
    device = resolve_device(config.device)
    notes: list[str] = []
    created = not run.exists()

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
        # Reads every image header: an unreadable imaging file is refused before split.json and
        # config.json are written (they used to be left behind in the run folder).
        model_spacing = (
            choose_pixel_spacing(cases, config.kidney_input)
            if config.pixel_spacing_mm == "auto"
            else config.pixel_spacing_mm
        )

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

        # A case refused while the split is written or the cache built (a NaN volume, shapes that
        # differ) leaves no run folder behind that this call created.
        with _undo_new_run_folder(run, created, ctx.is_main):
            ctx.run_on_main(prepare_split)
            split = read_split(run / SPLIT_FILE)

            cache_dir = Path(config.cache_dir) if config.cache_dir is not None else run / "cache"
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
        from ..nets.device import available_cores

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


@contextlib.contextmanager
def _undo_new_run_folder(run: Path, created: bool, is_main: bool) -> Iterator[None]:
    """Remove ``run`` when the block refuses the job (a :class:`KitssegError`) and this call created it.

    A bad case is found only while the slice cache is built, after ``split.json`` and ``config.json`` are
    written: the run was refused with one clear line but left those files and a partial cache in a new
    run folder. A folder that existed before the call (``--resume``, a folder the user made) is left as
    it was found otherwise; only rank 0 removes.
    """
    try:
        yield
    except KitssegError:
        if created and is_main:
            shutil.rmtree(run, ignore_errors=True)
        raise
