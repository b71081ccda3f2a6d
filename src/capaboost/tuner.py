"""What every CapaBoost tuner shares, whatever the method: mask keys, fingerprints, refusals."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch

from .masks import fingerprint

# Wrapper components that must not leak into mask keys (FSDP, activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def mixed_batch_error() -> NotImplementedError:
    return NotImplementedError(
        "CapaBoost bottleneck adapters (CapaBoostAdapterConfig) do not support mixed-adapter batches "
        "(adapter_names=...); call set_adapter() per batch instead. CapaBoost-LoRA models support them."
    )


def masks_fingerprint(model: torch.nn.Module, adapter_name: Optional[str] = None) -> str:
    """Digest of the masks of one adapter (keyed by module name), or of every adapter when None."""
    digests = {
        (module.capaboost_name if adapter_name is not None else f"{name}/{module.capaboost_name}"): pair.digest
        for module in model.modules()
        for name, pair in getattr(module, "capaboost_pairs", {}).items()
        if adapter_name is None or name == adapter_name
    }
    return fingerprint(digests)


def base_module_name(key: str) -> str:
    """A module's name relative to the unwrapped base model: the key its masks are drawn from."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)


def pattern_matches(pattern: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", name) is not None  # PEFT's rank_pattern rule


def unmatched_keys(patterns: Optional[dict], names: Sequence[str]) -> list[str]:
    """The keys of a ``*_pattern`` dict that match none of ``names`` (PEFT would silently ignore them)."""
    return [key for key in patterns or {} if not any(pattern_matches(key, name) for name in names)]


class MaskCheckMixin:
    """Hooks shared by CapaBoost tuners: inject layers, record the masks' fingerprint on save, refuse a mismatch
    on load, and refuse PEFT's mixed-adapter batches (which PEFT would otherwise silently ignore for us); a tuner
    that implements them (CapaBoost-LoRA) overrides ``_enable_peft_forward_hooks``.

    A tuner gives ``_layer_kwargs`` (the ``update_layer`` arguments of one module) and ``_new_layer``.
    """

    def _create_and_replace(
        self, config: Any, adapter_name: str, target: torch.nn.Module, target_name: str, parent: torch.nn.Module,
        current_key: str, **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        kwargs = self._layer_kwargs(config, current_key)
        # target_parameters: PEFT passes the parameter's own name; a tuner layer that wraps ANOTHER parameter of the
        # same module is nested (a new wrapper around it), one that wraps this parameter takes the new adapter
        parameter_name = optional_kwargs.get("parameter_name")
        if isinstance(target, self.tuner_layer_cls) and getattr(target, "parameter_name", None) == parameter_name:
            target.update_layer(adapter_name, **kwargs)
            return
        if parameter_name is not None:
            kwargs["parameter_name"] = parameter_name
        new_module = self._new_layer(config, adapter_name, target, base_module_name(current_key), **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        if kwargs.get("adapter_names") is not None:
            raise mixed_batch_error()
        yield

    def _post_injection_hook(self, model: torch.nn.Module, config: Any, adapter_name: str) -> None:
        """A copies/density pattern that matches no adapted module is a typo: its masks would silently differ."""
        for field in ("copies_pattern", "density_pattern"):
            names = self.targeted_module_names + getattr(self, "targeted_parameter_names", [])
            unmatched = unmatched_keys(getattr(config, field, None), names)
            if unmatched:
                raise ValueError(
                    f"{field} keys {unmatched} match no adapted module; adapted modules are e.g. "
                    f"{self.targeted_module_names[:5]}. Fix the keys (regexes matched against the end of module names)."
                )
        super()._post_injection_hook(model, config, adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        config.mask_fingerprint = masks_fingerprint(model, adapter_name)  # saved with the config
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        expected = getattr(config, "mask_fingerprint", None)
        actual = masks_fingerprint(model, adapter_name)
        if expected is None:  # unchecked, an edited seed or mode (d=1, mask_mode="same") loads with wrong outputs
            raise ValueError(
                f"adapter_config.json of adapter {adapter_name!r} has no mask_fingerprint, so the masks regenerated "
                "on load cannot be checked against those it was trained with. Restore the original adapter_config.json "
                "(save_pretrained() writes the fingerprint), or set config.mask_fingerprint = "
                "capaboost.tuner.masks_fingerprint(model, adapter_name) when loading a state dict into the model it "
                "came from."
            )
        if expected != actual:
            raise ValueError(
                f"The masks regenerated for adapter {adapter_name!r} (fingerprint {actual}) differ from those it was "
                f"trained with ({expected}): adapter_config.json was edited (seed, density, copies, pattern, mode or "
                "targets) or the base model differs. Restore the original adapter_config.json; loading would give "
                "wrong outputs."
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
