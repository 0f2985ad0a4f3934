"""Helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations


def exit_status(argv: list[str]) -> int:
    """``landscape``'s exit status for ``argv``, run in-process, also when argparse exits through SystemExit."""
    from landscape.cli.main import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)
