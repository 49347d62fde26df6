"""Keep glibc from handing the networks' activation buffers back to the kernel after every batch.

Why: a batch of 8 slices through the default U-Net allocates activation maps of 8-34 MB. glibc serves
blocks above its mmap threshold with a fresh ``mmap`` and unmaps them on free, so every batch pays page
faults and page zeroing for every map it writes. Measured on this project's 2-core CPU (512x512x300
synthetic CT, bf16, batch 8; ``benchmarks/README.md``): the kidney network took 22.9 ms per slice inside
the pipeline against 16.8 ms with the settings below, which is 1.8 s of a 10 s run. Intel's advice for
PyTorch on CPUs (a caching allocator such as jemalloc or tcmalloc through ``LD_PRELOAD``) needs the user
to start Python differently; ``mallopt`` does the same job from inside the process.

Settings: blocks up to 32 MB (glibc's largest mmap threshold) come from the heap, freed heap memory is
kept up to 1 GiB before it is trimmed, and the heap grows 64 MB at a time. Peak memory is unchanged in
that measurement (872 against 839 MB). Only glibc on Linux is touched; ``KITSSEG_MALLOPT=0`` turns it
off. The settings are process-wide and applied once.

Because they change the whole process, no library call applies them: the ``kitsseg segment`` command does
at its start, and a program embedding kitsseg opts in with :func:`kitsseg.tune_process`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

from .. import env

#: glibc's ``mallopt`` parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: Values: the largest mmap threshold glibc accepts on 64-bit, a 1 GiB trim threshold, 64 MB top pad.
SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}

_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Apply :data:`SETTINGS` with glibc's ``mallopt`` once per process; True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not env.mallopt_enabled():
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _applied
