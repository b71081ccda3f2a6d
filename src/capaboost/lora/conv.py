"""The conv part of CapaBoost-LoRA around ``nn.Conv{1,2,3}d``, grouped ones included, as PEFT's LoRA conv.

A mixin (no import of :mod:`capaboost.lora.layer`, which builds ``Conv1d``/``Conv2d``/``Conv3d`` from it and
``_Wrapper``), so that the wrappers keep their place in ``capaboost.lora.layer`` without an import cycle.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..masks import MaskSpec
from ..packing import MaskedPair


class ConvLoraMixin:
    """CapaBoost-LoRA around a ``nn.Conv{1,2,3}d``, as PEFT's LoRA: A is a conv with the base kernel (over all
    in_channels), B a pointwise conv with the base's ``groups``.

    groups=1: A is masked as an (r, in_channels*prod(kernel)) matrix (N:M groups run along that flattened input), B
    as (out_channels, r). The d copies run as ONE conv with d*r output channels and one pointwise conv, and
    B_cat @ A_cat reshaped to the kernel is ΔW exactly, so merging is exact.

    groups=G > 1 (PEFT: r divisible by G; B is (out_channels, r/G), group g of B reads A's rows g*r/G..): A is stored
    as its G row blocks side by side, an (r/G, G*in_channels*prod(kernel)) matrix, so that (A, B) is one
    :class:`MaskedPair` of rank r/G. A_cat is re-laid as ONE conv of d*r channels (group-major: group g's d*r/G
    channels hold every copy's rows of that group) and B_cat is the weight of PEFT's grouped pointwise conv of rank
    d*r, so the adapter is a PEFT LoRA of rank d*r (what export_as_lora writes). Its ΔW links every input channel to
    every output channel, which a grouped weight cannot hold: merging is refused, as PEFT's LoRA refuses it.
    """

    conv_type: type = nn.Conv2d
    conv_fn = staticmethod(F.conv2d)

    def _check_base_layer(self) -> None:
        conv, name, kind = self.get_base_layer(), self.capaboost_name, self.conv_type.__name__
        pointwise = all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
        if type(conv).forward is not self.conv_type.forward and not pointwise:
            raise ValueError(
                f"CapaBoost-LoRA cannot adapt {name!r}: {type(conv).__name__} overrides {kind}.forward "
                "(e.g. timm's Conv2dSame pads dynamically), so the adapter conv could not reproduce its padding. "
                "Only its 1x1/stride-1 convs can be targeted; exclude it with exclude_modules."
            )
        if conv.groups > 1:
            warnings.warn(
                f"CapaBoost-LoRA adapter added to {name!r}, a grouped {kind} (groups={conv.groups}): merging it is not "
                "supported (as with PEFT's LoRA)."
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"CapaBoost-LoRA cannot adapt {name!r}: {kind} padding_mode={conv.padding_mode!r} is not "
                "supported (only 'zeros'); exclude it with exclude_modules."
            )

    def update_layer(self, adapter_name: str, r: int, *args: Any, **kwargs: Any) -> None:
        groups = self.get_base_layer().groups
        if r % groups:
            raise ValueError(
                f"CapaBoost-LoRA cannot adapt {self.capaboost_name!r}: it is a grouped {self.conv_type.__name__} "
                f"(groups={groups}) and r={r} is not divisible by groups (its B is a grouped pointwise conv; PEFT's "
                f"LoRA has the same limit). Choose an r divisible by {groups} for it (r or rank_pattern), or exclude "
                "it with exclude_modules."
            )
        super().update_layer(adapter_name, r, *args, **kwargs)
        if groups > 1:  # A was drawn as (r/G, G*fan_in): rescale to PEFT's kaiming bound for a fan_in of its kernel
            with torch.no_grad():
                self.cblora_A[adapter_name].mul_(math.sqrt(groups))

    @property
    def factor_in_features(self) -> int:
        conv = self.get_base_layer()
        return conv.in_channels * math.prod(conv.kernel_size)

    def make_pair(self, spec: MaskSpec, r: int) -> MaskedPair:
        groups = self.get_base_layer().groups
        if groups > 1 and spec.nm is not None and self.factor_in_features % spec.nm[1]:
            # A is stored as its G row blocks side by side: an N:M group must not straddle two blocks, or the
            # exported (d*r, in*kernel) factor would not be N:M row by row
            raise ValueError(
                f"CapaBoost-LoRA cannot put mask_pattern={spec.pattern!r} on {self.capaboost_name!r}: it is a grouped "
                f"{self.conv_type.__name__} whose kernel fan-in {self.factor_in_features} is not divisible by "
                f"M={spec.nm[1]}. Use mask_pattern='random' for it, or exclude it with exclude_modules."
            )
        return MaskedPair(spec, self.capaboost_name, r // groups, groups * self.factor_in_features, self.out_features)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        conv = self.get_base_layer()
        if conv.groups > 1:
            raise NotImplementedError(
                f"CapaBoost-LoRA cannot merge (or build ΔW of) {self.capaboost_name!r}: it is a grouped "
                f"{self.conv_type.__name__} (groups={conv.groups}), and the adapter's ΔW links every input channel to "
                "every output channel, which the grouped weight cannot hold (PEFT's LoRA refuses this merge too). "
                "Use the model unmerged (or export_as_lora), or exclude the grouped conv with exclude_modules to "
                "merge the rest."
            )
        return super().get_delta_weight(adapter).reshape(conv.weight.shape)

    def _kernel(self, a_cat: torch.Tensor) -> torch.Tensor:
        """A_cat as the weight of the one adapter conv: (d*r, in_channels, *kernel), group-major when grouped."""
        conv = self.get_base_layer()
        groups, rows = conv.groups, a_cat.shape[0]
        if groups > 1:  # (d*r/G, G*fan_in) -> (G, d*r/G, fan_in): group g's rows, every copy's, side by side
            a_cat = a_cat.reshape(rows, groups, -1).transpose(0, 1)
        return a_cat.reshape(groups * rows, conv.in_channels, *conv.kernel_size)

    def lora_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.get_base_layer()
        if any(d != 1 for d in conv.dilation):
            raise ValueError(
                f"cannot export {self.capaboost_name!r} as PEFT LoRA: its {self.conv_type.__name__} has dilation="
                f"{conv.dilation}, which PEFT's LoRA conv ignores (it would change the outputs). Merge it instead "
                "(merge_and_unload)."
            )
        a_cat, b_cat = self.capaboost_pairs[adapter].cat(*self.packed_factors(adapter))
        return self._kernel(a_cat), self._pointwise(b_cat)

    def full_factors(self, a_cat: torch.Tensor, b_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's map as one matrix product B_full @ A_full (out x d*r, d*r x in*kernel): for a grouped
        conv B_cat acts per group, i.e. B_full is block-diagonal (what rank accounting needs; merging cannot hold it)."""
        groups = self.get_base_layer().groups
        a_full = self._kernel(a_cat).reshape(groups * a_cat.shape[0], -1)
        if groups == 1:
            return a_full, b_cat
        out, rows = b_cat.shape
        b_full = b_cat.new_zeros(out, groups * rows)
        for g in range(groups):  # output group g reads adapter channels g*rows ... (g+1)*rows
            block = slice(g * out // groups, (g + 1) * out // groups)
            b_full[block, g * rows : (g + 1) * rows] = b_cat[block]
        return a_full, b_full

    def _pointwise(self, b_cat: torch.Tensor) -> torch.Tensor:
        """B_cat (out x d*r/groups) as the weight of a pointwise conv of the base's dimensionality."""
        return b_cat.reshape(*b_cat.shape, *(1,) * len(self.get_base_layer().kernel_size))

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        conv = self.get_base_layer()
        a_cat, b_cat = self.cat_factors(adapter)
        h = self.conv_fn(x, self._kernel(a_cat), None, conv.stride, conv.padding, conv.dilation)  # d*r channels
        delta = self.conv_fn(h, self._pointwise(b_cat), groups=conv.groups)
        return result + (delta * self.scaling[adapter]).to(result.dtype)

