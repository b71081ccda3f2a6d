"""CapaBoost-LoRA on quantized base layers, dispatched the way PEFT dispatches LoRA onto them.

Backends (each optional; nothing here imports one unless the model already uses it):

* bitsandbytes ``Linear4bit`` (NF4 / FP4) and ``Linear8bitLt`` (LLM.int8) -> :class:`Linear4bit`, :class:`Linear8bitLt`;
* torchao int8 weight-only (an ``nn.Linear`` whose weight is a torchao ``Int8Tensor``) -> :class:`TorchaoLinear`.

As in PEFT's ``lora/bnb.py`` and ``lora/torchao.py``, the quantized base layer is kept frozen and runs its own
kernel; the adapter's update is added to its output in the adapter's dtype. The forward is the plain
:class:`~capaboost.lora.layer.Linear` one (the masked low-rank core in ``masks.py``): only merging differs.
``merge`` dequantizes the base weight, adds ΔW (from :meth:`get_delta_weight`, i.e. ``MaskedPair.delta``) in
float32 and **re-quantizes** it, as PEFT does, so a merged model carries one re-quantization's rounding error.
For an exact merge, :func:`dequantize_base` first swaps every quantized base layer for a float ``nn.Linear``
holding its dequantized weight; ``merge_and_unload`` then merges in float.

:func:`capaboost.quantize.quantize_base` quantizes a float model's linear layers in place (QLoRA-style: the heads
stay float), for runs that start from a float checkpoint; ``from_pretrained(..., quantization_config=
BitsAndBytesConfig(...) / TorchAoConfig(...))`` gives models that dispatch here as well.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from ..quantize import _bnb, _import_torchao, _torchao_tensor
from .layer import Linear


class _QuantizedLinear(Linear):
    """A CapaBoost-LoRA ``Linear`` whose base keeps its quantized weight; merges dequantize and re-quantize.

    Subclasses say how to read the base weight in float (:meth:`_dequantized`) and how to store a float
    weight back quantized (:meth:`_requantize`). Once :func:`dequantize_base` has replaced the base by a float
    ``nn.Linear``, the layer merges like the plain ``Linear`` (exactly).
    """

    backend = ""
    supports_dora = False  # PEFT's bnb DoRA dequantizes per step; not implemented here (refused by name)

    def _base_is_quantized(self) -> bool:
        raise NotImplementedError

    def _dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def _requantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantized_base(self) -> nn.Linear:
        """A float ``nn.Linear`` equal to the base layer with its weight dequantized (the bias shared)."""
        base = self.get_base_layer()
        weight = self._dequantized()
        dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if base.bias is not None:
            dense.bias = base.bias
        dense.train(base.training)
        return dense

    def _apply_delta(self, adapter: str, sign: int, safe_merge: bool = False) -> None:
        weight = self._dequantized()
        delta = self.get_delta_weight(adapter).to(weight.device, torch.float32)
        merged = weight.float() + sign * delta  # float32 sum, stored back in the base weight's dtype
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        self._requantize(merged.to(weight.dtype))

    def _merge_one(self, adapter: str, safe_merge: bool) -> None:
        if not self._base_is_quantized():
            return super()._merge_one(adapter, safe_merge)
        warnings.warn(
            f"Merging into a {self.backend} base layer re-quantizes it: outputs change by the rounding error. "
            "For an exact merge call capaboost.lora.quantized.dequantize_base(model) first."
        )
        self._apply_delta(adapter, +1, safe_merge)

    def _unmerge_one(self, adapter: str) -> None:
        if not self._base_is_quantized():
            return super()._unmerge_one(adapter)
        self._apply_delta(adapter, -1)


class Linear4bit(_QuantizedLinear):
    """CapaBoost-LoRA around bitsandbytes ``Linear4bit`` (NF4 or FP4; QLoRA)."""

    backend = "bitsandbytes 4-bit"

    def _base_is_quantized(self) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(self.get_base_layer().weight, bnb.nn.Params4bit)

    def _dequantized(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = self.get_base_layer().weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # AVX512-BF16 CPUs repack at eval
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    def _requantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Params4bit(
            weight.to("cpu"), requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=old.quant_storage, module=base,
        ).to(old.device)


class Linear8bitLt(_QuantizedLinear):
    """CapaBoost-LoRA around bitsandbytes ``Linear8bitLt`` (LLM.int8, frozen int8 weights)."""

    backend = "bitsandbytes 8-bit"

    def _check_base_layer(self) -> None:
        if self.get_base_layer().state.has_fp16_weights:
            raise ValueError(
                f"CapaBoost-LoRA cannot adapt {self.capaboost_name!r}: its Linear8bitLt has has_fp16_weights=True (the "
                "base weight itself trains in float16). Load it with has_fp16_weights=False (the default of "
                "BitsAndBytesConfig(load_in_8bit=True) and of quantize_base(model, '8bit'))."
            )

    def _base_is_quantized(self) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(self.get_base_layer().weight, bnb.nn.Int8Params)

    def _dequantized(self) -> torch.Tensor:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        scb = base.state.SCB if base.state.SCB is not None else base.weight.SCB
        return bnb.functional.int8_vectorwise_dequant(base.weight.data, scb.to(base.weight.device))

    def _requantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        # Int8Params quantizes when moved off the CPU-held float data, on any device (CPU included)
        base.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(old.device)
        base.state.reset_grads()


class TorchaoLinear(_QuantizedLinear):
    """CapaBoost-LoRA around an ``nn.Linear`` whose weight is torchao's ``Int8Tensor`` (int8 weight-only).

    Re-quantizing after a merge uses the weight's own granularity (per row, per group or per tensor), so no
    quantization config has to be carried along (PEFT's LoRA needs the model's ``hf_quantizer`` for this).
    """

    backend = "torchao int8"

    def _check_base_layer(self) -> None:
        from torchao.quantization import Int8Tensor

        weight = self.get_base_layer().weight
        if not isinstance(weight, Int8Tensor) or weight.act_quant_kwargs is not None:
            raise ValueError(
                f"CapaBoost-LoRA cannot adapt {self.capaboost_name!r}: its weight is torchao "
                f"{type(weight).__name__}{' with activation quantization' if isinstance(weight, Int8Tensor) else ''}; "
                "only int8 weight-only (Int8WeightOnlyConfig) is supported. Exclude it with exclude_modules."
            )

    def _base_is_quantized(self) -> bool:
        return _torchao_tensor(self.get_base_layer().weight)

    def _dequantized(self) -> torch.Tensor:
        return self.get_base_layer().weight.dequantize()

    def _requantize(self, weight: torch.Tensor) -> None:
        tq = _import_torchao()
        from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

        base = self.get_base_layer()
        block = list(base.weight.block_size)
        if block == list(weight.shape):
            granularity = PerTensor()
        elif block == [1, weight.shape[1]]:
            granularity = PerRow()
        else:
            granularity = PerGroup(block[1])
        del base.weight
        base.weight = nn.Parameter(weight, requires_grad=False)
        tq.quantize_(base, tq.Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False))


def dispatch_quantized(
    target: nn.Module, adapter_name: str, capaboost_name: str, config: Any, **layer_kwargs: Any
) -> Optional[nn.Module]:
    """The CapaBoost-LoRA layer for a quantized ``target``, or None when its base layer is not quantized.

    Must run before the ``nn.Linear`` branch of ``create_module``: bitsandbytes' layers subclass ``nn.Linear``
    and torchao's keep the class, and the plain ``Linear`` would merge into the packed quantized storage.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    bnb = _bnb()
    cls: Optional[type] = None
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        cls = Linear4bit
    elif bnb is not None and isinstance(base, bnb.nn.Linear8bitLt):
        cls = Linear8bitLt
    elif isinstance(base, nn.Linear) and _torchao_tensor(base.weight):
        cls = TorchaoLinear
    if cls is None:
        return None
    if getattr(config, "fan_in_fan_out", False):
        warnings.warn("fan_in_fan_out=True but the target is a quantized torch.nn.Linear; using fan_in_fan_out=False.")
    return cls(target, adapter_name, capaboost_name, fan_in_fan_out=False, **layer_kwargs)



