"""The per-case report: a JSON-ready dict, its atomic write, and its rich tables.

The library builds data and returns it; the CLI decides whether to print. Tables are built here (as
``rich.table.Table`` objects, never printed) so the terminal view and the JSON cannot drift apart.

Sides follow the internal frame: columns run from the patient's right to left, so voxels in columns below
``n_cols / 2`` are the patient's RIGHT kidney (radiological convention, like the KiTS19 images).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import OutputError
from ..io.atomic import write_json_output

if TYPE_CHECKING:
    from rich.table import Table

    from ..postprocess.components import Component
    from ..postprocess.pipeline import PostprocessOptions, PostprocessResult


class PredictionFacts(Protocol):
    """What a report records of the networks' run: the fields of
    :class:`kitsseg.inference.predict.Prediction` it reads. A protocol, so reporting (below inference)
    does not import it."""

    band: tuple[int, int] | None
    tumor_slices: int
    engine: str
    notes: list[str]

#: Version of the report layout; bump when a key changes meaning.
REPORT_FORMAT = "kitsseg-report/1"
#: Order of the per-stage timings.
STAGES = ("load", "kidney", "tumor", "postprocess", "write")
#: Keys every finished report has; a report without them (``{}``, one cut short by hand) is not finished.
REQUIRED_KEYS = (
    "format",
    "input",
    "output",
    "shape_zrc",
    "spacing_mm_zrc",
    "weights",
    "kidney_volume_ml",
    "tumor_count",
    "tumors",
    "input_fingerprint",
)


def side_volumes(labels: np.ndarray, spacing: Sequence[float]) -> dict[str, dict[str, float]]:
    """Kidney, tumor and total (kidney + tumor) volume in mL for the patient's right and left side.

    Split by voxel column at ``n_cols / 2`` (see the module docstring), so a kidney that crosses the
    midline (horseshoe kidney) is shared between the sides rather than assigned whole to one.
    """
    from ..arrays import bounding_box

    labels = np.asarray(labels)
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    n_cols = labels.shape[-1]
    half = (n_cols + 1) // 2  # columns < n_cols / 2 (integers): 0 .. ceil(n/2) - 1
    box = bounding_box(labels)  # a few percent of a CT: count there, not over the whole volume
    crop = labels[box] if box is not None else labels[:0]
    col0 = box[-1].start if box is not None else 0
    cut = min(max(half - col0, 0), crop.shape[-1])
    out: dict[str, dict[str, float]] = {}
    for side, part in (("right", crop[..., :cut]), ("left", crop[..., cut:])):
        kidney = int(np.count_nonzero(part == 1)) * voxel_ml
        tumor = int(np.count_nonzero(part == 2)) * voxel_ml
        out[side] = {"kidney_ml": kidney, "tumor_ml": tumor, "total_ml": kidney + tumor}
    return out


#: The HU statistics of each labelled region, in report and cohort-table order.
HU_STATS = ("mean", "median", "std", "p5", "p95")


def hu_statistics(ct: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    """HU statistics of the kidney (label 1, without tumor) and the tumor (label 2) voxels of a case.

    ``{"kidney": {"voxels", "mean", "median", "std", "p5", "p95"}, "tumor": {...}}``; the statistics are
    ``None`` for an empty region. Enhancement tells phase and tissue apart (a cyst near water, a solid
    tumor well above it), so cohort studies ask for these beside the volumes. Computed inside the labels'
    bounding box, a few percent of a CT.
    """
    from ..arrays import bounding_box

    labels = np.asarray(labels)
    box = bounding_box(labels)
    crop_labels = labels[box] if box is not None else labels[:0]
    crop_ct = np.asarray(ct)[box] if box is not None else np.asarray(ct)[:0]
    out: dict[str, dict[str, float | int | None]] = {}
    for name, value in (("kidney", 1), ("tumor", 2)):
        hu = crop_ct[crop_labels == value].astype(np.float64)
        stats: dict[str, float | int | None] = {"voxels": int(hu.size)}
        if hu.size:
            p5, median, p95 = np.percentile(hu, [5, 50, 95])
            stats.update(mean=float(hu.mean()), median=float(median), std=float(hu.std()), p5=float(p5))
            stats["p95"] = float(p95)
        else:
            stats.update(dict.fromkeys(HU_STATS))
        out[name] = stats
    return out


def tumor_entries(tumors: Iterable[Component], n_cols: int) -> list[dict[str, Any]]:
    """One dict per kept tumor, largest first: volume, largest axial diameter, eigenvalue ratio, side."""
    from ..postprocess.components import kidney_side

    rows = []
    for comp in sorted(tumors, key=lambda c: (-c.voxels, c.label)):
        rows.append(
            {
                "volume_ml": comp.volume_ml,
                "max_axial_diameter_mm": comp.max_axial_diameter_mm,
                "eigenvalue_ratio": comp.eigenvalue_ratio,
                "side": kidney_side(comp.centroid[-1], n_cols),
                "voxels": comp.voxels,
                "centroid_zrc": [round(c, 2) for c in comp.centroid],
                "overlap_with_kidney": comp.overlap,
            }
        )
    for i, row in enumerate(rows, start=1):
        row["index"] = i
    return rows


def removed_entries(removed: Iterable[Component], n_cols: int) -> list[dict[str, Any]]:
    """One dict per component that post-processing removed, with its reason."""
    from ..postprocess.components import kidney_side

    return [
        {
            "kind": comp.kind,
            "reason": comp.reason,
            "voxels": comp.voxels,
            "volume_ml": comp.volume_ml,
            "eigenvalue_ratio": comp.eigenvalue_ratio,
            "overlap_with_kidney": comp.overlap,
            "side": kidney_side(comp.centroid[-1], n_cols),
            "centroid_zrc": [round(c, 2) for c in comp.centroid],
        }
        for comp in removed
    ]


def build_report(
    *,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    shape: Sequence[int],
    spacing: Sequence[float],
    weights: Mapping[str, Any],
    device: str,
    timings: Mapping[str, float],
    labels: np.ndarray,
    prediction: PredictionFacts,
    post: PostprocessResult,
    options: PostprocessOptions,
    reference: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report of one segmented case (JSON-ready: plain types, no NaN).

    ``shape`` and ``spacing`` are in the internal ``(z, row, col)`` frame; ``timings`` in seconds per
    stage (:data:`STAGES`; ``kidney`` includes windowing and resizing); ``reference`` holds the reference
    path and Dice scores when one was given.
    """
    from .._version import __version__

    n_cols = int(labels.shape[-1])
    sides = side_volumes(labels, spacing)
    stage_times = {k: float(timings[k]) for k in STAGES if k in timings}
    stage_times["total"] = float(sum(stage_times.values()))
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "kitsseg_version": __version__,
        "input": str(input_path),
        "output": str(output_path),
        "shape_zrc": [int(s) for s in shape],
        "spacing_mm_zrc": [float(s) for s in spacing],
        "frame": "axial slices (z, row, col): rows anterior->posterior, columns patient right->left",
        "weights": dict(weights),
        "device": device,
        "timings_s": stage_times,
        "postprocess": _options_dict(options),
        "kidney_volume_ml": {side: sides[side]["total_ml"] for side in ("right", "left")},
        "sides": sides,
        "kidney_tumor_volume_ml": sides["right"]["total_ml"] + sides["left"]["total_ml"],
        "tumor_volume_ml": sides["right"]["tumor_ml"] + sides["left"]["tumor_ml"],
        "tumor_count": len(post.tumors),
        "tumors": tumor_entries(post.tumors, n_cols),
        "removed": removed_entries(post.removed, n_cols),
        "tumor_band": (
            {"first_row": prediction.band[0], "height": prediction.band[1], "slices": prediction.tumor_slices}
            if prediction.band is not None
            else None
        ),
        "network_engine": prediction.engine,
        "notes": list(prediction.notes),
    }
    if reference is not None:
        report["reference"] = dict(reference)
    if extra:
        report.update(extra)
    return _jsonable(report)


