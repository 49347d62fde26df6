"""The library entry point: segment one CT file, or a folder of them, into labelled NIfTI plus reports.

Data flows one way: ``volume.load_ct`` -> ``predict.predict_volume`` -> ``postprocess.postprocess`` ->
``volume.save_labels`` and ``report.write_json``. Outputs are checked before any work starts (an output
that would overwrite the input, a folder that cannot be written), so a mistake costs seconds, not a
model run; every file is written atomically, so an interrupted run leaves no half-written output.

A folder is processed with the model loaded once. Batches are built for clusters (REFERENCE section 4:
users of peer tools ask to skip finished cases and to split work across jobs): ``continue_`` skips cases
whose outputs already exist and are valid, and ``num_parts``/``part_id`` give each job of an array a
deterministic share of the sorted case list (case ``i`` goes to part ``i % num_parts``), by default
from Slurm's ``SLURM_ARRAY_TASK_*`` variables. One failing case is recorded and the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputNotFoundError, InvalidImageError, KitssegError, OutputError
from .postprocess import PAPER_MIN_OVERLAP, PostprocessOptions

if TYPE_CHECKING:
    import torch

    from .checkpoint import WeightsBundle
    from .predict import ProgressFn

#: Suffixes of NIfTI outputs.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


# ----------------------------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    """Weights loaded once on a device, with what the report says about them."""

    bundle: WeightsBundle
    device: torch.device
    info: dict[str, Any]
    threads: int

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.info.get('name')!r}, device={self.device}, threads={self.threads})"


def load_model(
    weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    *,
    download_progress: Any = False,
) -> LoadedModel:
    """Select the device, set the CPU threads and load the weights (``None``: the default registry entry).

    Names, paths and URLs are resolved by :func:`kitsseg.weights.resolve_weights`, which verifies their
    sha256 (and downloads a missing registry file unless offline; ``download_progress`` is its
    ``progress`` argument: ``False`` or a rich console).
    """
    from .allocator import tune_cpu_allocator
    from .checkpoint import load_bundle
    from .device import describe, select_device, set_threads
    from .weights import resolve_weights, weights_sha256

    torch_device = select_device(device)
    n_threads = set_threads(threads)
    if torch_device.type == "cpu":
        tune_cpu_allocator()  # before anything big is allocated: see kitsseg.allocator
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
        "device_name": describe(torch_device),
    }
    return LoadedModel(bundle, torch_device, info, n_threads)


# ----------------------------------------------------------------------------------------------- paths


def is_nifti_name(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def default_output(input_path: str | os.PathLike[str]) -> Path:
    """``<folder>/<name>_seg.nii.gz`` beside the input (used when no output path is given)."""
    from .volume import case_name

    p = Path(input_path)
    return p.with_name(f"{case_name(p)}_seg.nii.gz")


def report_path_for(output_path: str | os.PathLike[str]) -> Path:
    """The report beside a mask: ``mask.json`` for ``mask.nii.gz`` or ``mask.nii``."""
    p = Path(output_path)
    name = p.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    return p.with_name(name + ".json")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and make sure files can be created in it (before any work)."""
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
        raise OutputError(f"the {what} folder {folder} is not writable; choose a folder you can write to")


def check_outputs(
    input_path: Path,
    output_path: Path,
    report_path: Path,
    preview_path: Path | None = None,
    reference: Path | None = None,
) -> None:
    """Refuse outputs that would overwrite an input or each other, or that cannot be written."""
    if not is_nifti_name(output_path):
        raise OutputError(f"output {output_path} must end in .nii.gz or .nii (a labelled NIfTI is written)")
    protected = [("input", input_path)] + ([("reference", reference)] if reference is not None else [])
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
        _check_writable(out.parent, out_kind)


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
    out = default_output(src) if output_path is None else Path(output_path)
    if out.is_dir():  # an existing folder: write <folder>/<case>.nii.gz, as in folder mode
        from .volume import case_name

        out = out / f"{case_name(src)}.nii.gz"
    rep = report_path_for(out) if report_path is None else Path(report_path)
    prev = None if preview_path is None else Path(preview_path)
    ref = None if reference is None else Path(reference)
    _check_input(src)
    if ref is not None and not ref.exists():
        raise InputNotFoundError(f"reference {ref} does not exist; check the path")
    check_outputs(src, out, rep, prev, ref)
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


