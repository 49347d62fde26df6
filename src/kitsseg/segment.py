"""The library entry point: segment one CT file, or a folder of them, into labelled NIfTI plus reports.

Data flows one way: ``volume.load_ct`` -> ``predict.predict_volume`` -> ``postprocess.postprocess`` ->
``volume.save_labels`` and ``report.write_json``. Outputs are checked before any work starts (an output
that would overwrite the input, a folder that cannot be written), so a mistake costs seconds, not a
model run; every file is written atomically, so an interrupted run leaves no half-written output.

A folder is processed with the model loaded once. Batches are built for clusters (users of peer tools ask
to skip finished cases and to split work across jobs): ``continue_`` skips cases
whose outputs already exist and are valid, and ``num_parts``/``part_id`` give each job of an array a
deterministic share of the sorted case list (case ``i`` goes to part ``i % num_parts``), by default
from Slurm's ``SLURM_ARRAY_TASK_*`` variables. One failing case is recorded and the others go on.

Nothing here changes the process behind the caller's back: PyTorch's thread count is touched only while a
call that was given ``threads`` runs (and restored after), warnings are caught only around the load, and
the allocator settings are left to :func:`kitsseg.tune_process` (which the CLI calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .errors import InputNotFoundError, InvalidImageError, InvalidOptionError, KitssegError, OutputError
from .postprocess import PAPER_MIN_OVERLAP, PostprocessOptions
from .volume import NIFTI_SUFFIXES

if TYPE_CHECKING:
    import torch
    from nibabel.spatialimages import SpatialImage

    from .checkpoint import WeightsBundle
    from .predict import ProgressFn


# ----------------------------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    """Weights loaded once on a device, with what the report says about them."""

    bundle: WeightsBundle
    device: torch.device
    info: dict[str, Any]
    #: CPU threads for the work done with it; ``None``: whatever the process is set to.
    threads: int | None

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.info.get('name')!r}, device={self.device}, threads={self.threads})"


def load_model(
    weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    *,
    download_progress: Any = False,
) -> LoadedModel:
    """Select the device and load the weights (``None``: the default registry entry).

    ``threads`` is remembered, not applied: the calls that use the model run PyTorch with that many CPU
    threads and put the previous count back (``None``: the process's own setting, see
    :func:`kitsseg.tune_process`). Loading changes nothing process-wide.

    Names, paths and URLs are resolved by :func:`kitsseg.weights.resolve_weights`, which verifies their
    sha256 (and downloads a missing registry file unless offline; ``download_progress`` is its
    ``progress`` argument: ``False`` or a rich console).
    """
    from .checkpoint import load_bundle
    from .device import check_threads, describe, select_device
    from .weights import resolve_weights, weights_sha256

    torch_device = select_device(device)
    n_threads = check_threads(threads)
    path = resolve_weights(None if weights is None else str(weights), progress=download_progress)
    bundle = load_bundle(path, torch_device)
    meta = bundle.metadata
    info = {
        "name": meta.get("name") or Path(path).name,
        "version": meta.get("version"),
        "sha256": weights_sha256(path),
        "path": str(path),
        "license": meta.get("license"),
        "eig_bounds": list(bundle.eig_bounds),
        "hu_window": list(bundle.hu_window),
        "has_tumor_model": bundle.tumor is not None,
        "device_name": describe(torch_device, n_threads),
    }
    return LoadedModel(bundle, torch_device, info, n_threads)


# ----------------------------------------------------------------------------------------------- paths


def is_nifti_name(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a NIfTI file: ``.nii`` or ``.nii.gz`` after a non-empty stem."""
    name = Path(path).name.lower()
    return any(name.endswith(s) and len(name) > len(s) for s in NIFTI_SUFFIXES)


def check_output_name(output_path: str | os.PathLike[str]) -> None:
    """Refuse a mask name that is only a suffix (``-o .nii.gz``); reads and creates nothing."""
    name = Path(output_path).name
    if name.lower() in (*NIFTI_SUFFIXES, ".dcm"):
        raise OutputError(
            f"output {output_path} has no name before {name}; give a file name such as case_seg.nii.gz"
        )


def default_output(input_path: str | os.PathLike[str]) -> Path:
    """``<folder>/<name>_seg.nii.gz`` beside the input (used when no output path is given)."""
    from .volume import case_name

    p = Path(input_path)
    return p.with_name(f"{case_name(p)}_seg.nii.gz")


