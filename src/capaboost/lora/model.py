"""CapaBoost-LoRA tuner: injection, save/load checks, and the LoRA operations that do not apply."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.lora.model import _adapter_names_pre_forward_hook, _get_encoder
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper, TrainableTokensWrapper
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..tuner import MaskCheckMixin
from .config import CapaBoostLoraConfig
from .layer import CapaBoostLoraLayer, create_module
from .param import ParamWrapper
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

    def _check_new_adapter_config(self, config: CapaBoostLoraConfig) -> None:
        """As PEFT's LoraModel: adapters that use target_parameters must target the same parameters, since which
        parameter a factor belongs to is its wrapper's place in the nesting (and so in the state-dict keys)."""
        super()._check_new_adapter_config(config)
        targets = set(config.target_parameters or [])
        for name, other in self.peft_config.items():
            others = set(getattr(other, "target_parameters", None) or [])
            if other is not config and targets and others and others != targets:
                raise ValueError(
                    "When using multiple adapters with target_parameters, all adapters must target the same "
                    f"parameters, but got {sorted(targets)} for the new adapter and {sorted(others)} for {name!r}."
                )

    def _prepare_adapter_config(self, peft_config: CapaBoostLoraConfig, model_config: dict) -> CapaBoostLoraConfig:
        """As PEFT's LoraModel: target_parameters alone (no target_modules) is a complete target list."""
        if peft_config.target_modules is None and peft_config.target_parameters:
            if self.target_module_mapping.get(model_config["model_type"]) is None:
                return peft_config
        return super()._prepare_adapter_config(peft_config, model_config)

    def _layer_kwargs(self, config: CapaBoostLoraConfig, current_key: str) -> dict[str, Any]:
        r, alpha = config.rank_and_alpha(current_key)
        alpha = alpha * config.update_scale(current_key)  # scale_by_density: the layer's scaling is alpha / r
        return dict(
            r=r,
            lora_alpha=alpha,
            lora_dropout=config.lora_dropout,
            spec=config.mask_spec(current_key),
            init_lora_weights=config.init_lora_weights,
            use_dora=config.use_dora,
        )

    def _new_layer(self, config, adapter_name, target, name, **kwargs) -> torch.nn.Module:
        if "parameter_name" in kwargs:  # target_parameters: the module's forward reads W + ΔW (see .param)
            return ParamWrapper(target, adapter_name, name, fan_in_fan_out=config.fan_in_fan_out, **kwargs)
        # quantized bases first: bitsandbytes layers subclass nn.Linear, whose merge would write into packed storage
        new_module = dispatch_quantized(target, adapter_name, name, config, **kwargs)
        return new_module if new_module is not None else create_module(target, adapter_name, name, config, **kwargs)

    def _replace_module(
        self, parent: torch.nn.Module, child_name: str, new_module: torch.nn.Module, child: torch.nn.Module
    ) -> None:
        """Unloading a ``trainable_token_indices`` wrapper gives back the embedding (or tied lm_head) it wraps, which
        owns its weight: BaseTuner would re-assign ``child.weight`` to it, and on this wrapper that is the merged
        tensor, not a Parameter (a TypeError in unload, merge_and_unload and export). PEFT's LoraModel does the plain
        swap too. Unloading (nested) parameter wrappers gives back the module that owns the parameters: BaseTuner
        would look one wrapper deep for a ``weight`` that an experts module need not have. Every other replacement
        keeps BaseTuner's behaviour."""
        if isinstance(child, (TrainableTokensWrapper, ParamWrapper)):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Mixed-adapter batches, as PEFT's LoraModel: ``adapter_names`` reaches every CapaBoost layer (and every
        ``modules_to_save`` copy) through a forward pre-hook for the duration of the call (forward or generate)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise NotImplementedError(
                "mixed-adapter batches (adapter_names=...) are inference-only, as in PEFT LoRA: the model is in "
                "training mode; call model.eval() first (or set_adapter() per batch to train)."
            )
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        known = set()
        for module in self.modules():
            if isinstance(module, CapaBoostLoraLayer):
                known |= set(module.cblora_A.keys())
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        if any(getattr(m, "merged", False) for m in self.modules() if isinstance(m, CapaBoostLoraLayer)):
            raise ValueError(
                "Cannot pass adapter_names while adapters are merged into the base weights; call "
                "model.unmerge_adapter() first."
            )
        original = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each row num_beams times
            adapter_names = [name for name in original for _ in range(num_beams)]
        handles = []
        hooked = (CapaBoostLoraLayer, AuxiliaryTrainingWrapper)
        for module in self.modules():
            if isinstance(module, hooked):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _get_encoder(self.model)
        if len(adapter_names) != len(original) and encoder is not None:
            for module in encoder.modules():  # the encoder sees the rows before beam expansion
                if isinstance(module, hooked):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=original)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd", **kwargs: Any
    ) -> None:
        """Refused: a combination of CapaBoost adapters is not a CapaBoost adapter (see the message for the route).

        Each adapter's ΔW is a LoRA of rank d*r (B_cat A_cat), so ``combination_type="cat"`` has an exact result:
        a LoRA whose factors are the w-weighted concatenation of the adapters' A_cat / B_cat. That result cannot be
        stored as a new CapaBoost adapter: its factors are d masked copies of ONE (A, B) pair, and the concatenated
        factors of several adapters (or the weighted ones of one) are not of that form. The exact route is
        :func:`capaboost.export_as_lora` then PEFT LoRA's own ``add_weighted_adapter(combination_type="cat")``.
        """
        route = (
            "Export each adapter with capaboost.export_as_lora (it converts the model in place: load each adapter on "
            "its own base model, export it and save_pretrained the LoRA), load the LoRAs into one PeftModel "
            "(load_adapter) and call its add_weighted_adapter(..., combination_type='cat'), which is exact: "
            "ΔW = Σ w_i ΔW_i, a LoRA of rank Σ d_i r_i."
        )
        if combination_type == "cat":
            reason = (
                "the exact 'cat' combination of CapaBoost adapters is a LoRA of rank Σ d_i r_i whose factors are not d "
                "masked copies of one (A, B) pair, so no CapaBoost adapter can hold it."
            )
        else:
            reason = (
                f"combination_type={combination_type!r} combines the adapters' LoRA factors (linear/ties/dare sum "
                "them, svd refactorises their sum); on masked packed factors a weighted sum is not a CapaBoost "
                "adapter and (Σ w_i B_i)(Σ w_i A_i) is not Σ w_i ΔW_i. On the exported LoRAs it behaves as for any "
                "LoRA (only 'cat' is exact)."
            )
        raise NotImplementedError(f"add_weighted_adapter on a CapaBoost-LoRA model: {reason} {route}")
