"""``python -m kitsseg`` runs the CLI (also the entry point for ``torchrun -m kitsseg train``)."""

from .cli import main

main()
