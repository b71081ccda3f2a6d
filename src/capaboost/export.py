"""Conversion of CapaBoost adapters to stock PEFT formats that load without capaboost installed."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .lora.config import CapaBoostLoraConfig
from .lora.layer import CapaBoostLoraLayer, Embedding
from .lora.param import ParamWrapper


def _training_flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _restore_training_flags(model: torch.nn.Module, flags: dict[str, bool]) -> None:
    """Give every module its recorded train/eval flag: ``model.train(x)`` would impose one flag on all, e.g.
    the PeftModel wrapper's (True by default, even around a base model in eval mode) and turn dropout on.
    Modules the conversion created (lora_A, a new embedding) take their parent's flag."""
    for name, module in model.named_modules():  # parents come before their children
        if name not in flags:
            flags[name] = flags[name.rpartition(".")[0]]
        module.training = flags[name]


def _lora_keys(module: CapaBoostLoraLayer) -> tuple[str, str]:
    """PEFT LoRA's state-dict names of the A and B factors of a layer type: an Embedding keeps them as bare
    parameters (``lora_embedding_A``: r x num_embeddings, ``lora_embedding_B``: dim x r), the rest as modules."""
    if isinstance(module, Embedding):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


def export_as_lora(model: PeftModel, adapter_name: str = "default") -> PeftModel:
    """A plain PEFT LoRA of rank d*r (per module) with the same outputs, for stock PEFT and LoRA tooling.

    The LoRA factors are exactly A_cat and B_cat (no re-factorisation: the masks stay visible), and
    ``lora_alpha = d * alpha`` keeps the scaling alpha / r (alpha: the layer's, which includes the
    ``scale_by_density`` factor 1 / (d*s^2) when that option is on). A CapaBoost-DoRA adapter becomes
    ``LoraConfig(use_dora=True)`` with the same ``lora_magnitude_vector``: DoRA's norm depends only on ΔW = B_cat A_cat,
    so the outputs are equal. ``target_parameters`` adapters become ``LoraConfig(target_parameters=...)`` with PEFT's
    ParamWrapper factors of rank d*r (see :meth:`capaboost.lora.param.ParamWrapper.lora_weights`). Like ``merge_and_unload`` this converts IN
    PLACE: ``model`` is unloaded (all its adapters removed) and must not be used afterwards; the
    returned model wraps the same base model.
    """
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, CapaBoostLoraConfig):
        raise ValueError(
            f"export_as_lora needs a CapaBoost-LoRA adapter; adapter {adapter_name!r} is "
            f"{type(config).__name__ if config is not None else 'missing'} (adapters: {list(model.peft_config)})."
        )
    if any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, CapaBoostLoraLayer)):
        raise ValueError("export_as_lora needs an unmerged model: call model.unmerge_adapter() first.")

    flags = _training_flags(model)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    lora_state = {k: v for k, v in state.items() if ".cblora_" not in k}
    ranks, alphas, parameters = {}, {}, []
    with torch.no_grad():
        for path, module in model.named_modules():
            if not isinstance(module, CapaBoostLoraLayer) or adapter_name not in module.cblora_A:
                continue
            name, d = module.capaboost_name, module.capaboost_pairs[adapter_name].spec.num_copies
            a_cat, b_cat = module.lora_weights(adapter_name)
            key_a, key_b = _lora_keys(module)
            # a parameter target's name is the parameter's; its factors live at its (possibly nested) wrapper
            # (PEFT's LoRA nests its ParamWrappers in the same order: the same injection code)
            prefix = path if isinstance(module, ParamWrapper) else f"base_model.model.{name}"
            lora_state[f"{prefix}.{key_a}"] = a_cat.detach().clone()
            lora_state[f"{prefix}.{key_b}"] = b_cat.detach().clone()
            ranks[name], alphas[name] = d * module.r[adapter_name], d * module.lora_alpha[adapter_name]
            if isinstance(module, ParamWrapper):
                parameters.append(name)
    if not ranks:
        raise ValueError(f"adapter {adapter_name!r} has no CapaBoost-LoRA layers to export.")

    r0, a0 = next(iter(ranks.values())), next(iter(alphas.values()))
    lora_config = LoraConfig(
        r=r0,
        lora_alpha=a0,
        target_modules=sorted(n for n in ranks if n not in parameters),
        target_parameters=sorted(parameters) or None,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != a0},
        lora_dropout=config.lora_dropout,
        use_dora=config.use_dora,  # the magnitudes travel in lora_state under PEFT's own key
        fan_in_fan_out=config.fan_in_fan_out,
        bias="lora_only" if config.bias == "cblora_only" else config.bias,
        modules_to_save=config.modules_to_save,
        trainable_token_indices=config.trainable_token_indices,  # PEFT's token rows travel as they are
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=config.inference_mode,
    )
    base = model.unload()
    lora_model = get_peft_model(base, lora_config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(lora_model, lora_state, adapter_name=adapter_name)
    # bias="all" also collects a modules_to_save copy's bias under a stray name that PEFT's own LoRA does not
    # load either (the copy's bias travels under its plain name): not an export error.
    unexpected = [k for k in result.unexpected_keys if not (config.bias == "all" and ".modules_to_save.bias" in k)]
    if unexpected:
        raise RuntimeError(f"export_as_lora produced keys LoRA does not accept: {unexpected[:5]}")
    _restore_training_flags(lora_model, flags)
    return lora_model


def export_as_prefix(model: PeftModel, adapter_name: str = "default") -> PeftModel:
    """A stock PEFT prefix-tuning model (``prefix_projection=False``) holding the materialized prefix table.

    The CapaBoost MLP is evaluated once (eval mode, no dropout masks) into the flat table that stock
    ``PrefixTuningConfig`` trains and loads, so the outputs are equal and the checkpoint needs neither
    capaboost nor the masks. Converts IN PLACE like :func:`export_as_lora`: ``model``'s other adapters
    and wrappers are dropped (trained ``modules_to_save`` copies are kept) and it must not be used
    afterwards.
    """
    from peft import PrefixTuningConfig
    from peft.utils.other import ModulesToSaveWrapper, _get_submodules

    from .prefix import CapaBoostPrefixConfig

    config = model.peft_config.get(adapter_name)
    if not isinstance(config, CapaBoostPrefixConfig):
        raise ValueError(
            f"export_as_prefix needs a CapaBoost prefix adapter; adapter {adapter_name!r} is "
            f"{type(config).__name__ if config is not None else 'missing'} (adapters: {list(model.peft_config)})."
        )
    flags = _training_flags(model)
    encoder = model.prompt_encoder[adapter_name]
    encoder.eval()
    with torch.no_grad():
        table = encoder.table().detach().clone()
    base = model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):  # keep the trained copy as the plain module
            parent, _, target_name = _get_submodules(base, name)
            saved = module.modules_to_save
            setattr(parent, target_name, saved[adapter_name] if adapter_name in saved else module.original_module)
    prefix_config = PrefixTuningConfig(
        task_type=config.task_type,
        num_virtual_tokens=config.num_virtual_tokens,
        token_dim=config.token_dim,
        num_transformer_submodules=config.num_transformer_submodules,
        num_attention_heads=config.num_attention_heads,
        num_layers=config.num_layers,
        prefix_projection=False,
        modules_to_save=config.modules_to_save,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=config.inference_mode,
    )
    prefix_model = get_peft_model(base, prefix_config, adapter_name=adapter_name)
    with torch.no_grad():
        prefix_model.prompt_encoder[adapter_name].embedding.weight.copy_(table)
    _restore_training_flags(prefix_model, flags)
    return prefix_model
