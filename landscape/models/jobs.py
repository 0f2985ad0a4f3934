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

    def __post_init__(self) -> None:
        check_selection(split=self.split, samples=self.samples, batch_size=self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def open_run(self, path: str | Path) -> Run:
        """The run at ``path`` with this selection's task and data-directory overrides."""
        return open_run(path, task=self.task, data_dir=self.data_dir)

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
