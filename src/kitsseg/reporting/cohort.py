"""One table for a cohort: ``cases.csv`` in a ``segment`` output folder, one row per finished case.

A study of hundreds of cases wants one spreadsheet, not hundreds of JSON reports to stitch by hand. The
table is rebuilt from the per-case reports in the folder (``<case>.json`` beside ``<case>.nii.gz``) at the
end of every folder run, ``--continue`` and each part of a job array included; so after the last part
finishes it lists every case that any part finished, and a re-run never leaves stale rows. The rebuild
happens under a file lock (``.cases.csv.lock``, removed afterwards) and the table is written atomically,
so parts that finish together cannot leave a table that misses one of them.

Columns (:data:`COLUMNS`): ``case``, ``status`` (``done``, or ``empty`` when nothing was found), ``input``,
``mask`` (file name in the folder), kidney volume per side in mL (``right_kidney_ml``, ``left_kidney_ml``:
kidney with its tumors, as in the report's ``kidney_volume_ml``), ``tumor_count``, ``tumor_ml``, the HU
statistics of kidney (label 1) and tumor (label 2) voxels (``kidney_hu_mean`` ... ``tumor_hu_p95``; empty
where the region is), ``weights_name``, ``weights_sha256``, ``kitsseg_version``. Volumes are rounded to
0.001 mL and HU to 0.01; an empty cell means "not available" (e.g. a report of an older kitsseg).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..io.atomic import write_user_output
from .report import HU_STATS, REPORT_FORMAT, read_report

#: File name of the table in the output folder.
COHORT_FILE = "cases.csv"
#: Columns of the table, in order.
COLUMNS: tuple[str, ...] = (
    "case",
    "status",
    "input",
    "mask",
    "right_kidney_ml",
    "left_kidney_ml",
    "tumor_count",
    "tumor_ml",
    *(f"{region}_hu_{stat}" for region in ("kidney", "tumor") for stat in HU_STATS),
    "weights_name",
    "weights_sha256",
    "kitsseg_version",
)


def cohort_row(case: str, report: Mapping[str, Any], mask_name: str) -> dict[str, Any]:
    """The table row of one case, from its report (missing values become empty cells)."""
    volumes = report.get("kidney_volume_ml") or {}
    weights = report.get("weights") or {}
    total = report.get("kidney_tumor_volume_ml")
    row: dict[str, Any] = {
        "case": case,
        "status": "empty" if total == 0 else "done",
        "input": report.get("input", ""),
        "mask": mask_name,
        "right_kidney_ml": _round(volumes.get("right"), 3),
        "left_kidney_ml": _round(volumes.get("left"), 3),
        "tumor_count": report.get("tumor_count", ""),
        "tumor_ml": _round(report.get("tumor_volume_ml"), 3),
        "weights_name": weights.get("name", ""),
        "weights_sha256": weights.get("sha256", ""),
        "kitsseg_version": report.get("kitsseg_version", ""),
    }
    hu = report.get("hu_stats") or {}
    for region in ("kidney", "tumor"):
        stats = hu.get(region) or {}
        for stat in HU_STATS:
            row[f"{region}_hu_{stat}"] = _round(stats.get(stat), 2)
    return row


def cohort_rows(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per case in ``out_dir`` whose report parses and whose mask exists, sorted by case."""
    folder = Path(out_dir)
    rows = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            report = read_report(path)
        except (OSError, ValueError):
            continue  # a foreign or damaged JSON: not a finished case
        if report.get("format") != REPORT_FORMAT or not report.get("output"):
            continue  # batch summaries and other JSON files
        mask = folder / Path(str(report["output"])).name
        if not mask.is_file():
            continue
        rows.append(cohort_row(path.stem, report, mask.name))
    return rows


def cohort_csv(rows: list[dict[str, Any]]) -> str:
    """The CSV text of ``rows`` (header first, ``\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    return buffer.getvalue()


def write_cohort_table(out_dir: str | os.PathLike[str]) -> Path:
    """Rebuild ``<out_dir>/cases.csv`` from the reports in ``out_dir``, under a lock, atomically."""
    folder = Path(out_dir)
    target = folder / COHORT_FILE
    with _lock(folder / f".{COHORT_FILE}.lock"):
        return write_user_output(target, cohort_csv(cohort_rows(folder)), f"the cohort table {target}")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """The cache's ``flock`` (:func:`kitsseg.weights.cache.file_lock`) where the system has one, else none."""
    from ..weights import cache

    with contextlib.ExitStack() as stack:
        if cache.fcntl is not None:  # Windows has no flock: parts rarely run in parallel there
            # A file system without locks: go on, the atomic write still never leaves half a table.
            with contextlib.suppress(OSError):
                stack.enter_context(cache.file_lock(path))
        yield


def _round(value: Any, digits: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return round(float(value), digits)
