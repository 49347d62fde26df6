"""`kitsseg weights list|pull|import|path|verify`: the cached, verified weights, from the command line.

Each command parses, calls :mod:`kitsseg.weights` and renders with rich. Download progress goes to stderr
(so ``kitsseg weights path NAME`` and tables stay clean on stdout) and degrades to a final line when the
stream is not a terminal. Exit codes: 7 (``WeightsError``) for unknown names, offline misses and failed
downloads, 8 (``ChecksumError``) when a file does not match its sha256, including ``verify`` finding one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ChecksumError
from ._app import app, console, err_console, fail, one_line

weights_app = typer.Typer(
    name="weights",
    help="List, download, import, locate and verify model weights (cached, sha256-verified).",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")

CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Weights cache folder (default: $KITSSEG_HOME, else the user cache dir).",
        file_okay=False,
    ),
]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


@weights_app.command("list")
def list_cmd(cache_dir: CacheDir = None) -> None:
    """Show registered and imported weights: version, size, licence, and whether they are on disk."""
    from ..weights.cache import cache_root
    from ..weights.manage import list_weights

    rows = list_weights(cache_dir)
    table = Table(title=f"Weights (cache: {one_line(cache_root(cache_dir))})", title_justify="left")
    for column in ("name", "version", "size", "licence", "status"):
        table.add_column(column, no_wrap=column in ("name", "status"))
    styles = {
        "shipped": "[green]shipped[/]",
        "cached": "[green]cached[/]",
        "not cached": "[dim]not cached[/]",
        "missing": "[red]missing[/]",
    }
    for row in rows:
        entry = row.entry
        name = one_line(entry.name) + (" [dim](default)[/]" if entry.default else "")
        name += " [dim](local)[/]" if entry.origin == "local" else ""
        table.add_row(
            name,
            one_line(entry.version or "-"),
            _size(entry.size),
            one_line(entry.license or "-"),
            styles[row.state],
        )
    console.print(table)


@weights_app.command("pull")
def pull_cmd(
    name_or_url: Annotated[
        str, typer.Argument(metavar="NAME|URL", help="A registered name or an http(s) URL.")
    ],
    sha256: Annotated[
        str | None, typer.Option("--sha256", metavar="HEX", help="Expected sha256 (pins a URL).")
    ] = None,
    cache_dir: CacheDir = None,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Retries after a failed attempt.")] = 3,
) -> None:
    """Download weights into the cache (resuming an unfinished download) and verify their sha256."""
    from ..weights.download import DownloadPolicy
    from ..weights.resolve import pull_weights, weights_sha256

    path = pull_weights(
        name_or_url,
        sha256=sha256,
        cache_dir=cache_dir,
        progress=err_console,
        policy=DownloadPolicy(retries=retries),
    )
    console.print(f"[green]ok[/] {one_line(f'{name_or_url} -> {path}')}", highlight=False, soft_wrap=True)
    console.print(f"sha256 {weights_sha256(path)}", highlight=False, soft_wrap=True)


@weights_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="A weights file copied from a machine with network.")],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Name to register it under (default: the registry entry it matches, or the file stem).",
        ),
    ] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Copy a weights file into the cache (machines without network), verified, so names resolve to it."""
    from ..weights.manage import import_weights

    path = import_weights(file, name, cache_dir=cache_dir)
    console.print(f"[green]imported[/] {one_line(f'{file} -> {path}')}", highlight=False, soft_wrap=True)


@weights_app.command("path")
def path_cmd(
    name: Annotated[str | None, typer.Argument(help="Weights name (default: the default weights).")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Print the local file of verified weights (nothing is downloaded)."""
    from ..weights.resolve import cached_weights_path

    typer.echo(str(cached_weights_path(name, cache_dir=cache_dir)))


@weights_app.command("verify")
def verify_cmd(cache_dir: CacheDir = None) -> None:
    """Re-hash shipped and cached weights and report; nothing is deleted (loading refuses bad files)."""
    from ..weights.manage import verify_cache

    results = verify_cache(cache_dir)
    table = Table(title="Weights verification", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    table.add_column("details", overflow="fold")
    for result in results:
        table.add_row(
            one_line(result.name), "[green]ok[/]" if result.ok else "[red]FAILED[/]", one_line(result.message)
        )
    console.print(table)
    bad = [r for r in results if not r.ok]
    if bad:
        names = ", ".join(sorted({r.name for r in bad}))
        fail(
            f"{len(bad)} weights file(s) failed verification ({names}): "
            + " | ".join(r.message for r in bad),
            ChecksumError.exit_code,
        )
    console.print(f"{len(results)} item(s) checked, all ok" if results else "no weights files found")
