"""CapaBoost-LoRA tuner: injection, save/load checks, and the LoRA operations that do not apply."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..tuner import MaskCheckMixin, base_module_name
from .config import CapaBoostLoraConfig
from .layer import CapaBoostLoraLayer, create_module
from .quantized import dispatch_quantized

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
        alpha = alpha * config.update_scale(current_key)  # scale_by_density: the layer's scaling is alpha / r
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
        name = base_module_name(current_key)
        # quantized bases first: bitsandbytes layers subclass nn.Linear, whose merge would write into packed storage
        new_module = dispatch_quantized(target, adapter_name, name, config, **kwargs)
        if new_module is None:
            new_module = create_module(target, adapter_name, name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "add_weighted_adapter is not defined for CapaBoost-LoRA (a weighted sum of masked factors is not a "
            "CapaBoost adapter). Convert with capaboost.export_as_lora(model) and use LoRA's add_weighted_adapter."
        )