def report_path_for(output_path: str | os.PathLike[str]) -> Path:
    """The report beside a mask: ``mask.json`` for ``mask.nii.gz``, ``mask.nii`` or ``mask.dcm``."""
    p = Path(output_path)
    name = p.name
    for suffix in (*NIFTI_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    return p.with_name(name + ".json")


def _same_file(a: Path, b: Path) -> bool:
    from .guard import same_file  # the same inode (symlinks and hard links), else the same resolved path

    return same_file(a, b)


def remove_empty_folders(created: Sequence[Path]) -> None:
    """Remove folders this run created (deepest first) that are still empty, e.g. after a refused input."""
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty


def _check_writable(folder: Path, what: str) -> list[Path]:
    """Create ``folder`` if needed and make sure files can be created in it (before any work).

    Returns the folders it created, so a run refused later can remove them again
    (:func:`remove_empty_folders`) instead of leaving an empty output folder behind.
    """
    created = [p for p in (*reversed(folder.parents), folder) if not p.exists()]
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # mkdir would only say "File exists" or "Not a directory": name the culprit
        raise OutputError(
            f"cannot create the {what} folder {folder}: {blocker} is a file, not a folder; "
            "choose another output path"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the {what} folder {folder}: {exc.strerror or exc}; "
            "choose a folder you can write to"
        ) from exc
    if not folder.is_dir():
        raise OutputError(f"the {what} folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        remove_empty_folders(created)
        raise OutputError(f"the {what} folder {folder} is not writable; choose a folder you can write to")
    return created


def check_outputs(
    input_path: Path,
    output_path: Path,
    report_path: Path,
    preview_path: Path | None = None,
    reference: Path | None = None,
    weights: Path | None = None,
) -> list[Path]:
    """Refuse outputs that would overwrite an input (or link to one, ``weights`` included) or each other,
    or that cannot be written. Returns the folders created for them (see :func:`remove_empty_folders`)."""
    check_output_name(output_path)
    from .dicom_io import holds_dicom_series
    from .dicom_seg import is_seg_name

    dicom_input = holds_dicom_series(input_path)
    if not is_nifti_name(output_path):
        if not is_seg_name(output_path):
            raise OutputError(
                f"output {output_path} must end in .nii.gz or .nii (a labelled NIfTI is written), "
                "or in .dcm for a DICOM-SEG of a DICOM series"
            )
        if not dicom_input:
            raise OutputError(
                f"output {output_path} asks for a DICOM-SEG (.dcm), which references its source DICOM "
                f"series, but the input {input_path} is not a DICOM series; write a NIfTI mask (.nii.gz)"
            )
    protected = [("input", input_path)] + ([("reference", reference)] if reference is not None else [])
    if weights is not None:
        protected.append(("weights", weights))
    outputs = [("output", output_path), ("report", report_path)]
    if preview_path is not None:
        outputs.append(("preview", preview_path))
    for out_kind, out in outputs:
        for in_kind, src in protected:
            if _same_file(out, src):
                raise OutputError(
                    f"the {out_kind} path {out} is the {in_kind} file; inputs are never overwritten, "
                    "choose another output name"
                )
    for i, (kind_a, a) in enumerate(outputs):
        for kind_b, b in outputs[i + 1 :]:
            if _same_file(a, b):
                raise OutputError(
                    f"the {kind_a} and {kind_b} paths are the same file {a}; give them different names"
                )
    for out_kind, out in outputs:
        if out.is_dir():
            raise OutputError(f"the {out_kind} path {out} is a folder; give a file name")
        if dicom_input and _same_file(out.parent, input_path):
            raise OutputError(
                f"the {out_kind} path {out} lies in the input DICOM folder; inputs are never modified (and a "
                "file there would join the series): write it to another folder"
            )
    created: list[Path] = []
    try:
        for out_kind, out in outputs:
            created += _check_writable(out.parent, out_kind)
    except BaseException:
        remove_empty_folders(created)
        raise
    return created


# ----------------------------------------------------------------------------------------------- one case


@dataclass
class SegmentationResult:
    """What :func:`segment` wrote and measured. ``labels`` are in the internal ``(z, row, col)`` frame."""

    input_path: Path
    output_path: Path
    report_path: Path
    preview_path: Path | None
    report: dict[str, Any]
    labels: np.ndarray | None = None

    def __repr__(self) -> str:
        shape = None if self.labels is None else self.labels.shape
        return (
            f"SegmentationResult(input={str(self.input_path)!r}, output={str(self.output_path)!r}, "
            f"shape={shape}, tumors={self.report.get('tumor_count')})"
        )


def segment(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    *,
    weights: str | os.PathLike[str] | LoadedModel | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
    postprocess: PostprocessOptions | None = None,
    eig_bounds: tuple[float, float] | None = None,
    reference: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    preview_path: str | os.PathLike[str] | None = None,
    bf16: bool | None = None,
    progress: ProgressFn | None = None,
    volume_index: int | None = None,
) -> SegmentationResult:
    """Segment one CT NIfTI: write the labelled mask (0/1/2, the input's layout and header) and a JSON report.

    Parameters
    ----------
    input_path:
        A ``.nii`` or ``.nii.gz`` CT in HU. Never modified.
    output_path:
        The mask; default ``<case>_seg.nii.gz`` beside the input. Must differ from the input.
    weights:
        Registry name, path or URL of a weights file (``None``: the default entry), or a :class:`LoadedModel`
        from :func:`load_model` (then ``device`` and ``threads`` are not used).
    postprocess:
        Which post-processing steps run (default: all); ``PostprocessOptions.none()`` keeps the raw output.
    eig_bounds:
        Tumor shape bounds; default: those carried by the weights (they replace ``options.eig_bounds``).
    reference:
        A ground-truth label NIfTI on the same grid; adds Dice (kidney+tumor, tumor) to the report.
    report_path:
        Where the JSON report goes; default beside the mask (``mask.json`` for ``mask.nii.gz``).
    preview_path:
        Optional PNG montage of the slices with the most kidney and tumor.
    bf16:
        bfloat16 autocast for the networks. ``None`` (default): on where the device computes bf16
        natively (CPUs with AVX-512 bf16 or AMX, Ampere+ GPUs). Measured on the starter model's 115
        validation slices (weights 0.2.0): Dice kidney+tumor 0.8918 bf16 against 0.8919 fp32, tumor
        0.7515 against 0.7515, for about 2.5x less network time on this project's CPU (docs/model-card.md).
    volume_index:
        Which volume of a 4D file to segment, counting from 0 (a 4D file without it is refused).
    """
    src = Path(input_path)
    out = output_for(src, output_path)
    rep = report_path_for(out) if report_path is None else Path(report_path)
    prev = None if preview_path is None else Path(preview_path)
    ref = None if reference is None else Path(reference)
    _check_input(src)
    if ref is not None and not ref.exists():
        raise InputNotFoundError(f"reference {ref} does not exist; check the path")
    created = check_outputs(src, out, rep, prev, ref, _weights_file(weights))
    try:
        model = weights if isinstance(weights, LoadedModel) else load_model(weights, device, threads)
        return _segment_case(
            src,
            out,
            rep,
            model,
            batch_size=batch_size,
            options=postprocess,
            eig_bounds=eig_bounds,
            reference=ref,
            preview_path=prev,
            bf16=bf16,
            progress=progress,
            volume_index=volume_index,
        )
    except BaseException:
        remove_empty_folders(created)  # a refused input leaves no empty output folder behind
        raise


def output_for(input_path: Path, output_path: str | os.PathLike[str] | None) -> Path:
    """The mask path :func:`segment` writes: ``<case>_seg.nii.gz`` beside the input by default, and
    ``<folder>/<case>.nii.gz`` for an existing folder (``-o .`` and ``-o ""`` both mean the current one)."""
    out = default_output(input_path) if output_path is None else Path(output_path)
    if out.is_dir():  # an existing folder: write <folder>/<case>.nii.gz, as in folder mode
        from .volume import case_name

        out = out / f"{case_name(input_path)}.nii.gz"
    return out


def _weights_file(weights: str | os.PathLike[str] | LoadedModel | None) -> Path | None:
    """The local weights file behind ``weights`` when it is known without loading (an input to protect)."""
    if isinstance(weights, LoadedModel):
        return Path(weights.info["path"]) if weights.info.get("path") else None
    if weights is not None and Path(weights).is_file():
        return Path(weights)
    return None


def _check_input(src: Path) -> None:
    if not src.exists():
        raise InputNotFoundError(f"input {src} does not exist; check the path")
    if src.is_dir():
        from .dicom_io import holds_dicom_series

        if holds_dicom_series(src):  # one DICOM series: read by volume.load_ct
            return
        raise InvalidImageError(
            f"input {src} is a folder; segment a folder with segment_folder() (CLI: give an output folder)"
        )


def resolve_options(
    options: PostprocessOptions | None, bundle: WeightsBundle, eig_bounds: tuple[float, float] | None
) -> PostprocessOptions:
    """The post-processing options with the tumor shape bounds, unit and overlap taken from the weights.

    Explicit values (``eig_bounds``, ``options.min_overlap``) win over the weights' own.
    """
    opts = options or PostprocessOptions()
    bounds = tuple(float(b) for b in (eig_bounds if eig_bounds is not None else bundle.eig_bounds))
    if len(bounds) != 2 or not bounds[0] <= bounds[1]:
        raise InvalidOptionError(f"eigenvalue-ratio bounds must be LOW,HIGH with LOW <= HIGH, got {bounds}")
    unit = bundle.metadata.get("eig_unit", opts.unit)
    overlap = opts.min_overlap
    if overlap is None:
        overlap = float(bundle.metadata.get("min_overlap", PAPER_MIN_OVERLAP))
    if not 0.0 <= overlap <= 1.0:
        raise InvalidOptionError(f"the tumor overlap threshold must lie in [0, 1], got {overlap}")
    return dataclasses.replace(opts, eig_bounds=(bounds[0], bounds[1]), unit=unit, min_overlap=overlap)


def _segment_case(
    src: Path,
    out: Path,
    rep: Path,
    model: LoadedModel,
    *,
    batch_size: int,
    options: PostprocessOptions | None,
    eig_bounds: tuple[float, float] | None,
    reference: Path | None,
    preview_path: Path | None,
    bf16: bool | None,
    progress: ProgressFn | None,
    keep_labels: bool = True,
    volume_index: int | None = None,
) -> SegmentationResult:
    from .device import torch_threads
    from .errors import KitssegWarning
    from .fingerprint import FINGERPRINT_KEY, input_fingerprint
    from .inputchecks import input_checks
    from .metrics import EMPTY_MASK_RULE, dice, region_mask
    from .postprocess import postprocess
    from .predict import native_bf16, predict_volume
    from .report import build_report, hu_statistics, write_json
    from .volume import load_ct, load_labels, same_grid, save_labels

    opts = resolve_options(options, model.bundle, eig_bounds)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # keep_int16: half the memory, same HU
        volume = load_ct(src, volume_index=volume_index, keep_int16=True, threads=model.threads)
    try:  # what --continue compares: the report must describe this very input
        fingerprint = input_fingerprint(src)
    except OSError as exc:
        raise InvalidImageError(f"{src} cannot be read to the end: {exc.strerror or exc}") from exc
    load_warnings = [str(w.message) for w in caught]
    for w in caught:  # pass them on to the caller, and keep them in the report
        warnings.warn(w.message, w.category, stacklevel=3)
    ref_labels = None
    ref_same_grid = True
    if reference is not None:
        ref_volume = load_labels(reference)
        ref_labels = np.asarray(ref_volume.data)
        if ref_labels.shape != volume.data.shape:
            from .errors import GridMismatchError

            raise GridMismatchError(
                f"reference {reference} has shape {ref_labels.shape} in the (z, row, col) frame but the "
                f"CT has {volume.data.shape}; give the label file of this CT"
            )
        ref_same_grid = same_grid(volume, ref_volume)
    timings["load"] = time.perf_counter() - t0

    if bf16 is None:
        bf16 = native_bf16(model.device)
    with torch_threads(model.threads):
        pred = predict_volume(
            volume.data,
            model.bundle,
            batch_size=batch_size,
            device=model.device,
            bf16=bf16,
            progress=progress,
            spacing_rc=(volume.spacing[1], volume.spacing[2]),
        )
    timings.update(pred.timings)

    t0 = time.perf_counter()
    post = postprocess(pred.kidney_tumor_mask, pred.tumor_mask, opts, volume.spacing)
    labels = post.labels
    timings["postprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    written: list[Path] = []
    try:
        if is_nifti_name(out):
            save_labels(labels, volume, out, threads=model.threads)
            written.append(out)
        else:  # check_outputs let only a DICOM-SEG of a DICOM input through
            from .dicom_seg import write_dicom_seg

            name, version = str(model.info["name"]), model.info.get("version")
            notes = write_dicom_seg(
                labels, volume, out, algorithm_name=name, algorithm_version=str(version) if version else None
            )
            pred.notes.extend(notes)
            written.append(out)
        if preview_path is not None:
            from .preview import write_preview

            write_preview(volume.data, labels, preview_path)
            written.append(preview_path)
        timings["write"] = time.perf_counter() - t0

        ref_info = None
        if ref_labels is not None:
            ref_info = {
                "path": str(reference),
                "dice_kidney_tumor": dice(
                    region_mask(labels, "kidney_tumor"), region_mask(ref_labels, "kidney_tumor")
                ),
                "dice_tumor": dice(region_mask(labels, "tumor"), region_mask(ref_labels, "tumor")),
                "empty_mask_rule": EMPTY_MASK_RULE,
                "same_grid": ref_same_grid,
            }
            if not ref_same_grid:
                pred.notes.append(
                    "the reference has the CT's shape but a different position or spacing in its header; "
                    "Dice compares voxels as stored, check that it belongs to this CT"
                )
        report = build_report(
            input_path=src,
            output_path=out,
            shape=volume.data.shape,
            spacing=volume.spacing,
            weights={k: v for k, v in model.info.items() if k != "device_name"},
            device=model.info.get("device_name", str(model.device)),
            timings=timings,
            labels=labels,
            prediction=pred,
            post=post,
            options=opts,
            reference=ref_info,
            extra={
                "bf16": bool(bf16),
                "batch_size": int(batch_size),
                "preview": str(preview_path) if preview_path else None,
                "warnings": load_warnings,
                "volume_index": volume_index,
                FINGERPRINT_KEY: fingerprint,
                "hu_stats": hu_statistics(volume.data, labels),
            },
        )
        report["input_checks"] = input_checks(
            volume.data,
            labels,
            int(np.count_nonzero(pred.kidney_tumor_mask)),
            volume.spacing,
            report.get("kidney_volume_ml", {}),
            model.bundle.metadata,
        )
        for message in report["input_checks"]:  # one line each in the CLI, kept in the report
            warnings.warn(message, KitssegWarning, stacklevel=3)
        write_json(report, rep)
        if is_nifti_name(out):  # names and colours for Slicer and ITK-SNAP, beside the mask
            from .labeltable import write_label_tables

            written.append(rep)
            written.extend(write_label_tables(out))
    except BaseException:
        # A mask without its report (disk full, Ctrl-C between the two) is half a result: remove what this
        # call wrote, so no half-finished case is left behind and --continue segments it again.
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return SegmentationResult(src, out, rep, preview_path, report, labels if keep_labels else None)


# ----------------------------------------------------------------------------------------------- folders


@dataclass
class CaseOutcome:
    """One case of a batch: ``status`` is ``"done"``, ``"skipped"`` (already finished) or ``"failed"``."""

    case: str
    input_path: Path
    output_path: Path
    status: str
    message: str = ""
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "input": str(self.input_path),
            "output": str(self.output_path),
            "status": self.status,
            "message": self.message,
            "seconds": round(self.seconds, 3),
            "summary": self.summary,
        }


@dataclass
class BatchResult:
    """The outcome of :func:`segment_folder` for this part of the case list."""

    outcomes: list[CaseOutcome]
    num_parts: int
    part_id: int
    total_cases: int
    summary_path: Path | None = None
    cohort_path: Path | None = None

    @property
    def done(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "done"]

    @property
    def skipped(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "skipped"]

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "kitsseg-batch/1",
            "num_parts": self.num_parts,
            "part_id": self.part_id,
            "cases_in_folder": self.total_cases,
            "cases_in_part": len(self.outcomes),
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": [
                {"case": o.case, "input": str(o.input_path), "message": o.message} for o in self.failed
            ],
            "cases": [o.to_dict() for o in self.outcomes],
        }

    def __repr__(self) -> str:
        return (
            f"BatchResult(part={self.part_id}/{self.num_parts}, cases={len(self.outcomes)}, "
            f"done={len(self.done)}, skipped={len(self.skipped)}, failed={len(self.failed)})"
        )


