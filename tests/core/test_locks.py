"""One writer per output directory, through real processes: a second one is refused, a kill releases the lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from landscape.core.errors import ConfigError
from landscape.core.locks import LOCK_FILE, locked_output

HOLD = "import sys, time; from landscape.core.locks import locked_output\nwith locked_output(sys.argv[1]):\n"
HOLD += "    print('held', flush=True); time.sleep(60)\n"


def hold_in_another_process(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_kill_releases_the_lock(tmp_path):
    out = tmp_path / "out"
    proc = hold_in_another_process(out)
    try:
        with pytest.raises(ConfigError, match="another landscape process is writing to"), locked_output(out):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with locked_output(out):  # the kernel dropped the killed holder's lock
        (out / "result").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "result"]


def test_a_directory_only_the_lock_created_is_removed_and_files_are_refused(tmp_path):
    out = tmp_path / "new" / "out"
    with locked_output(out):
        assert out.is_dir()
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"), locked_output(tmp_path / "file"):
        pass


def test_two_surface_commands_on_one_output_one_is_refused(tiny_run, tmp_path):
    """The race of the issue: two `surface` processes with different parameters and one --out."""
    out = tmp_path / "surface"
    command = [sys.executable, "-m", "landscape.cli.main", "surface", str(tiny_run), "--out", str(out)]
    first = subprocess.Popen([*command, "--grid", "9", "--samples", "8"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "meta.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*command, "--grid", "3", "--samples", "8"], capture_output=True, text=True, timeout=120)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "another landscape process" in second.stderr or "other parameters" in second.stderr
