"""``landscape sweep`` and ``landscape table`` on a tiny model: trials and names, skip-done, an isolated failure,
analyses of each trial, and a table equal to a hand computation from the runs' metrics.jsonl."""

import json

import numpy as np
import pytest
import yaml
from helpers import exit_status, kill_9_when

from analyses.sweep import cost_key, plan, read_spec
from figures.tables import build_table, format_table
from landscape.cli.main import main
from landscape.core.errors import ConfigError


def write_spec(path, tiny_model_dir, tiny_data_dir, without=(), **sections):
    base = {"task": "sst2", "model": str(tiny_model_dir), "data_dir": str(tiny_data_dir), "lr": 1e-3,
            "batch_size": 8, "max_steps": 3, "save_every": 100, "dropout": 0.0}  # fmt: skip
    base = {key: value for key, value in base.items() if key not in without}
    path.write_text(yaml.safe_dump({"base": base, **sections}))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root / "spec.yaml", tiny_model_dir, tiny_data_dir, grid={"sam": ["none", "sam"], "seed": [1, 2]},
                      analyses={"sharpness": {"rho": 0.01, "sigma": 0.01, "pgd_steps": 1, "samples": 4}})  # fmt: skip
    assert main(["sweep", str(spec), "--out", str(root / "out")]) == 0
    return spec, root / "out"


def test_every_trial_is_a_named_run_with_its_analyses(sweep):
    _, out = sweep
    record = json.loads((out / "sweep.json").read_text())
    assert list(record["trials"]) == ["sam=none,seed=1", "sam=none,seed=2", "sam=sam,seed=1", "sam=sam,seed=2"]
    assert all(t["status"] == "completed" for t in record["trials"].values())
    for name in record["trials"]:
        config = json.loads((out / "trials" / name / "run.json").read_text())["config"]
        assert f"sam={config['sam']},seed={config['seed']}" == name
        assert (out / "trials" / name / "analyses" / "sharpness" / "meta.json").is_file()


def test_a_rerun_skips_finished_trials(sweep, capsys):
    spec, out = sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/final.safetensors")}
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/final.safetensors")} == before
    assert main(["sweep", str(spec), "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count(": done,") == 4


def test_the_table_is_the_hand_computed_mean_and_std_of_the_runs_records(sweep, capsys):
    _, out = sweep
    expected = {}
    for sam in ("none", "sam"):
        values = []
        for seed in (1, 2):
            lines = (out / "trials" / f"sam={sam},seed={seed}" / "metrics.jsonl").read_text().splitlines()
            evals = [json.loads(line) for line in lines if json.loads(line)["kind"] == "eval"]
            values.append(evals[-1]["accuracy"])
        expected[sam] = (np.mean(values), np.std(values, ddof=1))
    table = build_table([out], rows="task", cols="sam", baseline="none")
    for sam, (mean, std) in expected.items():
        cell = table.cells["sst2", sam]
        assert cell.mean == pytest.approx(mean) and (
            cell.std == pytest.approx(std) or np.isnan(std) == np.isnan(cell.std)
        )
    assert table.average("sst2") == pytest.approx((expected["none"][0] + expected["sam"][0]) / 2)
    assert main(["table", str(out), "--baseline", "none"]) == 0
    text = capsys.readouterr().out
    assert f"{100 * expected['none'][0]:.1f}" in text and "(n=2)" in text and "Δ" in text
    assert format_table(table, "latex").count("\\\\") == 2 and format_table(table, "csv").count("\n") == 2


def test_two_runs_of_one_cell_and_seed_are_refused_and_combined_columns_separate_them(sweep):
    """Keeping either run (or averaging them as seeds) would hide one: SAM and efficient SAM under --cols sam."""
    _, out = sweep
    with pytest.raises(ConfigError, match=r"fall in one cell \(task=sst2, optimizer=adamw, seed 1\) but differ in sam"):
        build_table([out], rows="task", cols="optimizer")
    table = build_table([out], rows="task", cols="sam,seed")
    assert sorted(table.cols) == ["none/1", "none/2", "sam/1", "sam/2"]
    assert all(len(table.cells["sst2", col].values) == 1 for col in table.cols)


def test_a_metric_no_run_recorded_names_the_ones_they_did(sweep, capsys):
    """Not "baseline ... expected one of []": the empty table's cause is the metric (CoLA records mcc only)."""
    _, out = sweep
    with pytest.raises(ConfigError, match=r"no completed run has a dev mcc; expected --metric to be one of accuracy$"):
        build_table([out], metric="mcc", baseline="none")
    assert main(["table", str(out), "--metric", "mcc"]) == 2
    assert "landscape table: error: no completed run has a dev mcc" in capsys.readouterr().err


def test_a_failing_trial_is_recorded_and_the_others_run(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, tiny_data_dir, without=("task",),
                      grid={"task": ["cola", "sst2"]})  # fmt: skip
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 1  # cola's data is not in the tiny data dir
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert record["trials"]["task=cola"]["status"] == "failed" and "CoLA" in record["trials"]["task=cola"]["error"]
    assert record["trials"]["task=sst2"]["status"] == "completed"
    capsys.readouterr()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"grid": {"seed": [1]}, "grids": {}}, "unknown key 'grids'"),
        ({"zip": {"seed": [1, 2], "lr": [1e-3]}}, "different lengths"),
        ({"grid": {"seed": []}}, "non-empty list"),
        ({"grid": {"lr": [1e-3]}}, "set twice"),
        ({"grid": {"rho": [-1.0]}}, "rho must be >= 0"),
        ({"analyses": {"surfaces": {}}}, "analysis 'surfaces' is unknown"),
    ],
)
def test_bad_specs_are_one_line(sections, message, tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, tiny_data_dir, **sections)
    assert exit_status(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_kill_9_mid_sweep_then_rerun_finishes_with_the_uninterrupted_weights(tmp_path, tiny_model_dir, tiny_data_dir):

    from safetensors.torch import load_file

    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, tiny_data_dir, grid={"seed": [1, 2, 3]})
    text = yaml.safe_load(spec.read_text())
    text["base"].update(max_steps=40, save_every=4)
    spec.write_text(yaml.safe_dump(text))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    second = out / "trials" / "seed=2" / "checkpoints"
    kill_9_when(["sweep", str(spec), "--out", str(out)],
                lambda: second.is_dir() and any(p.name.startswith("step-") for p in second.iterdir()))  # fmt: skip
    assert (out / "trials" / "seed=1" / "final.safetensors").is_file()  # the first trial had finished
    assert not (out / "trials" / "seed=2" / "final.safetensors").exists()  # the second was mid-run
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert all(t["status"] == "completed" for t in record["trials"].values())
    for name in ("seed=1", "seed=2", "seed=3"):
        a = load_file(str(out / "trials" / name / "final.safetensors"))
        b = load_file(str(tmp_path / "straight" / "trials" / name / "final.safetensors"))
        assert all(bool((a[k] == b[k]).all()) for k in a), name  # the resumed trial bitwise as the straight one
    resumed = json.loads((out / "trials" / "seed=2" / "run.json").read_text())
    assert resumed["resumed_from"] >= 4