def parts_from_env(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``(num_parts, part_id)`` of a Slurm job array, or ``None`` outside one.

    ``part_id`` counts from 0: ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` (divided by
    ``SLURM_ARRAY_TASK_STEP`` for arrays like ``--array=1-9:2``), or the task id itself without a minimum.
    """
    env = dict(os.environ) if env is None else env
    count, task = env.get("SLURM_ARRAY_TASK_COUNT"), env.get("SLURM_ARRAY_TASK_ID")
    if not count or task is None or task == "":
        return None
    try:
        n = int(count)
        part = int(task) - int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
    except ValueError:
        raise InvalidOptionError(
            f"cannot read the Slurm job array variables (SLURM_ARRAY_TASK_COUNT={count!r}, "
            f"SLURM_ARRAY_TASK_ID={task!r}); pass --num-parts and --part-id explicitly"
        ) from None
    return n, part // max(step, 1)


def resolve_parts(
    num_parts: int | None, part_id: int | None, env: dict[str, str] | None = None
) -> tuple[int, int]:
    """Explicit values win; missing ones come from the Slurm job array; else one part (everything).

    Errors name where a bad value came from: the option the user gave, or the Slurm variable.
    """
    env = dict(os.environ) if env is None else env
    from_env = parts_from_env(env)
    count_label = f"--num-parts {num_parts}"
    part_label = "--part-id"
    if num_parts is None:
        num_parts = from_env[0] if from_env else 1
        count_label = f"SLURM_ARRAY_TASK_COUNT={num_parts}" if from_env else "one part"
    if part_id is None:
        if from_env is not None and from_env[0] == num_parts:
            part_id = from_env[1]
            slurm = ", ".join(
                f"{k}={env[k]}"
                for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
                if env.get(k)
            )
            part_label = f"the part from the Slurm job array ({slurm})"
        elif num_parts == 1:
            part_id = 0
        else:
            raise InvalidOptionError(
                f"--num-parts {num_parts} needs --part-id (0 to {num_parts - 1}) for this job"
            )
    if num_parts < 1:
        if count_label.startswith("SLURM"):
            raise InvalidOptionError(
                f"{count_label} gives no parts to split the cases into; pass --num-parts and --part-id"
            )
        raise InvalidOptionError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        if part_label != "--part-id":
            raise InvalidOptionError(
                f"{part_label} is {part_id}, outside 0..{num_parts - 1} for {count_label}; check the job "
                "array's range, or pass --num-parts and --part-id explicitly"
            )
        raise InvalidOptionError(
            f"--part-id must be between 0 and {num_parts - 1} for {count_label}, got {part_id}"
        )
    return num_parts, part_id


def split_cases(cases: Sequence[Path], num_parts: int, part_id: int) -> list[Path]:
    """This part's share of the case list, sorted first: case ``i`` goes to part ``i % num_parts``."""
    from .volume import case_name

    ordered = sorted(cases, key=lambda p: (case_name(p), str(p)))
    return ordered[part_id::num_parts]


def output_paths(out_dir: Path, case: str) -> tuple[Path, Path]:
    """``<out_dir>/<case>.nii.gz`` and its report ``<out_dir>/<case>.json``."""
    mask = out_dir / f"{case}.nii.gz"
    return mask, report_path_for(mask)


#: Case names whose report would take the name of a batch summary (``kitsseg-batch.json`` and
#: ``kitsseg-batch-part<I>-of<N>.json``); such a case is refused rather than renamed.
RESERVED_CASE_NAME = re.compile(r"kitsseg-batch(-part\d+-of\d+)?")


def check_case_names(all_cases: Sequence[Path], out_dir: Path) -> None:
    """Refuse a batch whose outputs would collide, before anything is created or segmented.

    Checked over every case of the input folder, not only one job-array part's share, so two cases that
    map to one output (``case.nii`` and ``case.nii.gz``) are refused by every part alike instead of two
    parts silently overwriting each other. Also refused: a case named like a batch summary (its report
    would replace the summary or be replaced by it) and an output that is, or links to, an input.
    Collisions are refused, never renamed: a renamed output would not be found where users (and
    ``--continue``) look for it.
    """
    from .volume import case_name

    seen: dict[str, Path] = {}
    for path in sorted(all_cases, key=lambda p: (case_name(p), str(p))):
        name = case_name(path)
        if name in seen:
            raise OutputError(
                f"{seen[name]} and {path} would both be written to {name}.nii.gz; "
                "give each case its own name or segment them into different folders"
            )
        seen[name] = path
        if RESERVED_CASE_NAME.fullmatch(name):
            raise OutputError(
                f"{path} would write its report to {out_dir / name}.json, the name of a batch summary "
                "(kitsseg-batch.json, kitsseg-batch-part<I>-of<N>.json); rename the file"
            )
        for out in output_paths(out_dir, name):
            if any(_same_file(out, p) for p in all_cases):
                raise OutputError(
                    f"output {out} would overwrite an input; "
                    "choose an output folder other than the input folder"
                )


def is_finished(
    input_path: Path, output_path: Path, report_path: Path, *, volume_index: int | None = None
) -> bool:
    """Whether a case's outputs exist and are valid: the report is complete (every required key, ``{}``
    is not), it was made from this very input (its recorded size and sha256, see :mod:`kitsseg.fingerprint`,
    and the same ``volume_index``), and the mask loads as labels 0/1/2 stored with the input's shape.
    Anything else (missing, truncated, another input, wrong grid) means: segment it again (the new outputs
    replace the old ones atomically)."""
    from .fingerprint import FINGERPRINT_KEY, fingerprint_matches
    from .report import is_complete_report, read_report
    from .volume import load_labels

    if not (output_path.is_file() and report_path.is_file()):
        return False
    try:
        report = read_report(report_path)
        if not is_complete_report(report) or report.get("volume_index") != volume_index:
            return False
        if not fingerprint_matches(report.get(FINGERPRINT_KEY), input_path):
            return False
        labels = load_labels(output_path)
        if labels.data.size and int(labels.data.max()) > 2:
            return False
        return labels.geometry.spatial_shape == _stored_shape(input_path)
    except Exception:  # noqa: BLE001 - any failure to read means "not finished", never an error
        return False


def _stored_shape(path: Path) -> tuple[int, int, int]:
    """The three spatial axes of a NIfTI file (or DICOM series) as stored, from headers only (no voxels)."""
    import nibabel as nib

    if path.is_dir():
        from .dicom_io import stored_shape

        return stored_shape(path)
    from .volume import quiet_nibabel

    with quiet_nibabel():
        shape = cast("SpatialImage", nib.load(str(path))).shape
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def segment_folder(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | LoadedModel | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 8,
    postprocess: PostprocessOptions | None = None,
    eig_bounds: tuple[float, float] | None = None,
    preview_dir: str | os.PathLike[str] | None = None,
    bf16: bool | None = None,
    continue_: bool = False,
    num_parts: int | None = None,
    part_id: int | None = None,
    on_case_start: Callable[[str, int, int], None] | None = None,
    on_case_done: Callable[[CaseOutcome, int, int], None] | None = None,
    download_progress: Any = False,
) -> BatchResult:
    """Segment every NIfTI in ``in_dir`` into ``out_dir/<case>.nii.gz`` and ``<case>.json``.

    The model is loaded once, on the first case that needs it. A case that fails (a bad file, any
    :class:`KitssegError`, or an unexpected exception) is recorded with its message and the others go
    on; problems that concern every case (no weights, no device, an unwritable output folder) raise.
    A summary ``kitsseg-batch.json`` (``kitsseg-batch-part<I>-of<N>.json`` for job arrays) is written
    to ``out_dir``. ``on_case_start(case, index, total)`` and ``on_case_done(outcome, index, total)``
    report progress.
    """
    from .inputs import find_case_inputs
    from .volume import case_name

    src_dir, dst_dir = Path(in_dir), Path(out_dir)
    if not src_dir.exists():
        raise InputNotFoundError(f"input folder {src_dir} does not exist; check the path")
    if not src_dir.is_dir():
        raise InvalidImageError(
            f"{src_dir} is a file, not a folder; to segment one file give an output file name"
        )
    all_cases = find_case_inputs(src_dir)  # NIfTI files, KiTS case folders, DICOM series subfolders
    if not all_cases:
        from .dicom_io import holds_dicom_series

        if holds_dicom_series(src_dir):
            raise InputNotFoundError(
                f"input folder {src_dir} is one DICOM series, not a folder of cases; segment it with "
                "segment() (CLI: give an output file name, e.g. -o mask.nii.gz)"
            )
        raise InputNotFoundError(
            f"input folder {src_dir} holds no .nii or .nii.gz files, KiTS case folders "
            "(case_XXXXX/imaging.nii.gz) or DICOM series subfolders; give a folder of CT cases"
        )
    n_parts, part = resolve_parts(num_parts, part_id)
    cases = split_cases(all_cases, n_parts, part)
    check_case_names(all_cases, dst_dir)  # the whole folder, not this part: every part agrees
    names = [case_name(p) for p in cases]
    created = _check_writable(dst_dir, "output")
    prev_dir = None if preview_dir is None else Path(preview_dir)
    if prev_dir is not None:
        created += _check_writable(prev_dir, "preview")

    from .report import write_json

    model, source = (weights, None) if isinstance(weights, LoadedModel) else (None, weights)
    outcomes: list[CaseOutcome] = []
    result = BatchResult(outcomes, n_parts, part, len(all_cases))
    summary_path = dst_dir / (
        "kitsseg-batch.json" if n_parts == 1 else f"kitsseg-batch-part{part}-of{n_parts}.json"
    )
    total = len(cases)
    try:
        for index, (name, path) in enumerate(zip(names, cases, strict=True)):
            mask, report = output_paths(dst_dir, name)
            if on_case_start is not None:
                on_case_start(name, index, total)
            t0 = time.perf_counter()
            if continue_ and is_finished(path, mask, report):
                outcome = CaseOutcome(name, path, mask, "skipped", "output exists and is valid")
            else:
                if model is None:  # errors here concern every case: let them stop the batch
                    model = load_model(source, device, threads, download_progress=download_progress)
                outcome = _run_one(
                    path, mask, report, model, name, prev_dir, batch_size, postprocess, eig_bounds, bf16
                )
            outcome.seconds = time.perf_counter() - t0
            outcomes.append(outcome)
            if on_case_done is not None:
                on_case_done(outcome, index, total)
    except KeyboardInterrupt:
        # Finished cases are complete files; record them so --continue and people know where it stopped.
        with contextlib.suppress(KitssegError):
            write_json({**result.to_dict(), "interrupted": True}, summary_path)
        raise
    except BaseException:
        remove_empty_folders(created)  # e.g. the weights failed to load: no empty output folder is left
        raise
    result.summary_path = write_json(result.to_dict(), summary_path)
    from .cohort import write_cohort_table

    # Rebuilt from every report in the folder, so after all parts of a job array it lists every case.
    result.cohort_path = write_cohort_table(dst_dir)
    return result


def _run_one(
    path: Path,
    mask: Path,
    report: Path,
    model: LoadedModel,
    name: str,
    prev_dir: Path | None,
    batch_size: int,
    options: PostprocessOptions | None,
    eig_bounds: tuple[float, float] | None,
    bf16: bool | None,
) -> CaseOutcome:
    """Segment one case of a batch; every error becomes a failed outcome (Ctrl-C still stops the batch)."""
    preview = None if prev_dir is None else prev_dir / f"{name}.png"
    try:
        check_outputs(path, mask, report, preview, weights=_weights_file(model))
        result = _segment_case(
            path,
            mask,
            report,
            model,
            batch_size=batch_size,
            options=options,
            eig_bounds=eig_bounds,
            reference=None,
            preview_path=preview,
            bf16=bf16,
            progress=None,
            keep_labels=False,
        )
    except KitssegError as exc:
        return CaseOutcome(name, path, mask, "failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop a batch of hundreds
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
        return CaseOutcome(name, path, mask, "failed", f"unexpected {type(exc).__name__}: {exc}{at}")
    rep = result.report
    summary = {
        "right_ml": rep["kidney_volume_ml"]["right"],
        "left_ml": rep["kidney_volume_ml"]["left"],
        "tumor_count": rep["tumor_count"],
        "tumor_ml": rep["tumor_volume_ml"],
    }
    return CaseOutcome(name, path, mask, "done", "", summary=summary)
