"""Evaluate label predictions against ground truth: match cases, score each, summarize, write files.

Cases are matched by name (:func:`kitsseg.io.inputs.case_name`), so ``pred/case_00042.nii.gz`` meets
``gt/case_00042.nii.gz`` or the KiTS19 layout ``gt/case_00042/segmentation.nii.gz``. Files without a partner
are listed in the result and in ``summary.json``, never dropped silently.

Both sides are loaded with :func:`kitsseg.io.load.load_labels`, which puts every volume into the one
internal frame whatever its stored axis order, so a prediction saved in RAS ``(x, y, z)`` compares correctly
with KiTS19-layout ground truth. If the two really lie on different voxel grids the case becomes an error
row (nothing is resampled) and the other cases go on; an unreadable file does the same.

Label values other than 0, 1, 2 make a case an error row naming them; KiTS21/23 ground truth (3 = cyst) is
read with ``gt_labels="kits23"``, which counts cysts as kidney and adds the KiTS23 regions
(:mod:`kitsseg.evaluation.labelsets`).

Besides the voxel metrics, each case's tumors are matched as objects (:mod:`kitsseg.evaluation.lesions`): how
many ground-truth tumors there are, how many the prediction found, how many predicted tumors are false
positives; ``summary.json`` pools them into a lesion sensitivity and false positives per case, overall and per
tumor size class.

Reading gzip NIfTI dominates the time, so cases run in worker processes (``workers``); rows are sorted by
case name, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import (
    DatasetError,
    GridMismatchError,
    InputNotFoundError,
    InvalidOptionError,
    KitssegError,
    OutputError,
)
from ..io.atomic import atomic_output
from .labelsets import (
    KITS23_DEFINITIONS,
    KITS23_METRIC_NAMES,
    GtLabels,
    as_kits19,
    check_gt_labels,
    check_values,
    kits23_dice,
)
from .lesions import DEFAULT_MIN_OVERLAP, LesionMatch, check_min_overlap, match_lesions, summarize_lesions
from .metrics import (
    DEFAULT_TOLERANCE_MM,
    EMPTY_MASK_RULE,
    METRIC_NAMES,
    SURFACE_REGIONS,
    case_metrics,
    summarize,
)

#: Lesion-detection columns (counts of tumors as objects, see :mod:`kitsseg.evaluation.lesions`).
LESION_COLUMNS: tuple[str, ...] = ("tumors_gt", "tumors_found", "tumors_false_positive")

#: Columns of ``per_case.csv`` (KiTS19 ground truth, the default), in order. Every row has these keys, and
#: also ``lesions``: the case's :class:`~kitsseg.evaluation.lesions.LesionMatch` (each tumor's size and
#: coverage; ``None`` in error rows), which is not a CSV column.
COLUMNS: tuple[str, ...] = (
    "case",
    "status",
    *METRIC_NAMES,
    *LESION_COLUMNS,
    "message",
    "pred_file",
    "gt_file",
)

#: Columns of ``per_case.csv`` with ``gt_labels="kits23"``: the KiTS23 region Dice after the KiTS19 metrics.
KITS23_COLUMNS: tuple[str, ...] = (
    *COLUMNS[: 2 + len(METRIC_NAMES)],
    *KITS23_METRIC_NAMES,
    *COLUMNS[2 + len(METRIC_NAMES) :],
)


def columns(gt_labels: GtLabels = "kits19") -> tuple[str, ...]:
    """The ``per_case.csv`` columns (and row keys) for one reading of the ground-truth labels."""
    return KITS23_COLUMNS if gt_labels == "kits23" else COLUMNS


CSV_NAME = "per_case.csv"
SUMMARY_NAME = "summary.json"

#: How the metrics are defined, written into ``summary.json`` next to the numbers.
DEFINITIONS = {
    "dice_kidney_tumor": "Dice of label > 0 (KiTS19 kidney+tumor composite)",
    "dice_tumor": "Dice of label == 2 (KiTS19 tumor)",
    "dice_kidney": "Dice of label == 1 (kidney tissue without tumor)",
    "vol_*_ml": "voxel count x voxel volume / 1000; vol_diff = prediction - ground truth",
    "hd95_*_mm": "max of the two directed 95th percentiles of surface-voxel distances, in mm",
    "surface_dice_*": "fraction of both surfaces within tolerance_mm of the other surface",
    "std": "population standard deviation (ddof=0)",
    "tumors_gt": "ground-truth tumors of a case (26-connected components of label 2)",
    "tumors_found": "ground-truth tumors covered by predicted tumor voxels for at least lesions.min_overlap",
    "tumors_false_positive": "predicted tumors (components of label 2) touching no ground-truth tumor voxel",
}


@dataclass
class EvaluationResult:
    """Per-case rows (sorted by case), the summary dict, unmatched files and where outputs went."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    unmatched_pred: list[Path] = field(default_factory=list)
    unmatched_gt: list[Path] = field(default_factory=list)
    csv_path: Path | None = None
    summary_path: Path | None = None
    gt_labels: GtLabels = "kits19"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Rows of the cases that could not be evaluated."""
        return [r for r in self.rows if r["status"] != "ok"]

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> bool:
        """True when every matched case was evaluated."""
        return self.n_errors == 0

    def __repr__(self) -> str:
        return (
            f"EvaluationResult(cases={len(self.rows)}, errors={self.n_errors}, "
            f"unmatched_pred={len(self.unmatched_pred)}, unmatched_gt={len(self.unmatched_gt)}, "
            f"out={str(self.summary_path.parent) if self.summary_path else None!r})"
        )


# --------------------------------------------------------------------------------------------- matching


def _discover(path: Path, side: str) -> list[Path]:
    """NIfTI files of one side: the file itself, or a folder's files (and KiTS19 case folders for gt)."""
    from ..io.inputs import find_nifti

    if not path.exists():
        raise InputNotFoundError(f"{side} path {path} does not exist; give a NIfTI file or a folder of them")
    if path.is_file():
        return [path]
    try:
        found = {p.resolve(): p for p in find_nifti(path)}
    except InputNotFoundError:
        found = {}
    if side == "ground truth":
        # KiTS19 layout: case_XXXXX/segmentation.nii.gz (imaging.nii.gz beside it is not a label file).
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            for name in ("segmentation.nii.gz", "segmentation.nii"):
                if (sub / name).is_file():
                    found.setdefault((sub / name).resolve(), sub / name)
        found = {k: p for k, p in found.items() if p.name.lower() not in ("imaging.nii.gz", "imaging.nii")}
    if not found:
        raise InputNotFoundError(
            f"{side} folder {path} holds no NIfTI files (.nii or .nii.gz"
            + (", or KiTS19 case folders with segmentation.nii.gz" if side == "ground truth" else "")
            + "); check the path"
        )
    return sorted(found.values())


