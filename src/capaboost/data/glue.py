"""Readers for the eight GLUE tasks in their release TSV layouts.

Columns are located by header name (never by position) except for CoLA,
whose release files have no header. The label order of each task is fixed
here and is what the model's output indices mean:

====== ============================================ =================
task   label ids                                    main metric
====== ============================================ =================
cola   0 unacceptable, 1 acceptable                 matthews_correlation
sst2   0 negative, 1 positive                       accuracy
mrpc   0 not_equivalent, 1 equivalent               accuracy (+ f1)
qqp    0 not_duplicate, 1 duplicate                 accuracy (+ f1)
stsb   regression, float score 0-5                  combined = (pearson + spearman) / 2
mnli   0 contradiction, 1 entailment, 2 neutral     accuracy (matched; mismatched in extra_test)
qnli   0 entailment, 1 not_entailment               accuracy
rte    0 entailment, 1 not_entailment               accuracy
====== ============================================ =================

The MNLI order follows the GLUE processors in ``transformers`` (note that
the HF ``datasets`` copy of GLUE uses entailment/neutral/contradiction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capaboost.data.base import Example, TaskData
from capaboost.data.errors import DataError
from capaboost.data.io import column_index, get_field, read_tsv
from capaboost.data.protocols import apply_protocol, subsample
from capaboost.data.task_specs import TASK_SPECS, metrics_for_task

GLUE_TASKS = tuple(name for name, spec in TASK_SPECS.items() if spec.family == "glue")  # cola ... rte


@dataclass(frozen=True)
class GlueSpec:
    """Where a task's text and label live; ``int`` columns mean a header-less file."""

    name: str
    folder: str  # directory name in the GLUE release, used when data_dir is the GLUE root
    text: str | int
    pair: str | int | None
    label: str | int
    raw_labels: tuple[str, ...] | None  # file values in id order; None = regression
    label_names: tuple[str, ...] | None
    dev_files: tuple[str, ...] = ("dev.tsv",)
    header: bool = True


SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec("cola", "CoLA", 3, None, 1, ("0", "1"), ("unacceptable", "acceptable"), header=False),
    "sst2": GlueSpec("sst2", "SST-2", "sentence", None, "label", ("0", "1"), ("negative", "positive")),
    "mrpc": GlueSpec(
        "mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent")
    ),
    "qqp": GlueSpec(
        "qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate")
    ),
    "stsb": GlueSpec("stsb", "STS-B", "sentence1", "sentence2", "score", None, None),
    "mnli": GlueSpec(
        "mnli",
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        ("contradiction", "entailment", "neutral"),
        dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
    ),
    "qnli": GlueSpec(
        "qnli", "QNLI", "question", "sentence", "label", ("entailment", "not_entailment"),
        ("entailment", "not_entailment"),
    ),
    "rte": GlueSpec(
        "rte", "RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
        ("entailment", "not_entailment"),
    ),
}


def _layout(spec: GlueSpec) -> str:
    cols = [c for c in (spec.text, spec.pair, spec.label) if c is not None]
    if not spec.header:
        return "header-less TSV: source, label, original mark, sentence"
    return "TSV with a header containing " + ", ".join(repr(c) for c in cols)


def read_glue_file(task: str, path: str | Path, skip_malformed: bool = False) -> list[Example]:
    """Parse one GLUE TSV into examples.

    ``skip_malformed`` drops rows with too few fields instead of failing: some
    QQP copies contain a handful of truncated lines.
    """
    spec = SPECS[task]
    header, rows = read_tsv(path, header=spec.header)
    cols = {}
    for role, col in (("text", spec.text), ("pair", spec.pair), ("label", spec.label)):
        if col is None:
            continue
        cols[role] = col if isinstance(col, int) else column_index(header or [], col, path)
    names = {role: (str(c) if isinstance(c, str) else f"#{c}") for role, c in
             (("text", spec.text), ("pair", spec.pair), ("label", spec.label))}
    label_ids = None if spec.raw_labels is None else {v: i for i, v in enumerate(spec.raw_labels)}
    need = max(cols.values()) + 1
    out: list[Example] = []
    for line, fields in rows:
        if len(fields) < need and skip_malformed:
            continue
        text = get_field(fields, cols["text"], path, line, names["text"])
        pair = get_field(fields, cols["pair"], path, line, names["pair"]) if "pair" in cols else None
        raw = get_field(fields, cols["label"], path, line, names["label"]).strip()
        label: int | float
        if label_ids is None:
            try:
                label = float(raw)
            except ValueError:
                raise DataError(f"score {raw!r} is not a number", path, line, names["label"]) from None
        else:
            if raw not in label_ids:
                raise DataError(
                    f"unknown label {raw!r}; allowed labels: {list(spec.raw_labels or ())}", path, line, names["label"]
                )
            label = label_ids[raw]
        out.append(Example(text=text, text_pair=pair, label=label))
    if not out:
        raise DataError("no usable rows", path)
    return out


def _task_dir(spec: GlueSpec, data_dir: Path) -> Path:
    # Accept the GLUE root as well as the task folder itself.
    if not (data_dir / "train.tsv").exists() and (data_dir / spec.folder / "train.tsv").exists():
        return data_dir / spec.folder
    return data_dir


def load_glue(
    task: str,
    data_dir: str | Path,
    protocol: str = "dev",
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    skip_malformed: bool = False,
) -> TaskData:
    """Load a GLUE task from ``train.tsv`` + dev file(s) and apply the split protocol."""
    task = task.lower()
    if task not in SPECS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {list(GLUE_TASKS)}")
    spec = SPECS[task]
    root = _task_dir(spec, Path(data_dir))
    for name in ("train.tsv", spec.dev_files[0]):
        if not (root / name).is_file():
            raise DataError(
                f"missing {name}; a {task} folder must hold train.tsv and {spec.dev_files[0]} ({_layout(spec)})",
                root / name,
            )
    train = read_glue_file(task, root / "train.tsv", skip_malformed)
    dev = read_glue_file(task, root / spec.dev_files[0], skip_malformed)
    tr, val, test = apply_protocol(train, dev, protocol, seed, max_train_samples, max_eval_samples)
    extra: dict[str, list[Example]] = {}
    if task == "mnli" and (root / "dev_mismatched.tsv").is_file():
        # Never used for selection, so it stays whole under both protocols.
        mism = read_glue_file(task, root / "dev_mismatched.tsv", skip_malformed)
        extra["test_mismatched"] = subsample(mism, max_eval_samples, seed, "eval")
    metric_names, main = metrics_for_task(task)
    return TaskData(
        name=task,
        train=tr,
        validation=val,
        test=test,
        num_labels=1 if spec.raw_labels is None else len(spec.raw_labels),
        is_regression=spec.raw_labels is None,
        label_names=None if spec.label_names is None else list(spec.label_names),
        metric_names=metric_names,
        main_metric=main,
        protocol=protocol,
        seed=seed,
        extra_test=extra,
    )
