"""`landscape demo --quick` end to end on the tiny BERT: every stage runs, the report exists, a rerun skips all."""

from __future__ import annotations

import json

from landscape.cli.main import main
from landscape.demo import OPTIMIZERS


def test_quick_demo_end_to_end_then_a_rerun_skips_every_stage(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir), "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr()
    report = out / "report.html"
    assert f"report written to {report}" in first.out
    html = report.read_text(encoding="utf-8")
    for name, _ in OPTIMIZERS:
        run = out / "runs" / name
        config = json.loads((run / "run.json").read_text())["config"]
        assert (run / "final.safetensors").is_file()
        assert config["sam"] == {"adamw": "none"}.get(name, name)
        for analysis in ("interpolation", "surface", "hessian", "fisher", "sharpness"):
            meta = json.loads((run / "analyses" / analysis / "meta.json").read_text())
            assert meta.get("complete", True), (name, analysis)
        assert f"adamw+{name}" in html or name == "adamw"
    assert any(path.suffix == ".pdf" for path in (out / "figures").iterdir())

    assert main(args) == 0
    second = capsys.readouterr().err
    skipped = [line for line in second.splitlines() if line.endswith("already done, skipped")]
    assert len(skipped) == 4 * 6  # four trainings and five analyses of each run
