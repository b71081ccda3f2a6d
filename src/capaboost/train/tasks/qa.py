"""Extractive QA on SQuAD v1.1/v2.0 JSON: windowed features, a span head, EM/F1 after decoding."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...data.squad import postprocess_predictions, prepare_eval_features, prepare_train_features, references
from ...data.metrics import compute_metrics
from .base import Task

_BOOKKEEPING = ("example_id", "offset_mapping", "cls_index")


def _rows(columns: dict[str, list], keep: tuple[str, ...]) -> list[dict]:
    """Column dict -> one dict per window, trimmed of padding (the collator re-pads per batch)."""
    rows = []
    for i in range(len(columns["input_ids"])):
        length = int(sum(columns["attention_mask"][i]))
        row = {k: list(columns[k][i][:length]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in columns}
        row.update({k: columns[k][i] for k in keep})
        rows.append(row)
    return rows


class QuestionAnsweringTask(Task):
    model_kind = "qa"
    peft_task_type = "QUESTION_ANS"
    output_keys = ("start_logits", "end_logits")

    @property
    def doc_stride(self) -> int:
        return self.cfg.doc_stride or max(1, self.cfg.max_seq_len // 4)

    def load(self) -> None:
        self.load_cached(self._read_and_encode, doc_stride=self.doc_stride)

    def _read_and_encode(self) -> dict[str, Any]:
        cfg = self.cfg
        data = self.read_task(cfg.task)
        args = (self.tokenizer, cfg.max_seq_len, self.doc_stride)
        train = _rows(prepare_train_features(data.train, *args), ("start_positions", "end_positions"))
        evals, meta = {}, {}
        for split, examples in (("validation", data.validation), ("test", data.test)):
            columns = prepare_eval_features(examples, *args)
            evals[split] = _rows(columns, ())
            meta[split] = {"examples": examples, **{k: columns[k] for k in _BOOKKEEPING}}
        return {
            "num_labels": 2,
            "metric_names": list(data.metric_names),
            "main_metric": data.main_metric,
            "version_2": data.version_2,
            "train": train,
            "eval_splits": evals,
            "eval_meta": meta,
        }

    def score(self, split: str, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        meta = self.eval_meta[split]
        predictions = postprocess_predictions(
            meta["examples"], meta, outputs["start_logits"], outputs["end_logits"], version_2=self.version_2
        )
        return compute_metrics(self.cfg.task, predictions, references(meta["examples"]))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "num_labels": 2}
