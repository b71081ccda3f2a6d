"""CapaBoost-LoRA tuner: injection, save/load checks, and the LoRA operations that do not apply."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..masks import fingerprint
from .config import CapaBoostLoraConfig
from .layer import CapaBoostLoraLayer, create_module, mixed_batch_error

# Wrapper components that must not leak into mask keys (FSDP, activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def base_module_name(key: str) -> str:
    """A module's name relative to the unwrapped base model: the key its masks are drawn from."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)


class MaskCheckMixin:
    """Hooks shared by CapaBoost tuners: record the masks' fingerprint on save, refuse a mismatch on load,
    and refuse PEFT's mixed-adapter batches (which PEFT would otherwise silently ignore for us)."""

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        if kwargs.get("adapter_names") is not None:
            raise mixed_batch_error()
        yield

    def _post_injection_hook(self, model: torch.nn.Module, config: Any, adapter_name: str) -> None:
        """A copies/density pattern that matches no adapted module is a typo: its masks would silently differ."""
        for field in ("copies_pattern", "density_pattern"):
            unmatched = [
                key
                for key in getattr(config, field, None) or {}
                if not any(re.match(rf"(.*\.)?({key})$", name) for name in self.targeted_module_names)
            ]
            if unmatched:
                raise ValueError(
                    f"{field} keys {unmatched} match no adapted module; adapted modules are e.g. "
                    f"{self.targeted_module_names[:5]}. Fix the keys (regexes matched against the end of module names)."
                )
        super()._post_injection_hook(model, config, adapter_name)

    @staticmethod
    def adapter_fingerprint(model: torch.nn.Module, adapter_name: str) -> str:
        digests = {
            m.capaboost_name: m.capaboost_pairs[adapter_name].digest
            for m in model.modules()
            if adapter_name in getattr(m, "capaboost_pairs", {})
        }
        return fingerprint(digests)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        config.mask_fingerprint = cls.adapter_fingerprint(model, adapter_name)  # saved with the config
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        expected = getattr(config, "mask_fingerprint", None)
        actual = cls.adapter_fingerprint(model, adapter_name)
        if expected is not None and expected != actual:
            raise ValueError(
                f"The masks regenerated for adapter {adapter_name!r} (fingerprint {actual}) differ from those it was "
                f"trained with ({expected}): adapter_config.json was edited (seed, density, copies, pattern, mode or "
                "targets) or the base model differs. Restore the original adapter_config.json; loading would give "
                "wrong outputs."
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


class CapaBoostLoraModel(MaskCheckMixin, BaseTuner):
    """Injects :class:`CapaBoostLoraLayer` into a model; used through ``peft.get_peft_model``."""

    prefix: str = "cblora_"
    tuner_layer_cls = CapaBoostLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: torch.nn.Module, config: CapaBoostLoraConfig, adapter_name: str) -> None:
        """Name each target that matches nothing (PEFT only says that nothing at all matched)."""
        targets = config.target_modules
        if not isinstance(targets, (set, list, tuple)):
            return
        names = [n for n, _ in model.named_modules() if n]
        missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(
                f"target_modules {missing} not found in the base model ({type(model).__name__}). "
                f"Its linear layers are named: {leaves[:20]}; fix target_modules."
            )

    def _create_and_replace(
        self,
        config: CapaBoostLoraConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        r, alpha = config.rank_and_alpha(current_key)
        kwargs = dict(
            r=r,
            lora_alpha=alpha,
            lora_dropout=config.lora_dropout,
            spec=config.mask_spec(current_key),
            init_lora_weights=config.init_lora_weights,
        )
        if isinstance(target, CapaBoostLoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = create_module(target, adapter_name, base_module_name(current_key), config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "add_weighted_adapter is not defined for CapaBoost-LoRA (a weighted sum of masked factors is not a "
            "CapaBoost adapter). Convert with capaboost.export_as_lora(model) and use LoRA's add_weighted_adapter."
        )
