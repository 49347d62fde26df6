"""`kitsseg segment INPUT -o OUTPUT`: segment one CT (NIfTI file or DICOM series folder) or a folder of cases.

Parses options, calls :func:`kitsseg.inference.segment.segment` or
:func:`kitsseg.inference.batch.segment_folder`, and renders progress and tables with rich. A file gives a file
(plus its JSON report); a folder gives a folder of ``<case>.nii.gz`` and ``<case>.json``. Exit 0 on success;
in folder mode 12 (``EXIT_BATCH_FAILED``) when any case failed, after every other case was written.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import EXIT_BATCH_FAILED, InvalidOptionError
from ._app import app, console, count_progress, err_console, fail, one_line, warn_if_oversubscribed

if TYPE_CHECKING:
    from collections.abc import Iterator


_PP = "Post-processing"
_BATCH = "Folders and job arrays"
_RUN = "Device and speed"


def _parse_bounds(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InvalidOptionError(
            f"--eig-bounds expects LOW,HIGH (two numbers, e.g. 1.07,2.8), got {text!r}"
        ) from None
    if not 1.0 <= lo <= hi:
        raise InvalidOptionError(
            f"--eig-bounds expects 1 <= LOW <= HIGH (a ratio is at least 1), got {text!r}"
        )
    return lo, hi


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show library warnings (oblique axes, values that are not HU) as one yellow line each."""

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        err_console.print(f"[yellow]warning:[/] {one_line(message)}", highlight=False, soft_wrap=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


@app.command("segment")
def segment_command(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            help="A CT NIfTI (.nii/.nii.gz) in HU, a folder holding one DICOM CT series, or a folder of "
            "cases (NIfTI files, KiTS case_XXXXX/imaging.nii.gz folders, DICOM series subfolders).",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output mask (.nii.gz; .dcm writes a DICOM-SEG of a DICOM INPUT) for one CT; "
            "output folder for a folder of cases.",
        ),
    ],
    weights: Annotated[
        str | None,
        typer.Option(help="Weights: registry name, file path or URL (default: the default registry entry)."),
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="auto, cpu, cuda or cuda:N (auto: the first GPU if any).", rich_help_panel=_RUN),
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads (default: cores available to this job).", rich_help_panel=_RUN),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Slices per forward pass (memory vs speed).", rich_help_panel=_RUN)
    ] = 8,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bfloat16 autocast for the networks (default: on where the device has native bf16).",
            rich_help_panel=_RUN,
        ),
    ] = None,
    no_postprocess: Annotated[
        bool, typer.Option("--no-postprocess", help="Keep the raw network output.", rich_help_panel=_PP)
    ] = False,
    no_fill_holes: Annotated[
        bool, typer.Option("--no-fill-holes", help="Do not fill 3D holes.", rich_help_panel=_PP)
    ] = False,
    no_keep_kidneys: Annotated[
        bool,
        typer.Option(
            "--no-keep-kidneys", help="Keep every kidney component, not the two largest.", rich_help_panel=_PP
        ),
    ] = False,
    no_kidney_pairs: Annotated[
        bool,
        typer.Option(
            "--no-kidney-pairs",
            help="Anchor on the largest kidney component even when it has no left/right partner.",
            rich_help_panel=_PP,
        ),
    ] = False,
    bridge_mm: Annotated[
        float,
        typer.Option(
            "--bridge-mm",
            min=0.0,
            help="Kidney pieces separated along z by at most this many mm of missed slices count as one "
            "component when the kidneys are chosen (0: off).",
            rich_help_panel=_PP,
        ),
    ] = 10.0,
    round_exempt_mm: Annotated[
        float,
        typer.Option(
            "--round-exempt-mm",
            min=0.0,
            help="Tumors up to this sphere-equivalent diameter (mm) are kept however round they are: only "
            "the shape model's upper bound applies to them (0: the paper's rule for every size).",
            rich_help_panel=_PP,
        ),
    ] = 20.0,
    no_tumor_shape: Annotated[
        bool,
        typer.Option(
            "--no-tumor-shape", help="Do not filter tumors by eigenvalue ratio.", rich_help_panel=_PP
        ),
    ] = False,
    no_tumor_overlap: Annotated[
        bool,
        typer.Option(
            "--no-tumor-overlap", help="Keep tumors lying outside the kidney mask.", rich_help_panel=_PP
        ),
    ] = False,
    eig_bounds: Annotated[
        str | None,
        typer.Option(
            metavar="LO,HI",
            help="Tumor eigenvalue-ratio bounds (default: those of the weights, e.g. 1.07,2.8).",
            rich_help_panel=_PP,
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="Ground-truth labels of the same CT: adds Dice to the report (file mode)."),
    ] = None,
    min_overlap: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Least fraction of a tumor inside the kidney+tumor mask (default: the weights' value).",
        ),
    ] = None,
    volume_index: Annotated[
        int | None,
        typer.Option(min=0, help="Which volume of a 4D INPUT to segment, from 0 (file mode)."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="JSON report path (file mode; default: beside the mask, mask.json).")
    ] = None,
    preview: Annotated[
        Path | None,
        typer.Option(help="PNG overlay montage (file mode); a folder for one PNG per case (folder mode)."),
    ] = None,
    continue_: Annotated[
        bool,
        typer.Option(
            "--continue", help="Skip cases whose outputs exist and are valid.", rich_help_panel=_BATCH
        ),
    ] = False,
    num_parts: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Split the sorted cases into N parts (default: SLURM_ARRAY_TASK_COUNT).",
            rich_help_panel=_BATCH,
        ),
    ] = None,
    part_id: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Which part this job runs, 0..N-1 (default: from SLURM_ARRAY_TASK_ID).",
            rich_help_panel=_BATCH,
        ),
    ] = None,
) -> None:
    """Segment kidneys (label 1) and kidney tumors (label 2) in a CT, or in every CT of a folder."""
    from ..postprocess.pipeline import PostprocessOptions

    bounds = _parse_bounds(eig_bounds)
    if no_postprocess:
        options = PostprocessOptions.none()
    else:
        options = PostprocessOptions(
            fill_holes=not no_fill_holes,
            keep_kidneys=not no_keep_kidneys,
            kidney_pairs=not no_kidney_pairs,
            bridge_mm=bridge_mm,
            round_exempt_mm=round_exempt_mm or None,
            tumor_shape=not no_tumor_shape,
            tumor_overlap=not no_tumor_overlap,
            min_overlap=min_overlap,
        )
    common = dict(batch_size=batch_size, postprocess=options, eig_bounds=bounds, bf16=bf16)
    from ..io.dicom import holds_dicom_series

    with _warnings_as_lines():
        warn_if_oversubscribed(threads)
        if input_path.is_dir() and not holds_dicom_series(input_path):  # a DICOM series is one CT
            if volume_index is not None:
                raise InvalidOptionError(
                    "--volume-index works on a single 4D file; segment 4D files one by one, "
                    "or split them into 3D files first"
                )
            for flag, value in (("--reference", reference), ("--report", report)):
                if value is not None:
                    raise InvalidOptionError(
                        f"{flag} works on a single file; for a folder, reports are written beside each mask "
                        "and `kitsseg evaluate` scores a folder against ground truth"
                    )
            _segment_folder(
                input_path, output, weights, device, threads, preview, continue_, num_parts, part_id, common
            )
        else:
            if num_parts is not None or part_id is not None:
                raise InvalidOptionError(
                    "--num-parts and --part-id split a folder of cases; INPUT is a single file"
                )
            _segment_file(
                input_path,
                output,
                weights,
                device,
                threads,
                reference,
                report,
                preview,
                continue_,
                {**common, "volume_index": volume_index},
            )