def _options_dict(options: PostprocessOptions) -> dict[str, Any]:
    data = dataclasses.asdict(options)
    data["eig_bounds"] = list(data["eig_bounds"])
    return data


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become ``None`` (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    safe = _jsonable(data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot write the report {path}: {exc.strerror or exc}; choose a writable folder"
        ) from exc
    return write_json_output(path, safe, f"the report {path}")


def is_complete_report(data: object) -> bool:
    """Whether ``data`` is a whole report of this layout: :data:`REQUIRED_KEYS` present, the right format."""
    return (
        isinstance(data, Mapping)
        and all(k in data for k in REQUIRED_KEYS)
        and data.get("format") == REPORT_FORMAT
    )


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report written by :func:`write_json` (``ValueError`` or ``OSError`` if unreadable)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a kitsseg report")
    return data


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


#: Removed components listed on the terminal (largest first); the JSON report lists every one.
MAX_REMOVED_ROWS = 5


def report_table(report: Mapping[str, Any]) -> Table:
    """A rich table of one report: volumes per side, tumors, removed components, Dice, timings."""
    from rich.markup import escape  # paths, names and notes are the user's text, never rich markup
    from rich.table import Table

    name = escape(Path(str(report["input"])).name)
    table = Table(title=f"kitsseg: {name}", show_header=True, title_justify="left")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_column("detail")
    table.add_row("output", "", escape(str(report["output"])))
    table.add_row("shape (z,r,c)", "x".join(str(s) for s in report["shape_zrc"]), "")
    table.add_row("spacing mm", ", ".join(f"{s:g}" for s in report["spacing_mm_zrc"]), "")
    w = report.get("weights", {})
    table.add_row("weights", escape(str(w.get("name", "-"))), str(w.get("sha256", ""))[:12])
    table.add_row("device", "", escape(str(report.get("device", ""))))
    for side in ("right", "left"):
        s = report["sides"][side]
        table.add_row(
            f"{side} kidney mL",
            _fmt(s["total_ml"]),
            f"kidney {_fmt(s['kidney_ml'])}, tumor {_fmt(s['tumor_ml'])}",
        )
    table.add_row("tumors", str(report["tumor_count"]), f"{_fmt(report['tumor_volume_ml'])} mL in all")
    for region, stats in (report.get("hu_stats") or {}).items():
        if stats.get("voxels"):
            table.add_row(
                f"{region} HU",
                _fmt(stats.get("median")),
                f"median; mean {_fmt(stats.get('mean'))}, std {_fmt(stats.get('std'))}, "
                f"p5-p95 {_fmt(stats.get('p5'))} to {_fmt(stats.get('p95'))}",
            )
    for t in report["tumors"]:
        table.add_row(
            f"  tumor {t['index']} ({t['side']})",
            f"{_fmt(t['volume_ml'])} mL",
            f"diameter {_fmt(t['max_axial_diameter_mm'])} mm, eig ratio {_fmt(t['eigenvalue_ratio'], 2)}",
        )
    removed = list(report["removed"])
    table.add_row("removed", str(len(removed)), "components dropped by post-processing (all in the JSON)")
    # The largest few explain what post-processing did; hundreds of one-voxel specks would drown the table.
    shown = sorted(removed, key=lambda r: -(r.get("volume_ml") or 0.0))[:MAX_REMOVED_ROWS]
    for r in shown:
        table.add_row(f"  {r['kind']} ({r['side']})", f"{_fmt(r['volume_ml'], 2)} mL", r["reason"])
    if len(removed) > len(shown):
        rest = sum((r.get("volume_ml") or 0.0) for r in removed) - sum(
            (r.get("volume_ml") or 0.0) for r in shown
        )
        table.add_row("  ...", f"{_fmt(rest, 2)} mL", f"{len(removed) - len(shown)} smaller components")
    ref = report.get("reference")
    if ref:
        table.add_row(
            "Dice kidney+tumor", _fmt(ref.get("dice_kidney_tumor"), 4), escape(str(ref.get("path", "")))
        )
        table.add_row("Dice tumor", _fmt(ref.get("dice_tumor"), 4), "")
    times = report.get("timings_s", {})
    table.add_row(
        "time s",
        _fmt(times.get("total"), 2),
        ", ".join(f"{k} {v:.2f}" for k, v in times.items() if k != "total"),
    )
    for note in report.get("notes", []):
        table.add_row("note", "", escape(str(note)))
    return table


def batch_table(rows: Iterable[Mapping[str, Any]]) -> Table:
    """A rich table of a batch: one row per case with its status, tumor count, volumes or error message.

    ``rows`` are :meth:`kitsseg.inference.batch.CaseOutcome.to_dict` dicts.
    """
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="kitsseg batch", title_justify="left")
    table.add_column("case")
    table.add_column("status")
    table.add_column("right mL", justify="right")
    table.add_column("left mL", justify="right")
    table.add_column("tumors", justify="right")
    table.add_column("message")
    styles = {"done": "green", "skipped": "cyan", "failed": "bold red"}
    for row in rows:
        status = str(row["status"])
        summary = row.get("summary") or {}
        table.add_row(
            escape(str(row["case"])),
            f"[{styles.get(status, '')}]{escape(status)}[/]",
            _fmt(summary.get("right_ml")),
            _fmt(summary.get("left_ml")),
            _fmt(summary.get("tumor_count")),
            escape(str(row.get("message") or "")),
        )
    return table
