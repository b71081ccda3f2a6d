"""CapaBoost-DoRA: PEFT's DoRA with the masked rank-d*r update as the direction's ΔW.

DoRA (https://huggingface.co/papers/2402.09353) trains a per-output-row magnitude ``m`` next to LoRA and uses the
weight ``m ⊙ (W0 + s ΔW) / ||W0 + s ΔW||_row`` with the norm detached (paper section 4.3). It needs exactly two things
of the low-rank update: the dense ΔW (for the norm, which PEFT also materialises every forward) and ``x ΔWᵀ``. For
CapaBoost-LoRA both come from the one gather of the packed factors, ΔW = B_cat A_cat (Σ_i of the masked copies), so
nothing in DoRA depends on ΔW being a single rank-r pair, and at d=1, s=1 this is PEFT's DoRA.

The formulas follow PEFT 0.21 ``tuners/lora/dora.py`` (``DoraLinearLayer``: init, ``get_weight_norm``, ``forward``)
and ``tuners/lora/variants.py`` (``DoraLinearVariant``: dropout handling, merge, unmerge). PEFT's classes are not
reused because they call ``lora_A``/``lora_B`` as modules and keep the magnitude as ``<dora layer>.weight``; here the
magnitude is a plain ``ParameterDict`` named ``lora_magnitude_vector``, so a checkpoint carries PEFT's own key
(``...lora_magnitude_vector``) and :func:`capaboost.export_as_lora` hands it to ``LoraConfig(use_dora=True)`` as is.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.utils.other import transpose


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of an (out x in) weight, in its dtype (PEFT's ``get_weight_norm``)."""
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


class DoraLinearMixin:
    """DoRA for the CapaBoost-LoRA ``Linear`` (``nn.Linear`` and transformers' ``Conv1D``).

    An adapter uses DoRA iff it has an entry in ``lora_magnitude_vector``; every other adapter of the layer keeps
    the plain CapaBoost-LoRA path. Merging needs the norm of the *unmerged* base weight, kept per adapter from merge
    to unmerge (as PEFT does), because the merged weight no longer yields it.
    """

    supports_dora = True

    def _weight_out_in(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return transpose(weight if dtype is None else weight.to(dtype), self.fan_in_fan_out)

    def init_magnitude(self, adapter: str) -> None:
        """m = ||W0 + scaling ΔW||_row at init (= ||W0|| when B = 0), as PEFT's ``DoraLinearLayer.update_layer``."""
        with torch.no_grad():
            delta = transpose(self.get_delta_weight(adapter), self.fan_in_fan_out)  # scaled, out x in
            norm = row_norm(self._weight_out_in().to(delta.device) + delta)
        self.lora_magnitude_vector[adapter] = nn.Parameter(norm, requires_grad=True)

    def _dora_add(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``result`` (the base output, or the running one) plus DoRA's extra output (PEFT's
        ``DoraLinearVariant.forward`` and ``DoraLinearLayer.forward``); ``x`` has been through lora_dropout."""
        # one gather gives both ΔW (for the norm) and the low-rank path; mask_mode="dropout" draws its masks once
        a_cat, b_cat = self.cat_factors(adapter)
        scaling = self.scaling[adapter]
        weight = self._weight_out_in(x.dtype)
        weight_norm = row_norm(weight + scaling * (b_cat @ a_cat).detach().to(x.dtype)).detach()  # DoRA sec. 4.3
        mag_norm_scale = (self.lora_magnitude_vector[adapter] / weight_norm).view(1, -1)
        lora_result = F.linear(F.linear(x, a_cat), b_cat)
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not self.training:
            # PEFT passes the running result: with several active DoRA adapters each rescales what came before
            bias = self.get_base_layer().bias
            base_result = result if bias is None else result - bias
        else:  # x is the dropped-out input: the base term is recomputed from it, as PEFT does
            base_result = F.linear(x, weight)
        dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
        return (result + dora).to(result.dtype)

    def _dora_factor(self, adapter: str, weight_norm: torch.Tensor) -> torch.Tensor:
        """m / ||W0 + ΔW||, shaped to scale the rows of the base weight in its own layout."""
        factor = self.lora_magnitude_vector[adapter] / weight_norm
        return transpose(factor.view(-1, 1), self.fan_in_fan_out)

    def _base_weight_without_merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with the already merged adapters taken out (PEFT's ``_unmerged_base_weight``)."""
        for adapter in reversed(self.merged_adapters):
            if adapter in self.cblora_A:
                weight = self._unmerged_weight(weight, adapter)
        return weight

    def _merged_weight(self, weight: torch.Tensor, adapter: str) -> torch.Tensor:
        if adapter not in self.lora_magnitude_vector:
            return super()._merged_weight(weight, adapter)
        delta = self.get_delta_weight(adapter)
        base = self._base_weight_without_merged(weight.clone())
        weight_norm = row_norm(transpose(base, self.fan_in_fan_out) + transpose(delta, self.fan_in_fan_out)).detach()
        self._dora_merge_norm[adapter] = weight_norm  # the merged weight cannot give it back on unmerge
        return (self._dora_factor(adapter, weight_norm) * (weight + delta)).to(weight.dtype)

    def _unmerged_weight(self, weight: torch.Tensor, adapter: str) -> torch.Tensor:
        if adapter not in self.lora_magnitude_vector:
            return super()._unmerged_weight(weight, adapter)
        factor = self._dora_factor(adapter, self._dora_merge_norm[adapter])
        return (weight / factor - self.get_delta_weight(adapter)).to(weight.dtype)