def _tune_process(device: str, threads: int | None) -> None:
    """The process-wide settings (CPU threads, allocator on a CPU run), once, before the model loads.

    Only the command does this: the library never changes the process (see :func:`kitsseg.tune_process`).
    A device that cannot be used is left for ``load_model`` to report, in its usual place.
    """
    from ..errors import DeviceError
    from ..nets.device import select_device, tune_process

    try:
        on_cpu = select_device(device).type == "cpu"
    except DeviceError:
        on_cpu = False
    tune_process(threads, allocator=on_cpu)


def _segment_file(
    input_path: Path,
    output: Path,
    weights: str | None,
    device: str,
    threads: int | None,
    reference: Path | None,
    report: Path | None,
    preview: Path | None,
    continue_: bool,
    common: dict[str, Any],
) -> None:

    from rich.markup import escape

    from ..errors import InputNotFoundError
    from ..inference.batch import is_finished
    from ..inference.outputs import check_outputs, remove_empty_folders, report_path_for
    from ..inference.segment import load_model, output_for, segment
    from ..reporting.report import report_table

    output = output_for(input_path, output)  # an existing folder (-o . or -o "") gets <case>.nii.gz
    report_path = report if report is not None else report_path_for(output)
    volume_index = common.get("volume_index")
    if continue_ and is_finished(input_path, output, report_path, volume_index=volume_index):
        console.print(
            f"[cyan]skipped[/] {escape(str(input_path))}: {escape(str(output))} exists, is valid and was "
            "made from this input (--continue)",
            highlight=False,
        )
        return
    # Every check that needs no voxels happens before the model loads, so a typo costs no model run.
    if not input_path.exists():
        raise InputNotFoundError(f"input {input_path} does not exist; check the path")
    if reference is not None and not reference.exists():
        raise InputNotFoundError(f"reference {reference} does not exist; check the path")
    weights_file = Path(weights) if weights is not None and Path(weights).is_file() else None
    created = check_outputs(input_path, output, report_path, preview, reference, weights_file)
    try:
        _tune_process(device, threads)
        model = load_model(weights, device, threads, download_progress=err_console)
        with count_progress(target=err_console) as bar:
            tasks: dict[str, Any] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"{stage} model", total=total)
                bar.update(tasks[stage], completed=done)

            result = segment(
                input_path,
                output,
                weights=model,
                reference=reference,
                report_path=report_path,
                preview_path=preview,
                progress=progress,
                **common,
            )
    except BaseException:
        remove_empty_folders(created)  # a refused input leaves no empty output folder behind
        raise
    console.print(report_table(result.report))
    written = [str(result.output_path), str(result.report_path)]
    if result.preview_path is not None:
        written.append(str(result.preview_path))
    console.print("[green]wrote[/] " + escape(", ".join(written)), highlight=False, soft_wrap=True)


