"""Causal-LM evaluation (perplexity over response tokens, exact match of greedy generations) and the
runner's ``causal-lm`` task.

Perplexity is exp(total NLL / number of response tokens) over the whole set, not a mean of
per-batch or per-example perplexities, so it does not depend on batching or padding.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...data.causal_lm import (
    IGNORE_INDEX,
    CausalLMCollator,
    CausalLMExample,
    load_causal_lm,
    pack_features,
    pad_token_id,
    prompt_ids,
    tokenize_example,
)
from ...distributed import all_reduce_sum, rank_and_world
from ..errors import ConfigError

from ..methods import PREFIX_METHODS
from .base import Task

def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(sum of next-token NLL over labelled tokens, their count) for one collated batch."""
    device = _device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    return float(nll), int((labels != IGNORE_INDEX).sum())


def nll_totals(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed NLL, labelled-token count) over ``batches``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        nll, n = response_nll(model, batch)
        total, count = total + nll, count + n
    model.train(was_training)
    return total, count


def _from_totals(total: float, count: float) -> dict[str, float]:
    if count == 0:
        raise ValueError("no labelled tokens to score: every response was empty or truncated away.")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``{"loss": mean token NLL, "perplexity": exp(loss)}`` over all labelled tokens of ``batches``."""
    return _from_totals(*nll_totals(model, batches))


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    was_training = model.training
    model.eval()
    pad, device, out = pad_token_id(tokenizer), _device(model), []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        if any(not r for r in rows):
            raise ValueError("greedy generation needs a non-empty prompt (or a tokenizer that adds BOS).")
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                   use_cache=True)  # also after packed training turned the config's cache off
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not references:
        raise ValueError("cannot compute exact match on zero examples.")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def evaluate_causal_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[CausalLMExample],
    max_length: int = 512,
    batch_size: int = 8,
    max_new_tokens: Optional[int] = None,
) -> dict[str, float]:
    """Perplexity on every example; exact match on the prompt/response ones (``text`` and chat rows have none).

    Under torch.distributed each rank scores every world-size-th example and the sums are
    all-reduced, so all ranks return the metrics of the whole set (call it on every rank, with the
    unwrapped model). ``max_new_tokens`` defaults to the longest reference response plus its EOS.
    """
    rank, world = rank_and_world()
    pairs = [e for e in examples if e.has_reference]
    if pairs and max_new_tokens is None:  # from all pairs, so every rank generates equally far
        max_new_tokens = 1 + max(len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in pairs)
    collate = CausalLMCollator(pad_token_id(tokenizer))
    features = [tokenize_example(e, tokenizer, max_length) for e in examples[rank::world]]
    total, count = nll_totals(model, (collate(features[i:i + batch_size]) for i in range(0, len(features), batch_size)))
    mine = pairs[rank::world]
    predictions = greedy_generate(model, tokenizer, [e.prompt for e in mine], max_new_tokens, batch_size) if mine else []
    correct = exact_match(predictions, [e.response for e in mine]) * len(mine) if mine else 0.0
    total, count, correct = all_reduce_sum([total, count, correct])
    metrics = _from_totals(total, count)
    if pairs:
        metrics["exact_match"] = correct / len(pairs)
    return metrics


class CausalLMTask(Task):
    """Runner task ``causal-lm``: JSONL folder -> response-only LM loss; perplexity (main) and exact match."""

    model_kind = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    scores_outputs = False  # perplexity needs the labels and exact match generates: evaluate() does both

    def load(self) -> None:
        """Tokenize the splits; with ``--packing`` the training split becomes ``max_seq_len`` blocks (evaluation
        stays one example per row, so perplexity and exact match do not depend on packing)."""
        cfg = self.cfg
        if cfg.packing and cfg.method in PREFIX_METHODS:
            raise ConfigError(f"--packing does not work with {cfg.method!r}: prefix tuning feeds the prefix as a KV "
                              "cache, so packed examples would attend to each other; drop --packing.")

        def build() -> dict[str, Any]:
            data = load_causal_lm(cfg.data_dir, cfg.protocol, cfg.seed, cfg.max_train_samples, cfg.max_eval_samples)
            encode = lambda examples: [  # noqa: E731
                {**tokenize_example(e, self.tokenizer, cfg.max_seq_len), "example": e} for e in examples]
            train = encode(data.train)
            if cfg.packing:
                train = pack_features(train, cfg.max_seq_len)
            return {"metric_names": list(data.metric_names), "main_metric": data.main_metric, "train": train,
                    "eval_splits": {"validation": encode(data.validation), "test": encode(data.test)}}

        self.load_cached(build, packing=cfg.packing)

    def build_model(self) -> torch.nn.Module:
        """The base model; packed training runs it without a KV cache, which transformers' packed-sequence
        detection (block-diagonal attention from the restarting ``position_ids``) requires."""
        model = super().build_model()
        if self.cfg.packing:
            model.config.use_cache = False
        return model

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return CausalLMCollator(pad_token_id(self.tokenizer))(features)

    def evaluate(self, model: torch.nn.Module, split: str, outputs: Optional[Callable[[], Any]] = None) -> dict[str, float]:
        """Perplexity and exact match of ``split`` on every rank; the runner's gathered ``outputs`` are not used."""
        examples = [f["example"] for f in self.eval_splits[split]]
        return evaluate_causal_lm(model, self.tokenizer, examples, self.cfg.max_seq_len, self.cfg.eval_batch_size)