def _by_name(files: Iterable[Path], side: str) -> dict[str, Path]:
    from ..io.inputs import case_name

    out: dict[str, Path] = {}
    for f in files:
        name = case_name(f)
        if name in out:
            raise DatasetError(
                f"two {side} files have the case name {name!r}: {out[name]} and {f}; "
                "keep one of them so cases can be matched unambiguously"
            )
        out[name] = f
    return out


def match_cases(pred: Path, gt: Path) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """Pair prediction and ground-truth files by case name.

    Returns ``(pairs, unmatched_pred, unmatched_gt)`` with pairs ``(case, pred_file, gt_file)`` sorted by
    case. Two single files are paired whatever their names (named after the prediction).
    """
    pred_files = _discover(pred, "prediction")
    gt_files = _discover(gt, "ground truth")
    if pred.is_file() and gt.is_file():
        from ..io.inputs import case_name

        return [(case_name(pred), pred, gt)], [], []
    p_map = _by_name(pred_files, "prediction")
    g_map = _by_name(gt_files, "ground truth")
    common = sorted(p_map.keys() & g_map.keys())
    pairs = [(c, p_map[c], g_map[c]) for c in common]
    unmatched_pred = [p_map[c] for c in sorted(p_map.keys() - g_map.keys())]
    unmatched_gt = [g_map[c] for c in sorted(g_map.keys() - p_map.keys())]
    if pred.is_file() and gt.is_dir():
        unmatched_gt = []  # one prediction against a folder: the other cases were never asked for
    if gt.is_file() and pred.is_dir():
        unmatched_pred = []
    if not pairs:
        raise DatasetError(
            f"no case names in common between predictions ({', '.join(sorted(p_map)[:3])}...) and ground "
            f"truth ({', '.join(sorted(g_map)[:3])}...); files are matched by name, e.g. case_00042.nii.gz "
            "with case_00042.nii.gz or case_00042/segmentation.nii.gz"
        )
    return pairs, unmatched_pred, unmatched_gt