def _check_input(src: Path) -> None:
    if not src.exists():
        raise InputNotFoundError(f"input {src} does not exist; check the path")
    if src.is_dir():
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
        raise KitssegError(f"eigenvalue-ratio bounds must be LOW,HIGH with LOW <= HIGH, got {bounds}")
    unit = bundle.metadata.get("eig_unit", opts.unit)
    overlap = opts.min_overlap
    if overlap is None:
        overlap = float(bundle.metadata.get("min_overlap", PAPER_MIN_OVERLAP))
    if not 0.0 <= overlap <= 1.0:
        raise KitssegError(f"the tumor overlap threshold must lie in [0, 1], got {overlap}")
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
    from .metrics import EMPTY_MASK_RULE, dice, region_mask
    from .postprocess import postprocess
    from .predict import native_bf16, predict_volume
    from .report import build_report, write_json
    from .volume import load_ct, load_labels, same_grid, save_labels

    opts = resolve_options(options, model.bundle, eig_bounds)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = load_ct(src, volume_index=volume_index, keep_int16=True)  # half the memory, same HU
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
    pred = predict_volume(
        volume.data, model.bundle, batch_size=batch_size, device=model.device, bf16=bf16, progress=progress
    )
    timings.update(pred.timings)

    t0 = time.perf_counter()
    post = postprocess(pred.kidney_tumor_mask, pred.tumor_mask, opts, volume.spacing)
    labels = post.labels
    timings["postprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    written: list[Path] = []
    try:
        save_labels(labels, volume, out)
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
            },
        )
        write_json(report, rep)
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
        raise KitssegError(
            f"cannot read the Slurm job array variables (SLURM_ARRAY_TASK_COUNT={count!r}, "
            f"SLURM_ARRAY_TASK_ID={task!r}); pass --num-parts and --part-id explicitly"
        ) from None
    return n, part // max(step, 1)


def resolve_parts(
    num_parts: int | None, part_id: int | None, env: dict[str, str] | None = None
) -> tuple[int, int]:
    """Explicit values win; missing ones come from the Slurm job array; else one part (everything)."""
    from_env = parts_from_env(env)
    if num_parts is None:
        num_parts = from_env[0] if from_env else 1
    if part_id is None:
        if from_env is not None and from_env[0] == num_parts:
            part_id = from_env[1]
        elif num_parts == 1:
            part_id = 0
        else:
            raise KitssegError(f"--num-parts {num_parts} needs --part-id (0 to {num_parts - 1}) for this job")
    if num_parts < 1:
        raise KitssegError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise KitssegError(
            f"--part-id must be between 0 and {num_parts - 1} for --num-parts {num_parts}, got {part_id}"
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


def is_finished(input_path: Path, output_path: Path, report_path: Path) -> bool:
    """Whether a case's outputs exist and are valid: the report parses and the mask loads as labels
    0/1/2 stored with the input's shape. Anything else (missing, truncated, wrong grid) means: segment it
    again (the new outputs replace the old ones atomically)."""
    from .report import read_report
    from .volume import load_labels

    if not (output_path.is_file() and report_path.is_file()):
        return False
    try:
        read_report(report_path)
        labels = load_labels(output_path)
        if labels.data.size and int(labels.data.max()) > 2:
            return False
        return labels.geometry.spatial_shape == _stored_shape(input_path)
    except Exception:  # noqa: BLE001 - any failure to read means "not finished", never an error
        return False


def _stored_shape(path: Path) -> tuple[int, int, int]:
    """The three spatial axes of a NIfTI file as stored, read from its header only (no voxels)."""
    import nibabel as nib

    shape = nib.load(str(path)).shape
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
    from .volume import case_name, find_nifti

    src_dir, dst_dir = Path(in_dir), Path(out_dir)
    if not src_dir.exists():
        raise InputNotFoundError(f"input folder {src_dir} does not exist; check the path")
    if not src_dir.is_dir():
        raise InvalidImageError(
            f"{src_dir} is a file, not a folder; to segment one file give an output file name"
        )
    all_cases = list(find_nifti(src_dir))
    if not all_cases:
        raise InputNotFoundError(
            f"input folder {src_dir} holds no .nii or .nii.gz files; give a folder of NIfTI CT volumes "
            "(convert DICOM first, e.g. with dcm2niix)"
        )
    n_parts, part = resolve_parts(num_parts, part_id)
    cases = split_cases(all_cases, n_parts, part)
    _check_writable(dst_dir, "output")
    prev_dir = None if preview_dir is None else Path(preview_dir)
    if prev_dir is not None:
        _check_writable(prev_dir, "preview")

    names = [case_name(p) for p in cases]
    seen: dict[str, Path] = {}
    for name, path in zip(names, cases, strict=True):
        if name in seen:
            raise OutputError(
                f"{seen[name]} and {path} would both be written to {name}.nii.gz; "
                "give each case its own name or segment them into different folders"
            )
        seen[name] = path
        mask, report = output_paths(dst_dir, name)
        for out in (mask, report):
            if any(_same_file(out, p) for p in all_cases):
                raise OutputError(
                    f"output {out} would overwrite an input; "
                    "choose an output folder other than the input folder"
                )

    from .report import write_json

    model = weights if isinstance(weights, LoadedModel) else None
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
                    model = load_model(weights, device, threads, download_progress=download_progress)
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
    result.summary_path = write_json(result.to_dict(), summary_path)
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
        check_outputs(path, mask, report, preview)
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