def test_ray_runs_the_trials_as_the_serial_executor_does(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'landscape[ray]')")
    from safetensors.torch import load_file

    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, tiny_data_dir, grid={"sam": ["none", "sam"]},
                      analyses={"sharpness": {"rho": 0.01, "sigma": 0.01, "pgd_steps": 1, "samples": 4}})  # fmt: skip
    assert main(["sweep", str(spec), "--out", str(tmp_path / "serial")]) == 0
    ray_args = ["sweep", str(spec), "--out", str(tmp_path / "ray"), "--executor", "ray", "--cpus-per-trial", "1"]
    assert main(ray_args) == 0
    printed = capsys.readouterr().out
    assert "[2/2]" in printed and "0 to go" in printed
    serial = json.loads((tmp_path / "serial" / "sweep.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    assert list(on_ray["trials"]) == list(serial["trials"])  # the spec's order, whatever order they finished in
    for name in serial["trials"]:
        assert on_ray["trials"][name]["status"] == "completed"
        a = load_file(str(tmp_path / "ray" / "trials" / name / "final.safetensors"))
        b = load_file(str(tmp_path / "serial" / "trials" / name / "final.safetensors"))
        # one torch thread on a worker, two here: float32 reductions in another order, nothing more
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, name
        assert (tmp_path / "ray" / "trials" / name / "analyses" / "sharpness" / "meta.json").is_file()
    assert exit_status(["sweep", str(spec), "--out", str(tmp_path / "x"), "--gpus-per-trial", "1"]) == 2
    assert "only for --executor ray" in capsys.readouterr().err


def test_the_report_of_a_sweep_puts_its_table_and_the_sharpness_figure_first(sweep, tmp_path, capsys):
    _, out = sweep
    page = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(page)]) == 0
    capsys.readouterr()
    text = page.read_text()
    table, metrics, figure = (text.index(marker) for marker in ("over seeds</h2>", "<h2>Metrics", "sharpness-vs-dev"))
    assert table < metrics < figure
    assert text.count("(n=2)") == 2  # two seeds in each of the two cells (sam none, sam sam)
    first_figure = text.index("<figure")
    assert text.index('id="sharpness-vs-dev-metric"') == first_figure + len("<figure ")


def test_a_dry_run_times_two_steps_of_each_cost_without_a_finished_trial(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                         capsys):  # fmt: skip
    """Seeds share one timing; efficient SAM (ascent on a quarter of the batch) is not SAM's cost: timed apart."""
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, tiny_data_dir, grid={"seed": [1, 2]},
                      zip={"sam": ["none", "sam", "sam"], "ascent_fraction": [1.0, 1.0, 0.25]})  # fmt: skip
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("s/step, timed now)") == 6 and "6 trials, 6 to train, ~" in printed
    rows = plan(read_spec(spec), out)
    assert len({cost_key(row["config"]) for row in rows}) == 3  # none, SAM, efficient SAM; not 2, not 6
    assert not (out / "trials").exists() and not (out / "sweep.json").exists()  # nothing trained or recorded
