"""GLUE / SuperGLUE task registry and loaders for the task files (TSV, JSONL) or the Hugging Face hub.

A data directory holds ``glue/<Folder>/`` and ``superglue/<Folder>/`` with the files named in each
:class:`TaskSpec`. Every row becomes an :class:`Example` whose ``label`` is an index into
``TaskSpec.label_names`` (or a float score for the regression task STS-B). Every malformed input raises
:class:`~landscape.core.errors.DataError` naming the file and line.

Input choices for the SuperGLUE tasks that are not plain sentence pairs:

* WiC: ``text_a = f"{word}: {sentence1}"``, ``text_b = sentence2``.
* WSC: ``text_a`` is the text with span 1 marked ``*span1*`` and span 2 marked ``#span2#``;
  ``text_b = f"Does '{span2_text}' refer to '{span1_text}'?"``. See :func:`mark_wsc_spans`.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from landscape.core.errors import ConfigError, DataError

SPLITS = ("train", "dev")
DATA_DIR_ENV = "LANDSCAPE_DATA_DIR"
_NO_DATA_DIR = "no data directory: pass --data-dir or set LANDSCAPE_DATA_DIR (or install datasets for the hub)"


@dataclass(frozen=True)
class Example:
    """One labelled input: a sentence or sentence pair and its label."""

    text_a: str
    text_b: str | None  # None for single-sentence tasks
    label: int | float  # class index into TaskSpec.label_names, or float score (STS-B)
    guid: str  # "<file>:<1-based line>" or "<hub dataset>/<config>/<split>:<0-based record>"


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to find, parse and score one task."""

    name: str
    benchmark: str  # "glue" or "superglue"
    folder: str  # folder under <data_dir>/<benchmark>/
    files: Mapping[str, str] = field(hash=False)  # split -> file name
    label_names: tuple[str, ...]  # () for regression
    metric_names: tuple[str, ...]
    primary_metric: str
    hub_dataset: str
    hub_config: str
    hub_splits: Mapping[str, str] = field(hash=False)  # split -> hub split name
    # Input fields (TSV header names or JSON keys) in the files, in the order the builder expects.
    file_fields: tuple[str, ...] = ()
    file_label_field: str = "label"
    # Column names for a TSV file without a header row (CoLA); None means the file has a header.
    fixed_columns: tuple[str, ...] | None = None
    hub_fields: tuple[str, ...] = ()
    # Hub label name -> our label name, where the hub names its classes differently from the files.
    hub_label_aliases: Mapping[str, str] = field(default_factory=dict, hash=False)
    input_format: str = "plain"  # "plain", "wic" or "wsc": how fields become text_a / text_b
    label_range: tuple[float, float] | None = None  # allowed scores for regression

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def file_format(self) -> str:
        return "jsonl" if self.benchmark == "superglue" else "tsv"


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")
_BOOL = ("False", "True")
_GLUE_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
_SG_FILES = {"train": "train.jsonl", "dev": "val.jsonl"}
_HUB_SPLITS = {"train": "train", "dev": "validation"}


def _spec(
    name: str,
    benchmark: str,
    folder: str,
    label_names: tuple[str, ...],
    file_fields: tuple[str, ...],
    hub_fields: tuple[str, ...],
    *,
    metrics: tuple[str, ...] = ("accuracy",),
    primary: str = "accuracy",
    files: Mapping[str, str] | None = None,
    hub_config: str | None = None,
    hub_splits: Mapping[str, str] | None = None,
    **extra: Any,
) -> TaskSpec:
    glue = benchmark == "glue"
    aliases = extra.pop("hub_label_aliases", {})
    return TaskSpec(
        name=name,
        benchmark=benchmark,
        folder=folder,
        files=MappingProxyType(dict(files or (_GLUE_FILES if glue else _SG_FILES))),
        label_names=label_names,
        metric_names=metrics,
        primary_metric=primary,
        hub_dataset="nyu-mll/glue" if glue else "aps/super_glue",
        hub_config=hub_config or name,
        hub_splits=MappingProxyType(dict(hub_splits or _HUB_SPLITS)),
        file_fields=file_fields,
        hub_fields=hub_fields,
        hub_label_aliases=MappingProxyType(dict(aliases)),
        **extra,
    )


