"""Task registry, file loaders (every format quirk and failure), hub conversion and subsampling."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from landscape.core.errors import ConfigError, DataError
from landscape.data.tasks import (
    Example,
    get_task,
    load_split,
    mark_wsc_spans,
    resolve_data_dir,
    subsample_indices,
    task_names,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

ALL_TASKS = [
    "cola",
    "sst2",
    "mrpc",
    "stsb",
    "qqp",
    "mnli",
    "mnli-mm",
    "qnli",
    "rte",
    "wnli",
    "boolq",
    "cb",
    "superglue-rte",
    "wic",
    "wsc",
]


def put(root: Path, rel: str, content: str | bytes) -> Path:
    """Write a data file under ``root`` (text is written as UTF-8 without newline translation)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------------------------------------
# Registry


def test_task_names_are_the_fifteen_tasks():
    assert task_names() == ALL_TASKS


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("SST-2", "sst2"),
        ("sst2", "sst2"),
        ("sts-b", "stsb"),
        ("STS-B", "stsb"),
        ("mnli-m", "mnli"),
        ("MNLI", "mnli"),
        ("mnli_matched", "mnli"),
        ("mnli_mismatched", "mnli-mm"),
        ("mnli-mm", "mnli-mm"),
        ("sg-rte", "superglue-rte"),
        ("superglue/rte", "superglue-rte"),
        ("SuperGLUE-RTE", "superglue-rte"),
        ("super_glue/rte", "superglue-rte"),
        ("glue/rte", "rte"),
        ("RTE", "rte"),
        ("glue/CoLA", "cola"),
        ("superglue/boolq", "boolq"),
        ("sg-cb", "cb"),
        (" WSC ", "wsc"),
    ],
)
def test_get_task_aliases(alias, name):
    assert get_task(alias).name == name


