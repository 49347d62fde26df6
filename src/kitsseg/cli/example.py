"""`kitsseg example`: print the path of the shipped example CT.

Use it as ``kitsseg segment "$(kitsseg example)" -o mask.nii.gz``.
"""

from __future__ import annotations

from ._app import app


@app.command("example")
def example_cmd() -> None:
    """Print the path of the example CT that ships with kitsseg (real CT, Apache-2.0)."""
    from ..inference.example import example_ct_path

    print(example_ct_path())
