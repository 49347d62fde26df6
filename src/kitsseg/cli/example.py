"""`kitsseg example`: print the path of the shipped example CT, e.g. ``kitsseg segment "$(kitsseg example)"``."""

from __future__ import annotations

from ._app import app


@app.command("example")
def example_cmd() -> None:
    """Print the path of the example CT that ships with kitsseg (real CT, Apache-2.0)."""
    from ..example import example_ct_path

    print(example_ct_path())
