"""GLUE readers: every release layout, label order, protocols, and bad-file errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from capaboost.data import DataError, TaskData, load_task
from capaboost.data.glue import GLUE_TASKS, read_glue_file

SHARED_GLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"

MNLI_TRAIN_HEAD = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEAD = MNLI_TRAIN_HEAD.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")


def _row(task: str, i: int, label: str, dev: bool = False) -> str:
    """One data line in the task's GLUE release layout; texts carry stray quotes on purpose."""
    a, b = f'sent "a{i}', f"sent b{i}'"
    if task == "cola":
        return f"src{i}\t{label}\t{'*' if label == '0' else ''}\t{a}"
    if task == "sst2":
        return f"{a}\t{label}"
    if task == "mrpc":
        return f"{label}\t{100 + i}\t{200 + i}\t{a}\t{b}"
    if task == "qqp":
        return f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{label}"
    if task == "stsb":
        return f"{i}\tmain-news\tMSRvid\t2012test\t{i}\tnone\tnone\t{a}\t{b}\t{label}"
    if task == "mnli":
        labels = f"{label}\t{label}\t{label}\t{label}\t{label}" if dev else label
        return f"{i}\t{i}\t{i}e\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{labels}\t{label}"
    if task in ("qnli", "rte"):
        return f"{i}\t{a}\t{b}\t{label}"
    raise AssertionError(task)


HEADERS = {
    "cola": None,
    "sst2": "sentence\tlabel",
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",  # the MRPC release has a BOM
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "qnli": "index\tquestion\tsentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
}
RAW_LABELS = {
    "cola": ["0", "1"], "sst2": ["0", "1"], "mrpc": ["0", "1"], "qqp": ["0", "1"],
    "stsb": ["0.0", "2.5", "5.000"], "mnli": ["contradiction", "entailment", "neutral"],
    "qnli": ["entailment", "not_entailment"], "rte": ["entailment", "not_entailment"],
}


