"""`kitsseg evaluate PRED GT`: score label predictions against ground truth and show the tables.

Parses options, calls :func:`kitsseg.evaluation.evaluate.evaluate`, renders a per-case table, a summary and a
tumor detection table (lesion-wise counts, :mod:`kitsseg.evaluation.lesions`) with rich. Exit 0 when every
matched case was evaluated, 12 (``EXIT_BATCH_FAILED``) when any case failed; the outputs are written either
way.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..errors import EXIT_BATCH_FAILED
from ._app import app, console, count_progress, fail, one_line

if TYPE_CHECKING:
    from ..evaluation.evaluate import EvaluationResult

#: Per-case columns shown on the terminal (the CSV has them all): (key, header, decimals).
_CASE_COLUMNS = (
    ("dice_kidney_tumor", "Dice K+T", 4),
    ("dice_tumor", "Dice T", 4),
    ("dice_kidney", "Dice K", 4),
    ("vol_pred_kt_ml", "K+T pred mL", 1),
    ("vol_gt_kt_ml", "K+T gt mL", 1),
    ("vol_pred_tumor_ml", "T pred mL", 1),
    ("vol_gt_tumor_ml", "T gt mL", 1),
    ("hd95_kidney_tumor_mm", "HD95 K+T mm", 2),
    ("hd95_tumor_mm", "HD95 T mm", 2),
    ("surface_dice_kidney_tumor", "SDice K+T", 4),
    ("surface_dice_tumor", "SDice T", 4),
    ("tumors_gt", "tumors gt", 0),
    ("tumors_found", "found", 0),
    ("tumors_false_positive", "FP", 0),
)
_MAX_LISTED = 10


class GtLabelsChoice(str, enum.Enum):
    """How ground-truth label values are read (:mod:`kitsseg.evaluation.labelsets`)."""

    kits19 = "kits19"
    kits23 = "kits23"


def _fmt(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "[dim]-[/]"
    return f"{value:.{decimals}f}"


def _decimals(metric: str) -> int:
    if metric.startswith("vol_"):
        return 2
    if metric.startswith("hd95_"):
        return 2
    return 4


def _case_table(result: EvaluationResult) -> Table:
    table = Table(title="Per case", title_justify="left", show_lines=False)
    table.add_column("case", no_wrap=True)
    table.add_column("status")
    for _, header, _ in _CASE_COLUMNS:
        table.add_column(header, justify="right")
    for row in result.rows:
        if row["status"] == "ok":
            cells = [_fmt(row[k], d) for k, _, d in _CASE_COLUMNS]
            table.add_row(one_line(row["case"]), "[green]ok[/]", *cells)
        else:
            table.add_row(one_line(row["case"]), "[red]error[/]", *(["[dim]-[/]"] * len(_CASE_COLUMNS)))
    return table


def _summary_table(result: EvaluationResult) -> Table:
    summary = result.summary
    table = Table(
        title=f"Summary over {summary['n_evaluated']} evaluated of {summary['n_cases']} matched cases "
        f"(surface Dice tolerance {summary['tolerance_mm']:g} mm)",
        title_justify="left",
    )
    table.add_column("metric", no_wrap=True)
    for name in ("mean", "median", "std", "min", "max"):
        table.add_column(name, justify="right")
    table.add_column("n", justify="right")
    for metric, stats in summary["metrics"].items():
        d = _decimals(metric)
        n = f"{stats['n']}" + (f" ({stats['n_undefined']} undef.)" if stats["n_undefined"] else "")
        table.add_row(metric, *(_fmt(stats[k], d) for k in ("mean", "median", "std", "min", "max")), n)
    return table


def _lesion_table(result: EvaluationResult) -> Table:
    lesions = result.summary["lesions"]
    table = Table(
        title=f"Tumor detection over {lesions['n_cases']} evaluated cases (by equivalent diameter)",
        title_justify="left",
    )
    table.add_column("tumor size", no_wrap=True)
    for header in ("gt tumors", "found", "sensitivity", "FP", "FP / case"):
        table.add_column(header, justify="right")
    blocks = [("all", lesions["overall"]), *lesions["by_size"].items()]
    for name, block in blocks:
        table.add_row(
            name,
            str(block["tumors_gt"]),
            str(block["tumors_found"]),
            _fmt(block["sensitivity"], 3),
            str(block["false_positives"]),
            _fmt(block["false_positives_per_case"], 2),
        )
    return table


def _list_paths(title: str, paths: list[Path]) -> None:
    if not paths:
        return
    console.print(f"[yellow]{title} ({len(paths)}):[/]")
    for p in paths[:_MAX_LISTED]:
        console.print(f"  {one_line(p)}", highlight=False, soft_wrap=True)
    if len(paths) > _MAX_LISTED:
        console.print(f"  ... and {len(paths) - _MAX_LISTED} more (all listed in summary.json)")


@app.command("evaluate")
def evaluate_command(
    pred: Annotated[
        Path,
        typer.Argument(
            metavar="PRED", help="Predicted label NIfTI, or a folder of them.", show_default=False
        ),
    ],
    gt: Annotated[
        Path,
        typer.Argument(
            metavar="GT",
            help="Ground-truth label NIfTI, a folder of them, or a KiTS19 folder "
            "(case_XXXXX/segmentation.nii.gz).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder for per_case.csv and summary.json, created if needed (default: write nothing).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Cases evaluated in parallel.")] = 1,
    tolerance_mm: Annotated[
        float, typer.Option("--tolerance-mm", min=0.0, help="Tolerance of the surface Dice, in mm.")
    ] = 2.0,
    lesion_overlap: Annotated[
        float,
        typer.Option(
            "--lesion-overlap",
            min=0.0,
            max=1.0,
            help="Fraction (0, 1] of a ground-truth tumor that predicted tumor voxels must cover for the "
            "tumor to count as found.",
        ),
    ] = 0.1,
    gt_labels: Annotated[
        GtLabelsChoice,
        typer.Option(
            "--gt-labels",
            help="Ground-truth labels: kits19 (0 background, 1 kidney, 2 tumor) or kits23 (KiTS21/23: also "
            "3 cyst, counted as kidney; adds the KiTS23 regions kidney+masses, masses, tumor).",
        ),
    ] = GtLabelsChoice.kits19,
) -> None:
    """Score predictions against ground truth: Dice, volumes, HD95, surface Dice, tumors found by size."""

    from ..evaluation.evaluate import evaluate
    from ..evaluation.metrics import EMPTY_MASK_RULE

    with count_progress("evaluating") as bar:
        task = bar.add_task("", total=None)

        def advance(row: dict[str, Any]) -> None:
            bar.update(task, advance=1, description=one_line(row["case"]))

        result = evaluate(
            pred,
            gt,
            out_dir=output,
            workers=workers,
            tolerance_mm=tolerance_mm,
            lesion_overlap=lesion_overlap,
            gt_labels=gt_labels.value,
            progress=advance,
        )

    console.print(_case_table(result))
    console.print(_summary_table(result))
    console.print(_lesion_table(result))
    console.print(
        f"[dim]Tumors: 26-connected components of label 2. Found: predicted tumor voxels cover >= "
        f"{lesion_overlap:g} of a ground-truth tumor. FP: a predicted tumor touching no ground-truth "
        "tumor.[/]",
        highlight=False,
    )
    console.print(f"[dim]Empty masks: {EMPTY_MASK_RULE} '-' marks an undefined value.[/]", highlight=False)
    if result.gt_labels == "kits23":
        console.print(
            "[dim]Ground truth read as KiTS21/23 labels: cyst (3) counted as kidney above; dice_kits23_* "
            "score the KiTS23 regions (kidney+masses, masses = tumor+cyst, tumor) against the prediction's "
            "kidney+tumor, tumor, tumor.[/]",
            highlight=False,
        )
    _list_paths("Predictions without ground truth", result.unmatched_pred)
    _list_paths("Ground truth without prediction", result.unmatched_gt)
    for row in result.errors:
        console.print(
            f"[red]{one_line(row['case'])}:[/] {one_line(row['message'])}", highlight=False, soft_wrap=True
        )
    if result.summary_path is not None:
        console.print(
            one_line(f"Wrote {result.csv_path} and {result.summary_path}"), highlight=False, soft_wrap=True
        )
    else:
        console.print("[dim]Nothing written; add -o DIR to save per_case.csv and summary.json.[/]")
    if not result.ok:
        fail(
            f"{result.n_errors} of {len(result.rows)} matched cases could not be evaluated", EXIT_BATCH_FAILED
        )
