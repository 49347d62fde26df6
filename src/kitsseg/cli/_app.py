"""The Typer application object, the error handler and the ``main`` entry point."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from .. import __version__
from ..errors import EXIT_INTERRUPTED, KitssegError

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


def fail(message: str, code: int) -> None:
    """Print one red error line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the project's own errors become one line and an exit code, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except KitssegError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; no partial output was left behind", EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except Exception as exc:
        # Usage errors from click (typer >= 0.29 bundles its own copy, so match by name, not by class).
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "Abort" in names:
            fail("interrupted; no partial output was left behind", EXIT_INTERRUPTED)
        if "ClickException" in names and hasattr(exc, "show"):
            exc.show(file=sys.stderr)
            raise SystemExit(getattr(exc, "exit_code", 2)) from None
        raise
    else:
        return