def write_split(task: str, path: Path, n: int, dev: bool = False) -> list[str]:
    """Write ``n`` rows cycling through the task's labels; returns the raw labels written."""
    labels = [RAW_LABELS[task][i % len(RAW_LABELS[task])] for i in range(n)]
    head = (MNLI_DEV_HEAD if dev else MNLI_TRAIN_HEAD) if task == "mnli" else HEADERS[task]
    lines = ([head] if head else []) + [_row(task, i, lab, dev) for i, lab in enumerate(labels)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return labels


def make_glue(task: str, root: Path, n_train: int = 12, n_dev: int = 9) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_split(task, root / "train.tsv", n_train)
    if task == "mnli":
        write_split(task, root / "dev_matched.tsv", n_dev, dev=True)
        write_split(task, root / "dev_mismatched.tsv", n_dev + 2, dev=True)
    else:
        write_split(task, root / "dev.tsv", n_dev)
    return root


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_every_layout_reads_texts_and_labels(task: str, tmp_path: Path) -> None:
    root = make_glue(task, tmp_path / task)
    data = load_task(task, root)
    assert isinstance(data, TaskData)
    assert data.sizes()["train"] == 12 and len(data.test) == 9
    first = data.train[0]
    assert first.text == 'sent "a0'  # the quote survives QUOTE_NONE
    if task in ("cola", "sst2"):
        assert first.text_pair is None
    else:
        assert first.text_pair == "sent b0'"
    raw = RAW_LABELS[task]
    if task == "stsb":
        assert data.is_regression and data.num_labels == 1 and data.label_names is None
        assert [e.label for e in data.train[:3]] == [0.0, 2.5, 5.0]
        assert data.main_metric == "combined"
    else:
        assert not data.is_regression and data.num_labels == len(raw)
        assert [e.label for e in data.train[: len(raw)]] == list(range(len(raw)))
    assert data.main_metric in data.metric_names


def test_label_orders_are_fixed(tmp_path: Path) -> None:
    names = {t: load_task(t, make_glue(t, tmp_path / t)).label_names for t in ("mnli", "qnli", "rte", "cola")}
    assert names["mnli"] == ["contradiction", "entailment", "neutral"]
    assert names["qnli"] == names["rte"] == ["entailment", "not_entailment"]
    assert names["cola"] == ["unacceptable", "acceptable"]


def test_metric_choices(tmp_path: Path) -> None:
    got = {t: load_task(t, make_glue(t, tmp_path / t)) for t in ("cola", "mrpc", "qqp")}
    assert got["cola"].metric_names == ["matthews_correlation"]
    assert got["mrpc"].metric_names == ["accuracy", "f1"] and got["mrpc"].main_metric == "accuracy"
    assert got["qqp"].main_metric == "accuracy"


def test_mnli_columns_found_by_name_and_mismatched_extra_split(tmp_path: Path) -> None:
    data = load_task("mnli", make_glue("mnli", tmp_path))
    assert data.extra_test["test_mismatched"][0].text == 'sent "a0'
    assert len(data.extra_test["test_mismatched"]) == 11
    assert [e.label for e in data.test[:3]] == [0, 1, 2]


def test_mnli_without_mismatched_file(tmp_path: Path) -> None:
    root = make_glue("mnli", tmp_path)
    (root / "dev_mismatched.tsv").unlink()
    assert load_task("mnli", root).extra_test == {}


def test_glue_root_is_accepted(tmp_path: Path) -> None:
    make_glue("rte", tmp_path / "RTE")
    assert len(load_task("rte", tmp_path).train) == 12


def test_propetl_small_task_halves_dev(tmp_path: Path) -> None:
    root = make_glue("rte", tmp_path, n_train=20, n_dev=9)
    data = load_task("rte", root, protocol="propetl", seed=3)
    assert len(data.train) == 20 and len(data.validation) == 4 and len(data.test) == 5
    dev_texts = {e.text for e in load_task("rte", root).test}
    val, test = {e.text for e in data.validation}, {e.text for e in data.test}
    assert val | test == dev_texts and not val & test


def test_propetl_large_task_holds_out_1k_train(tmp_path: Path) -> None:
    root = make_glue("sst2", tmp_path, n_train=10_050, n_dev=7)
    data = load_task("sst2", root, protocol="propetl", max_train_samples=500, max_eval_samples=300)
    assert data.sizes() == {"train": 500, "validation": 300, "test": 7}
    full = load_task("sst2", root, protocol="propetl")
    assert len(full.train) == 9_050 and len(full.validation) == 1_000
    assert not {e.text for e in full.train} & {e.text for e in full.validation}
    assert {e.text for e in data.train} <= {e.text for e in full.train}


def test_mnli_caps_apply_to_mismatched(tmp_path: Path) -> None:
    data = load_task("mnli", make_glue("mnli", tmp_path), max_eval_samples=4)
    assert len(data.test) == len(data.validation) == len(data.extra_test["test_mismatched"]) == 4


# ------------------------------------------------------------------ errors
def test_missing_dev_file_names_path_and_layout(tmp_path: Path) -> None:
    root = make_glue("qnli", tmp_path)
    (root / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"dev\.tsv.*'question', 'sentence', 'label'") as err:
        load_task("qnli", root)
    assert err.value.path == str(root / "dev.tsv")


def test_missing_mnli_matched_dev(tmp_path: Path) -> None:
    root = make_glue("mnli", tmp_path)
    (root / "dev_matched.tsv").unlink()
    with pytest.raises(DataError, match="dev_matched.tsv"):
        load_task("mnli", root)


def test_missing_column_lists_columns_found(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    p.write_text("index\tsentence1\tsentence2\tlbl\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=r"missing column 'label'; columns found: \['index', 'sentence1'") as err:
        read_glue_file("rte", p)
    assert err.value.column == "label" and err.value.line == 1


def test_unknown_label_names_value_line_and_allowed(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    p.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tcontradiction\n")
    with pytest.raises(DataError) as err:
        read_glue_file("rte", p)
    msg = str(err.value)
    assert "'contradiction'" in msg and "line 3" in msg and "['entailment', 'not_entailment']" in msg
    assert str(p) in msg and err.value.column == "label"


def test_bad_score_and_short_row(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    write_split("stsb", p, 3)
    p.write_text(p.read_text().replace("\t5.000\n", "\tfive\n"))
    with pytest.raises(DataError, match=r"line 4.*'five' is not a number"):
        read_glue_file("stsb", p)
    q = tmp_path / "qqp.tsv"
    q.write_text(HEADERS["qqp"] + "\n0\t1\t2\tq1\tq2\t1\n1\t3\t4\tonly one question\n")
    with pytest.raises(DataError, match=r"line 3, column 'question2'"):
        read_glue_file("qqp", q)
    assert len(read_glue_file("qqp", q, skip_malformed=True)) == 1


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_glue_file("cola", p)
    p.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="no data rows"):
        read_glue_file("sst2", p)


def test_unknown_task_and_protocol(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed tasks: .*'cola'.*'squad_v2'.*'image'"):
        load_task("wnli", tmp_path)
    with pytest.raises(ValueError, match="unknown protocol"):
        load_task("rte", make_glue("rte", tmp_path), protocol="best")


# ------------------------------------------------------------------ real data
@pytest.mark.skipif(not (SHARED_GLUE / "CoLA" / "train.tsv").is_file(), reason="shared GLUE data absent")
def test_real_cola_both_protocols() -> None:
    dev = load_task("cola", SHARED_GLUE / "CoLA")
    assert dev.sizes() == {"train": 8551, "validation": 1043, "test": 1043}
    assert dev.train[0].text.startswith("Our friends won't buy this analysis")
    assert dev.train[0].label == 1
    pro = load_task("cola", SHARED_GLUE / "CoLA", protocol="propetl")
    assert pro.sizes() == {"train": 8551, "validation": 521, "test": 522}


@pytest.mark.skipif(not (SHARED_GLUE / "SST-2" / "train.tsv").is_file(), reason="shared GLUE data absent")
def test_real_sst2_both_protocols() -> None:
    pro = load_task("sst2", SHARED_GLUE, protocol="propetl", seed=0)
    assert pro.sizes() == {"train": 66349, "validation": 1000, "test": 872}
    again = load_task("sst2", SHARED_GLUE, protocol="propetl", seed=0)
    assert [e.text for e in pro.validation] == [e.text for e in again.validation]
    dev = load_task("sst2", SHARED_GLUE / "SST-2", max_train_samples=10_000)
    assert dev.sizes() == {"train": 10_000, "validation": 872, "test": 872}
    assert {e.label for e in dev.train} == {0, 1}
