"""The library entry point for one CT: load the model once, segment a file into a labelled NIfTI plus report.

Data flows one way: ``io.load.load_ct`` -> ``predict.predict_volume`` -> ``postprocess.pipeline.postprocess``
-> ``io.save.save_labels`` and ``reporting.report.write_json``. Outputs are checked before any work starts
(:mod:`.outputs`), so a mistake costs seconds, not a model run; every file is written atomically, so an
interrupted run leaves no half-written output. A folder of CTs is :mod:`.batch`.

Nothing here changes the process behind the caller's back: PyTorch's thread count is touched only while a
call that was given ``threads`` runs (and restored after), warnings are caught only around the load, and
the allocator settings are left to :func:`kitsseg.tune_process` (which the CLI calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputNotFoundError, InvalidImageError, InvalidOptionError
from ..postprocess.pipeline import PostprocessOptions
from ..postprocess.tumors import PAPER_MIN_OVERLAP
from .outputs import check_outputs, default_output, is_nifti_name, remove_empty_folders, report_path_for

if TYPE_CHECKING:
    import torch

    from ..weights.checkpoint import WeightsBundle
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

    Names, paths and URLs are resolved by :func:`kitsseg.weights.resolve.resolve_weights`, which verifies
    their sha256 (and downloads a missing registry file unless offline; ``download_progress`` is its
    ``progress`` argument: ``False`` or a rich console).
    """
    from ..nets.device import check_threads, describe, select_device
    from ..weights.checkpoint import load_bundle
    from ..weights.resolve import resolve_weights, weights_sha256

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
        from ..io.inputs import case_name

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
        from ..io.dicom import holds_dicom_series

        if holds_dicom_series(src):  # one DICOM series: read by io.load.load_ct
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
    from ..errors import KitssegWarning
    from ..evaluation.metrics import EMPTY_MASK_RULE, dice, region_mask
    from ..io.fingerprint import FINGERPRINT_KEY, input_fingerprint
    from ..io.frame import same_grid
    from ..io.load import load_ct, load_labels
    from ..io.save import save_labels
    from ..nets.device import torch_threads
    from ..postprocess.pipeline import postprocess
    from ..reporting.report import build_report, hu_statistics, write_json
    from .inputchecks import input_checks
    from .predict import native_bf16, predict_volume

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
            from ..errors import GridMismatchError

            raise GridMismatchError(
                f"reference {reference} has shape {ref_labels.shape} in the (z, row, col) frame but the "
                f"CT has {volume.data.shape}; give the label file of this CT"
            )
        ref_same_grid = same_grid(volume, ref_volume)
        _check_reference_values(ref_labels, reference)
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
            from ..io.dicom_seg import write_dicom_seg

            name, version = str(model.info["name"]), model.info.get("version")
            notes = write_dicom_seg(
                labels, volume, out, algorithm_name=name, algorithm_version=str(version) if version else None
            )
            pred.notes.extend(notes)
            written.append(out)
        if preview_path is not None:
            from ..reporting.preview import write_preview

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
            from ..io.labeltable import write_label_tables

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


def _check_reference_values(ref_labels: np.ndarray, reference: Path) -> None:
    """Refuse a ``--reference`` holding values other than 0, 1, 2, before the CT is segmented.

    The Dice of the report counts label > 0 as kidney+tumor and 2 as tumor, so a KiTS21/23 cyst (3) or any
    other value would silently change it (``evaluate`` refuses the same files; see
    :mod:`kitsseg.evaluation.labelsets`).
    """
    from ..evaluation.labelsets import KITS19_VALUES, unexpected_values

    bad = unexpected_values(ref_labels, KITS19_VALUES)
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InvalidImageError(
            f"reference {reference} has label values {shown} (expected 0, 1, 2: background, kidney, tumor); "
            "the report's Dice would count them as kidney: remap them first (KiTS21/23 labels: use "
            "kitsseg evaluate --gt-labels kits23 on the written mask)"
        )