def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace every quantized base layer (wrapped by CapaBoost-LoRA or bare) by a float ``nn.Linear`` holding its
    dequantized weight, in place; returns ``model``. The outputs stay those of the quantized kernels up to their
    own arithmetic (4-bit and torchao: float rounding; LLM.int8 also quantizes activations), and a following
    ``merge_and_unload()`` merges exactly, in float, instead of re-quantizing."""
    wrappers = [m for m in model.modules() if isinstance(m, _QuantizedLinear) and m._base_is_quantized()]
    for layer in wrappers:
        holder = layer
        while isinstance(holder.base_layer, BaseTunerLayer):
            holder = holder.base_layer
        holder.base_layer = layer.dequantized_base()
    bnb = _bnb()
    for name, module in list(model.named_modules()):  # bare quantized layers (not adapted)
        quantized = (bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))) or (
            type(module) is nn.Linear and _torchao_tensor(module.weight)
        )
        if not quantized or not name:
            continue
        parent_name, _, attr = name.rpartition(".")
        if isinstance(model.get_submodule(parent_name), BaseTunerLayer):
            raise ValueError(
                f"dequantize_base cannot replace {name!r}: it is the base layer of a "
                f"{type(model.get_submodule(parent_name)).__name__}, not of a CapaBoost-LoRA layer."
            )
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        if isinstance(module, nn.Linear) and _torchao_tensor(module.weight):
            weight = module.weight.dequantize()
        elif isinstance(module.weight, bnb.nn.Params4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        else:
            scb = module.state.SCB if module.state.SCB is not None else module.weight.SCB
            weight = bnb.functional.int8_vectorwise_dequant(module.weight.data, scb.to(module.weight.device))
        dense.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if module.bias is not None:
            dense.bias = module.bias
        dense.train(module.training)
        setattr(model.get_submodule(parent_name), attr, dense)
    for module in model.modules():  # the transformers model, wherever PEFT's wrappers hold it
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if flag in vars(module):
                setattr(module, flag, False)
    return model
