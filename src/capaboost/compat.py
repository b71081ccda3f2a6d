"""Fixes for upstream releases newer than the PEFT we build on.

transformers 5.24 renamed the encoders' ``past_key_values`` argument to ``cache`` (the old name is
still accepted through a deprecation wrapper until 5.40). PEFT 0.21's prefix tuning for
classification, token classification and QA decides whether a backbone "supports past key values"
by reading the parameter names of its ``forward``, so on 5.24 it refuses every BERT-like model,
although the model would take the prefix. We keep PEFT's code path and only hand it a backbone
whose ``forward`` carries the old name, forwarding the prefix as ``cache``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Any, Callable

import torch.nn as nn

#: PEFT task models whose prefix path inspects the backbone's signature.
_PREFIX_TASK_MODELS = (
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
)


def _takes(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def needs_cache_rename(backbone: nn.Module) -> bool:
    """True where the backbone takes ``cache`` but no longer names ``past_key_values``."""
    return _takes(backbone, "cache") and not _takes(backbone, "past_key_values")


def _with_cache_rename(prefix_forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(prefix_forward)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        backbone = self.base_model.get_submodule(self.transformer_backbone_name)
        if _takes(self.base_model, "past_key_values") or not needs_cache_rename(backbone):
            return prefix_forward(self, *args, **kwargs)
        inner = backbone.forward

        def renamed(*a: Any, past_key_values: Any = None, **kw: Any) -> Any:
            return inner(*a, cache=past_key_values, **kw)

        backbone.forward = renamed  # instance attribute, removed again below
        try:
            return prefix_forward(self, *args, **kwargs)
        finally:
            del backbone.forward

    forward.capaboost_compat = True
    return forward


def import_torchao_quietly() -> None:
    """Import torchao (if installed) with its load-time warnings at ERROR level, then restore them.

    transformers imports torchao whenever it is installed; on a CPU, or a Python other than the wheel's, torchao
    logs a "Failed to load" line per CUDA kernel library and torch's pytree logs deprecations: noise on every
    command, none of it about what runs. Importing it first, quietly, leaves later imports silent.
    """
    if importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401  (what transformers imports: the noisy parts)
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken torchao only matters to --quantize int8, which says so
        pass
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def install() -> None:
    """Patch PEFT's prefix path once (idempotent); a no-op on models that still name the argument."""
    from peft import peft_model

    for name in _PREFIX_TASK_MODELS:
        cls = getattr(peft_model, name)
        if not getattr(cls._prefix_tuning_forward, "capaboost_compat", False):
            cls._prefix_tuning_forward = _with_cache_rename(cls._prefix_tuning_forward)
