"""Reading what the figures show: result directories (``result.npz`` + ``meta.json``) and run directories
(``run.json``, ``metrics.jsonl``, and their analyses under ``RUN/analyses/<name>/``), as docs/results.md defines them.

Nothing here imports model code: results come through :func:`landscape.core.results.load_result` (numpy and JSON only).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from figures.style import run_label
from landscape.core.errors import CheckpointError, ConfigError, LandscapeError
from landscape.core.results import META_FILE, Result, load_result
from landscape.core.rundir import ANALYSES_DIR, RUN_FILE, TRIALS_DIR, read_metrics, read_run_info

KINDS = ("surface", "interpolation", "hessian", "fisher", "sharpness", "transfer")


def primary_metric(task: str | None, available: Iterable[str]) -> str | None:
    """The task's primary metric (``mcc`` for CoLA, ``f1`` for MRPC, …) if ``available`` has it, else the first
    available name that is not ``loss``; None when there is none."""
    names = [name for name in available if name != "loss"]
    if task:
        try:
            from landscape.data.tasks import get_task  # the task registry: numpy and the standard library only

            name = get_task(task).primary_metric
        except LandscapeError:
            name = None
        if name in names:
            return name
    return names[0] if names else None


@dataclass(frozen=True, eq=False)
class RunRecord:
    """A training run as its files describe it: ``run.json`` (``info``) and the records of ``metrics.jsonl``."""

    path: Path
    info: Mapping[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config(self) -> Mapping[str, Any]:
        return self.info.get("config", {})

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """``optimizer+sam`` (``adamw+fsam``), or ``optimizer`` alone for plain runs."""
        return run_label(self.config.get("optimizer"), self.config.get("sam"))

    @property
    def task(self) -> str:
        return str(self.info.get("task") or self.config.get("task") or "?")

    @property
    def dev_metrics(self) -> dict[str, float]:
        return dict(self.info.get("dev_metrics") or {})

    @property
    def metric_name(self) -> str | None:
        """The primary dev metric of the run's task, among those the run recorded."""
        names = list(self.dev_metrics)
        for record in self.records:
            if record.get("kind") == "eval":
                names += [key for key in record if key not in names]
        names = [n for n in names if n not in ("kind", "step", "split", "epoch")]
        return primary_metric(self.task, names)

    def records_of(self, kind: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record.get("kind") == kind]

    @property
    def uses_fisher_mask(self) -> bool:
        return self.config.get("sam") == "fsam" or bool(self.config.get("fisher_mask"))


@dataclass(frozen=True, eq=False)
class ResultRecord:
    """One analysis result and where it came from."""

    path: Path
    result: Result

    @property
    def kind(self) -> str:
        return self.result.kind

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.result.meta

    @property
    def arrays(self) -> Mapping[str, Any]:
        return self.result.arrays

    @property
    def run(self) -> Mapping[str, Any]:
        """``meta["run"]``: the analysed run's ``path``, ``label``, ``task``, ``optimizer``, ``sam``, ``seed``."""
        run = self.meta.get("run") or self.meta.get("source") or {}
        return run if isinstance(run, Mapping) else {}

    @property
    def label(self) -> str:
        if self.run.get("label"):
            return str(self.run["label"])
        if self.run.get("optimizer"):
            return run_label(self.run.get("optimizer"), self.run.get("sam"))
        return self.path.name

    @property
    def run_name(self) -> str:
        """The analysed run's folder name, else the label."""
        return Path(str(self.run["path"])).name if self.run.get("path") else self.label

    @property
    def task(self) -> str:
        data = self.meta.get("data") or {}
        return str(data.get("task") or self.run.get("task") or "?")

    @property
    def metric_name(self) -> str:
        return str(self.meta.get("metric_name") or "metric")

    @property
    def name(self) -> str:
        """``<run>.<result folder>``: unique enough for file names and headings."""
        return f"{self.run_name}.{self.path.name}"


@dataclass
class Collection:
    """Everything found under the paths given to ``landscape figures`` / ``landscape report``."""

    runs: list[RunRecord] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[ResultRecord]:
        return [record for record in self.results if record.kind == kind]

    def surfaces(self, dims: int) -> list[ResultRecord]:
        return [r for r in self.of_kind("surface") if ("b" in r.arrays) == (dims == 2)]


