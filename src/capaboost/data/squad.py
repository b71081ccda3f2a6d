"""SQuAD v1.1 / v2.0 extractive QA: JSON reader, HF-style features, answer decoding.

The feature and post-processing code follows the Hugging Face ``run_qa``
example (offset mappings of a *fast* tokenizer, overflowing windows with
``doc_stride``), so results are comparable to numbers reported with it.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capaboost.data.errors import DataError
from capaboost.data.protocols import apply_protocol
from capaboost.data.task_specs import metrics_for_task

# Accepted file names, most specific first.
FILE_NAMES = {
    "squad": {"train": ("train-v1.1.json", "train.json"), "dev": ("dev-v1.1.json", "dev.json")},
    "squad_v2": {"train": ("train-v2.0.json", "train.json"), "dev": ("dev-v2.0.json", "dev.json")},
}


@dataclass
class SquadExample:
    """One question; ``answer_texts``/``answer_starts`` are empty when unanswerable."""

    id: str
    question: str
    context: str
    answer_texts: list[str]
    answer_starts: list[int]
    is_impossible: bool = False
    title: str = ""


@dataclass
class SquadData:
    """SQuAD after the split protocol (dev plays GLUE's dev role)."""

    name: str
    train: list[SquadExample]
    validation: list[SquadExample]
    test: list[SquadExample]
    version_2: bool
    metric_names: list[str]
    main_metric: str
    protocol: str = "dev"
    seed: int = 0

    def sizes(self) -> dict[str, int]:
        """Split sizes, handy for logs and sanity checks."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def references(examples: Sequence[SquadExample]) -> dict[str, list[str]]:
    """Gold answers by id, the ``references`` argument of ``compute_metrics("squad", ...)``."""
    return {ex.id: list(ex.answer_texts) for ex in examples}


# ------------------------------------------------------------------ reading
def _get(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"malformed SQuAD JSON at {where}: expected an object, got {type(obj).__name__}", path)
    if key not in obj:
        raise DataError(f"malformed SQuAD JSON at {where}: missing key {key!r} (keys found: {sorted(obj)})", path)
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(
            f"malformed SQuAD JSON at {where}.{key}: expected {name}, got {type(value).__name__}", path
        )
    return value


def read_squad_file(path: str | Path, version_2: bool = False) -> list[SquadExample]:
    """Parse a SQuAD-format JSON file.

    Malformed input fails with the JSON path of the bad node (e.g.
    ``data[0].paragraphs[2].qas[1].answers[0].answer_start``) because SQuAD
    files are one long line, so line numbers alone would not help.
    Unanswerable questions are an error unless ``version_2``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at column {e.colno}: {e.msg}", path, e.lineno) from e
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8: {e}", path) from e
    articles = _get(raw, "data", list, path, "<root>")
    out: list[SquadExample] = []
    seen: set[str] = set()
    for a, article in enumerate(articles):
        where_a = f"data[{a}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, para in enumerate(_get(article, "paragraphs", list, path, where_a)):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = _get(para, "context", str, path, where_p)
            for q, qa in enumerate(_get(para, "qas", list, path, where_p)):
                where = f"{where_p}.qas[{q}]"
                qid = str(_get(qa, "id", (str, int), path, where))
                if qid in seen:
                    raise DataError(f"duplicate question id {qid!r} at {where}", path)
                seen.add(qid)
                question = _get(qa, "question", str, path, where)
                answers = _get(qa, "answers", list, path, where) if "answers" in qa or not version_2 else []
                impossible = bool(qa.get("is_impossible", False)) or (version_2 and not answers)
                texts, starts = [], []
                if not impossible:
                    for n, ans in enumerate(answers):
                        w = f"{where}.answers[{n}]"
                        text = _get(ans, "text", str, path, w)
                        start = _get(ans, "answer_start", int, path, w)
                        if not 0 <= start <= len(context) - len(text):
                            raise DataError(
                                f"answer_start {start} at {w} puts {text!r} outside the context "
                                f"({len(context)} characters)",
                                path,
                            )
                        texts.append(text)
                        starts.append(start)
                    if not texts:
                        raise DataError(
                            f"question {qid!r} at {where} has no answers; unanswerable questions need squad_v2",
                            path,
                        )
                out.append(SquadExample(qid, question, context, texts, starts, impossible, title))
    if not out:
        raise DataError("file contains no questions", path)
    return out


def _find_file(data_dir: Path, task: str, split: str) -> Path:
    names = FILE_NAMES[task][split]
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(
        f"missing {split} file; expected one of {list(names)} in SQuAD JSON format "
        '({"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]})',
        data_dir / names[-1],
    )


def load_squad(
    data_dir: str | Path,
    version_2: bool = False,
    protocol: str = "dev",
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> SquadData:
    """Load SQuAD train/dev JSON and apply the split protocol like GLUE."""
    task = "squad_v2" if version_2 else "squad"
    data_dir = Path(data_dir)
    train = read_squad_file(_find_file(data_dir, task, "train"), version_2)
    dev = read_squad_file(_find_file(data_dir, task, "dev"), version_2)
    tr, val, test = apply_protocol(train, dev, protocol, seed, max_train_samples, max_eval_samples)
    metric_names, main = metrics_for_task(task)
    return SquadData(task, tr, val, test, version_2, metric_names, main, protocol, seed)


# ------------------------------------------------------------------ features
def _tokenize(examples: Sequence[SquadExample], tokenizer: Any, max_len: int, doc_stride: int) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("SQuAD preprocessing needs a fast tokenizer (offset mappings)")
    pad_right = tokenizer.padding_side == "right"
    # Leading spaces in questions would waste tokens and can break truncation.
    questions = [ex.question.lstrip() for ex in examples]
    contexts = [ex.context for ex in examples]
    return tokenizer(
        questions if pad_right else contexts,
        contexts if pad_right else questions,
        truncation="only_second" if pad_right else "only_first",
        max_length=max_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def _cls_index(input_ids: Sequence[int], tokenizer: Any) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0


def prepare_train_features(
    examples: Sequence[SquadExample], tokenizer: Any, max_len: int = 384, doc_stride: int = 128
) -> dict[str, list]:
    """Tokenize into (possibly several overlapping) windows with start/end token labels.

    A window that does not contain the whole answer, and every window of an
    unanswerable question, points both labels at the CLS token — the SQuAD v2
    convention for "no answer here".
    """
    enc = _tokenize(examples, tokenizer, max_len, doc_stride)
    context_id = 1 if tokenizer.padding_side == "right" else 0
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        cls = _cls_index(enc["input_ids"][i], tokenizer)
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        if ex.is_impossible or not ex.answer_starts:
            starts.append(cls)
            ends.append(cls)
            continue
        start_char = ex.answer_starts[0]
        end_char = start_char + len(ex.answer_texts[0])
        seq = enc.sequence_ids(i)
        lo = seq.index(context_id)
        hi = len(seq) - 1 - seq[::-1].index(context_id)
        if not (offsets[lo][0] <= start_char and offsets[hi][1] >= end_char):
            starts.append(cls)
            ends.append(cls)
            continue
        while lo < len(offsets) and seq[lo] == context_id and offsets[lo][0] <= start_char:
            lo += 1
        while seq[hi] == context_id and offsets[hi][1] >= end_char:
            hi -= 1
        starts.append(lo - 1)
        ends.append(hi + 1)
    out = {k: list(v) for k, v in enc.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
    out["start_positions"] = starts
    out["end_positions"] = ends
    return out


def prepare_eval_features(
    examples: Sequence[SquadExample], tokenizer: Any, max_len: int = 384, doc_stride: int = 128
) -> dict[str, list]:
    """Tokenize for inference, keeping what decoding needs.

    ``example_id``, ``offset_mapping`` (``None`` outside the context) and
    ``cls_index`` are bookkeeping columns: drop them before the forward pass.
    """
    enc = _tokenize(examples, tokenizer, max_len, doc_stride)
    context_id = 1 if tokenizer.padding_side == "right" else 0
    ids, offs, cls = [], [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        ids.append(examples[enc["overflow_to_sample_mapping"][i]].id)
        offs.append([tuple(o) if s == context_id else None for o, s in zip(offsets, seq)])
        cls.append(_cls_index(enc["input_ids"][i], tokenizer))
    out = {k: list(v) for k, v in enc.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
    out["example_id"] = ids
    out["offset_mapping"] = offs
    out["cls_index"] = cls
    return out


def postprocess_predictions(
    examples: Sequence[SquadExample],
    features: Mapping[str, Sequence],
    start_logits: Sequence[Sequence[float]] | np.ndarray,
    end_logits: Sequence[Sequence[float]] | np.ndarray,
    n_best: int = 20,
    max_answer_len: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Turn per-window logits into one answer string per example id.

    Each window proposes its ``n_best`` start x end spans; the best-scoring
    valid span over all windows wins. Under v2 the answer is "" when the
    lowest CLS (null) score beats the best span by more than
    ``null_threshold``.
    """
    start_logits = np.asarray(start_logits)
    end_logits = np.asarray(end_logits)
    n_feat = len(features["example_id"])
    if start_logits.shape[0] != n_feat or end_logits.shape[0] != n_feat:
        raise ValueError(f"{n_feat} features but logits for {start_logits.shape[0]}/{end_logits.shape[0]}")
    by_example: dict[str, list[int]] = collections.defaultdict(list)
    for i, qid in enumerate(features["example_id"]):
        by_example[qid].append(i)
    cls_idx = features.get("cls_index") or [0] * n_feat

    preds: dict[str, str] = {}
    for ex in examples:
        min_null: float | None = None
        best_score, best_text = -np.inf, ""
        for fi in by_example.get(ex.id, []):
            s, e = start_logits[fi], end_logits[fi]
            offsets = features["offset_mapping"][fi]
            null = float(s[cls_idx[fi]] + e[cls_idx[fi]])
            min_null = null if min_null is None else min(min_null, null)
            top_s = np.argsort(s)[::-1][:n_best]
            top_e = np.argsort(e)[::-1][:n_best]
            for si in top_s:
                for ei in top_e:
                    if si >= len(offsets) or ei >= len(offsets) or offsets[si] is None or offsets[ei] is None:
                        continue
                    if ei < si or ei - si + 1 > max_answer_len:
                        continue
                    score = float(s[si] + e[ei])
                    if score > best_score:
                        best_score = score
                        best_text = ex.context[offsets[si][0] : offsets[ei][1]]
        if version_2 and min_null is not None and min_null - best_score > null_threshold:
            best_text = ""
        preds[ex.id] = best_text
    return preds
