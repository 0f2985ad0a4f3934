"""``--dry-run`` on surface and hessian: the cost measured on this machine, printed before any work, nothing
written; the count of units is the computation's own and the time per unit is that of the real work."""

from __future__ import annotations

import re

import pytest

from landscape.cli.main import main
from landscape.core.results import load_result

# One torch thread: with more runnable threads than free cores, torch's operators stall on descheduled threads and a
# tiny model's cell takes 30x longer in bursts, which no timing comparison survives.
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # fmt: skip


def test_surface_dry_run_counts_the_cells_times_real_ones_and_writes_nothing(tiny_run, tmp_path, capsys):
    args = ["surface", str(tiny_run), "--grid", "5", "4", "--samples", "8", "--no-progress"]
    assert main([*args, "--dry-run", "--out", str(tmp_path / "planned")]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "planned").exists()
    pattern = r": 20 cells × ([0-9.e+-]+) s \(median of 3 timed on this machine\) ≈ .*nothing was written"
    match = re.search(pattern, printed)
    assert match, printed
    per_cell = float(match.group(1))
    assert main([*args, "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    meta = load_result(tmp_path / "done").meta
    assert meta["cells_timed"] == 20  # the result records what its cells took, to set beside the estimate
    measured = meta["cell_seconds_median"]
    # both are medians of the same evaluation on this machine (the plan adds its share of a save): same magnitude
    assert per_cell / 5 < measured < per_cell * 5, (per_cell, measured)
    assert meta["wall_time_s"] > 20 * measured  # the wall time holds the start-up too


def test_hessian_dry_run_bounds_the_products_the_options_ask_for(tiny_run, tmp_path, capsys):
    args = ["hessian", str(tiny_run), "--top-k", "3", "--max-iter", "30", "--trace", "--trace-samples", "7",
            "--samples", "8", "--dry-run", "--out", str(tmp_path / "h")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "at most 37 Hessian-vector products" in printed  # 30 Lanczos steps (residuals cost none) + 7 probes
    assert "nothing was written" in printed and not (tmp_path / "h").exists()
    per_product = float(re.search(r"products × ([0-9.e+-]+) s", printed).group(1))
    assert main([*args[:-3], "--out", str(tmp_path / "h")]) == 0
    meta = load_result(tmp_path / "h").meta
    assert meta["matvecs_this_session"] <= 37  # the plan is a bound
    # the result records what one product took, to set beside the estimate: the same magnitude on this machine
    assert per_product / 5 < meta["product_seconds_mean"] < per_product * 5, (per_product, meta)
