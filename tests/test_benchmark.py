"""The speed benchmark still runs, and its printed ratios are computed from its own measurements.

``benchmarks/bench_segment.py`` is not part of the package, so nothing else would notice if a change to
``segment()`` broke it. This runs it on a 16-slice synthetic CT (one run, one repetition: the numbers are
not meant to be fast here, only consistent) and checks the bookkeeping behind wall / floor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_segment.py"


@pytest.mark.slow
def test_benchmark_runs_and_its_ratios_add_up(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--slices", "16", "--runs", "1", "--reps", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wall / floor" in done.stdout
    payload = json.loads(out.read_text())
    assert sorted(payload["input"]["shape"]) == [16, 512, 512]
    (result,) = payload["results"]
    run, stages = result["run"], result["stages"]
    assert run["engine"] in {"onednn-fused", "torch"}
    # The breakdown splits the measured wall time: its parts add up to it.
    assert sum(result["breakdown_s"].values()) == pytest.approx(result["wall_s"], rel=1e-6)
    assert all(v >= 0 for k, v in result["breakdown_s"].items() if not k.startswith("other")), result[
        "breakdown_s"
    ]
    # FLOPs and floor: per-slice counts times the slices each stage really ran.
    kidney, tumor = stages["kidney"], stages["tumor"]
    assert kidney["slices_run"] == 16
    assert tumor["slices_run"] == run["tumor_slices"]
    expected_gflop = kidney["gflop_per_slice"] * 16 + tumor["gflop_per_slice"] * tumor["slices_run"]
    assert result["gflop_executed"] == pytest.approx(expected_gflop, rel=1e-6)
    assert result["floor_s"] == pytest.approx(kidney["floor_s"] + tumor["floor_s"], rel=1e-6)
    assert result["floor_s"] <= result["floor_s_at_run_batch"] * (1 + 1e-9)
    assert result["wall_over_floor"] == pytest.approx(result["wall_s"] / result["floor_s"], rel=1e-6)
    nets = run["detail_s"]["kidney_net"] + run["detail_s"]["tumor_net"]
    assert result["nets_over_floor"] == pytest.approx(nets / result["floor_s"], rel=1e-6)
    assert result["slices_per_s"] == pytest.approx(16 / result["wall_s"], rel=1e-6)
    assert 0 < result["peak_rss_mb"] < 4096
