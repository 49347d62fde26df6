"""The example CT that ships with the package, so the main job runs on a fresh install without network.

It is a real non-contrast abdominal CT (122x101x112 voxels at 3 mm, RAS layout) from the TotalSegmentator
repository, Apache-2.0; see ``assets/README.md`` for attribution.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def example_ct_path() -> Path:
    """Path of the shipped example CT (a real file inside the installed package)."""
    return Path(str(resources.files("kitsseg") / "assets" / "example_ct.nii.gz"))
