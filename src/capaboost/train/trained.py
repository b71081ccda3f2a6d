"""Reloading a trained run's model from its ``adapter/`` folder (for ``capaboost rank`` and ``export``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from .models import build_base_model
from .run_config import ConfigError

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
    info = json.loads((folder / RUN_INFO).read_text())
    base = build_base_model(info["kind"], info["model"], info["num_labels"], info.get("is_regression", False))
    if info.get("peft", True):
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(folder))
    else:
        from safetensors.torch import load_file

        state = load_file(str(folder / "trainable.safetensors"))
        result = base.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"{folder}: tensors {result.unexpected_keys[:3]} do not fit the base model {info['model']}.")
        model = base
    return model.eval(), info
