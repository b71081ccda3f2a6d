"""Loading base models and tokenizers from local paths, one loader per head kind.

A trained checkpoint records its ``kind`` and ``num_labels`` so ``capaboost rank``/``export`` can
rebuild exactly the model it was trained on without reading the data again.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .errors import ConfigError

TIMM_PREFIX = "timm:"


def _check_path(path: str) -> None:
    if path.startswith(TIMM_PREFIX):
        return
    if not Path(path).exists():
        raise ConfigError(
            f"--model {path!r} does not exist; pass a local folder saved with save_pretrained "
            "(nothing is downloaded), or 'timm:NAME' for a timm vision model."
        )


def max_sequence_length(path: str) -> Optional[int]:
    """Longest input the model at ``path`` takes (its position table, or its tokenizer's stated limit if lower).

    Read from the saved JSON files alone, so it costs nothing before training; None when they do not say
    (timm models, missing files: those fail or pass later on their own).
    """
    if path.startswith(TIMM_PREFIX):
        return None
    limits = []
    for name, keys in (("config.json", ("max_position_embeddings", "n_positions")),
                       ("tokenizer_config.json", ("model_max_length",))):
        file = Path(path) / name
        try:
            data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError):
            continue
        # 1e30 is transformers' "no limit" placeholder for model_max_length
        limits += [int(data[k]) for k in keys if isinstance(data.get(k), (int, float)) and 0 < data[k] < 1e9]
    return min(limits) if limits else None


def check_max_seq_len(max_seq_len: int, path: str) -> None:
    """Refuse a --max-seq-len the model cannot take, before training (it would fail mid-run with an index error)."""
    limit = max_sequence_length(path)
    if limit is not None and max_seq_len > limit:
        raise ConfigError(
            f"--max-seq-len {max_seq_len} exceeds the model's maximum of {limit} tokens ({path}); "
            f"pass --max-seq-len {limit} or less."
        )


def load_tokenizer(path: str) -> Any:
    """The model's fast tokenizer, with a pad token (GPT-style models have none)."""
    from transformers import AutoTokenizer

    _check_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _seq_cls(path: str, num_labels: int, is_regression: bool) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=num_labels,
        problem_type="regression" if is_regression else "single_label_classification",
        ignore_mismatched_sizes=True,
    )
    if model.config.pad_token_id is None:  # GPT-style heads pool the last non-pad token
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def _qa(path: str, num_labels: int, is_regression: bool) -> nn.Module:
    from transformers import AutoModelForQuestionAnswering

    return AutoModelForQuestionAnswering.from_pretrained(path)


class TimmClassifier(nn.Module):
    """A timm model behind the HF calling convention (``pixel_values``, ``labels`` -> loss, logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **_: Any) -> SimpleNamespace:
        logits = self.model(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def _image(path: str, num_labels: int, is_regression: bool) -> nn.Module:
    if path.startswith(TIMM_PREFIX):
        from ..timm_compat import import_timm

        try:
            timm = import_timm()
        except ImportError as err:
            raise ConfigError(f"--model {path!r} needs timm, which failed to import: {err}") from err
        name, _, weights = path[len(TIMM_PREFIX) :].partition("@")
        overlay = {"file": weights} if weights else None
        model = timm.create_model(name, pretrained=bool(weights), pretrained_cfg_overlay=overlay, num_classes=num_labels)
        return TimmClassifier(model)
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True)


def _causal_lm(path: str, num_labels: int, is_regression: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


# kind -> loader(path, num_labels, is_regression); one entry per head kind
MODEL_KINDS: dict[str, Callable[[str, int, bool], nn.Module]] = {
    "seq_cls": _seq_cls, "qa": _qa, "image": _image, "causal_lm": _causal_lm}


def build_base_model(kind: str, path: str, num_labels: int = 2, is_regression: bool = False) -> nn.Module:
    """A base model with a fresh head of ``num_labels`` outputs, loaded from local files only."""
    _check_path(path)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" reports are expected here
    try:
        return MODEL_KINDS[kind](path, num_labels, is_regression)
    finally:
        hf_logging.set_verbosity(verbosity)


def image_preprocessing(model: nn.Module, path: str) -> dict[str, Any]:
    """(size, mean, std, channels) the model expects: from its processor config, else the HF ViT defaults."""
    if isinstance(model, TimmClassifier):
        cfg = model.model.pretrained_cfg
        _, height, width = cfg.get("input_size", (3, 224, 224))
        return {"size": (height, width), "mean": cfg.get("mean", (0.5,) * 3), "std": cfg.get("std", (0.5,) * 3), "channels": 3}
    config = model.config
    size = getattr(config, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    prep = {"size": size, "mean": (0.5,) * 3, "std": (0.5,) * 3, "channels": getattr(config, "num_channels", 3)}
    proc = Path(path) / "preprocessor_config.json"
    if proc.is_file():
        data = json.loads(proc.read_text())
        prep["mean"] = data.get("image_mean", prep["mean"])
        prep["std"] = data.get("image_std", prep["std"])
    return prep
