"""Causal-LM data: JSONL of ``prompt``/``response`` pairs (loss on the response only), plain ``text``, or chat
``messages`` (the tokenizer's chat template, loss on the assistant turns: :mod:`capaboost.data.chat`).

Prompt and response are tokenized separately and concatenated, so the prompt ids seen in training
are exactly those that :func:`capaboost.train.tasks.causal_lm.greedy_generate` continues from; with BPE
tokenizers start the response with the space that separates it from the prompt (``" 4"``). The
tokenizer's EOS is appended to every response so the model learns where to stop.

Packing (:func:`pack_features`, the runner's ``--packing``) concatenates short training sequences into
blocks of at most ``max_length`` tokens, so batches carry fewer padding tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from capaboost.data.chat import read_messages, tokenize_chat
from capaboost.data.errors import DataError
from capaboost.data.io import iter_jsonl
from capaboost.data.protocols import apply_protocol
from capaboost.data.task_specs import task_spec

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss
TRAIN_FILES = ("train.jsonl",)
EVAL_FILES = ("validation.jsonl", "dev.jsonl")


@dataclass
class CausalLMExample:
    """One training sequence; plain ``text`` rows have ``prompt=""`` and ``is_text=True`` (no exact match); chat rows
    carry ``messages`` (``prompt``/``response`` empty) and are scored by perplexity only."""

    prompt: str
    response: str
    is_text: bool = False
    messages: Optional[list[dict[str, str]]] = None
    source: tuple[Optional[str], Optional[int]] = field(default=(None, None), compare=False, repr=False)

    @property
    def has_reference(self) -> bool:
        """Whether exact match scores it: prompt/response rows only."""
        return not self.is_text and self.messages is None


@dataclass
class CausalLMData:
    """A causal-LM task after the split protocol."""

    name: str
    train: list[CausalLMExample]
    validation: list[CausalLMExample]
    test: list[CausalLMExample]
    metric_names: tuple[str, ...]  # from the task table (capaboost.data.task_specs)
    main_metric: str

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def _string(obj: dict, field: str, path: Path, line: int) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{field!r} must be a string, got {type(value).__name__}", path, line, field)
    return value


def read_causal_lm_jsonl(path: str | Path) -> list[CausalLMExample]:
    """Rows ``{"prompt": ..., "response": ...}``, ``{"text": ...}`` or ``{"messages": [...]}`` (detected per row);
    anything else names the line and field."""
    path = Path(path)
    out: list[CausalLMExample] = []
    for line, obj in iter_jsonl(path):
        if "messages" in obj:
            others = sorted(set(obj) & {"text", "prompt", "response"})
            if others:
                raise DataError(f"a row has either 'messages' or {others}, not both", path, line, "messages")
            out.append(CausalLMExample("", "", messages=read_messages(obj["messages"], path, line),
                                       source=(str(path), line)))
            continue
        if "text" in obj and ("prompt" in obj or "response" in obj):
            raise DataError("a row has either 'text' or 'prompt'/'response', not both", path, line, "text")
        if "text" in obj:
            text = _string(obj, "text", path, line)
            if not text.strip():
                raise DataError("'text' is empty: nothing to train on", path, line, "text")
            out.append(CausalLMExample("", text, is_text=True))
            continue
        for field in ("prompt", "response"):
            if field not in obj:
                raise DataError(
                    f"missing field {field!r}; each row needs 'prompt' and 'response' (loss on the response), "
                    f"'text' or 'messages'; fields found: {sorted(obj)}", path, line, field)
        prompt, response = _string(obj, "prompt", path, line), _string(obj, "response", path, line)
        if not response.strip():
            raise DataError("'response' is empty: the loss is on the response only", path, line, "response")
        out.append(CausalLMExample(prompt, response))
    return out


def _find(data_dir: Path, names: Sequence[str]) -> Optional[Path]:
    return next((data_dir / n for n in names if (data_dir / n).is_file()), None)


def load_causal_lm(
    data_dir: str | Path,
    protocol: str = "dev",
    seed: int = 0,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
) -> CausalLMData:
    """``train.jsonl`` + ``validation.jsonl`` (or ``dev.jsonl``) from ``data_dir``, split like the GLUE tasks."""
    data_dir = Path(data_dir)
    train_file, eval_file = _find(data_dir, TRAIN_FILES), _find(data_dir, EVAL_FILES)
    if train_file is None or eval_file is None:
        missing = TRAIN_FILES[0] if train_file is None else " or ".join(EVAL_FILES)
        raise DataError(
            f"missing {missing}; a causal-lm folder holds train.jsonl and validation.jsonl (or dev.jsonl), one JSON "
            'object per line: {"prompt": ..., "response": ...}, {"text": ...} or {"messages": [...]}',
            data_dir / missing.split()[0])
    train, val, test = apply_protocol(read_causal_lm_jsonl(train_file), read_causal_lm_jsonl(eval_file), protocol,
                                      seed, max_train_samples, max_eval_samples)
    spec = task_spec("causal-lm")
    return CausalLMData(name=spec.name, train=train, validation=val, test=test, metric_names=spec.metrics,
                        main_metric=spec.main_metric)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt tokens with the tokenizer's own special prefix (e.g. LLaMA's BOS); shared with generation."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def tokenize_example(example: CausalLMExample, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + response + EOS, ``labels`` = -100 on the prompt (chat rows: ``tokenize_chat``).

    Over ``max_length`` the response keeps its head (at most ``max_length - 1`` tokens) and the
    prompt its tail, the part next to the response.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt or BOS token and one target), got {max_length}.")
    if example.messages is not None:
        return tokenize_chat(example.messages, tokenizer, max_length, example.source)
    head = prompt_ids(tokenizer, example.prompt)  # plain text: "" -> just the special prefix, if any
    body = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        body.append(tokenizer.eos_token_id)
    body = body[: max_length - 1] if head else body[:max_length]
    head = head[len(head) - (max_length - len(body)):] if len(head) + len(body) > max_length else head
    return {"input_ids": head + body, "labels": [IGNORE_INDEX] * len(head) + body}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its EOS (padding is masked out, so its id does not matter)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token = ... before use.")


def pack_features(features: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenized examples concatenated, in order, into blocks of at most ``max_length`` tokens (next-fit: a block
    is closed when the next example does not fit), each with ``position_ids`` restarting at 0 per example.

    Each example's first label is set to -100 in the block: unpacked, that label never counts (nothing before it
    predicts it), and packed it would make the previous example's last token predict the next example's
    first, so the loss covers exactly the tokens it covers unpacked. The restarting ``position_ids`` give
    every example its own positions and, fed without an attention mask and without a KV cache, let
    transformers build a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``, on every
    attention backend, CPU included), so no example attends to another (see :class:`CausalLMCollator`).
    """
    blocks: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for f in features:
        n = len(f["input_ids"])
        if n > max_length:
            raise ValueError(f"a feature of {n} tokens is longer than the block length {max_length}.")
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            blocks.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += list(f["input_ids"])
        current["labels"] += [IGNORE_INDEX] + list(f["labels"][1:])
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        blocks.append(current)
    return blocks


class CausalLMCollator:
    """Right-pads ``input_ids``/``labels`` (labels with -100) and builds the attention mask.

    Packed blocks (features with ``position_ids``) get ``position_ids`` instead of an attention mask: the
    padding is one more sequence of its own (positions 0, 1, ...; labels -100), so transformers' packed-sequence
    detection keeps every example, and the padding, to itself. The model must run without a KV cache
    (``use_cache=False``) for that detection to apply.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if "position_ids" in features[0]:
            return self._packed(features, width)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _packed(self, features: Sequence[dict[str, list[int]]], width: int) -> dict[str, torch.Tensor]:
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width).repeat(len(features), 1)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            positions[i, :n], positions[i, n:] = torch.tensor(f["position_ids"]), torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
