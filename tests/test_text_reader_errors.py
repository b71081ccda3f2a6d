"""Text readers: broken quoting, numeric labels spelled two ways and bad bytes are named by file and true line."""

from __future__ import annotations

import bz2

import pytest

from capaboost.data.errors import DataError
from capaboost.data.text import load_text_task, read_text_file


def test_an_unterminated_quote_is_an_error_at_its_line_not_a_merged_row(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('text,label\ngood film,1\n"bad film,0\nnice film,1\ndull film,0\n')
    with pytest.raises(DataError, match=r"r\.csv, line 3: malformed row.*quote"):
        read_text_file(path)
    path.write_text('text,label\ngood film,1\n"bad film,0\nnice film,1\n"dull" film,0\n')
    with pytest.raises(DataError, match=r"r\.csv, line 3: malformed row"):
        read_text_file(path)
    path.write_text('text,label\n"a ""quoted"" word, and a comma",1\n"two\nlines",0\n')  # valid CSV still reads
    assert [(e.text, e.label) for e in read_text_file(path)] == [('a "quoted" word, and a comma', 1), ("two\nlines", 0)]


def test_a_row_with_extra_fields_is_named(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\ngood film,1\nbad, dull film,0\n")
    with pytest.raises(DataError, match=r"r\.csv, line 3: row has 3 fields but the header has 2"):
        read_text_file(path)


def test_numeric_labels_are_read_by_value(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\na,0\nb,1\nc,1.0\nd,0.0\n")
    assert [e.label for e in read_text_file(path)] == [0, 1, 1, 0]  # two classes, not four
    data = load_text_task({"train": path, "dev": path})
    assert data.num_labels == 2 and data.label_names == ["0", "1"]
    path.write_text("text,label\na,0\nb,1\nc,0.5\n")
    with pytest.raises(DataError, match=r"r\.csv, line 4: label '0\.5' is not a whole number"):
        read_text_file(path)
    path.write_text("text,label\na,neg\nb,pos\n")
    assert [e.label for e in read_text_file(path)] == [0, 1]


@pytest.mark.parametrize("name", ["train.tsv", "train.csv", "train.jsonl", "train.tsv.bz2"])
def test_a_bad_byte_is_reported_at_its_true_line(tmp_path, name):
    rows = [f"sentence number {i} is long enough to fill the decoder's read-ahead buffer quickly" for i in range(300)]
    if "jsonl" in name:
        lines = ['{"text": "%s", "label": %d}' % (r, i % 2) for i, r in enumerate(rows)]
    else:
        sep = "\t" if ".tsv" in name else ","
        lines = ["text" + sep + "label"] + [f"{r}{sep}{i % 2}" for i, r in enumerate(rows)]
    raw = "\n".join(lines).encode() + b"\n"
    at = raw.index(b"sentence number 199 ")  # file line 201 with a header (200 without)
    raw = raw[:at] + b"\xff" + raw[at + 1:]
    path = tmp_path / name
    path.write_bytes(bz2.compress(raw) if name.endswith(".bz2") else raw)
    line = 200 if "jsonl" in name else 201
    where = rf"{name.replace('.', '[.]')}, line {line}"
    with pytest.raises(DataError, match=rf"{where}: not valid UTF-8: byte 0xff at character 1"):
        read_text_file(path)
