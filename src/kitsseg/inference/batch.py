"""A folder of CTs: the model loaded once, one failing case recorded while the others go on, job arrays.

Batches are built for clusters (users of peer tools ask to skip finished cases and to split work across
jobs): ``continue_`` skips cases whose outputs already exist and are valid, and ``num_parts``/``part_id``
give each job of an array a deterministic share of the sorted case list (case ``i`` goes to part
``i % num_parts``), by default from Slurm's ``SLURM_ARRAY_TASK_*`` variables. One failing case is
recorded and the others go on. Each case runs through :mod:`.segment`.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import InputNotFoundError, InvalidImageError, InvalidOptionError, KitssegError, OutputError
from ..postprocess.pipeline import PostprocessOptions
from .outputs import _check_writable, _same_file, check_outputs, remove_empty_folders, report_path_for
from .segment import LoadedModel, _segment_case, _weights_file, load_model

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage



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
    from ..io.inputs import case_name

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
    from ..io.inputs import case_name

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
    is not), it was made from this very input (its recorded size and sha256, see
    :mod:`kitsseg.io.fingerprint`, and the same ``volume_index``), and the mask loads as labels 0/1/2 stored
    with the input's shape. Anything else (missing, truncated, another input, wrong grid) means: segment it
    again (the new outputs replace the old ones atomically)."""
    from ..io.fingerprint import FINGERPRINT_KEY, fingerprint_matches
    from ..io.load import load_labels
    from ..reporting.report import is_complete_report, read_report

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
        from ..io.dicom import stored_shape

        return stored_shape(path)
    from ..io.frame import quiet_nibabel

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
    from ..io.inputs import case_name, find_case_inputs

    src_dir, dst_dir = Path(in_dir), Path(out_dir)
    if not src_dir.exists():
        raise InputNotFoundError(f"input folder {src_dir} does not exist; check the path")
    if not src_dir.is_dir():
        raise InvalidImageError(
            f"{src_dir} is a file, not a folder; to segment one file give an output file name"
        )
    all_cases = find_case_inputs(src_dir)  # NIfTI files, KiTS case folders, DICOM series subfolders
    if not all_cases:
        from ..io.dicom import holds_dicom_series

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

    from ..reporting.report import write_json

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
    from ..reporting.cohort import write_cohort_table

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
