"""Library calls leave the process as they found it; process-wide tuning is an explicit opt-in.

PyTorch's thread count, glibc's allocator settings and the warning filters belong to the whole process
(a notebook, a web service, another library's tests). ``load_model`` and ``segment`` must not change them
behind the caller's back; an explicit ``threads`` applies only while the call runs, and bounds the
threads that copy the CT into the frame too. ``kitsseg.tune_process`` (what the CLI calls) is the one
place that changes the process.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import kitsseg
from kitsseg.errors import InvalidOptionError
from kitsseg.evaluation.phantom import write_phantom
from kitsseg.io.save import write_frame
from kitsseg.nets.device import torch_threads
from oracle import write_oracle_weights

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
SHAPE = (8, 64, 64)
SPACING = (2.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oracle_weights(tmp_path_factory.mktemp("weights") / "oracle.pt")


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    return write_phantom(tmp_path / "in", "kits19", shape=SHAPE, spacing=SPACING, seed=2, noise_hu=1.0)[0]


@pytest.fixture
def other_thread_count() -> Iterator[int]:
    """A thread count different from the one asked for below (1), set for the test and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_load_model_leaves_the_thread_count_alone(weights: Path, other_thread_count: int) -> None:
    model = kitsseg.load_model(weights, device="cpu", threads=1)
    assert torch.get_num_threads() == other_thread_count
    assert model.threads == 1
    assert model.info["device_name"] == "cpu (1 threads)"  # what the work will run with


def test_segment_runs_with_its_threads_and_restores_the_count(
    tmp_path: Path, ct: Path, weights: Path, other_thread_count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kitsseg.inference.predict as predict
    from kitsseg.io import frame, load, save

    seen: dict[str, list[int | None]] = {"torch": [], "copy": []}
    real_predict, real_copy = predict.predict_volume, frame._blocked_copy

    def recording_predict(*args: object, **kwargs: object) -> object:
        seen["torch"].append(torch.get_num_threads())
        return real_predict(*args, **kwargs)  # type: ignore[arg-type]

    def recording_copy(dst: np.ndarray, src: np.ndarray, workers: int | None = None) -> np.ndarray:
        seen["copy"].append(workers)
        return real_copy(dst, src, workers)

    monkeypatch.setattr(predict, "predict_volume", recording_predict)
    for module in (frame, load, save):  # each module that calls it holds its own reference
        monkeypatch.setattr(module, "_blocked_copy", recording_copy)
    result = kitsseg.segment(ct, tmp_path / "m.nii.gz", weights=weights, device="cpu", threads=1)
    assert result.report["tumor_count"] >= 0
    assert seen["torch"] == [1]  # the networks ran with the threads asked for
    assert seen["copy"]
    assert set(seen["copy"]) == {1}  # so did the copy of the CT into the frame
    assert torch.get_num_threads() == other_thread_count  # and the caller's count is back


def test_segment_without_threads_uses_the_process_setting(
    tmp_path: Path, ct: Path, weights: Path, other_thread_count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kitsseg.inference.predict as predict

    seen: list[int] = []
    real = predict.predict_volume

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(predict, "predict_volume", recording)
    kitsseg.segment(ct, tmp_path / "m.nii.gz", weights=weights, device="cpu")
    assert seen == [other_thread_count]
    assert torch.get_num_threads() == other_thread_count


def test_segment_leaves_the_warning_filters_alone(tmp_path: Path, weights: Path) -> None:
    """A CT that draws a warning: it reaches the caller and the report, and the filters are unchanged."""
    normalised = np.random.default_rng(0).random(SHAPE).astype(np.float32)  # 0..1: "not HU"
    src = write_frame(normalised, tmp_path / "ct.nii.gz", spacing=SPACING)
    with warnings.catch_warnings():  # this test's own scope; the library must not change it further
        warnings.simplefilter("default")
        before = list(warnings.filters)
        with pytest.warns(UserWarning, match="do not look like Hounsfield"):
            result = kitsseg.segment(src, tmp_path / "m.nii.gz", weights=weights, device="cpu", threads=1)
        assert warnings.filters == before
    assert any("Hounsfield" in w for w in result.report["warnings"])


def test_torch_threads_restores_after_an_error(other_thread_count: int) -> None:
    inside: list[int] = []

    def fails_inside() -> None:
        with torch_threads(1):
            inside.append(torch.get_num_threads())
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fails_inside()
    assert inside == [1]
    assert torch.get_num_threads() == other_thread_count
    with torch_threads(None):
        assert torch.get_num_threads() == other_thread_count
    with pytest.raises(InvalidOptionError, match="at least 1"), torch_threads(0):
        pass


def _fresh(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KITSSEG_MALLOPT"}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip().splitlines()[-1]


def test_library_calls_leave_the_allocator_alone(tmp_path: Path, ct: Path, weights: Path) -> None:
    code = (
        "import sys, kitsseg, kitsseg.nets.allocator as a\n"
        "kitsseg.segment(sys.argv[1], sys.argv[2], weights=sys.argv[3], device='cpu', threads=1)\n"
        "print(a._applied)\n"
    )
    assert _fresh(code, str(ct), str(tmp_path / "m.nii.gz"), str(weights)) == "None"


def test_tune_process_is_the_opt_in() -> None:
    code = (
        "import torch, kitsseg, kitsseg.nets.allocator as a\n"
        "n = kitsseg.tune_process(threads=1)\n"
        "print(n, torch.get_num_threads(), a._applied)\n"
    )
    assert _fresh(code) == f"1 1 {GLIBC}"
    with pytest.raises(InvalidOptionError, match="--threads must be at least 1"):
        kitsseg.tune_process(threads=0)