_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "cola",
            "glue",
            "CoLA",
            _BINARY,
            ("sentence",),
            ("sentence",),
            metrics=("mcc",),
            primary="mcc",
            fixed_columns=("source", "label", "original_label", "sentence"),
            hub_label_aliases={"unacceptable": "0", "acceptable": "1"},
        ),
        _spec(
            "sst2",
            "glue",
            "SST-2",
            _BINARY,
            ("sentence",),
            ("sentence",),
            hub_label_aliases={"negative": "0", "positive": "1"},
        ),
        _spec(
            "mrpc",
            "glue",
            "MRPC",
            _BINARY,
            ("#1 String", "#2 String"),
            ("sentence1", "sentence2"),
            metrics=("accuracy", "f1"),
            primary="f1",
            file_label_field="Quality",
            hub_label_aliases={"not_equivalent": "0", "equivalent": "1"},
        ),
        _spec(
            "stsb",
            "glue",
            "STS-B",
            (),
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            metrics=("pearson", "spearman"),
            primary="pearson",
            file_label_field="score",
            label_range=(0.0, 5.0),
        ),
        _spec(
            "qqp",
            "glue",
            "QQP",
            _BINARY,
            ("question1", "question2"),
            ("question1", "question2"),
            metrics=("accuracy", "f1"),
            primary="accuracy",
            file_label_field="is_duplicate",
            hub_label_aliases={"not_duplicate": "0", "duplicate": "1"},
        ),
        _spec(
            "mnli",
            "glue",
            "MNLI",
            _NLI3,
            ("sentence1", "sentence2"),
            ("premise", "hypothesis"),
            files={"train": "train.tsv", "dev": "dev_matched.tsv"},
            hub_splits={"train": "train", "dev": "validation_matched"},
            file_label_field="gold_label",
        ),
        _spec(
            "mnli-mm",
            "glue",
            "MNLI",
            _NLI3,
            ("sentence1", "sentence2"),
            ("premise", "hypothesis"),
            files={"train": "train.tsv", "dev": "dev_mismatched.tsv"},
            hub_config="mnli",
            hub_splits={"train": "train", "dev": "validation_mismatched"},
            file_label_field="gold_label",
        ),
        _spec("qnli", "glue", "QNLI", _NLI2, ("question", "sentence"), ("question", "sentence")),
        _spec("rte", "glue", "RTE", _NLI2, ("sentence1", "sentence2"), ("sentence1", "sentence2")),
        _spec(
            "wnli",
            "glue",
            "WNLI",
            _BINARY,
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            hub_label_aliases={"not_entailment": "0", "entailment": "1"},
        ),
        _spec("boolq", "superglue", "BoolQ", _BOOL, ("question", "passage"), ("question", "passage")),
        _spec(
            "cb",
            "superglue",
            "CB",
            _NLI3,
            ("premise", "hypothesis"),
            ("premise", "hypothesis"),
            metrics=("accuracy", "macro_f1"),
        ),
        _spec(
            "superglue-rte",
            "superglue",
            "RTE",
            _NLI2,
            ("premise", "hypothesis"),
            ("premise", "hypothesis"),
            hub_config="rte",
        ),
        _spec(
            "wic",
            "superglue",
            "WiC",
            _BOOL,
            ("word", "sentence1", "sentence2"),
            ("word", "sentence1", "sentence2"),
            input_format="wic",
        ),
        _spec(
            "wsc",
            "superglue",
            "WSC",
            _BOOL,
            ("text", "span1_index", "span2_index", "span1_text", "span2_text"),
            ("text", "span1_index", "span2_index", "span1_text", "span2_text"),
            # wsc.fixed corrects span indices of the original release; same examples and counts.
            hub_config="wsc.fixed",
            input_format="wsc",
        ),
    )
}

# Aliases after normalisation (lower case, "_" -> "-"), without any benchmark prefix.
_ALIASES = {
    "sst-2": "sst2",
    "sts-b": "stsb",
    "mnli-m": "mnli",
    "mnli-matched": "mnli",
    "mnli-mismatched": "mnli-mm",
}
_GLUE_PREFIXES = ("glue/", "glue-")
_SUPERGLUE_PREFIXES = ("superglue/", "superglue-", "super-glue/", "super-glue-", "sg/", "sg-")


def task_names() -> list[str]:
    """Canonical task names, GLUE first, in registry order."""
    return list(_TASKS)