def _segment_folder(
    input_dir: Path,
    output_dir: Path,
    weights: str | None,
    device: str,
    threads: int | None,
    preview: Path | None,
    continue_: bool,
    num_parts: int | None,
    part_id: int | None,
    common: dict[str, Any],
) -> None:

    from ..inference.batch import CaseOutcome, segment_folder
    from ..reporting.report import batch_table

    if output_dir.exists() and not output_dir.is_dir():
        from ..errors import OutputError

        raise OutputError(
            f"INPUT {input_dir} is a folder, so -o must be a folder too; {output_dir} is a file"
        )
    _tune_process(device, threads)
    with count_progress(target=err_console) as bar:
        task = bar.add_task("segmenting", total=None)

        def start(case: str, index: int, total: int) -> None:
            bar.update(task, total=total, completed=index, description=f"segmenting {one_line(case)}")

        def done(outcome: CaseOutcome, index: int, total: int) -> None:
            bar.update(task, completed=index + 1)
            if outcome.status == "failed":
                err_console.print(
                    f"[bold red]failed[/] {one_line(outcome.case)}: {one_line(outcome.message)}",
                    highlight=False,
                    soft_wrap=True,
                )

        result = segment_folder(
            input_dir,
            output_dir,
            weights=weights,
            device=device,
            threads=threads,
            download_progress=err_console,
            continue_=continue_,
            num_parts=num_parts,
            part_id=part_id,
            preview_dir=preview,
            on_case_start=start,
            on_case_done=done,
            **common,
        )
    console.print(batch_table([o.to_dict() for o in result.outcomes]))
    console.print(
        f"part {result.part_id} of {result.num_parts}: {len(result.outcomes)} of {result.total_cases} cases; "
        f"{len(result.done)} done, {len(result.skipped)} skipped, {len(result.failed)} failed; "
        + one_line(f"summary {result.summary_path}; cohort table {result.cohort_path}"),
        highlight=False,
    )
    if result.failed:
        names = ", ".join(o.case for o in result.failed)
        # "the other outputs were written" only where there are others: a batch of bad files said it too.
        rest = (
            "no mask was written"
            if len(result.failed) == len(result.outcomes)
            else "the other outputs were written"
        )
        fail(f"{len(result.failed)} case(s) failed: {names}; {rest}", EXIT_BATCH_FAILED)
