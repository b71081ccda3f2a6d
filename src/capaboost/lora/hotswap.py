"""Hotswapping a CapaBoost-LoRA adapter in place: new values (and, if the config says so, new masks), same tensors.

PEFT's ``peft.utils.hotswap.hotswap_adapter`` is LoRA-only (its ``check_hotswap_configs_compatible`` refuses
other PEFT types) and could not serve us anyway: it derives the module of a key by stripping
``lora_*.<adapter>.weight`` (our packed values are ``cblora_A.<adapter>``, no ``.weight``), computes the scaling
as ``lora_alpha / r`` (ours includes ``scale_by_density``) and knows nothing of the masks, which are rebuilt
from the config rather than saved. :func:`hotswap_adapter` does the same job for CapaBoost-LoRA.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import load_peft_weights, set_peft_model_state_dict

from ..masks import fingerprint
from .config import CapaBoostLoraConfig
from .layer import CapaBoostLoraLayer

#: Config fields that change the outputs besides the packed values and the masks, and that a swap cannot change.
_FIXED_FIELDS = ("lora_dropout", "fan_in_fan_out", "bias", "modules_to_save", "task_type", "use_dora")
_SUFFIXES = (".cblora_A", ".cblora_B")
_MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m (PEFT's key): swapped with the factors, same shape (out_features)


def hotswap_adapter(
    model: torch.nn.Module,
    model_name_or_path: str,
    adapter_name: str = "default",
    torch_device: Optional[str] = None,
    **kwargs: Any,
) -> None:
    """Replace the values of the loaded CapaBoost-LoRA adapter ``adapter_name`` by those saved at ``model_name_or_path``.

    ``model`` is the ``PeftModel`` (or ``torch.compile`` of it). The new adapter must adapt the same modules with the
    same rank and the same packed sizes (copies, density, pattern and mode fix them; a new ``mask_seed`` changes the
    masks but keeps the sizes only where each union has a fixed count, e.g. ``num_copies=1`` or ``mask_mode="same"``).
    The packed values are copied into the existing parameters (no re-allocation), the layers' scalings follow the
    new ``lora_alpha``/``alpha_pattern``, and the masks follow the new config, checked against its saved
    ``mask_fingerprint`` as on load. A CapaBoost-DoRA adapter swaps its magnitudes (``lora_magnitude_vector``) with
    the factors (``use_dora`` must match: DoRA and plain adapters do not swap into each other). When the masks and scalings are unchanged (same mask fields and alphas), only
    tensor values change, so a compiled model keeps its graphs (a new scaling is a Python float: dynamo recompiles,
    with correct outputs). Anything else is refused before the model is touched.
    """
    hf_kwargs = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
    peft_type = PeftConfig._get_peft_type(model_name_or_path, **hf_kwargs)
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(model_name_or_path, **hf_kwargs)
    if torch_device is None:  # where the adapter's values live (checks of the adapter itself come below)
        packed = _first_packed(_peft_model(model), adapter_name)
        torch_device = str(packed.device) if packed is not None else "cpu"
    state_dict = load_peft_weights(model_name_or_path, device=torch_device, **hf_kwargs)
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


def _peft_model(model: torch.nn.Module) -> PeftModel:
    peft_model = getattr(model, "_orig_mod", model)  # torch.compile(model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"hotswap_adapter needs the PeftModel (or torch.compile of it), got {type(peft_model).__name__}.")
    return peft_model


def _first_packed(peft_model: PeftModel, adapter_name: str) -> Optional[torch.Tensor]:
    for module in peft_model.modules():
        if isinstance(module, CapaBoostLoraLayer) and adapter_name in module.cblora_A:
            return module.cblora_A[adapter_name]
    return None


def hotswap_adapter_from_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: PeftConfig
) -> None:
    """:func:`hotswap_adapter` from a state dict as saved (``get_peft_model_state_dict``: no adapter name in keys)."""
    peft_model = _peft_model(model)
    old = peft_model.peft_config.get(adapter_name)
    if not isinstance(old, CapaBoostLoraConfig):
        raise ValueError(
            f"hotswap_adapter swaps a CapaBoost-LoRA adapter; adapter {adapter_name!r} is "
            f"{type(old).__name__ if old is not None else 'missing'} (adapters: {list(peft_model.peft_config)})."
        )
    if not isinstance(config, CapaBoostLoraConfig):
        raise ValueError(
            f"cannot hotswap a {type(config).__name__} into CapaBoost-LoRA adapter {adapter_name!r}: both must be "
            "CapaBoost-LoRA (for a stock LoRA use peft.utils.hotswap on a LoRA model)."
        )
    for field in _FIXED_FIELDS:
        values = getattr(old, field), getattr(config, field)
        if field == "modules_to_save":  # PEFT appends the task's head names (again) on every load
            values = tuple(set(v or ()) for v in values)
        if values[0] != values[1]:
            raise ValueError(
                f"cannot hotswap adapter {adapter_name!r}: the configs differ in {field} ({getattr(old, field)!r} vs "
                f"{getattr(config, field)!r}); load the new adapter with load_adapter() instead."
            )
    named = {
        name: module
        for name, module in peft_model.named_modules()
        if isinstance(module, CapaBoostLoraLayer) and adapter_name in module.cblora_A
    }
    if not named:
        raise ValueError(f"the model has no CapaBoost-LoRA adapter {adapter_name!r} to hotswap.")
    if any(adapter_name in module.merged_adapters for module in named.values()):
        raise ValueError(
            f"cannot hotswap adapter {adapter_name!r} while it is merged into the base weights; call "
            "model.unmerge_adapter() first."
        )
    expected = {name + suffix for name in named for suffix in _SUFFIXES}
    expected |= {name + _MAGNITUDE for name, module in named.items() if adapter_name in module.lora_magnitude_vector}
    given = {key for key in state_dict if ".cblora_" in key or key.endswith(_MAGNITUDE)}
    if given != expected:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise ValueError(
            f"cannot hotswap adapter {adapter_name!r}: the new adapter adapts other modules (missing: {missing[:4]}, "
            f"unexpected: {unexpected[:4]}); hotswapping cannot add or remove adapted modules. Load it with "
            "load_adapter() instead."
        )

    # dry run: every check before anything changes
    plan = []
    for name, module in named.items():
        key = module.capaboost_name
        r, alpha = config.rank_and_alpha(key)
        if r != module.r[adapter_name]:
            raise ValueError(
                f"cannot hotswap adapter {adapter_name!r}: {key!r} has rank {module.r[adapter_name]}, the new adapter "
                f"rank {r}; hotswapping copies values in place and cannot change shapes. Use load_adapter() instead."
            )
        pair = module.capaboost_pairs[adapter_name]
        spec = config.mask_spec(key)
        if spec != pair.spec:
            pair = module.make_pair(spec, r)  # the layer's own layout (grouped convs store A by group)
        packed = (module.cblora_A[adapter_name], module.cblora_B[adapter_name])
        for old_val, factor, suffix in zip(packed, (pair.A, pair.B), _SUFFIXES):
            new_val = state_dict[name + suffix]
            if new_val.shape != old_val.shape or factor.numel_union != old_val.numel():
                raise ValueError(
                    f"cannot hotswap adapter {adapter_name!r}: the packed {suffix[1:]} of {key!r} holds "
                    f"{old_val.numel()} values, the new adapter's {new_val.numel()} (its masks' union has "
                    f"{factor.numel_union}): copies, density, pattern, mode or mask_seed give another mask union. "
                    "Hotswapping copies values in place and cannot resize; use load_adapter() instead."
                )
        if adapter_name in module.lora_magnitude_vector:
            old_m, new_m = module.lora_magnitude_vector[adapter_name], state_dict[name + _MAGNITUDE]
            if new_m.shape != old_m.shape:
                raise ValueError(
                    f"cannot hotswap adapter {adapter_name!r}: the DoRA magnitude of {key!r} has shape "
                    f"{tuple(new_m.shape)}, expected {tuple(old_m.shape)}; use load_adapter() instead."
                )
        plan.append((module, pair, alpha * config.update_scale(key) / r))
    actual = fingerprint({module.capaboost_name: pair.digest for module, pair, _ in plan})
    if config.mask_fingerprint is None:
        raise ValueError(
            f"the new adapter_config.json has no mask_fingerprint, so the masks rebuilt for it cannot be checked "
            "against those it was trained with. Restore the original adapter_config.json (save_pretrained writes it)."
        )
    if config.mask_fingerprint != actual:
        raise ValueError(
            f"The masks rebuilt for the new adapter (fingerprint {actual}) differ from those it was trained with "
            f"({config.mask_fingerprint}): its adapter_config.json was edited or the base model differs."
        )

    # swap: masks (only where they change), scalings, then the values, copied in place by load_state_dict
    for module, pair, scaling in plan:
        if pair is not module.capaboost_pairs[adapter_name]:
            module.capaboost_pairs[adapter_name] = pair
        current = module.scaling[adapter_name]
        if isinstance(current, torch.Tensor):
            current.fill_(scaling)
        elif current != scaling:
            module.scaling[adapter_name] = scaling
        module.lora_alpha[adapter_name] = scaling * module.r[adapter_name]
    new_config = copy.copy(config)
    new_config.inference_mode = old.inference_mode
    peft_model.peft_config[adapter_name] = new_config
    with torch.no_grad():
        result = set_peft_model_state_dict(peft_model, state_dict, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise RuntimeError(f"hotswap_adapter: keys the model does not hold: {result.unexpected_keys[:5]}")
