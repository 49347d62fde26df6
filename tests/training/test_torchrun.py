"""Data-parallel training through torchrun: 2 CPU processes with gloo, rank 0 alone writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kitsseg.evaluation.phantom import write_phantom
from kitsseg.training.distributed import DistContext, env_context
from kitsseg.weights.checkpoint import load_bundle


def test_env_context_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    single = env_context()
    assert (single.rank, single.world_size, single.is_main, single.is_distributed) == (0, 1, True, False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ctx = env_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert not ctx.is_main
    assert ctx.is_distributed


def test_single_process_collectives_are_no_ops() -> None:
    ctx = DistContext()
    t = torch.tensor([1.0, 2.0])
    assert ctx.all_reduce_sum(t) is t
    assert t.tolist() == [1.0, 2.0]
    ctx.barrier()
    assert ctx.run_on_main(lambda: 5) == 5


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        write_phantom(data, name=f"case_{i:05d}", shape=(12, 64, 64), spacing=(3.0, 1.2, 1.2), seed=i)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "kitsseg",
            "train",
            str(data),
            "-o",
            str(run),
            "--epochs",
            "2",
            "--batch-size",
            "2",
            "--base-width",
            "4",
            "--depth",
            "2",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("kidney", "tumor"):
        files = sorted(p.name for p in (run / stage).iterdir())
        assert files == [
            "best.pt",
            "last.pt",
            "log.jsonl",
        ]  # one checkpoint, no per-rank copies or temporaries
        lines = (run / stage / "log.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # written once, by rank 0
        state = torch.load(run / stage / "last.pt", weights_only=True)
        assert state["epoch"] == 2
    assert proc.stdout.count("kidney epoch 2/2") == 1  # only rank 0 prints
    bundle = load_bundle(run / "weights.pt")
    assert bundle.tumor is not None
    assert not [p for p in run.rglob(".*")]
