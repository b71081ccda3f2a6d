"""Reloading a trained run's model from its ``adapter/`` folder (for ``capaboost rank`` and ``export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import SafetensorError

from ..checkpoint import RunFileError, read_json, verify_checksums
from .models import build_base_model
from .errors import ConfigError

RUN_INFO = "capaboost_run.json"


def adapter_dir(path: str | Path) -> Path:
    """The adapter folder of ``path``: a run's output folder or the adapter folder itself."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / RUN_INFO).is_file():
            return candidate
    raise ConfigError(
        f"{str(path)!r} is not a capaboost checkpoint: expected {RUN_INFO} in it or in its adapter/ folder "
        "(pass the --output-dir of a finished `capaboost train` run)."
    )


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, run info) rebuilt from the base model files and the saved adapter."""
    import capaboost  # noqa: F401  registers the CapaBoost methods with PEFT before loading

    folder = adapter_dir(path)
    fix = "restore the run's adapter/ folder from a copy, or train the run again (`capaboost train ... --overwrite`)."
    info = read_json(folder / RUN_INFO, fix)
    if not {"kind", "model", "num_labels"} <= set(info):
        raise RunFileError(f"{folder / RUN_INFO} lacks kind/model/num_labels (it was edited); {fix}")
    verify_checksums(folder, info.get("sha256", {}), fix)  # adapters saved before the checksums: unchecked
    peft = info.get("peft", True)
    weights = folder / ("adapter_model.safetensors" if peft else "trainable.safetensors")
    if not weights.is_file() and not (peft and (folder / "adapter_model.bin").is_file()):
        raise RunFileError(f"{weights} is missing; {fix}")  # else PEFT would look for it on the Hub
    if peft:
        config = folder / "adapter_config.json"
        if "peft_type" not in read_json(config, fix):
            raise RunFileError(f"{config} names no peft_type (it was edited); {fix}")
    base = build_base_model(info["kind"], info["model"], info["num_labels"], info.get("is_regression", False))
    if peft:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base, str(folder))
        except SafetensorError as err:  # no ValueError: would escape the CLI as a traceback
            raise RunFileError(f"{weights} is truncated or corrupt ({err}); {fix}") from None
        except ConfigError:
            raise
        except ValueError as err:  # the mask check and PEFT's config validation: the config does not fit
            raise ConfigError(f"{config}: {err}") from None
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except SafetensorError as err:
            raise RunFileError(f"{weights} is truncated or corrupt ({err}); {fix}") from None
        result = base.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"{folder}: tensors {result.unexpected_keys[:3]} do not fit the base model {info['model']}.")
        model = base
    return model.eval(), info
