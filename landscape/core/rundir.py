"""A run directory's files, without torch: names, ``run.json`` reading, completeness, ``metrics.jsonl``.

Every command that reads a run (the analyses' context, eval, training's resume, transfer, figures, the report, the
demo) goes through this module, so a missing, corrupt or foreign ``run.json`` gives the same one-line error
everywhere and "is this run complete?" is decided in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from landscape.core.atomic import write_text
from landscape.core.errors import CheckpointError

RUN_FILE = "run.json"
INIT_WEIGHTS = "init.safetensors"
FINAL_WEIGHTS = "final.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ANALYSES_DIR = "analyses"
RUN_FILES = (RUN_FILE, INIT_WEIGHTS, FINAL_WEIGHTS, METRICS_FILE, CHECKPOINTS_DIR, ANALYSES_DIR)
COMPLETED = "completed"
DIVERGED = "diverged"
SWEEP_FILE = "sweep.json"  # a sweep directory: its record, and its trials' run directories under TRIALS_DIR
TRIALS_DIR = "trials"  # the loss, weights or dev metrics became non-finite; see run.json's "diverged"


#: options renamed since runs were first written: old name -> current name
RENAMED_OPTIONS = {"beta": "delta_beta"}


#: options added since runs were first written whose earlier behaviour is not their default: name -> that behaviour
EARLIER_BEHAVIOUR = {"delta_weights": "literal"}


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config dict in today's terms (a copy): renamed options under their current names, and options
    added later set to what the run actually did (so ``--resume`` of an old δ-SAM run asks for ``literal``)."""
    upgraded = dict(config)
    for old, new in RENAMED_OPTIONS.items():
        if old in upgraded and new not in upgraded:
            upgraded[new] = upgraded.pop(old)
    for name, behaviour in EARLIER_BEHAVIOUR.items():
        upgraded.setdefault(name, behaviour)
    return upgraded


def has_run(path: str | os.PathLike[str]) -> bool:
    """``path`` is a folder holding a ``run.json`` (complete or not)."""
    return (Path(path) / RUN_FILE).is_file()


def read_run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``path/run.json`` as a dict with a ``config`` dict; a missing or malformed file is a :class:`CheckpointError`."""
    path = Path(path)
    run_file = path / RUN_FILE
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist; expected the --out folder of landscape train")
    if not run_file.is_file():
        raise CheckpointError(
            f"{path} has no {RUN_FILE}; expected the --out folder of landscape train or a model checkpoint folder "
            "(config.json and safetensors weights)"
        )
    try:
        info = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{run_file} is not readable JSON: {str(exc).splitlines()[0]}") from exc
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise CheckpointError(f"{run_file} is not a run.json written by landscape train: it needs a 'config' object")
    return info


def is_complete(path: str | os.PathLike[str], info: dict[str, Any] | None = None) -> bool:
    """The run finished: ``run.json`` says ``completed`` and ``final.safetensors`` exists."""
    path = Path(path)
    if info is None:
        if not has_run(path):
            return False
        info = read_run_info(path)
    return info.get("status") == COMPLETED and (path / FINAL_WEIGHTS).is_file()


def find_run_dir(start: str | os.PathLike[str], depth: int = 4) -> Path | None:
    """The run directory that ``start`` (a file or a folder inside a run) belongs to, looking ``depth`` levels up."""
    start = Path(start)
    folder = start if start.is_dir() else start.parent
    for candidate in [folder, *folder.parents][:depth]:
        if has_run(candidate):
            return candidate
    return None


def read_metrics(path: str | os.PathLike[str], *, strict: bool = True) -> list[dict[str, Any]]:
    """The records of the run directory ``path``'s ``metrics.jsonl`` (none when absent); see :func:`read_records`."""
    return read_records(Path(path) / METRICS_FILE, strict=strict)


def read_records(metrics_file: Path, *, strict: bool = True) -> list[dict[str, Any]]:
    """The JSON records of a JSON-lines file (none when absent). ``strict``: a malformed line is an error;
    otherwise it is skipped (a torn last line after a kill)."""
    if not metrics_file.is_file():
        return []
    records = []
    for number, line in enumerate(metrics_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise CheckpointError(f"{metrics_file}:{number} is not a JSON record: {exc.msg}") from exc
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (keys sorted), appended and flushed after each record."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (and drop a torn last line), rewriting the file atomically."""
        if not self.path.exists():
            return
        kept = [r for r in read_records(self.path, strict=False) if r.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
