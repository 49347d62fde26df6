"""Data-parallel training through torchrun, and the same code path in a single process.

``torchrun --nproc_per_node=N -m kitsseg train ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment. :func:`setup` reads them, joins the process group (NCCL between GPUs,
gloo on CPUs) and pins each rank to its GPU; without those variables it returns a single-process context
whose collectives are no-ops, so the training loop has one code path. Rank 0 alone writes files (cache,
split, checkpoints, logs); the others wait at a barrier and read what it wrote. Work that only rank 0 does
goes through :meth:`DistContext.run_on_main`, which also hands rank 0's error to every rank, so a failure
there stops the whole job with the real message instead of leaving the other ranks waiting for a timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from ..errors import KitssegError

T = TypeVar("T")

#: How long ranks wait for each other (building the slice cache on rank 0 can take a while).
DEFAULT_TIMEOUT = timedelta(hours=2)


@dataclass
class DistContext:
    """Where this process stands in the job: ``rank`` of ``world_size``; ``local_rank`` picks its GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place and return it (identity in a single process)."""
        if self.is_distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def run_on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; every rank raises if it failed there. Returns ``fn``'s value on rank 0.

        The others return ``None`` after rank 0 is done (they read its result from disk).
        """
        if not self.is_distributed:
            return fn()
        result: T | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
                error = exc
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[0] is not None:
            raise KitssegError(f"rank 0 failed, stopping rank {self.rank}: {message[0]}")
        return result

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"


def env_context() -> DistContext:
    """Read torchrun's variables without joining any group (``world_size == 1`` when absent)."""

    def _int(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value)
        except ValueError:
            return default

    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local_rank = _int("LOCAL_RANK", 0)
    local_world = _int("LOCAL_WORLD_SIZE", world)
    if world > 1 and not 0 <= rank < world:
        raise KitssegError(f"RANK={rank} is outside WORLD_SIZE={world}; start the job with torchrun")
    return DistContext(rank, world, local_rank, local_world)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or not part of a distributed job): it alone prints and writes."""
    return env_context().rank == 0


def setup(device_type: str = "cpu", timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the process group torchrun describes (no-op for a single process).

    ``device_type`` picks the backend: ``"cuda"`` uses NCCL and pins the rank to GPU ``LOCAL_RANK``, anything
    else uses gloo.
    """
    ctx = env_context()
    if not ctx.is_distributed:
        return ctx
    if not torch.distributed.is_available():
        raise KitssegError("this PyTorch build has no torch.distributed; run training in one process")
    if torch.distributed.is_initialized():
        return ctx
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(
        backend=backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout
    )
    ctx.owns_group = True
    return ctx


def teardown(ctx: DistContext) -> None:
    """Leave the process group if :func:`setup` joined it."""
    if ctx.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        ctx.owns_group = False


@contextmanager
def distributed(device_type: str = "cpu", timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[DistContext]:
    """``with distributed("cuda") as ctx:`` join the job for the block, leave it afterwards."""
    ctx = setup(device_type, timeout)
    try:
        yield ctx
    finally:
        teardown(ctx)
