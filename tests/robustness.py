"""Helpers of the issue-18 robustness tests (``test_robustness_*.py``): run the CLI, read its one line.

A helper module imported by name (like ``oracle.py``): test modules do not import each other. The CLI runs
in this process through :func:`kitsseg.cli.main`, so monkeypatches reach it and a run costs no start-up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kitsseg.cli import main
from kitsseg.evaluation.phantom import make_phantom
from kitsseg.io.save import write_frame

SHAPE = (12, 48, 48)
SPACING = (2.5, 0.8, 0.8)


def run_cli(argv: list[str | Path]) -> int:
    """The CLI in this process; its exit code."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def error_lines(stderr: str) -> list[str]:
    """The non-empty stderr lines that are not warnings."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def assert_one_error(stderr: str, fragment: str) -> str:
    """Exactly one ``error:`` line (warnings aside), holding ``fragment``, and no traceback; returns it."""
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert fragment in lines[0], stderr
    return lines[0]


def phantom_ct(path: Path, seed: int = 1, layout: str = "kits19") -> Path:
    """A small phantom CT (HU) in ``path``, written like a converter would."""
    ct, _ = make_phantom(SHAPE, SPACING, seed=seed, noise_hu=1.0)
    return write_frame(ct, path, spacing=SPACING, layout=layout)


def phantom_labels(path: Path, seed: int = 1) -> Path:
    """The phantom's labels (0/1/2, uint8) in ``path``."""
    import numpy as np

    _, labels = make_phantom(SHAPE, SPACING, seed=seed, noise_hu=1.0)
    return write_frame(labels.astype(np.uint8), path, spacing=SPACING)


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` and ``"<folder>"`` for every folder, by relative path."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<folder>"
        )
        for p in sorted(folder.rglob("*"))
    }


def segment_args(weights: Path) -> list[str | Path]:
    return ["--weights", weights, "--device", "cpu", "--threads", "1"]
