"""Low-level readers that keep line numbers, so errors can point at the bad row."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from capaboost.data.errors import DataError

# GLUE sentences can be long; the csv default limit (128 KiB) is too small for some corpora.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

COMPRESSIONS = (".bz2", ".gz")


def _open_bytes(path: Path) -> IO[bytes]:
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def open_text(path: str | Path) -> IO[str]:
    """Open a UTF-8 text file (a BOM, as in GLUE MRPC, is dropped), decompressing ``.bz2``/``.gz`` by extension."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    if path.suffix not in COMPRESSIONS:
        return open(path, encoding="utf-8-sig", newline="")
    return io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", newline="")


def utf8_error(path: str | Path, err: UnicodeDecodeError) -> DataError:
    """The DataError for a file that is not UTF-8, at the line of its first bad byte.

    The decoder reads ahead in blocks, so neither the row being parsed when it fails nor its byte
    position says where the bad byte is; the file is scanned again, line by line, to find it.
    """
    with _open_bytes(Path(path)) as raw:
        for number, line in enumerate(raw, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                byte = line[bad.start]
                return DataError(
                    f"not valid UTF-8: byte 0x{byte:02x} at character {bad.start + 1} ({bad.reason}); "
                    "re-save the file as UTF-8", path, number,
                )
    return DataError(f"not valid UTF-8: {err}", path)


def data_format(path: str | Path) -> str:
    """``csv``, ``tsv`` or ``jsonl`` from the extension, ignoring a compression suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".csv", ".tsv", ".jsonl"):
        return ext[1:]
    if ext == ".json":
        return "jsonl"
    raise DataError(f"unknown file format {ext!r}; expected .csv, .tsv or .jsonl (optionally .bz2/.gz)", path)


def read_tsv(path: str | Path, header: bool = True) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """Read a GLUE-style TSV; returns (header, [(line_number, fields)]).

    ``QUOTE_NONE`` because GLUE text contains unbalanced quotes that the
    default dialect would swallow across lines.
    """
    return _read_delimited(path, "\t", csv.QUOTE_NONE, header)


def read_csv(path: str | Path, header: bool = True) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """Read an RFC-4180 CSV (quoted fields may span lines); line numbers are where a row starts."""
    # strict: an unterminated quote is an error at the row that opens it, not a silent merge of the rows after it
    return _read_delimited(path, ",", csv.QUOTE_MINIMAL, header, strict=True)


def _read_delimited(
    path: str | Path, delimiter: str, quoting: int, header: bool, strict: bool = False
) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=strict)
        rows: list[tuple[int, list[str]]] = []
        start = 1
        try:
            for fields in reader:
                rows.append((start, fields))
                start = reader.line_num + 1
        except csv.Error as e:
            hint = (" (a quote opened on this line is never closed, or a quote stands inside an unquoted field: "
                    'quote the whole field and double the quotes inside it, "like ""this""")') if strict else ""
            raise DataError(f"malformed row: {e}{hint}", path, start) from e
        except UnicodeDecodeError as e:
            raise utf8_error(path, e) from e
    # Blank lines (e.g. a trailing newline) are not rows.
    rows = [(n, r) for n, r in rows if r and any(x.strip() for x in r)]
    if not rows:
        raise DataError("file is empty", path)
    if not header:
        return None, rows
    head = [h.strip() for h in rows[0][1]]
    if len(rows) == 1:
        raise DataError(f"file has a header {head} but no data rows", path)
    return head, rows[1:]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line of a JSON-lines file."""
    with open_text(path) as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise utf8_error(path, e) from e
    seen = False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON at character {e.colno}: {e.msg}", path, n) from e
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object per line, got {type(obj).__name__}", path, n)
        seen = True
        yield n, obj
    if not seen:
        raise DataError("file is empty", path)


def column_index(header: list[str], name: str, path: str | Path) -> int:
    """Index of a named column, or a DataError listing the columns that exist."""
    try:
        return header.index(name)
    except ValueError:
        raise DataError(f"missing column {name!r}; columns found: {header}", path, 1, name) from None


def get_field(fields: list[str], idx: int, path: str | Path, line: int, column: str) -> str:
    """Fetch one field; short rows (a stray tab or truncated line) name the row and column."""
    if idx >= len(fields):
        raise DataError(
            f"row has {len(fields)} fields, expected at least {idx + 1}", path, line, column
        )
    return fields[idx]