def get_task(name: str) -> TaskSpec:
    """Look up a task by name, case-insensitively and with aliases ("SST-2", "sg-rte", "glue/rte")."""
    if not isinstance(name, str):
        raise DataError(f"task name must be a string, got {name!r}; known tasks: {', '.join(_TASKS)}")
    key = name.strip().lower().replace("_", "-")
    benchmark: str | None = None
    if key.startswith(_SUPERGLUE_PREFIXES):
        benchmark = "superglue"
        key = key.split("/", 1)[1] if "/" in key else key.split("-", 1)[1]
        if key.startswith("glue-"):  # "super-glue-x" split at its first "-"
            key = key[len("glue-") :]
        if key == "rte":
            key = "superglue-rte"
    elif key.startswith(_GLUE_PREFIXES):
        benchmark = "glue"
        key = key[len("glue/") :]
    key = _ALIASES.get(key, key)
    spec = _TASKS.get(key)
    if spec is None or (benchmark is not None and spec.benchmark != benchmark):
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(_TASKS)}")
    return spec


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """Return ``data_dir``, else ``$LANDSCAPE_DATA_DIR``, else None (meaning: use the hub)."""
    source = "data directory"
    if data_dir is None or str(data_dir) == "":
        env = os.environ.get(DATA_DIR_ENV, "")
        if not env:
            return None
        data_dir, source = env, f"{DATA_DIR_ENV}"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"{source} {str(path)!r} {what}; expected a folder holding glue/ and/or superglue/")
    return path


def load_split(task: TaskSpec, split: str, data_dir: Path | None) -> list[Example]:
    """Load one split ("train" or "dev") from ``data_dir``, or from the hub when ``data_dir`` is None."""
    if split not in task.files:
        raise ConfigError(f"unknown split {split!r} for task {task.name}; expected one of {list(task.files)}")
    if data_dir is None:
        return _load_hub(task, split)
    folder = Path(data_dir) / task.benchmark / task.folder
    if not folder.is_dir():
        raise DataError(
            f"task {task.name}: folder {str(folder)!r} not found (expected <data_dir>/{task.benchmark}/{task.folder}/)"
        )
    path = folder / task.files[split]
    if not path.is_file():
        raise DataError(f"task {task.name}: {split} file {str(path)!r} not found")
    records = _read_tsv(task, path) if task.file_format == "tsv" else _read_jsonl(path)
    examples = [
        record_to_example(
            task,
            record,
            f"{path.name}:{line}",
            where=f"{path}:{line}",
            fields=task.file_fields,
            label_field=task.file_label_field,
        )
        for line, record in records
    ]
    if not examples:
        raise DataError(f"{path} has no data rows; expected {task.name} {split} examples")
    return examples


