"""``python -m kitsseg`` runs the CLI (also the entry point for ``torchrun -m kitsseg train``).

Once the CLI runs, its own handler turns Ctrl-C into one line and exit 130. Importing it (typer, rich,
every command module) takes a moment before that, and an interrupt then would show a traceback of the
import machinery, so :func:`run` handles it the same way, without rich (which may be half imported).
"""

from __future__ import annotations

import sys


def run() -> None:
    """Import and run the CLI; Ctrl-C during the import gives the same one line and exit code 130."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; no partial output was left behind\n")
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    run()