def read_run(path: str | os.PathLike[str]) -> RunRecord:
    """Read a run directory's ``run.json`` and, when present, ``metrics.jsonl``."""
    path = Path(path)
    info = read_run_info(path)
    records = read_metrics(path)
    return RunRecord(path, info, records)


def read_result(path: str | os.PathLike[str], kind: str | None = None) -> ResultRecord:
    """Load a result directory (checked against its digest); with ``kind``, refuse a result of another kind."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path} has no {META_FILE}; expected a result directory (result.npz + meta.json)")
    record = ResultRecord(path, load_result(path))
    if kind is not None and record.kind != kind:
        raise ConfigError(f"{path} holds a {record.kind!r} result; expected a {kind!r} result")
    if record.kind not in KINDS:
        raise ConfigError(f"{path} holds a result of unknown kind {record.kind!r}; expected one of {', '.join(KINDS)}")
    return record


def collect(paths: Iterable[str | os.PathLike[str]]) -> Collection:
    """Read every run directory (with its ``analyses/*/`` results) and result directory in ``paths``."""
    collection = Collection()
    seen: set[Path] = set()
    paths = list(paths)
    if not paths:
        raise ConfigError("no input: give run directories (with run.json) or result directories (with meta.json)")
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist; expected a run directory or a result directory")
        if not path.is_dir():
            raise ConfigError(
                f"{path} is a file; expected a run directory (run.json) or a result directory (result.npz + meta.json)"
            )
        if (path / RUN_FILE).is_file():
            _add_run(collection, path, seen)
        elif (path / TRIALS_DIR).is_dir():  # a sweep: each trial is a run directory
            for trial in sorted(p for p in (path / TRIALS_DIR).iterdir() if (p / RUN_FILE).is_file()):
                _add_run(collection, trial, seen)
        elif (path / META_FILE).is_file():
            if path.resolve() not in seen:
                seen.add(path.resolve())
                collection.results.append(read_result(path))
        else:
            raise ConfigError(
                f"{path} is neither a run directory (no {RUN_FILE}), a sweep (no {TRIALS_DIR}/) nor a result "
                f"directory (no {META_FILE})"
            )
    return collection


def _add_run(collection: Collection, path: Path, seen: set[Path]) -> None:
    """A run directory and the results in its ``analyses/`` folder, each once."""
    if path.resolve() in seen:
        return
    seen.add(path.resolve())
    collection.runs.append(read_run(path))
    analyses = path / ANALYSES_DIR
    if analyses.is_dir():
        for child in sorted(analyses.iterdir()):
            if (child / META_FILE).is_file() and child.resolve() not in seen:
                seen.add(child.resolve())
                collection.results.append(read_result(child))


def group_by_task(records: Iterable[Any]) -> dict[str, list[Any]]:
    """Records (runs or results) grouped by task, in first-seen order."""
    groups: dict[str, list[Any]] = {}
    for record in records:
        groups.setdefault(record.task, []).append(record)
    return groups


def as_result_record(source: ResultRecord | Result | str | os.PathLike[str], kind: str) -> ResultRecord:
    """A :class:`ResultRecord` of ``kind`` from a record, an in-memory :class:`Result` or a result directory."""
    if isinstance(source, ResultRecord):
        record = source
    elif isinstance(source, Result):
        record = ResultRecord(Path(str(source.meta.get("kind", kind))), source)
    else:
        return read_result(source, kind)
    if record.kind != kind:
        raise ConfigError(f"{record.path} holds a {record.kind!r} result; expected a {kind!r} result")
    return record


def as_run_record(source: RunRecord | str | os.PathLike[str]) -> RunRecord:
    """A :class:`RunRecord` from a record or a run directory."""
    return source if isinstance(source, RunRecord) else read_run(source)


def legend_labels(records: Iterable[Any]) -> list[str]:
    """Each record's optimizer label, with its run name added where two records share a label."""
    records = list(records)
    labels = [record.label for record in records]
    names = [getattr(record, "run_name", None) or record.name for record in records]
    return [
        f"{label} ({name})" if labels.count(label) > 1 else label for label, name in zip(labels, names, strict=True)
    ]