# --------------------------------------------------------------------------------------------- one case


def _empty_row(case: str, pred_file: Path, gt_file: Path, gt_labels: GtLabels = "kits19") -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(columns(gt_labels), math.nan)
    row.update(case=case, status="ok", message="", pred_file=str(pred_file), gt_file=str(gt_file))
    row["lesions"] = None
    return row


def evaluate_case(
    case: str,
    pred_file: Path,
    gt_file: Path,
    tolerance_mm: float,
    lesion_overlap: float = DEFAULT_MIN_OVERLAP,
    gt_labels: GtLabels = "kits19",
) -> dict[str, Any]:
    """Load one pair into the frame and score it; problems the user can fix become an error row.

    Label values outside 0, 1, 2 (0..3 in ground truth read as ``kits23``) are such a problem: the row's
    message names them (:func:`kitsseg.evaluation.labelsets.check_values`). With ``kits23`` the KiTS19
    metrics and tumor counts use the ground truth with cysts as kidney, the KiTS23 Dice the original labels.

    Runs in worker processes, so it must stay a module-level function with picklable arguments (the
    row's :class:`~kitsseg.evaluation.lesions.LesionMatch` is a frozen dataclass of plain values, so it
    pickles too).
    """
    from ..io.frame import same_grid
    from ..io.load import load_labels

    row = _empty_row(case, pred_file, gt_file, gt_labels)
    try:
        gt_vol = load_labels(gt_file)
        pred_vol = load_labels(pred_file)
        check_values(pred_vol.data, gt_vol.data, pred_file, gt_file, gt_labels)
        if not same_grid(pred_vol, gt_vol):
            raise GridMismatchError(
                f"prediction {pred_file.name} (shape {tuple(pred_vol.data.shape)}, spacing "
                f"{_fmt_spacing(pred_vol.spacing)} mm) is not on the voxel grid of ground truth "
                f"{gt_file} (shape {tuple(gt_vol.data.shape)}, spacing {_fmt_spacing(gt_vol.spacing)} mm) "
                "even after reorienting both to one frame; nothing is resampled: save the prediction on "
                "the ground truth's grid"
            )
        gt19 = as_kits19(gt_vol.data, gt_labels)
        row.update(case_metrics(pred_vol.data, gt19, gt_vol.spacing, tolerance_mm=tolerance_mm))
        if gt_labels == "kits23":
            row.update(kits23_dice(pred_vol.data, gt_vol.data))
        match = match_lesions(pred_vol.data, gt19, gt_vol.spacing, min_overlap=lesion_overlap)
        row.update(
            tumors_gt=match.n_gt,
            tumors_found=match.n_found,
            tumors_false_positive=match.n_false_positive,
            lesions=match,
        )
    except (KitssegError, OSError, EOFError, MemoryError) as exc:
        row = _empty_row(case, pred_file, gt_file, gt_labels)
        row.update(status="error", message=f"{type(exc).__name__}: {exc}")
    return row


def _fmt_spacing(spacing: Iterable[float]) -> str:
    return "(" + ", ".join(f"{float(s):.4g}" for s in spacing) + ")"


# --------------------------------------------------------------------------------------------- summary


