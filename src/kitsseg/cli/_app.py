"""The Typer application object, the error handler and the ``main`` entry point.

What a user sees on stderr when something is wrong is decided here, once for every command: one red
``error:`` line and the exit code of the error's class (``docs/errors.md``), one yellow ``warning:`` line
per warning (no file name, no source line), and for a mistyped command line one red line that names the
option and where to find help. Only a bug (an exception outside :class:`KitssegError`) shows a traceback.

SIGTERM (what Slurm sends at a job's time limit, and ``kill``'s default) is handled like Ctrl-C: without a
handler Python would die on the spot and leave a half-written mask or checkpoint behind, so while ``main``
runs it raises ``KeyboardInterrupt`` instead, the same cleanup runs, and the exit code is 143 (128 + 15).

Every option error, click's parse errors and kitsseg's own :class:`~kitsseg.errors.InvalidOptionError`
alike, exits with 2; a batch with failed cases with ``EXIT_BATCH_FAILED`` (12). The process-wide settings
(PyTorch's CPU threads, the allocator) belong to the program, so the commands that run the networks set
them at their start (:func:`kitsseg.tune_process`); the library never does.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any, NoReturn, TextIO

import typer
from rich.console import Console

from .._version import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, KitssegError

app = typer.Typer(
    name="kitsseg",
    help="Kidney and kidney-tumor segmentation in abdominal CT (two 2D U-Nets + post-processing).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Rich console for tables and progress (stdout) and for the one-line errors (stderr).
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"kitsseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Kidney and kidney-tumor segmentation in abdominal CT."""


def one_line(message: object) -> str:
    """``message`` as a single line of plain text: line breaks folded, rich markup characters escaped."""
    from rich.markup import escape

    return escape(re.sub(r"\s*\n\s*", " ", str(message)).strip())


def count_progress(label: str | None = None, *, target: Console | None = None) -> Any:
    """The one progress-bar layout of every command: label, bar, done/total, elapsed, detail.

    ``label`` is a fixed text before the bar; without it each task's description stands there instead.
    Transient, so only the final tables stay on the terminal. Imported lazily (rich.progress is not
    needed for ``--help``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns: list[Any] = [TextColumn(label) if label else TextColumn("{task.description}")]
    columns += [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if label:
        columns.append(TextColumn("{task.description}"))
    return Progress(*columns, console=target or console, transient=True)


def fail(message: str, code: int) -> NoReturn:
    """Print one red error line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the CLI: one yellow line, without the file, line number or source."""
    err_console.print(f"[yellow]warning:[/] {one_line(message)}", highlight=False, soft_wrap=True)


def _usage_error(exc: Any) -> None:
    """A command line click could not parse: one red line naming the problem and the help command."""
    ctx = getattr(exc, "ctx", None)
    message = str(exc.format_message())
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    fail(message, int(getattr(exc, "exit_code", 2)))


@dataclass
class _Termination:
    """Whether SIGTERM arrived while ``main`` ran (Ctrl-C and SIGTERM both surface as an interrupt)."""

    received: bool = False


@contextmanager
def _sigterm_as_interrupt() -> Iterator[_Termination]:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread; the previous handler is restored.

    Only the first SIGTERM raises: a second one (``scancel`` twice) must not cut the cleanup of the first
    short; SIGKILL still ends the process. Outside the main thread (``main`` called from a worker thread)
    Python cannot install handlers, and nothing is changed.
    """
    state = _Termination()

    def handler(signum: int, frame: FrameType | None) -> None:
        if not state.received:
            state.received = True
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        # None: a handler installed outside Python, which cannot be put back; the default is closest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the project's own errors become one line and an exit code, never a traceback."""
    try:
        with warnings.catch_warnings(), _sigterm_as_interrupt() as termination:
            warnings.showwarning = show_warning
            _run(argv, termination)
    except KeyboardInterrupt:  # Ctrl-C outside the command itself (while handlers are set up or restored)
        fail("interrupted; no partial output was left behind", EXIT_INTERRUPTED)


def warn_if_oversubscribed(threads: int | None, option: str = "--threads") -> None:
    """One warning line when ``threads`` exceeds the machine's CPUs (``os.cpu_count()``): the extra
    threads only compete for the same cores, which makes PyTorch slower, not faster."""
    import os

    from ..errors import KitssegWarning

    cores = os.cpu_count()
    if threads is not None and cores is not None and threads > cores:
        warnings.warn(
            f"{option} {threads} is more than the {cores} CPU cores of this machine; the extra threads "
            f"compete for the same cores and slow the work down (use at most {option} {cores})",
            KitssegWarning,
            stacklevel=2,
        )


def _interrupted(termination: _Termination) -> NoReturn:
    """The one line and exit code of a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    if termination.received:
        fail("terminated; no partial output was left behind", EXIT_TERMINATED)
    fail("interrupted; no partial output was left behind", EXIT_INTERRUPTED)


def _run(argv: list[str] | None, termination: _Termination) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except KitssegError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted(termination)
    except SystemExit:
        raise
    except Exception as exc:
        # Usage errors from click (typer >= 0.29 bundles its own copy, so match by name, not by class).
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "Abort" in names:
            _interrupted(termination)
        if "NoArgsIsHelpError" in names and hasattr(exc, "show"):  # bare `kitsseg weights`: the help
            exc.show(file=sys.stderr)
            raise SystemExit(getattr(exc, "exit_code", 2)) from None
        if "ClickException" in names and hasattr(exc, "format_message"):
            _usage_error(exc)
        raise
    # Without standalone mode typer *returns* the code of a ``typer.Exit``, and it turns Ctrl-C inside a
    # command into ``Exit(130)``; ignoring the return value would end an interrupted run with status 0.
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == EXIT_INTERRUPTED:
            _interrupted(termination)
        raise SystemExit(code)