@pytest.mark.parametrize("bad", ["mnli2", "glue/cb", "superglue/cola", "", "sst"])
def test_unknown_task_lists_known_names(bad):
    with pytest.raises(DataError) as info:
        get_task(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert all(name in message for name in ALL_TASKS)


@pytest.mark.parametrize(
    ("name", "metrics", "primary"),
    [
        ("cola", ("mcc",), "mcc"),
        ("mrpc", ("accuracy", "f1"), "f1"),
        ("qqp", ("accuracy", "f1"), "accuracy"),
        ("stsb", ("pearson", "spearman"), "pearson"),
        ("cb", ("accuracy", "macro_f1"), "accuracy"),
        ("sst2", ("accuracy",), "accuracy"),
        ("rte", ("accuracy",), "accuracy"),
        ("wsc", ("accuracy",), "accuracy"),
    ],
)
def test_metric_names(name, metrics, primary):
    spec = get_task(name)
    assert spec.metric_names == metrics
    assert spec.primary_metric == primary
    assert spec.primary_metric in spec.metric_names


def test_every_task_is_consistent():
    for name in ALL_TASKS:
        spec = get_task(name)
        assert spec.benchmark in ("glue", "superglue")
        assert set(spec.files) == {"train", "dev"} == set(spec.hub_splits)
        assert spec.primary_metric in spec.metric_names
        assert spec.num_labels == (1 if spec.is_regression else len(spec.label_names))
        assert spec.hub_dataset == ("nyu-mll/glue" if spec.benchmark == "glue" else "aps/super_glue")
        hash(spec)  # usable as a dict key despite its mapping fields


def test_label_sets_and_files():
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mrpc").label_names == ("0", "1")
    assert get_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_task("cb").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("boolq").label_names == ("False", "True")
    assert get_task("mnli").files["dev"] == "dev_matched.tsv"
    assert get_task("mnli-mm").files["dev"] == "dev_mismatched.tsv"
    assert get_task("mnli-mm").hub_splits["dev"] == "validation_mismatched"
    assert get_task("wsc").files == {"train": "train.jsonl", "dev": "val.jsonl"}


# ----------------------------------------------------------------------------------------------------------
# Data directory


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("LANDSCAPE_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("LANDSCAPE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other  # the argument beats the environment


def test_resolve_data_dir_missing(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("LANDSCAPE_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="LANDSCAPE_DATA_DIR"):
        resolve_data_dir(None)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_split(get_task("mrpc"), "train", tmp_path)
    assert str(tmp_path / "glue" / "MRPC") in str(info.value)
    (tmp_path / "glue" / "MRPC").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        load_split(get_task("mrpc"), "dev", tmp_path)
    assert str(tmp_path / "glue" / "MRPC" / "dev.tsv") in str(info.value)


def test_unknown_split(tmp_path):
    with pytest.raises(ConfigError, match="'test'"):
        load_split(get_task("rte"), "test", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# GLUE TSV quirks


def test_cola_without_header_or_trailing_newline(tmp_path):
    put(tmp_path, "glue/CoLA/dev.tsv", "gj04\t1\t\tThe sailors rode.\n\ngj04\t0\t*\tRode the sailors the.")
    examples = load_split(get_task("cola"), "dev", tmp_path)
    assert examples == [
        Example("The sailors rode.", None, 1, "dev.tsv:1"),
        Example("Rode the sailors the.", None, 0, "dev.tsv:3"),  # the blank line 2 is skipped
    ]


def test_mrpc_with_bom_and_label_in_column_zero(tmp_path):
    put(
        tmp_path,
        "glue/MRPC/train.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t11\t12\tHe said "yes".\tHe agreed.\n'
        "0\t13\t14\tA cat.\tA dog.\n",
    )
    examples = load_split(get_task("mrpc"), "train", tmp_path)
    assert examples == [
        Example('He said "yes".', "He agreed.", 1, "train.tsv:2"),
        Example("A cat.", "A dog.", 0, "train.tsv:3"),
    ]


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_rte_extra_empty_column_is_accepted(tmp_path):
    put(
        tmp_path,
        "glue/RTE/train.tsv",
        RTE_HEADER + "0\tA man sleeps.\tA man rests.\tentailment\n"
        '1\t"Odd quote.\tThe film "X" was shot.\t\tnot_entailment\n',
    )
    examples = load_split(get_task("rte"), "train", tmp_path)
    assert [e.label for e in examples] == [0, 1]
    assert examples[1] == Example('"Odd quote.', 'The film "X" was shot.', 1, "train.tsv:3")


def test_extra_non_empty_column_is_rejected(tmp_path):
    path = put(tmp_path, "glue/RTE/train.tsv", RTE_HEADER + "0\ta\tb\tstray\tentailment\n")
    with pytest.raises(DataError) as info:
        load_split(get_task("rte"), "train", tmp_path)
    assert f"{path}:2 has 5 columns, expected 4" in str(info.value)
    assert "stray" in str(info.value)


def test_too_few_columns(tmp_path):
    path = put(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n1\tonly one\n")
    with pytest.raises(DataError) as info:
        load_split(get_task("rte"), "dev", tmp_path)
    assert f"{path}:3 has 2 columns, expected 4" in str(info.value)


def test_cola_too_few_columns(tmp_path):
    path = put(tmp_path, "glue/CoLA/train.tsv", "gj04\t1\tsentence\n")
    with pytest.raises(DataError, match="has 3 columns, expected 4") as info:
        load_split(get_task("cola"), "train", tmp_path)
    assert f"{path}:1" in str(info.value)


def test_bad_label_names_line_and_allowed_labels(tmp_path):
    path = put(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(DataError) as info:
        load_split(get_task("rte"), "dev", tmp_path)
    message = str(info.value)
    assert f"{path}:3" in message and "'maybe'" in message
    assert "'entailment'" in message and "'not_entailment'" in message


def test_sst2_bad_binary_label(tmp_path):
    put(tmp_path, "glue/SST-2/dev.tsv", "sentence\tlabel\ngood .\t1\nbad .\t2\n")
    with pytest.raises(DataError, match=r"dev\.tsv:3.*'2'.*'0', '1'"):
        load_split(get_task("sst2"), "dev", tmp_path)


def test_header_missing_column(tmp_path):
    path = put(tmp_path, "glue/SST-2/train.tsv", "text\tlabel\ngood .\t1\n")
    with pytest.raises(DataError) as info:
        load_split(get_task("sst2"), "train", tmp_path)
    assert f"{path}:1" in str(info.value) and "'sentence'" in str(info.value)


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def stsb_row(i: int, score: str) -> str:
    return f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\tA plane {i}.\tAn air plane {i}.\t{score}\n"


def test_stsb_float_scores(tmp_path):
    put(tmp_path, "glue/STS-B/train.tsv", STSB_HEADER + stsb_row(0, "5.000") + stsb_row(1, "3.800") + stsb_row(2, "0"))
    examples = load_split(get_task("stsb"), "train", tmp_path)
    assert [e.label for e in examples] == [5.0, 3.8, 0.0]
    assert all(isinstance(e.label, float) for e in examples)
    assert examples[1].text_a == "A plane 1." and examples[1].text_b == "An air plane 1."


@pytest.mark.parametrize("score", ["5.5", "-0.1", "abc", "nan", ""])
def test_stsb_bad_score(tmp_path, score):
    path = put(tmp_path, "glue/STS-B/dev.tsv", STSB_HEADER + stsb_row(0, "1.0") + stsb_row(1, score))
    with pytest.raises(DataError) as info:
        load_split(get_task("stsb"), "dev", tmp_path)
    assert f"{path}:3" in str(info.value) and "[0, 5]" in str(info.value)


MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
)


def mnli_row(premise: str, hypothesis: str, label: str) -> str:
    return f"0\t1\t1e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{premise}\t{hypothesis}" + f"\t{label}" * 6 + "\n"


def test_mnli_matched_and_mismatched_dev(tmp_path):
    put(tmp_path, "glue/MNLI/dev_matched.tsv", MNLI_HEADER + mnli_row("P1", "H1", "neutral"))
    put(
        tmp_path,
        "glue/MNLI/dev_mismatched.tsv",
        MNLI_HEADER + mnli_row("P2", "H2", "contradiction") + mnli_row("P3", "H3", "entailment"),
    )
    matched = load_split(get_task("mnli"), "dev", tmp_path)
    mismatched = load_split(get_task("mnli_mismatched"), "dev", tmp_path)
    assert matched == [Example("P1", "H1", 1, "dev_matched.tsv:2")]
    assert [(e.text_a, e.label) for e in mismatched] == [("P2", 2), ("P3", 0)]


def test_qqp_qnli_wnli_columns(tmp_path):
    put(tmp_path, "glue/QQP/dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tQ1?\tQ2?\t1\n")
    put(tmp_path, "glue/QNLI/dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tnot_entailment\n")
    put(tmp_path, "glue/WNLI/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tS1.\tS2.\t0\n")
    assert load_split(get_task("qqp"), "dev", tmp_path) == [Example("Q1?", "Q2?", 1, "dev.tsv:2")]
    assert load_split(get_task("qnli"), "dev", tmp_path) == [Example("Who?", "Him.", 1, "dev.tsv:2")]
    assert load_split(get_task("wnli"), "dev", tmp_path) == [Example("S1.", "S2.", 0, "dev.tsv:2")]


def test_non_utf8_bytes(tmp_path):
    good = b"sentence\tlabel\nfine .\t1\n"
    path = put(tmp_path, "glue/SST-2/train.tsv", good + b"caf\xe9 .\t0\n")
    with pytest.raises(DataError) as info:
        load_split(get_task("sst2"), "train", tmp_path)
    message = str(info.value)
    assert f"{path}:3" in message
    assert f"byte offset {len(good) + 3}" in message


def test_non_utf8_in_jsonl(tmp_path):
    path = put(tmp_path, "superglue/CB/val.jsonl", b'{"premise": "\xff", "hypothesis": "h", "label": "neutral"}\n')
    with pytest.raises(DataError, match="byte offset 13") as info:
        load_split(get_task("cb"), "dev", tmp_path)
    assert f"{path}:1" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n", "sentence\tlabel\n"])
def test_empty_file(tmp_path, content):
    path = put(tmp_path, "glue/SST-2/dev.tsv", content)
    with pytest.raises(DataError, match="no data rows") as info:
        load_split(get_task("sst2"), "dev", tmp_path)
    assert str(path) in str(info.value)


def test_empty_jsonl(tmp_path):
    put(tmp_path, "superglue/WSC/train.jsonl", "")
    with pytest.raises(DataError, match="no data rows"):
        load_split(get_task("wsc"), "train", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# SuperGLUE JSONL


def test_cb_and_superglue_rte(tmp_path):
    put(
        tmp_path,
        "superglue/CB/train.jsonl",
        jsonl(
            {"premise": "P", "hypothesis": "H", "label": "contradiction", "idx": 0},
            {"premise": "P2", "hypothesis": "H2", "label": "neutral", "idx": 1},
        ),
    )
    put(tmp_path, "superglue/RTE/val.jsonl", jsonl({"premise": "A", "hypothesis": "B", "label": "not_entailment"}))
    assert load_split(get_task("cb"), "train", tmp_path) == [
        Example("P", "H", 2, "train.jsonl:1"),
        Example("P2", "H2", 1, "train.jsonl:2"),
    ]
    assert load_split(get_task("sg-rte"), "dev", tmp_path) == [Example("A", "B", 1, "val.jsonl:1")]


def test_boolq_json_booleans_and_strings(tmp_path):
    records = [
        {"question": f"q{i}", "passage": f"p{i}", "label": label}
        for i, label in enumerate([True, False, "true", "False", "TRUE"])
    ]
    put(tmp_path, "superglue/BoolQ/val.jsonl", jsonl(*records))
    examples = load_split(get_task("boolq"), "dev", tmp_path)
    assert [e.label for e in examples] == [1, 0, 1, 0, 1]
    assert (examples[0].text_a, examples[0].text_b) == ("q0", "p0")


@pytest.mark.parametrize("label", [1, "yes", None])
def test_boolq_bad_label(tmp_path, label):
    path = put(tmp_path, "superglue/BoolQ/train.jsonl", jsonl({"question": "q", "passage": "p", "label": label}))
    with pytest.raises(DataError, match="'False', 'True'") as info:
        load_split(get_task("boolq"), "train", tmp_path)
    assert f"{path}:1" in str(info.value)


def test_wic_input_format(tmp_path):
    record = {
        "word": "bank",
        "sentence1": "He sat on the bank.",
        "sentence2": "She went to the bank.",
        "start1": 14,
        "end1": 18,
        "start2": 16,
        "end2": 20,
        "label": False,
    }
    put(tmp_path, "superglue/WiC/train.jsonl", jsonl(record))
    assert load_split(get_task("wic"), "train", tmp_path) == [
        Example("bank: He sat on the bank.", "She went to the bank.", 0, "train.jsonl:1")
    ]


def wsc_record(text: str, i1: int, s1: str, i2: int, s2: str, label: bool = True) -> dict:
    target = {"span2_index": i2, "span1_index": i1, "span1_text": s1, "span2_text": s2}
    return {"text": text, "target": target, "idx": 0, "label": label}


def test_wsc_spans_marked_by_index(tmp_path):
    put(
        tmp_path,
        "superglue/WSC/train.jsonl",
        jsonl(
            wsc_record("Mark told Pete lies. He was wrong.", 0, "Mark", 4, "He", False),
            # The span text is capitalised differently from the text, as in the released data.
            wsc_record("Then the lawyer asked him.", 1, "The lawyer", 4, "him.", True),
        ),
    )
    first, second = load_split(get_task("wsc"), "train", tmp_path)
    assert first == Example("*Mark* told Pete lies. #He# was wrong.", "Does 'He' refer to 'Mark'?", 0, "train.jsonl:1")
    assert second.text_a == "Then *the lawyer* asked #him.#"
    assert second.text_b == "Does 'him.' refer to 'The lawyer'?"


def test_wsc_span_falls_back_to_first_occurrence():
    # Index 5 points at "use", not "it": the span is found by its first whole word occurrence instead
    # (not inside "with").
    text = "He sat with a safe . use it now"
    assert mark_wsc_spans(text, 4, "safe", 5, "it") == "He sat with a *safe* . use #it# now"
    # Out-of-range index also falls back.
    assert mark_wsc_spans("a dog saw it", 99, "dog", 3, "it") == "a *dog* saw #it#"


def test_wsc_nested_spans():
    text = "and their mothers are worried"
    assert mark_wsc_spans(text, 1, "their mothers", 1, "their") == "and *#their# mothers* are worried"


def test_wsc_span_not_found(tmp_path):
    path = put(tmp_path, "superglue/WSC/val.jsonl", jsonl(wsc_record("A cat sat.", 1, "dog", 2, "sat.")))
    with pytest.raises(DataError, match="'dog' not found") as info:
        load_split(get_task("wsc"), "dev", tmp_path)
    assert f"{path}:1" in str(info.value)


def test_malformed_json_line(tmp_path):
    good = {"premise": "P", "hypothesis": "H", "label": "neutral"}
    path = put(tmp_path, "superglue/CB/val.jsonl", json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match="malformed JSON") as info:
        load_split(get_task("cb"), "dev", tmp_path)
    assert f"{path}:2" in str(info.value)


def test_json_line_not_an_object(tmp_path):
    put(tmp_path, "superglue/CB/val.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match=r"val\.jsonl:1: expected a JSON object"):
        load_split(get_task("cb"), "dev", tmp_path)


def test_missing_json_field(tmp_path):
    path = put(tmp_path, "superglue/CB/train.jsonl", jsonl({"premise": "P", "label": "neutral"}))
    with pytest.raises(DataError, match="missing field 'hypothesis'") as info:
        load_split(get_task("cb"), "train", tmp_path)
    assert f"{path}:1" in str(info.value)


def test_wsc_missing_target_field(tmp_path):
    record = wsc_record("A cat sat.", 1, "cat", 2, "sat.")
    del record["target"]["span2_index"]
    put(tmp_path, "superglue/WSC/train.jsonl", jsonl(record))
    with pytest.raises(DataError, match="missing field 'span2_index'"):
        load_split(get_task("wsc"), "train", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face hub path (datasets is not installed: a fake module stands in for it)


class FakeClassLabel:
    def __init__(self, names: list[str]):
        self.names = names


class FakeDataset:
    def __init__(self, records: list[dict], features: dict):
        self.records = records
        self.features = features

    def __iter__(self):
        return iter(self.records)


def install_fake_datasets(monkeypatch, table: dict) -> list:
    """Install a fake ``datasets`` module serving ``table[(name, config, split)]``; return the call log."""
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if (name, config, split) not in table:
            raise ConnectionError("offline")
        return table[(name, config, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_mrpc_label_names_are_mapped(monkeypatch):
    dataset = FakeDataset(
        [
            {"sentence1": "A", "sentence2": "B", "label": 1, "idx": 0},
            {"sentence1": "C", "sentence2": "D", "label": 0, "idx": 1},
        ],
        {"label": FakeClassLabel(["not_equivalent", "equivalent"])},
    )
    calls = install_fake_datasets(monkeypatch, {("nyu-mll/glue", "mrpc", "validation"): dataset})
    examples = load_split(get_task("mrpc"), "dev", None)
    assert calls == [("nyu-mll/glue", "mrpc", "validation")]
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [("A", "B", 1), ("C", "D", 0)]
    assert examples[0].guid == "nyu-mll/glue/mrpc/validation:0"


def test_hub_cb_label_order_differs_from_ours(monkeypatch):
    names = ["entailment", "contradiction", "neutral"]  # the hub's CB order
    dataset = FakeDataset(
        [{"premise": "P", "hypothesis": "H", "label": i, "idx": i} for i in range(3)], {"label": FakeClassLabel(names)}
    )
    install_fake_datasets(monkeypatch, {("aps/super_glue", "cb", "train"): dataset})
    examples = load_split(get_task("cb"), "train", None)
    ours = get_task("cb").label_names
    assert [ours[e.label] for e in examples] == names


def test_hub_mnli_mismatched_and_stsb(monkeypatch):
    mnli = FakeDataset(
        [{"premise": "P", "hypothesis": "H", "label": 2}],
        {"label": FakeClassLabel(["entailment", "neutral", "contradiction"])},
    )
    stsb = FakeDataset([{"sentence1": "A", "sentence2": "B", "label": 3.25}], {"label": object()})
    calls = install_fake_datasets(
        monkeypatch,
        {("nyu-mll/glue", "mnli", "validation_mismatched"): mnli, ("nyu-mll/glue", "stsb", "train"): stsb},
    )
    assert load_split(get_task("mnli-mm"), "dev", None)[0].label == 2
    assert load_split(get_task("stsb"), "train", None)[0].label == 3.25
    assert calls[0] == ("nyu-mll/glue", "mnli", "validation_mismatched")


def test_hub_wsc_flat_fields_share_the_jsonl_conversion(monkeypatch, tmp_path):
    flat = {
        "text": "Mark told Pete lies. He was wrong.",
        "span1_index": 0,
        "span2_index": 4,
        "span1_text": "Mark",
        "span2_text": "He",
        "idx": 0,
        "label": 0,
    }
    hub = FakeDataset([flat], {"label": FakeClassLabel(["False", "True"])})
    install_fake_datasets(monkeypatch, {("aps/super_glue", "wsc.fixed", "validation"): hub})
    from_hub = load_split(get_task("wsc"), "dev", None)[0]
    put(tmp_path, "superglue/WSC/val.jsonl", jsonl(wsc_record(flat["text"], 0, "Mark", 4, "He", False)))
    from_file = load_split(get_task("wsc"), "dev", tmp_path)[0]
    assert (from_hub.text_a, from_hub.text_b, from_hub.label) == (from_file.text_a, from_file.text_b, from_file.label)


def test_hub_unlabelled_record(monkeypatch):
    dataset = FakeDataset([{"sentence": "x", "label": -1}], {"label": FakeClassLabel(["negative", "positive"])})
    install_fake_datasets(monkeypatch, {("nyu-mll/glue", "sst2", "train"): dataset})
    with pytest.raises(DataError, match="record 0: label -1"):
        load_split(get_task("sst2"), "train", None)


def test_hub_offline_is_a_data_error(monkeypatch):
    install_fake_datasets(monkeypatch, {})
    with pytest.raises(DataError, match=r"ConnectionError.*no data directory"):
        load_split(get_task("rte"), "train", None)


def test_no_data_dir_and_no_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError) as info:
        load_split(get_task("rte"), "train", None)
    assert "no data directory: pass --data-dir or set LANDSCAPE_DATA_DIR" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Subsampling


def test_subsample_full_and_partial():
    assert np.array_equal(subsample_indices(7, 1.0, seed=0), np.arange(7))
    picked = subsample_indices(100, 0.25, seed=3)
    assert len(picked) == 25 and len(set(picked.tolist())) == 25
    assert np.all(np.diff(picked) > 0) and picked.min() >= 0 and picked.max() < 100
    assert np.array_equal(picked, subsample_indices(100, 0.25, seed=3))
    assert not np.array_equal(picked, subsample_indices(100, 0.25, seed=4))
    assert len(subsample_indices(10, 0.26, seed=0)) == 3  # round(2.6)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.5, float("nan"), True])
def test_subsample_bad_fraction(fraction):
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        subsample_indices(10, fraction, seed=0)


def test_subsample_to_zero_examples():
    with pytest.raises(DataError, match="gives 0 examples"):
        subsample_indices(10, 0.01, seed=0)
    with pytest.raises(DataError, match="gives 0 examples"):
        subsample_indices(0, 1.0, seed=0)


# ----------------------------------------------------------------------------------------------------------
# The real task files in <repo>/../shared/data (counts from its SOURCES.md)

REAL_COUNTS = {
    "cola": (8551, 1043),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
    "rte": (2490, 277),
    "sst2": (67349, 872),
    "cb": (250, 56),
    "wsc": (554, 104),
    "superglue-rte": (2490, 277),
}


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    return SHARED_DATA


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_files(shared_data, name):
    spec = get_task(name)
    if not (shared_data / spec.benchmark / spec.folder).is_dir():
        pytest.skip(f"{name} not in {shared_data}")
    for split, expected in zip(("train", "dev"), REAL_COUNTS[name], strict=True):
        examples = load_split(spec, split, shared_data)
        assert len(examples) == expected
        assert all(e.text_a for e in examples)
        assert all((e.text_b is None) == (name in ("cola", "sst2")) for e in examples)
        labels = np.array([e.label for e in examples])
        if spec.is_regression:
            assert labels.min() >= 0.0 and labels.max() <= 5.0 and labels.std() > 0.5
        else:
            counts = np.bincount(labels, minlength=spec.num_labels)
            assert len(counts) == spec.num_labels and np.all(counts > 0), counts


def test_real_wsc_marks_both_spans(shared_data):
    if not (shared_data / "superglue" / "WSC").is_dir():
        pytest.skip("WSC not present")
    for split in ("train", "dev"):
        for example in load_split(get_task("wsc"), split, shared_data):
            assert example.text_a.count("*") >= 2 and example.text_a.count("#") >= 2
            assert example.text_b.startswith("Does '")


def test_real_rte_row_with_extra_column(shared_data):
    if not (shared_data / "glue" / "RTE").is_dir():
        pytest.skip("RTE not present")
    examples = load_split(get_task("rte"), "train", shared_data)
    row = examples[2164]  # data row index 2164 is file line 2166 (header + 1-based)
    assert row.guid == "train.tsv:2166"
    assert row.text_b == 'The film "WarGames" was shot in 1983.'
    assert get_task("rte").label_names[row.label] == "not_entailment"


def test_training_fractions_and_analysis_samples_draw_the_same_seeded_subset():
    from landscape.models.runs import choose_indices

    drawn = subsample_indices(50, 0.4, 7)
    assert np.array_equal(drawn, choose_indices(50, 20, 7))
    assert len(set(drawn.tolist())) == 20 and np.all(np.diff(drawn) > 0) and drawn.dtype == np.int64
    assert not np.array_equal(drawn, subsample_indices(50, 0.4, 8))  # the seed matters
    assert np.array_equal(choose_indices(50, None, 7), np.arange(50))
