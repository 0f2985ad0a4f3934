"""Helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations


def exit_status(argv: list[str]) -> int:
    """``landscape``'s exit status for ``argv``, run in-process, also when argparse exits through SystemExit."""
    from landscape.cli.main import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def kill_9_when(argv: list[str], ready, *, timeout: float = 180.0) -> str:
    """Run ``python -m landscape ARGV`` in a subprocess, SIGKILL it as soon as ``ready()`` holds, and return its stderr.

    Fails the test when the command ended on its own before the kill (the kill must land mid-work for a resume
    test to mean anything) or when ``ready()`` never held within ``timeout`` seconds.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "landscape", *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready():
        assert time.monotonic() < deadline, f"landscape {argv[0]} did not reach the kill point in {timeout:.0f} s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    ended = f"landscape {argv[0]} ended by itself (exit {process.returncode}): {stderr[-2000:]}"
    assert process.returncode == -signal.SIGKILL, ended
    return stderr
