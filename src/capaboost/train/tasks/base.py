"""What the runner needs from a task, and the on-disk cache of tokenized splits.

A task turns local files into *features* (one dict per training/evaluation example, model inputs
plus ``labels``), builds the base model with the right head, batches features (``collate``) and
scores a split (``evaluate``: by default ``score`` on the model's gathered outputs). The runner owns
everything else (optimisation, distribution, checkpoints), so a new task is one row in the task table
(``capaboost.data.task_specs``) and, for a new family, one subclass in ``tasks.TASK_CLASSES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn as nn

from ...data import load_task
from ...data.task_specs import greater_is_better
from ...checkpoint import atomic_write_bytes
from ..models import build_base_model, load_tokenizer

if TYPE_CHECKING:  # annotations only: run_config reads the task table, so importing it here would close a circle
    from ..run_config import RunConfig

CACHE_VERSION = 1


class Task:
    """Base class of the runner's tasks. Subclasses set the class attributes and implement ``load`` and
    ``score`` (or, for tasks that do not score gathered outputs, override ``evaluate``)."""

    model_kind: ClassVar[str] = "seq_cls"  # key of models.MODEL_KINDS
    peft_task_type: ClassVar[Optional[str]] = None  # PEFT task_type: makes the head trainable and saved
    head_modules: ClassVar[tuple[str, ...]] = ()  # heads to train when there is no PEFT task_type
    output_keys: ClassVar[tuple[str, ...]] = ("logits",)  # model outputs gathered for scoring
    # False: evaluate() scores the model itself (causal-lm generates) instead of scoring the features' outputs
    scores_outputs: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.name = cfg.task
        self.train: list[dict] = []
        self.eval_splits: dict[str, list[dict]] = {}  # "validation", "test", extra test sets
        self.num_labels = 2
        self.is_regression = False
        self.metric_names: list[str] = []
        self.main_metric = "accuracy"
        self.tokenizer: Any = None

    # --- to implement
    def load(self) -> None:
        """Fill ``train``, ``eval_splits``, ``num_labels``, ``metric_names``, ``main_metric``."""
        raise NotImplementedError

    def score(self, split: str, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics of ``split`` from the gathered ``output_keys`` arrays (in feature order)."""
        raise NotImplementedError

    # --- shared defaults
    def evaluate(
        self, model: nn.Module, split: str, outputs: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, float]:
        """Metrics of ``split``, called on every process with the unwrapped model.

        ``outputs()`` runs the runner's distributed prediction and returns the gathered ``output_keys``
        arrays; the default scores them. Tasks with ``scores_outputs = False`` override this and never call it.
        """
        return self.score(split, outputs())

    @property
    def greater_is_better(self) -> bool:
        """Direction of ``main_metric`` (the task table's metric facts): model selection maximises or minimises it."""
        return greater_is_better(self.main_metric)

    def load_cached(self, build: Callable[[], dict[str, Any]], **key_extra: Any) -> None:
        """Load the tokenizer, then the task's tokenized data from the cache (``build`` runs once per key)."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        key = {
            "task": cfg.task,
            "data_dir": cfg.data_dir,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "max_seq_len": cfg.max_seq_len,
            "protocol": cfg.protocol,
            "seed": cfg.seed,
            "samples": [cfg.max_train_samples, cfg.max_eval_samples],
            **key_extra,
        }
        self.__dict__.update(cached(cfg, key, build))

    def read_task(self, name: str, **options: Any) -> Any:
        """Task ``name``'s data through its reader (``data.load_task``), with the run's split protocol, seed and
        subsample sizes; ``options`` go to the reader."""
        cfg = self.cfg
        return load_task(name, cfg.data_dir, protocol=cfg.protocol, seed=cfg.seed,
                         max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples, **options)

    def build_model(self) -> nn.Module:
        return build_base_model(self.model_kind, self.cfg.model, self.num_labels, self.is_regression)

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Dynamic padding: pad token sequences to the longest in the batch, stack the rest."""
        return pad_batch(features, self.tokenizer.pad_token_id if self.tokenizer is not None else 0)

    def model_selection(self) -> bool:
        """Whether the best validation checkpoint may be reported (propetl); under dev it would leak test."""
        return self.cfg.protocol == "propetl"

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), **{k: len(v) for k, v in self.eval_splits.items()}}

    def info(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the model without the data."""
        return {"kind": self.model_kind, "num_labels": self.num_labels, "is_regression": self.is_regression}


SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def pad_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the token columns to the batch's longest row (right padding), tensorise the others."""
    batch: dict[str, torch.Tensor] = {}
    longest = max((len(f["input_ids"]) for f in features if "input_ids" in f), default=0)
    for key in features[0]:
        values = [f[key] for f in features]
        if key in SEQUENCE_KEYS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([list(v) + [fill] * (longest - len(v)) for v in values], dtype=torch.long)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = torch.tensor(values)
    return batch


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("CAPABOOST_CACHE_DIR") or Path.home() / ".cache" / "capaboost")


def files_fingerprint(path: Optional[str]) -> list:
    """(name, size, mtime) of the data files: a changed file invalidates the cache."""
    if not path:
        return []
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())[:500]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _code_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for src in sorted([*(here.parent.parent / "data").glob("*.py"), *here.glob("*.py")]):
        digest.update(src.read_bytes())
    return digest.hexdigest()[:16]


def cached(cfg: RunConfig, key: dict[str, Any], build: Callable[[], Any]) -> Any:
    """``build()``'s result, tokenized once per (data files, tokenizer, options, reader code) and reused."""
    key = {**key, "version": CACHE_VERSION, "code": _code_fingerprint(), "files": files_fingerprint(cfg.data_dir)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir(cfg) / f"{cfg.task}-{digest}.pkl"
    if path.is_file():
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError):
            pass  # a torn or stale file: rebuild it
    value = build()
    try:
        atomic_write_bytes(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass  # a read-only cache only costs speed
    return value


def tokenizer_fingerprint(tokenizer: Any) -> list:
    return [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer.padding_side]
