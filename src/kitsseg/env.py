"""Every ``KITSSEG_*`` environment switch, read in this one module.

Why one place: a switch read ad hoc in several modules drifts (one module accepts ``true``, another only
``1``) and cannot be listed for users. Each switch is read when it is needed, not at import, so a test's
``monkeypatch.setenv`` or a job script's ``export`` before a call takes effect.

========================  =========  =======================================================================
variable                  default    effect
========================  =========  =======================================================================
``KITSSEG_HOME``          (unset)    weights cache folder; default: the platform's user cache (platformdirs)
``KITSSEG_OFFLINE``       (unset)    ``1``, ``true``, ``yes`` or ``on``: no network access (cached weights)
``KITSSEG_REGISTRY``      (unset)    a weights registry JSON to use instead of the one inside the package
``KITSSEG_MALLOPT``       ``1``      ``0``: :func:`kitsseg.nets.allocator.tune_cpu_allocator` leaves glibc
alone
``KITSSEG_FUSED_CONV``    ``1``      ``0``: CPU inference runs the plain module, not oneDNN's fused kernels
========================  =========  =======================================================================

``OMP_NUM_THREADS`` and Slurm's ``SLURM_ARRAY_TASK_*`` are other programs' variables and are read where they
are used (:mod:`kitsseg.nets.device`, :mod:`kitsseg.inference.segment`).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME = "KITSSEG_HOME"
OFFLINE = "KITSSEG_OFFLINE"
REGISTRY = "KITSSEG_REGISTRY"
MALLOPT = "KITSSEG_MALLOPT"
FUSED_CONV = "KITSSEG_FUSED_CONV"

#: Every switch, for listings and tests.
ALL = (HOME, OFFLINE, REGISTRY, MALLOPT, FUSED_CONV)

_TRUE = frozenset({"1", "true", "yes", "on"})


def _text(name: str) -> str:
    return os.environ.get(name, "").strip()


def _path(name: str) -> Path | None:
    text = _text(name)
    return Path(text).expanduser() if text else None


def home() -> Path | None:
    """``$KITSSEG_HOME`` as a path, or ``None`` when unset or empty."""
    return _path(HOME)


def offline() -> bool:
    """Whether ``$KITSSEG_OFFLINE`` forbids the network (``1``, ``true``, ``yes`` or ``on``, any case)."""
    return _text(OFFLINE).lower() in _TRUE


def registry() -> Path | None:
    """``$KITSSEG_REGISTRY`` as a path, or ``None`` when unset or empty."""
    return _path(REGISTRY)


def mallopt_enabled() -> bool:
    """False only when ``$KITSSEG_MALLOPT`` is ``0``."""
    return _text(MALLOPT) != "0"


def fused_conv_enabled() -> bool:
    """False only when ``$KITSSEG_FUSED_CONV`` is ``0``."""
    return _text(FUSED_CONV) != "0"