def build_summary(
    rows: list[dict[str, Any]],
    *,
    pred: Path | str,
    gt: Path | str,
    unmatched_pred: list[Path],
    unmatched_gt: list[Path],
    tolerance_mm: float,
    lesion_overlap: float = DEFAULT_MIN_OVERLAP,
    gt_labels: GtLabels = "kits19",
) -> dict[str, Any]:
    """The ``summary.json`` dict: statistics of every metric over the evaluated cases, and the rules.

    ``gt_labels`` says how the ground truth was read; with ``kits23`` the KiTS23 region Dice are among the
    metrics and their definitions among the definitions.

    ``lesions`` pools the tumor counts of the evaluated cases
    (:func:`kitsseg.evaluation.lesions.summarize_lesions`).
    """
    ok_rows = [r for r in rows if r["status"] == "ok"]
    matches: list[LesionMatch] = [r["lesions"] for r in ok_rows]
    metric_names = METRIC_NAMES + (KITS23_METRIC_NAMES if gt_labels == "kits23" else ())
    definitions = {**DEFINITIONS, **(KITS23_DEFINITIONS if gt_labels == "kits23" else {})}
    return {
        "kitsseg_version": __version__,
        "pred": str(pred),
        "gt": str(gt),
        "gt_labels": gt_labels,
        "n_cases": len(rows),
        "n_evaluated": len(ok_rows),
        "n_errors": len(rows) - len(ok_rows),
        "errors": [{"case": r["case"], "message": r["message"]} for r in rows if r["status"] != "ok"],
        "unmatched": {
            "pred_only": [str(p) for p in unmatched_pred],
            "gt_only": [str(p) for p in unmatched_gt],
        },
        "empty_mask_rule": EMPTY_MASK_RULE,
        "tolerance_mm": float(tolerance_mm),
        "surface_regions": list(SURFACE_REGIONS),
        "definitions": definitions,
        "metrics": {name: summarize([r[name] for r in ok_rows]) for name in metric_names},
        "lesions": summarize_lesions(matches, min_overlap=lesion_overlap),
    }


# --------------------------------------------------------------------------------------------- writing


def _csv_cell(row: dict[str, Any], key: str) -> Any:
    value = row[key]
    if isinstance(value, float) and math.isnan(value):
        # Undefined metrics of evaluated cases read "nan"; error rows leave metric cells empty.
        return "" if row["status"] != "ok" else "nan"
    return value


