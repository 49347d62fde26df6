"""`kitsseg stats DIR`: derive the tumor shape bounds (eigenvalue-ratio percentiles) from a labelled dataset.

Parses options, calls :func:`kitsseg.postprocess.shapestats.shape_stats`, shows the percentiles in a rich
table and optionally writes the JSON. The 5th-95th percentile range is what ``eig_bounds`` of the tumor filter
should be, in the unit shown.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..errors import EXIT_BATCH_FAILED
from ._app import app, console, count_progress, fail, one_line

if TYPE_CHECKING:
    from ..postprocess.shapestats import ShapeStats


class UnitChoice(str, enum.Enum):
    voxel = "voxel"
    mm = "mm"


def _fmt(value: float) -> str:
    return f"{value:.3f}" if value == value else "[dim]-[/]"


def _table(stats: ShapeStats) -> Table:
    table = Table(
        title=f"Tumor eigenvalue ratio l1/l2 ({stats.unit} units): {stats.n_components} components "
        f"in {len(stats.cases)} cases",
        title_justify="left",
    )
    table.add_column("percentile", justify="right")
    table.add_column("ratio", justify="right")
    for p, v in stats.percentiles.items():
        table.add_row(f"{p}th", _fmt(v))
    return table


@app.command("stats")
def stats_command(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Folder of label NIfTI files: KiTS19 layout (case_XXXXX/segmentation.nii.gz) or flat "
            "(case_XXXXX.nii.gz).",
            show_default=False,
        ),
    ],
    unit: Annotated[
        UnitChoice,
        typer.Option(
            "--unit",
            help="Coordinates of the covariance: voxel indices on the original grid (reproduces the paper's "
            "1.07-2.8) or millimetres.",
        ),
    ] = UnitChoice.voxel,
    min_voxels: Annotated[
        int, typer.Option("--min-voxels", min=1, help="Ignore tumor components smaller than this (specks).")
    ] = 10,
    largest_only: Annotated[
        bool, typer.Option("--largest-only", help="Use only the largest tumor component of each case.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the statistics (with per-case ratios) to this JSON file."),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Cases read in parallel.")] = 1,
) -> None:
    """Eigenvalue-ratio statistics of the tumors in a labelled dataset (the tumor shape model)."""

    from ..io.inputs import case_name
    from ..postprocess.shapestats import CaseShapes, find_label_files, shape_stats, write_json

    label_files = find_label_files(folder)
    if output is not None:
        _check_output(output, label_files)
    with count_progress("reading labels") as bar:
        task = bar.add_task("", total=len(label_files))

        def advance(case: CaseShapes) -> None:
            bar.update(task, advance=1, description=one_line(case.case))

        def failed(path: str, reason: str) -> None:
            bar.update(task, advance=1)
            bar.console.print(f"[red]failed:[/] {one_line(reason)}", highlight=False, soft_wrap=True)

        stats = shape_stats(
            folder,
            unit=unit.value,
            min_voxels=min_voxels,
            largest_only=largest_only,
            workers=workers,
            progress=advance,
            skip_failed=True,
            on_failure=failed,
        )
    n_files, n_failed = len(label_files), len(stats.failed)
    if n_failed == n_files:
        first = stats.failed[0][1]
        fail(f"none of the {n_files} label files could be read (first: {first})", EXIT_BATCH_FAILED)

    console.print(_table(stats))
    lo, hi = stats.bounds
    if stats.n_components:
        console.print(
            f"Shape bounds (5th-95th percentile): [bold]{lo:.3f} to {hi:.3f}[/] in {stats.unit} units "
            f"(the paper: 1.07 to 2.8 in voxel units).",
            highlight=False,
        )
    else:
        console.print("[yellow]No tumor components found (label 2); no bounds can be derived.[/]")
    n_ignored = sum(c.n_ignored for c in stats.cases)
    if n_ignored:
        console.print(f"[dim]{n_ignored} components under {min_voxels} voxels ignored.[/]")
    if output is not None:
        write_json(stats, output)
        console.print(f"Wrote {one_line(output)}", highlight=False, soft_wrap=True)
    if n_failed:
        names = ", ".join(case_name(Path(p)) for p, _ in stats.failed[:5]) + (" ..." if n_failed > 5 else "")
        fail(
            f"{n_failed} of {n_files} label files could not be read ({names}); the statistics cover the "
            f"other {n_files - n_failed}",
            EXIT_BATCH_FAILED,
        )


def _check_output(output: Path, label_files: list[Path]) -> None:
    """Refuse ``-o`` before any file is read: a folder (``-o .``), a missing folder, or one of the label
    files being read (also through a symlink or hard link)."""
    from ..errors import OutputError
    from ..io.guard import refuse_outputs_on_inputs

    if output.is_dir():
        raise OutputError(
            f"-o {output} is a folder; give a file name for the statistics, e.g. shape-stats.json"
        )
    if not output.parent.is_dir():
        # A file where the folder should be (``-o case.nii.gz/stats.json``) was reported as missing.
        why = "is a file, not a folder" if output.parent.exists() else "does not exist; create it first"
        raise OutputError(f"cannot write {output}: {output.parent} {why}")
    refuse_outputs_on_inputs([("-o", output)], [("label file", p) for p in label_files])
