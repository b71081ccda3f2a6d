"""CapaBoost adapter tuner: placement-driven injection, save/load mask checks, no merging."""

from __future__ import annotations

from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner

from ..tuner import MaskCheckMixin
from .config import CapaBoostAdapterConfig
from .layer import CapaBoostAdapterLayer, _merge_error
from .placement import Placement, resolve_placement


class CapaBoostAdapterModel(MaskCheckMixin, BaseTuner):
    """Injects :class:`CapaBoostAdapterLayer` at the sites of the config's style; used via ``get_peft_model``."""

    prefix: str = "cbadapter_"
    tuner_layer_cls = CapaBoostAdapterLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: CapaBoostAdapterConfig, model_config: dict) -> PeftConfig:
        """Resolve the placement once and record it, so a saved config reloads without the table."""
        placement = resolve_placement(model_config.get("model_type"), peft_config.adapter_placement, peft_config.style)
        peft_config.adapter_placement = placement.to_dict()
        peft_config.target_modules = placement.target_regex(peft_config.style)
        return peft_config

    def _layer_kwargs(self, config: CapaBoostAdapterConfig, current_key: str) -> dict[str, Any]:
        parallel = config.style == "parallel"
        ffn_input_key = Placement.from_dict(config.adapter_placement, config.style).ffn_input_key(current_key)
        return dict(
            bottleneck=config.bottleneck,
            non_linearity=config.non_linearity,
            scaling=config.adapter_scaling,
            spec=config.mask_spec(current_key),
            parallel=parallel,
            ffn_input=self.model.get_submodule(ffn_input_key) if parallel and ffn_input_key else None,
            init_weights=config.init_weights,
        )

    def _new_layer(self, config, adapter_name, target, name, **kwargs) -> torch.nn.Module:
        return CapaBoostAdapterLayer(target, adapter_name, name, **kwargs)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Sites may be whole blocks (e.g. an MLP) without a ``weight``; adapter tensors are created on the
        # base layer's device and dtype in update_layer, so a plain swap is all that is needed.
        setattr(parent, child_name, new_module)

    def _check_merge_allowed(self) -> None:
        raise _merge_error()