def seeded_indices(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct positions of ``range(n)`` drawn with ``seed``, sorted, int64; ``k >= n`` means all of them.

    The one seeded subsample of the toolkit: training's ``train_fraction`` and the analyses' ``--samples`` both
    draw through it, so the same (n, k, seed) selects the same examples everywhere.
    """
    if k >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


def subsample_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded draw of ``round(fraction * n)`` distinct indices out of ``range(n)``, sorted."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not math.isfinite(fraction):
        raise ConfigError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    if n < 0:
        raise ConfigError(f"number of examples must be >= 0, got {n}")
    k = n if fraction == 1.0 else round(fraction * n)
    if k == 0:
        raise DataError(f"fraction {fraction} of {n} examples gives 0 examples; use a larger fraction")
    return seeded_indices(n, k, seed)


# ----------------------------------------------------------------------------------------------------------
# Record -> Example (shared by the TSV, JSONL and hub paths)


def record_to_example(
    task: TaskSpec,
    record: Mapping[str, Any],
    guid: str,
    *,
    where: str,
    fields: Sequence[str],
    label_field: str,
    label_names: Sequence[str] | None = None,
) -> Example:
    """Build an :class:`Example` from one record (TSV row as a dict, JSON object or hub record).

    ``fields`` are the input field names in the order the task's input format expects; ``label_names`` are
    the hub's class names when the record's label is an integer index into them.
    """
    values = []
    for name in (*fields, label_field):
        if name not in record:
            raise DataError(f"{where}: missing field {name!r}; expected fields {[*fields, label_field]}")
        values.append(record[name])
    *inputs, raw_label = values
    text_a, text_b = _build_inputs(task, inputs, where)
    return Example(text_a, text_b, _parse_label(task, raw_label, where, label_names), guid)


def _build_inputs(task: TaskSpec, inputs: list[Any], where: str) -> tuple[str, str | None]:
    if task.input_format == "wic":
        word, sentence1, sentence2 = (_text(v, where) for v in inputs)
        return f"{word}: {sentence1}", sentence2
    if task.input_format == "wsc":
        text, index1, index2, span1, span2 = inputs
        text, span1, span2 = _text(text, where), _text(span1, where), _text(span2, where)
        marked = mark_wsc_spans(text, _index(index1, where), span1, _index(index2, where), span2, where=where)
        return marked, f"Does '{span2}' refer to '{span1}'?"
    texts = [_text(v, where) for v in inputs]
    return texts[0], (texts[1] if len(texts) > 1 else None)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a text field, got {value!r}")
    return value


def _index(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: expected an integer span index, got {value!r}")
    return value


def _parse_label(task: TaskSpec, raw: Any, where: str, hub_names: Sequence[str] | None) -> int | float:
    if task.is_regression:
        return _parse_score(task, raw, where)
    if hub_names is not None and isinstance(raw, int) and not isinstance(raw, bool):
        if not 0 <= raw < len(hub_names):
            raise DataError(f"{where}: label {raw} is not a class index into {list(hub_names)} (unlabelled split?)")
        raw = hub_names[raw]
    if isinstance(raw, bool):
        raw = "True" if raw else "False"
    if isinstance(raw, str):
        name = raw.strip()
        name = task.hub_label_aliases.get(name, name)
        if task.label_names == _BOOL and name.lower() in ("true", "false"):
            name = name.capitalize()
        if name in task.label_names:
            return task.label_names.index(name)
    allowed = ", ".join(repr(n) for n in task.label_names)
    raise DataError(f"{where}: bad label {raw!r} for task {task.name}; expected one of {allowed}")


def _parse_score(task: TaskSpec, raw: Any, where: str) -> float:
    low, high = task.label_range or (-math.inf, math.inf)
    score: float | None = None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        score = float(raw)
    elif isinstance(raw, str):
        try:
            score = float(raw.strip())
        except ValueError:
            score = None
    if score is None or not math.isfinite(score) or not low <= score <= high:
        raise DataError(f"{where}: bad score {raw!r} for task {task.name}; expected a number in [{low:g}, {high:g}]")
    return score


def mark_wsc_spans(text: str, index1: int, span1: str, index2: int, span2: str, *, where: str = "") -> str:
    """Mark span 1 as ``*span*`` and span 2 as ``#span#`` inside ``text``.

    A span is located at its word index over ``text.split(" ")`` when the words there start with the span
    text (case-insensitively and ignoring whitespace differences: the released data capitalises "The" in
    the span but not in the text, and has a newline in one span); otherwise by its first whole-word
    occurrence, then its first substring occurrence. The marked characters are the text's own; nested
    spans give nested markers (``*#their# mothers*``).
    """
    regions = (
        _find_span(text, index1, span1, where, "span1"),
        _find_span(text, index2, span2, where, "span2"),
    )
    # Spans may nest (WSC val has span1 "their mothers" around span2 "their"), so insert the four markers in
    # position order, closing before opening at one position, outer spans opening first and closing last.
    inserts = []
    for order, ((start, end), mark) in enumerate(zip(regions, "*#", strict=True)):
        inserts.append((start, 1, start - end, order, mark))
        inserts.append((end, 0, end - start, -order, mark))
    pieces, previous = [], 0
    for position, *_, mark in sorted(inserts):
        pieces += [text[previous:position], mark]
        previous = position
    pieces.append(text[previous:])
    return "".join(pieces)


def _find_span(text: str, index: int, span: str, where: str, name: str) -> tuple[int, int]:
    words = span.split()
    if not words:
        raise DataError(f"{where}: WSC {name}_text is empty")
    body = r"\s+".join(re.escape(w) for w in words)
    starts = [0]
    for word in text.split(" "):
        starts.append(starts[-1] + len(word) + 1)
    if 0 <= index < len(starts) - 1:
        hit = re.compile(body, re.IGNORECASE).match(text, starts[index])
        if hit:
            return hit.span()
    # The index does not point at the span: fall back to searching for it, most specific pattern first.
    for pattern, flags in (
        (rf"(?<!\w){body}(?!\w)", 0),
        (rf"(?<!\w){body}(?!\w)", re.IGNORECASE),
        (body, 0),
        (body, re.IGNORECASE),
    ):
        hit = re.search(pattern, text, flags)
        if hit:
            return hit.span()
    raise DataError(f"{where}: WSC {name}_text {span!r} not found in text {text!r}")


# ----------------------------------------------------------------------------------------------------------
# File readers: yield (1-based line number, record dict)


def _read_tsv(task: TaskSpec, path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    needed = [*task.file_fields, task.file_label_field]
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = _guard_utf8(path, ((reader.line_num, row) for row in reader if row))
        header = task.fixed_columns
        if header is None:
            first = next(rows, None)
            if first is None:
                return
            header = tuple(first[1])
            missing = [name for name in needed if name not in header]
            if missing:
                raise DataError(f"{path}:{first[0]}: header lacks column(s) {missing}; header is {list(header)}")
        positions = [header.index(name) for name in needed]
        width = len(header)
        label_last = positions[-1] == width - 1
        for line, row in rows:
            if len(row) < width:
                raise DataError(f"{path}:{line} has {len(row)} columns, expected {width}")
            if len(row) > width:
                # Tolerate stray empty cells (RTE train has one before its label); anything else is corrupt.
                extra = row[width - 1 : -1] if label_last else row[width:]
                if any(cell != "" for cell in extra):
                    raise DataError(
                        f"{path}:{line} has {len(row)} columns, expected {width} "
                        f"(extra cells are only allowed when empty, got {extra!r})"
                    )
                if label_last:
                    row = [*row[: width - 1], row[-1]]
            yield line, {name: row[pos] for name, pos in zip(needed, positions, strict=True)}


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as handle:
        for line, text in _guard_utf8(path, enumerate(handle, start=1)):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
            target = record.get("target")
            if isinstance(target, dict):
                # WSC nests its span fields under "target"; the hub has them flat: flatten to share code.
                record = {**record, **target}
            yield line, record


def _open_text(path: Path):
    # newline="" so csv sees "\r\n" itself; utf-8-sig drops the BOM that MRPC starts with.
    return open(path, encoding="utf-8-sig", errors="strict", newline="")


def _guard_utf8(path: Path, items: Iterator[Any]) -> Iterator[Any]:
    """Re-raise a decoding error from ``items`` as a DataError with the file's line and byte offset."""
    try:
        yield from items
    except UnicodeDecodeError:
        line, offset = _locate_bad_utf8(path)
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {offset}); expected UTF-8 text") from None


def _locate_bad_utf8(path: Path) -> tuple[int, int]:
    # The text decoder reports offsets within its internal chunk, so rescan in binary to find the byte.
    offset = 0
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return line, offset + exc.start
            offset += len(raw)
    return 0, -1


# ----------------------------------------------------------------------------------------------------------
# Hugging Face hub


def _load_hub(task: TaskSpec, split: str) -> list[Example]:
    try:
        import datasets  # optional dependency, only needed without a data directory
    except ImportError:
        raise DataError(_NO_DATA_DIR) from None
    hub_split = task.hub_splits[split]
    source = f"{task.hub_dataset}/{task.hub_config}/{hub_split}"
    try:
        dataset = datasets.load_dataset(task.hub_dataset, task.hub_config, split=hub_split)
    except Exception as exc:  # offline, missing cache, renamed dataset: all mean "no data" to the user
        raise DataError(f"could not load {source} from the hub ({type(exc).__name__}: {exc}); {_NO_DATA_DIR}") from exc
    return examples_from_hub(task, dataset, source)


def examples_from_hub(task: TaskSpec, dataset: Any, source: str) -> list[Example]:
    """Convert a loaded hub dataset (iterable of dict records with ``features``) to examples."""
    label_feature = dataset.features.get("label")
    hub_names: list[str] | None = getattr(label_feature, "names", None)
    examples = [
        record_to_example(
            task,
            record,
            f"{source}:{i}",
            where=f"{source} record {i}",
            fields=task.hub_fields,
            label_field="label",
            label_names=hub_names,
        )
        for i, record in enumerate(dataset)
    ]
    if not examples:
        raise DataError(f"{source} on the hub has no records; expected {task.name} examples")
    return examples
