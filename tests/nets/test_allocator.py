"""The glibc allocator settings: applied once on glibc Linux, off with KITSSEG_MALLOPT=0.

Each case runs in a fresh interpreter, because the settings are process-wide and applied once.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from kitsseg.nets.allocator import tune_cpu_allocator as t; print(t(), t())"
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KITSSEG_MALLOPT"}
    if env_value is not None:
        env["KITSSEG_MALLOPT"] = env_value
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="the settings exist for glibc on Linux only")
def test_applied_once_on_glibc() -> None:
    assert _run(None) == "True True"


def test_switched_off_by_environment() -> None:
    assert _run("0") == "False False"


@pytest.mark.skipif(not GLIBC, reason="the settings exist for glibc on Linux only")
def test_tune_process_applies_them_and_results_do_not_change(tmp_path) -> None:  # noqa: ANN001
    # The same phantom segmented after kitsseg.tune_process (what the CLI calls), with the settings on and
    # off, gives identical labels. segment() itself never applies them (tests/test_process_state.py).
    code = (
        "import sys, numpy as np\n"
        "import kitsseg\n"
        "from kitsseg.evaluation.phantom import make_phantom\n"
        "from kitsseg.io.save import write_frame\n"
        "import kitsseg.nets.allocator as a\n"
        "kitsseg.tune_process(threads=1)\n"
        "ct, _ = make_phantom((6, 96, 96), (2.5, 3.0, 3.0), seed=1)\n"
        "src = write_frame(ct.astype(np.int16), sys.argv[1] + '/ct.nii.gz', spacing=(2.5, 3.0, 3.0))\n"
        "kitsseg.segment(src, sys.argv[1] + '/' + sys.argv[2] + '.nii.gz', batch_size=2)\n"
        "print(a._applied)\n"
    )
    outs = {}
    for value, name in (("1", "on"), ("0", "off")):
        env = dict(os.environ, KITSSEG_MALLOPT=value, KITSSEG_OFFLINE="1")
        run = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path), name],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outs[name] = run.stdout.strip().splitlines()[-1]
    assert outs == {"on": "True", "off": "False"}
    from kitsseg.io.load import load_labels

    on = load_labels(tmp_path / "on.nii.gz").data
    off = load_labels(tmp_path / "off.nii.gz").data
    assert (on == off).all()