def rows_to_csv(rows: list[dict[str, Any]], gt_labels: GtLabels = "kits19") -> str:
    """``per_case.csv`` text: a header of :func:`columns` and one line per matched case."""
    cols = columns(gt_labels)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_csv_cell(row, k) for k in cols])
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def check_output_folder(out_dir: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``-o`` that is a file, or whose ``per_case.csv``/``summary.json`` is (or links to) an
    input; checked before any case is scored."""
    from ..io.guard import refuse_outputs_on_inputs

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a folder; give a folder for -o")
    refuse_outputs_on_inputs(
        [("output", out_dir / CSV_NAME), ("output", out_dir / SUMMARY_NAME)],
        [("input file", p) for p in inputs],
    )


def write_outputs(result: EvaluationResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``per_case.csv`` and ``summary.json`` into ``out_dir`` (created if needed), both or neither.

    Both are written to temporary files and flushed to disk first; only then are both renamed into place
    (a rename needs no space). A full disk while writing either leaves the previous pair, if any, as it
    was: never a new ``per_case.csv`` beside an old or missing ``summary.json``. A folder created here is
    removed again when nothing could be written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a folder; give a folder for -o")
    csv_path = out_dir / CSV_NAME
    summary_path = out_dir / SUMMARY_NAME
    csv_text = rows_to_csv(result.rows, result.gt_labels)
    summary_text = json.dumps(_json_safe(result.summary), indent=2, allow_nan=False) + "\n"
    created = [p for p in (*reversed(out_dir.parents), out_dir) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Both flushed inside the block, before either is renamed on the way out (a rename needs no space).
        with atomic_output(csv_path) as tmp_csv, atomic_output(summary_path) as tmp_json:
            for tmp, text in ((tmp_csv, csv_text), (tmp_json, summary_text)):
                with open(tmp, "w", encoding="utf-8", newline="") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
    except OSError as exc:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        # "free some space" only for a full disk: a file in the folder's path is not cured by that.
        hint = "choose another folder"
        if exc.errno == errno.ENOSPC:
            hint = "free some space or " + hint
        raise OutputError(
            f"cannot write evaluation results to {out_dir}: {exc.strerror or exc}; neither {CSV_NAME} nor "
            f"{SUMMARY_NAME} was changed: {hint}"
        ) from exc
    return csv_path, summary_path


# --------------------------------------------------------------------------------------------- entry


def evaluate(
    pred: str | os.PathLike[str],
    gt: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    lesion_overlap: float = DEFAULT_MIN_OVERLAP,
    gt_labels: GtLabels = "kits19",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> EvaluationResult:
    """Score predictions against ground truth, case by case, and summarize.

    Parameters
    ----------
    pred, gt
        A NIfTI label file or a folder of them; ``gt`` may also be a KiTS19 folder of
        ``case_XXXXX/segmentation.nii.gz``.
    out_dir
        If given, ``per_case.csv`` and ``summary.json`` are written there (atomically), including error rows.
    workers
        Worker processes; 1 runs in this process. The result does not depend on it.
    tolerance_mm
        Tolerance of the surface Dice, in mm.
    lesion_overlap
        Fraction (0, 1] of a ground-truth tumor's voxels that predicted tumor voxels must cover for the
        tumor to count as found (:mod:`kitsseg.evaluation.lesions`; default 0.1).
    gt_labels
        How ground-truth labels are read. ``"kits19"`` (default): 0 background, 1 kidney, 2 tumor.
        ``"kits23"``: KiTS21/23 labels, 3 (cyst) also allowed and counted as kidney for the KiTS19 metrics;
        adds the KiTS23 region Dice (:data:`~kitsseg.evaluation.labelsets.KITS23_METRIC_NAMES`). Other
        values, in either file, make the case an error row naming them.
    progress
        Called in this process with each finished row (in completion order), e.g. to advance a progress bar.

    Raises
    ------
    InputNotFoundError
        ``pred`` or ``gt`` does not exist, or a folder holds no NIfTI files.
    DatasetError
        No case names in common, or two files of one side share a case name.
    InvalidOptionError
        ``lesion_overlap`` is not in (0, 1], ``tolerance_mm`` is not a finite number >= 0, ``workers`` is
        below 1, or ``gt_labels`` is not ``"kits19"`` or ``"kits23"`` (also a ``ValueError``).
    """
    # InvalidOptionError (a ValueError): the CLI passes these straight from --workers and --tolerance-mm,
    # whose own range check lets "inf" through; a plain ValueError reached the user as a traceback.
    if workers < 1:
        raise InvalidOptionError(f"--workers must be at least 1, got {workers}")
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise InvalidOptionError(f"--tolerance-mm must be a finite number of mm >= 0, got {tolerance_mm}")
    lesion_overlap = check_min_overlap(lesion_overlap)
    gt_labels = check_gt_labels(gt_labels)
    pred_path, gt_path = Path(pred), Path(gt)
    pairs, unmatched_pred, unmatched_gt = match_cases(pred_path, gt_path)
    if out_dir is not None:
        inputs = [p for _, pr, g in pairs for p in (pr, g)] + list(unmatched_pred) + list(unmatched_gt)
        check_output_folder(Path(out_dir), inputs)

    rows: list[dict[str, Any]] = []
    n_workers = min(workers, len(pairs))
    if n_workers <= 1:
        for case, p, g in pairs:
            row = evaluate_case(case, p, g, tolerance_mm, lesion_overlap, gt_labels)
            rows.append(row)
            if progress is not None:
                progress(row)
    else:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            futures = [
                pool.submit(evaluate_case, case, p, g, tolerance_mm, lesion_overlap, gt_labels)
                for case, p, g in pairs
            ]
            for fut in as_completed(futures):
                row = fut.result()
                rows.append(row)
                if progress is not None:
                    progress(row)
    rows.sort(key=lambda r: r["case"])

    summary = build_summary(
        rows,
        pred=pred_path,
        gt=gt_path,
        unmatched_pred=unmatched_pred,
        unmatched_gt=unmatched_gt,
        tolerance_mm=tolerance_mm,
        lesion_overlap=lesion_overlap,
        gt_labels=gt_labels,
    )
    result = EvaluationResult(rows, summary, unmatched_pred, unmatched_gt, gt_labels=gt_labels)
    if out_dir is not None:
        result.csv_path, result.summary_path = write_outputs(result, Path(out_dir))
    return result
