"""The ``kitsseg`` command line: parses options, calls the library, renders with rich. Nothing else.

Each command lives in its own module and registers itself on :data:`app`. Heavy imports (torch,
nibabel) happen inside the command functions so ``kitsseg --help`` answers instantly. Errors of the
project's own family become one red line on stderr and their documented exit code (see
:mod:`kitsseg.errors`); Ctrl-C exits with 130, SIGTERM with 143.
"""

from __future__ import annotations

from . import evaluate as _evaluate  # noqa: F401,E402
from . import example as _example  # noqa: F401,E402
from . import segment as _segment  # noqa: F401,E402  (registers the command)
from . import stats as _stats  # noqa: F401,E402
from . import train as _train  # noqa: F401,E402
from . import weights as _weights  # noqa: F401,E402
from ._app import app, main  # noqa: F401
