"""CapaBoost bottleneck-adapter tuner layer (paper eq. 5), wrapping one adapter site of a layer."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from ..masks import MaskSpec
from ..packing import MaskedPair, warn_dense_copies


class AdapterMergeError(ValueError):
    """A bottleneck adapter is nonlinear: it has no weight delta to fold into the base model."""


def _merge_error() -> AdapterMergeError:
    return AdapterMergeError(
        "CapaBoost adapters cannot be merged into the base weights: f(x W_down) W_up is nonlinear in x, so no "
        "weight delta exists. Keep the PeftModel for inference, or call model.unload() to get the base model back."
    )


def _io_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a projection, or of a block from its first and last projections."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return _get_in_out_features(module)
    projections = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not projections:
        raise ValueError(
            f"cannot infer the hidden size of {type(module).__name__}: it holds no nn.Linear/Conv1D; point "
            "adapter_placement at a projection or at a block that contains them."
        )
    return _get_in_out_features(projections[0])[0], _get_in_out_features(projections[-1])[1]


class CapaBoostAdapterLayer(nn.Module, BaseTunerLayer):
    """``out + s * up_cat(f(down_cat(src) + b_down)) + s * b_up`` with ``src = out`` (sequential) or the FFN input.

    The down factor A (bottleneck x in) and up factor B (out x bottleneck) are stored packed (union of
    the d masks only); the d copies run as ONE down-projection to d*bottleneck features and ONE
    up-projection. Biases are unmasked: b_down is shared by the copies (repeated d times), b_up added
    once. Several active adapters are summed, each reading the base output.
    """

    adapter_layer_names = ("cbadapter_A", "cbadapter_B", "cbadapter_bias_A", "cbadapter_bias_B")
    other_param_names = ("bottleneck", "scaling", "parallel", "activation", "capaboost_pairs")

    def __init__(self, base_layer: nn.Module, adapter_name: str, capaboost_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.capaboost_name = capaboost_name
        self.bottleneck: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.parallel: dict[str, bool] = {}
        self.activation: dict[str, nn.Module] = {}
        self.capaboost_pairs: dict[str, MaskedPair] = {}
        self.cbadapter_A = nn.ParameterDict()
        self.cbadapter_B = nn.ParameterDict()
        self.cbadapter_bias_A = nn.ParameterDict()
        self.cbadapter_bias_B = nn.ParameterDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        # A parallel adapter whose site is not the whole FFN block reads the FFN input from a sibling
        # module through a pre-hook; the sibling is not registered (it belongs to the base model).
        self._ffn_input_hook: Optional[torch.utils.hooks.RemovableHandle] = None
        self._ffn_input: Optional[torch.Tensor] = None
        self.update_layer(adapter_name, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        bottleneck: int,
        non_linearity: str,
        scaling: float,
        spec: MaskSpec,
        parallel: bool = False,
        ffn_input: Optional[nn.Module] = None,
        init_weights: bool = True,
    ) -> None:
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be an integer >= 1, got {bottleneck}.")
        warn_dense_copies(spec)
        n_out = _io_features(self.get_base_layer())[1]
        n_in = _io_features(ffn_input if ffn_input is not None else self.get_base_layer())[0] if parallel else n_out
        pair = MaskedPair(spec, self.capaboost_name, bottleneck, n_in, n_out)
        ref = next((p for p in self.get_base_layer().parameters() if p.is_floating_point()), None)
        device, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
        nontrivial = functools.partial(nn.init.uniform_, a=-0.5, b=0.5)  # tests: a non-trivial adapter
        # A as LoRA's, up = 0: a no-op at init
        packed = pair.init_packed(init_b=None if init_weights else nontrivial, device=device, dtype=dtype)
        bias_a = torch.zeros(bottleneck, device=device, dtype=dtype)
        bias_b = torch.zeros(n_out, device=device, dtype=dtype)
        if not init_weights:
            for bias in (bias_a, bias_b):
                nontrivial(bias)
        self.bottleneck[adapter_name], self.scaling[adapter_name] = bottleneck, scaling
        self.parallel[adapter_name] = parallel
        self.activation[adapter_name] = ACT2FN[non_linearity]
        self.capaboost_pairs[adapter_name] = pair
        self.cbadapter_A[adapter_name], self.cbadapter_B[adapter_name] = packed
        self.cbadapter_bias_A[adapter_name] = nn.Parameter(bias_a)
        self.cbadapter_bias_B[adapter_name] = nn.Parameter(bias_b)
        if ffn_input is not None and self._ffn_input_hook is None:
            self._ffn_input_hook = ffn_input.register_forward_pre_hook(self._stash_ffn_input)
        self.set_adapter(self.active_adapters)

    def _stash_ffn_input(self, module: nn.Module, args: tuple) -> None:
        self._ffn_input = args[0] if args else None

    def packed_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cbadapter_A[adapter], self.cbadapter_B[adapter]

    def adapter_output(self, adapter: str, source: torch.Tensor) -> torch.Tensor:
        """The unscaled adapter output ``up_cat(f(down_cat(source) + b_down)) + b_up`` (one product each way)."""
        packed_a, packed_b = self.cbadapter_A[adapter], self.cbadapter_B[adapter]
        return self.capaboost_pairs[adapter].bottleneck(
            self._cast_input_dtype(source, packed_a.dtype), packed_a, packed_b, self.cbadapter_bias_A[adapter],
            self.cbadapter_bias_B[adapter], self.activation[adapter], self.training,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ffn_input, self._ffn_input = self._ffn_input, None  # consume: never hold activations past a step
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        base_out = result
        for adapter in self.active_adapters:
            if adapter not in self.cbadapter_A:
                continue
            if not self.parallel[adapter]:
                source = base_out
            elif self._ffn_input_hook is None:
                source = x
            elif ffn_input is None:
                raise RuntimeError(
                    f"the parallel adapter at {self.capaboost_name!r} got no FFN input: its FFN-input module did not "
                    "run before it in this forward pass; check adapter_placement['ffn_in']."
                )
            else:
                source = ffn_input
            delta = self.adapter_output(adapter, source).to(result.dtype)
            result = torch.add(result, delta, alpha=self.scaling[adapter])
        return result

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise _merge_error()

    def unmerge(self) -> None:
        warnings.warn("CapaBoost adapters are never merged; nothing to unmerge.")

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Called by ``unload()``: drop the FFN-input hook and hand back the wrapped module."""
        if merge:
            raise _merge_error()
        self._remove_ffn_input_hook()
        return self.get_base_layer()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not any(self.parallel.values()):
            self._remove_ffn_input_hook()

    def _remove_ffn_input_hook(self) -> None:
        if self._ffn_input_hook is not None:
            self._ffn_input_hook.remove()
            self._ffn_input_hook, self._ffn_input = None, None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "capaboost." + super().__repr__()
