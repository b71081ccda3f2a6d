"""CapaBoost-LoRA on a bare ``nn.Parameter`` (``target_parameters``), e.g. MoE experts stored as one tensor.

Mirrors PEFT's ``lora.ParamWrapper``: while the wrapper runs, the target parameter is parametrized as W + ΔW
(``torch.nn.utils.parametrize``), so the module's own forward (``x @ W``, ``torch.bmm``, grouped matmul) sees the
adapted weight; merging adds ΔW to the stored parameter.

Factor layout (why one :class:`MaskedPair` serves all experts): PEFT stores the E experts' factors as ONE
``lora_A`` of shape (r*E, in) read as (E, r, in) (expert e: rows e*r..e*r+r-1) and ONE ``lora_B`` of shape
(out, r*E) read as (out, r, E) (expert e: columns k*E+e). CapaBoost masks exactly those two 2-D matrices, keyed by
the parameter's name: every entry of every expert gets its own mask bit, so the experts' masks differ without a
per-expert key, and the mask core, packing, fingerprints and accounting stay those of every other layer. Copy i of
the masked pair is then a PEFT-layout rank-r LoRA of all experts (A_cat rows i*r*E.., B_cat columns i*r*E..), and
ΔW_e = scaling * Σ_i (B_e⊙m_Bi,e)(A_e⊙m_Ai,e) is exact: :meth:`ParamWrapper.expert_factors` regroups the copies per
expert, and :meth:`ParamWrapper.lora_weights` re-lays them as PEFT's rank-d*r factors (export is exact too).
With ``mask_pattern`` N:M, B's groups of M run along its stored columns (rank-major, experts interleaved, as PEFT
stores them); A's run along the input features as for every layer.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from peft.tuners.lora.layer import _LoraParameterProxy

from ..masks import MaskSpec
from ..packing import MaskedPair, linear_init, warn_dense_copies
from .layer import CapaBoostLoraLayer


class ParamWrapper(nn.Module, CapaBoostLoraLayer):
    """CapaBoost-LoRA of ONE ``nn.Parameter`` (2-D: (out, in) as PEFT reads it; 3-D: (experts, in, out), or
    (experts, out, in) where the module sets ``is_transposed``), following PEFT's ParamWrapper exactly.

    The class is named ``ParamWrapper`` on purpose: PEFT's injection recognises an existing parameter wrapper by that
    class name, to nest a second targeted parameter of the same module and to add a second adapter to the wrapper.
    As in PEFT, lora_dropout, fan_in_fan_out, DoRA and mixed-adapter batches are refused: dropout cannot be factored
    out of a weight update, and the base module's own forward computes with the whole weight.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, capaboost_name: str, parameter_name: str, r: int,
        lora_alpha: float, lora_dropout: float, spec: MaskSpec, init_lora_weights: bool = True,
        use_dora: bool = False, fan_in_fan_out: bool = False, **kwargs: Any,
    ) -> None:
        self.parameter_name = parameter_name
        nn.Module.__init__(self)
        self.base_layer = base_layer
        shape = tuple(self.get_param().shape)
        if len(shape) not in (2, 3):
            raise ValueError(
                f"CapaBoost-LoRA cannot adapt parameter {capaboost_name!r} of shape {shape}: only 2-D and 3-D "
                "(experts, in, out) parameters are supported, as in PEFT; remove it from target_parameters."
            )
        if fan_in_fan_out:
            raise ValueError(f"target_parameters ({capaboost_name!r}) does not work with fan_in_fan_out=True, as in "
                             "PEFT: set fan_in_fan_out=False.")
        self.num_experts = shape[0] if len(shape) == 3 else 1
        # PEFT's reading of the shape (lora.ParamWrapper._get_in_out_features + its swap for 3-D parameters)
        self._did_swap_in_out_features = len(shape) == 3 and not getattr(base_layer, "is_transposed", False)
        if len(shape) == 2:
            in_features, out_features = shape[1], shape[0]
        elif self._did_swap_in_out_features:
            in_features, out_features = shape[2], shape[1]
        else:
            in_features, out_features = shape[1], shape[2]
        with warnings.catch_warnings():  # the base module is no layer PEFT knows: its features come from the shape
            warnings.simplefilter("ignore")
            CapaBoostLoraLayer.__init__(self, base_layer, capaboost_name, **kwargs)
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, spec, init_lora_weights, use_dora)

    def get_param(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, spec: MaskSpec,
        init_lora_weights: bool = True, use_dora: bool = False,
    ) -> None:
        """As the Linear layer's, with factors of rank r * num_experts (PEFT's layout, see the module docstring)."""
        if r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r}.")
        for refused, value, why in (
            ("lora_dropout", lora_dropout, "dropout on the input cannot be factored out of a weight update"),
            ("use_dora", use_dora, "DoRA is not implemented for parameter targets"),
        ):
            if value:
                raise ValueError(
                    f"CapaBoost-LoRA cannot adapt parameter {self.capaboost_name!r} (target_parameters) with "
                    f"{refused}={value!r}: {why}, as in PEFT's lora.ParamWrapper. Set {refused} to its default, or "
                    "target the parameter's module with target_modules if it is an nn.Linear."
                )
        warn_dense_copies(spec)
        pair = self.make_pair(spec, r)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Identity()
        self.capaboost_pairs[adapter_name] = pair
        self.cblora_A[adapter_name], self.cblora_B[adapter_name] = pair.init_packed(
            init_b=None if init_lora_weights else linear_init
        )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def make_pair(self, spec: MaskSpec, r: int) -> MaskedPair:
        """PEFT's ParamWrapper factors: A (r*experts, in), B (out, r*experts); one pair holds every expert."""
        return MaskedPair(spec, self.capaboost_name, r * self.num_experts, self.in_features, self.out_features)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """To the target parameter's device and (floating) dtype: the base module may have no ``weight``."""
        param = self.get_param()
        dtype = param.dtype if (param.dtype.is_floating_point or param.dtype.is_complex) else None
        for store in (self.cblora_A, self.cblora_B):
            if adapter_name in store and store[adapter_name].device.type != "meta":
                store[adapter_name] = nn.Parameter(
                    store[adapter_name].data.to(device or param.device, dtype=dtype),
                    requires_grad=store[adapter_name].requires_grad,
                )

    def expert_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e, B_e) per expert: (E, d*r, in) and (E, out, d*r), masks applied, copies side by side.

        A_cat's rows are (copy, expert, rank) and B_cat's columns (copy, rank, expert), PEFT's per-copy layout.
        """
        a_cat, b_cat = self.cat_factors(adapter)
        d, e, r = self.capaboost_pairs[adapter].spec.num_copies, self.num_experts, self.r[adapter]
        a_e = a_cat.reshape(d, e, r, self.in_features).permute(1, 0, 2, 3).reshape(e, d * r, self.in_features)
        b_e = b_cat.reshape(self.out_features, d, r, e).permute(3, 0, 1, 2).reshape(e, self.out_features, d * r)
        return a_e, b_e

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the parameter's shape and dtype: per expert scaling * B_e A_e, laid out as PEFT's ParamWrapper."""
        param = self.get_param()
        a_e, b_e = self.expert_factors(adapter)
        delta = torch.bmm(b_e, a_e) * self.scaling[adapter]  # (E, out, in)
        if not self._did_swap_in_out_features:  # 2-D: (out, in); 3-D transposed: (E, in, out)
            delta = delta[0] if param.dim() == 2 else delta.transpose(-2, -1)
        return delta.to(param.device, param.dtype)

    def lora_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) of PEFT's ParamWrapper at rank d*r: (d*r*E, in) and (out, d*r*E), for export."""
        a_e, b_e = self.expert_factors(adapter)
        return a_e.reshape(-1, self.in_features), b_e.permute(1, 2, 0).reshape(self.out_features, -1)

    @contextmanager
    def _activate(self) -> Iterator[None]:
        """The target parameter reads W + Σ ΔW (active adapters) for the duration of the base module's forward."""
        adapters = [a for a in self.active_adapters if a in self.cblora_A]
        if not adapters:
            yield
            return
        delta = sum(self.get_delta_weight(a) for a in adapters)
        base_layer, param = self.get_base_layer(), self.get_param()
        requires_grad = param.requires_grad
        nn.utils.parametrize.register_parametrization(base_layer, self.parameter_name, _LoraParameterProxy(delta))
        base_layer.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with nn.utils.parametrize.cached():
                yield
        finally:
            self._remove_parametrization()

    def _remove_parametrization(self) -> None:
        """Remove only this wrapper's proxy: another parametrization of the parameter (or none) stays as it was."""
        base_layer = self.get_base_layer()
        stack = base_layer.parametrizations[self.parameter_name]
        if len(stack) == 1:
            nn.utils.parametrize.remove_parametrizations(base_layer, self.parameter_name, leave_parametrized=False)
            return
        for i in reversed(range(len(stack))):
            if isinstance(stack[i], _LoraParameterProxy):
                del stack[i]
                break

    def _merge_target(self) -> torch.Tensor:
        return self.get_param()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Nested wrappers (several parameters of one module) merge and unload together, as PEFT's ParamWrapper."""
        layer: nn.Module = self
        while isinstance(layer, ParamWrapper):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            layer = layer.base_layer
        return self.get_base_layer()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None and not self.disable_adapters:
            raise ValueError(
                f"mixed-adapter batches (adapter_names=...) are not supported for the parameter target "
                f"{self.capaboost_name!r} (as in PEFT's lora.ParamWrapper): call set_adapter() per batch instead."
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        with self._activate():
            return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        rep = super().__repr__()
        idx = rep.find("(") + 1
        return f"capaboost.{rep[:idx]}\n  parameter_name='{self.parameter_name}',{rep[idx:]}"
