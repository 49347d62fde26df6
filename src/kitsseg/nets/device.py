"""Choosing the compute device and the number of CPU threads, with clear errors.

Cluster users of segmentation tools ask for explicit device and thread control: on a cluster node the job
may own 4 of 64 cores, and PyTorch's default (all physical cores of the machine) then oversubscribes the
node and runs slower than with the right number. ``default_threads`` is therefore the cores this process
may actually run on (``os.sched_getaffinity``, which honours cgroups/taskset/Slurm bindings), unless
``OMP_NUM_THREADS`` says otherwise.

PyTorch's intra-op thread count belongs to the whole process, so library calls never change it behind the
caller's back: :func:`tune_process` sets it (and the allocator settings) once, from the CLI's entry point
or from a program that opts in; :func:`torch_threads` sets it only for the duration of a call that was
given an explicit thread count, and puts the previous value back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..errors import DeviceError, InvalidOptionError


def select_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``'auto' | 'cpu' | 'cuda' | 'cuda:N'`` into a ``torch.device``, or raise :class:`DeviceError`.

    ``'auto'`` (or ``None``) picks the first CUDA GPU when one is usable, else the CPU. Asking for CUDA
    where there is none is an error rather than a silent fall-back, so a cluster job that lost its GPU
    fails loudly instead of running 50 times slower.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {text} was requested but no CUDA GPU is usable here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                "use --device cpu, or install a CUDA build of PyTorch on a machine with a GPU"
            )
        index = 0
        if ":" in text:
            try:
                index = int(text.split(":", 1)[1])
            except ValueError:
                raise DeviceError(f"cannot read device {text!r}; expected cuda or cuda:N") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise DeviceError(
                f"--device {text}: this machine has {count} CUDA device(s), numbered 0 to {count - 1}"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}; expected one of auto, cpu, cuda, cuda:N")


def available_cores() -> int:
    """Cores this process may run on (affinity mask), falling back to ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set to a positive integer, else :func:`available_cores`."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


def set_threads(n: int | None = None) -> int:
    """Set PyTorch's intra-op CPU threads to ``n`` (default :func:`default_threads`); return the count.

    Process-wide: meant for entry points (:func:`tune_process`, the training loop), not for library calls.
    """
    if n is None:
        n = default_threads()
    if int(n) < 1:
        raise DeviceError(f"--threads must be at least 1, got {n}")
    n = int(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


#: The most CPU threads accepted (or the machine's cores, where it has more). OpenMP starts every thread
#: at the first parallel operation and cannot report a failure: ``--threads 100000`` (a typo for 10) ended
#: in a segmentation fault with no message once the system refused to create more threads, whereas more
#: threads than cores only slow the work down (one warning line, ``warn_if_oversubscribed``).
MAX_THREADS = 1024


def check_threads(n: int | None) -> int | None:
    """``n`` as an int, or ``None``; an :class:`InvalidOptionError` when it is below 1 or above
    :data:`MAX_THREADS` (or the cores of a larger machine), before any thread is started."""
    if n is None:
        return None
    if int(n) < 1:
        raise InvalidOptionError(f"--threads must be at least 1, got {n}")
    limit = max(MAX_THREADS, available_cores())
    if int(n) > limit:
        raise InvalidOptionError(
            f"--threads {n} is more than kitsseg starts (at most {limit}); this machine has "
            f"{available_cores()} CPU core(s) for this job: use at most --threads {available_cores()}"
        )
    return int(n)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with PyTorch's intra-op threads at ``n``, then restore the previous count.

    ``None`` (or the count already in effect) changes nothing. The count is process-wide, so another thread
    running PyTorch at the same time sees it too; a caller that wants no change at all passes ``None``.
    """
    n = check_threads(n)
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tune_process(threads: int | None = None, *, allocator: bool = True) -> int:
    """Opt in to kitsseg's process-wide settings; returns PyTorch's CPU thread count now in effect.

    Sets PyTorch's intra-op threads to ``threads`` (default :func:`default_threads`: the cores this job may
    use) and, with ``allocator``, applies the glibc allocator settings of :mod:`kitsseg.nets.allocator` (once
    per process; ``KITSSEG_MALLOPT=0`` turns them off). The ``kitsseg segment`` command calls it at its start;
    a program embedding kitsseg may call it once, before loading models. Library calls never do.
    """
    from .allocator import tune_cpu_allocator

    n = set_threads(check_threads(threads))
    if allocator:
        tune_cpu_allocator()  # before anything big is allocated: see kitsseg.nets.allocator
    return n


def describe(device: torch.device, threads: int | None = None) -> str:
    """A human-readable name for the report: ``'cpu (2 threads)'`` or ``'cuda:0 (NVIDIA H100 ...)'``.

    ``threads``: the CPU threads the work will run with (default: PyTorch's current count).
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({threads if threads is not None else torch.get_num_threads()} threads)"
