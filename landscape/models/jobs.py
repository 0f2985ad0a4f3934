"""The skeleton every analysis command goes through: which examples (:class:`DataSelection`), and one result
directory whose identity decides between resuming and refusing (:class:`AnalysisJob`).

An analysis (surface, interpolation, Hessian, Fisher, sharpness) opens a run, loads its weights, selects a
:class:`DataSelection`'s examples, states an ``identity`` (every parameter that determines its values: checkpoint
content hash, data, options), then either finds the result already complete, resumes an incomplete one, or starts;
it saves through the job, which adds the identity, the completion flag and the wall time accumulated over sessions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landscape.core.errors import ConfigError
from landscape.core.results import Result, resume_or_start, save_result
from landscape.core.rundir import ANALYSES_DIR, RUN_FILE, has_run
from landscape.models.adapters import check_subspace
from landscape.models.runs import EvalSubset, Run, check_selection, open_run, select_subset


@dataclass(frozen=True)
class DataSelection:
    """Which examples an analysis evaluates on: ``samples`` examples of ``split`` drawn with ``seed``.

    ``samples`` None (or at least the split's size) means the whole split. ``task`` / ``data_dir`` override the
    run's own (a task with the same number of labels). ``seed`` also seeds the analysis' own random draws
    (directions, probe vectors), as ``--seed`` does on the command line. ``batch_size`` only groups the forward
    passes: every example weighs the same in a mean whatever the batches.
    """

    split: str = "dev"
    samples: int | None = 256
    seed: int = 0
    task: str | None = None
    data_dir: str | Path | None = None
    batch_size: int = 32
    subspace: str = "full"  # a PEFT adapter folder's parameters: merged into the base (full) or its own (adapter)

    def __post_init__(self) -> None:
        check_selection(split=self.split, samples=self.samples, batch_size=self.batch_size)
        check_subspace(self.subspace)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def open_run(self, path: str | Path) -> Run:
        """The run at ``path`` with this selection's task and data-directory overrides."""
        return open_run(path, task=self.task, data_dir=self.data_dir, subspace=self.subspace)

    def subset(self, run: Run, tokenizer: Any) -> EvalSubset:
        """The selected examples of ``run``'s data, tokenized once and batched."""
        return select_subset(
            run, tokenizer, split=self.split, samples=self.samples, seed=self.seed, batch_size=self.batch_size
        )


class AnalysisJob:
    """One analysis result directory ``out`` of ``kind``, keyed by ``identity``.

    On construction a result of the same identity already in ``out`` is found (:attr:`existing`, complete or
    not) and one of other parameters is refused with :class:`ConfigError` unless ``overwrite`` (which deletes
    it). :meth:`save` writes atomically, with ``identity``, ``complete`` and ``wall_time_s`` (this session's time
    plus that of the sessions the result was resumed from).
    """

    def __init__(self, kind: str, out: str | Path, identity: Mapping[str, Any], *, overwrite: bool = False) -> None:
        self.kind = kind
        self.out = Path(out)
        if has_run(self.out):  # result files mixed into a run's own would be read back as neither
            raise ConfigError(
                f"--out {self.out} is a run directory (it holds {RUN_FILE}); write the {kind} result to a folder "
                f"of its own, e.g. {self.out / ANALYSES_DIR / kind}"
            )
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a directory; expected a result directory")
        self.identity = dict(identity)
        self.existing: Result | None = resume_or_start(self.out, kind, self.identity, overwrite=overwrite)
        previous = 0.0 if self.existing is None else float(self.existing.meta.get("wall_time_s", 0.0))
        self._offset = 0.0 if self.complete is not None else previous
        self._started = time.perf_counter()

    @property
    def complete(self) -> Result | None:
        """The result already complete in ``out`` with this identity (nothing to compute), else None."""
        return self.existing if self.existing is not None and self.existing.meta.get("complete") else None

    def wall_time(self) -> float:
        """Seconds spent on this result: this session's and those of the sessions it resumed."""
        return self._offset + time.perf_counter() - self._started

    def save(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, complete: bool = True) -> Result:
        """Write ``arrays`` and ``meta`` (plus identity, completion, wall time) to ``out``; return the result."""
        full = {**meta, "identity": self.identity, "complete": complete, "wall_time_s": self.wall_time()}
        return save_result(Result(self.kind, dict(arrays), full), self.out)

    def progress(self, *, every_seconds: float = 60.0) -> Progress:
        """The finished units (and the partial state) of an incomplete result of this identity, for resuming."""
        return Progress(self, every_seconds=every_seconds)


def evaluation_arrays(evaluation: Any) -> dict[str, np.ndarray]:
    """An :func:`~landscape.models.runs.evaluate_subset` result as a progress unit's arrays."""
    return {
        "loss": np.float64(evaluation.loss),
        "metric": np.float64(evaluation.metric),
        "metric_name": np.asarray(evaluation.metric_name),
    }


def evaluation_meta(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The ``loss``, ``metric`` and ``metric_name`` entries of a result's meta from :func:`evaluation_arrays`."""
    return {"loss": float(arrays["loss"]), "metric": float(arrays["metric"]), "metric_name": str(arrays["metric_name"])}


class NoProgress:
    """The :class:`Progress` interface for a computation that keeps nothing (a direct API call): every unit runs."""

    resumed_units = 0

    def unit(self, name: str, compute: Any) -> dict[str, np.ndarray]:
        return {key: np.asarray(value) for key, value in compute().items()}

    def partial(self, name: str) -> None:
        return None

    def keep(self, name: str, state: Any) -> None:
        return None


UNIT_PREFIX = "unit--"
PARTIAL_PREFIX = "partial--"
SEPARATOR = "--"  # result array names allow letters, digits, _ . - only; no parameter name holds "--"


class Progress:
    """What an analysis that writes once at the end has finished so far, kept in its result directory as an
    incomplete result, so that a rerun after a kill skips it and gives bitwise the uninterrupted arrays.

    A *unit* is a named group of arrays computed by a deterministic function of the inputs (one ρ's sharpness, the
    eigenpairs, the trace): :meth:`unit` returns the stored arrays of a finished unit or computes and stores them.
    A unit may keep a *partial state* while it runs (the Lanczos basis, a Fisher's running sums, Hutchinson's
    samples and generator state): :meth:`keep` stores it at most every ``every_seconds`` (0: at every call), and
    :meth:`partial` hands it back to the rerun, which continues from it. The arrays on disk are the truth (a kill
    between the two renames of a save leaves arrays newer than the meta; they are used).
    """

    def __init__(self, job: AnalysisJob, *, every_seconds: float) -> None:
        if not every_seconds >= 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 seconds, got {every_seconds}")
        self.job = job
        self.every_seconds = every_seconds
        stored = {} if job.existing is None or job.complete is not None else job.existing.arrays
        self.units: dict[str, dict[str, np.ndarray]] = {}
        self._partial: tuple[str, dict[str, np.ndarray]] | None = None
        partial: dict[str, dict[str, np.ndarray]] = {}
        for key, value in stored.items():
            for prefix, into in ((UNIT_PREFIX, self.units), (PARTIAL_PREFIX, partial)):
                if key.startswith(prefix):
                    unit, _, name = key[len(prefix) :].partition(SEPARATOR)
                    into.setdefault(unit, {})[name] = value
        if partial:
            name, arrays = next(iter(partial.items()))
            self._partial = (name, arrays)
        self.resumed_units = len(self.units) + (self._partial is not None)
        self._last_save = time.perf_counter()

    def unit(self, name: str, compute: Any) -> dict[str, np.ndarray]:
        """The arrays of unit ``name``: stored ones, or ``compute()``'s (a dict of arrays), stored now."""
        if name in self.units:
            return self.units[name]
        arrays = {key: np.asarray(value) for key, value in compute().items()}
        self.units[name] = arrays
        if self._partial is not None and self._partial[0] == name:
            self._partial = None
        self._save()
        return arrays

    def partial(self, name: str) -> dict[str, np.ndarray] | None:
        """The partial state unit ``name`` kept before the kill (None: start it afresh)."""
        return self._partial[1] if self._partial is not None and self._partial[0] == name else None

    def keep(self, name: str, state: Any) -> None:
        """Store the partial state of unit ``name`` if ``every_seconds`` passed since the last save.

        ``state`` is a callable returning the dict of arrays, so that nothing is built when nothing is saved.
        """
        if time.perf_counter() - self._last_save < self.every_seconds:
            return
        self._partial = (name, {key: np.asarray(value) for key, value in state().items()})
        self._save()

    def _save(self) -> None:
        arrays = {
            f"{UNIT_PREFIX}{unit}{SEPARATOR}{key}": value
            for unit, group in self.units.items()
            for key, value in group.items()
        }
        if self._partial is not None:
            unit, group = self._partial
            arrays.update({f"{PARTIAL_PREFIX}{unit}{SEPARATOR}{key}": value for key, value in group.items()})
        meta = {
            "progress": {"units": sorted(self.units), "partial": None if self._partial is None else self._partial[0]}
        }
        self.job.save(arrays, meta, complete=False)
        self._last_save = time.perf_counter()
