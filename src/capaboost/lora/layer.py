"""CapaBoost-LoRA tuner layer: ``z = W0 x + scaling * B_cat (A_cat x)`` (paper eq. 4)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from transformers.pytorch_utils import Conv1D

from ..masks import MaskSpec
from ..packing import MaskedPair, linear_init, warn_dense_copies
from ..tuner import mixed_batch_error
from .conv import ConvLoraMixin
from .dora import DoraLinearMixin


class CapaBoostLoraLayer(BaseTunerLayer):
    """LoRA with d masked copies of one (A, B) pair, stored packed: only the union of the masks trains.

    The packed values are 1-D parameters ``cblora_A[adapter]`` / ``cblora_B[adapter]``, so optimizer
    state, DDP buckets and checkpoints are union-sized. Masks live in ``capaboost_pairs`` (plain
    attributes: regenerated, never saved or broadcast).
    """

    adapter_layer_names = ("cblora_A", "cblora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "capaboost_pairs")
    supports_dora = False  # see DoraLinearMixin

    def __init__(self, base_layer: nn.Module, capaboost_name: str, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.capaboost_name = capaboost_name
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.cblora_A = nn.ParameterDict()
        self.cblora_B = nn.ParameterDict()
        self.capaboost_pairs: dict[str, MaskedPair] = {}
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, PEFT's name: only adapters with use_dora=True
        self._dora_merge_norm: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        spec: MaskSpec,
        init_lora_weights: bool = True,
        use_dora: bool = False,
    ) -> None:
        if r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r}.")
        self._check_dora(use_dora)
        warn_dense_copies(spec)
        pair = self.make_pair(spec, r)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.capaboost_pairs[adapter_name] = pair
        # as LoRA: A random, B = 0 (so the wrapped model equals the base)
        packed = pair.init_packed(init_b=None if init_lora_weights else linear_init)
        self.cblora_A[adapter_name], self.cblora_B[adapter_name] = packed
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if adapter_name in self.lora_magnitude_vector:  # re-adding a name: its old magnitude must not survive
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:  # after the move, as PEFT: m is the norm of the weight where the adapter lives
            self.init_magnitude(adapter_name)
        self.set_adapter(self.active_adapters)

    def _check_dora(self, use_dora: bool) -> None:
        """DoRA is implemented for the Linear wrapper only (nn.Linear, Conv1D): refuse it by name elsewhere."""
        if use_dora and not self.supports_dora:
            base, backend = self.get_base_layer(), getattr(self, "backend", "")
            raise ValueError(
                f"CapaBoost-LoRA cannot apply use_dora=True (DoRA) to {self.capaboost_name!r} of type "
                f"{type(base).__module__}.{type(base).__name__}{f' ({backend})' if backend else ''}: CapaBoost-DoRA "
                "is implemented for unquantized torch.nn.Linear and transformers' Conv1D layers only (PEFT's "
                "Embedding/Conv/quantized DoRA variants are not). Exclude it with exclude_modules, or use "
                "peft.LoraConfig(use_dora=True) for DoRA on it."
            )

    @property
    def factor_in_features(self) -> int:
        """Columns of the down factor A: the input features (a conv's in_channels * kernel area)."""
        return self.in_features

    def make_pair(self, spec: MaskSpec, r: int) -> MaskedPair:
        """The masked (A, B) pair of an adapter of rank ``r`` (a grouped conv lays its factors out otherwise)."""
        return MaskedPair(spec, self.capaboost_name, r, self.factor_in_features, self.out_features)

    def packed_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cblora_A[adapter], self.cblora_B[adapter]

    def lora_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat) shaped as PEFT LoRA's lora_A/lora_B weights of rank d*r (for export)."""
        return self.capaboost_pairs[adapter].cat(*self.packed_factors(adapter))

    def cat_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat) of ``adapter``: d*r x in and out x d*r, masks applied."""
        return self.capaboost_pairs[adapter].cat(self.cblora_A[adapter], self.cblora_B[adapter], self.training)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the base weight's layout (transposed for Conv1D-style fan_in_fan_out)."""
        packed_a, packed_b = self.cblora_A[adapter], self.cblora_B[adapter]
        dtype = packed_b.dtype
        cast = packed_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)  # slow half matmul on CPU
        if cast:
            packed_a, packed_b = packed_a.float(), packed_b.float()
        delta = transpose(self.capaboost_pairs[adapter].delta(packed_a, packed_b), self.fan_in_fan_out)
        return (delta * self.scaling[adapter]).to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.cblora_A:
                self._merge_one(adapter, safe_merge)
                self.merged_adapters.append(adapter)

    def _merge_target(self) -> torch.Tensor:
        """The tensor ΔW is merged into (a parameter wrapper's is its target parameter, not ``weight``)."""
        return self.get_base_layer().weight

    def _merge_one(self, adapter: str, safe_merge: bool) -> None:
        """Merge one adapter into :meth:`_merge_target`; quantized bases override it to re-quantize."""
        target = self._merge_target()
        merged = self._merged_weight(target.data, adapter)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        target.data = merged

    def _unmerge_one(self, adapter: str) -> None:
        target = self._merge_target()
        target.data = self._unmerged_weight(target.data, adapter)

    def _merged_weight(self, weight: torch.Tensor, adapter: str) -> torch.Tensor:
        """``weight`` with ``adapter`` merged in (a new tensor); DoRA overrides it."""
        return weight + self.get_delta_weight(adapter).to(weight.dtype)

    def _unmerged_weight(self, weight: torch.Tensor, adapter: str) -> torch.Tensor:
        """Inverse of :meth:`_merged_weight`."""
        return weight - self.get_delta_weight(adapter).to(weight.dtype)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.cblora_A:
                self._unmerge_one(adapter)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Row i of the batch uses adapter ``adapter_names[i]`` ("__base__": none), as PEFT LoRA's mixed batches.

        The base layer runs once on the whole batch; each adapter adds its ΔW x to its own rows only.
        """
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows at "
                f"{self.capaboost_name!r}; pass one adapter name per row."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass adapter_names while adapters are merged into the base weights; call "
                "model.unmerge_adapter() first."
            )
        result = self.base_layer(x, *args, **kwargs)
        for adapter in sorted(set(adapter_names)):
            if adapter == "__base__" or adapter not in self.cblora_A:
                continue
            rows = torch.tensor([i for i, name in enumerate(adapter_names) if name == adapter], device=x.device)
            x_in = self.lora_dropout[adapter](self._cast_input_dtype(x[rows], self.cblora_A[adapter].dtype))
            result[rows] = self._add_delta(result[rows], x_in, adapter).to(result.dtype)
        return result


class _Wrapper(nn.Module, CapaBoostLoraLayer):
    """Construction and forward skeleton shared by the wrapped layer types; each adds its own ΔW x."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        capaboost_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        spec: MaskSpec,
        fan_in_fan_out: bool = False,
        init_lora_weights: bool = True,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        CapaBoostLoraLayer.__init__(self, base_layer, capaboost_name, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self._check_dora(use_dora)  # before the layer's own checks: DoRA is the option the user can drop
        self._check_base_layer()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, spec, init_lora_weights, use_dora)

    def _check_base_layer(self) -> None:
        """Refuse a base layer whose computation the adapter path could not mirror."""

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.cblora_A:
                x_in = self.lora_dropout[adapter](self._cast_input_dtype(x, self.cblora_A[adapter].dtype))
                result = self._add_delta(result, x_in, adapter)
        return result

    def __repr__(self) -> str:
        return "capaboost." + super().__repr__()


class Linear(DoraLinearMixin, _Wrapper):
    """CapaBoost-LoRA around ``nn.Linear`` or transformers' ``Conv1D``; with ``use_dora=True`` CapaBoost-DoRA."""

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        if adapter in self.lora_magnitude_vector:
            return self._dora_add(result, x, adapter)
        # one autograd node: gather, x A_cat^T, then result + scaling * h B_cat^T in one addmm
        return self.capaboost_pairs[adapter].add_lowrank(
            result, x, self.cblora_A[adapter], self.cblora_B[adapter], self.scaling[adapter], self.training
        )


class Embedding(_Wrapper):
    """CapaBoost-LoRA around ``nn.Embedding``, as PEFT's LoRA Embedding.

    A (r x num_embeddings) is looked up by the token ids, B is (embedding_dim x r): the delta is
    ``embedding(x, A_catᵀ) B_catᵀ * scaling`` for all d copies at once, and ΔW = (B_cat A_cat)ᵀ, so merging
    is exact. As PEFT: A starts at 0 and B ~ N(0, 1) (both N(0, 1) with init_lora_weights=False), token ids are
    neither cast nor dropped out (lora_dropout does not apply), and an ``embed_scale`` of the base scales the delta.
    """

    def _check_base_layer(self) -> None:
        emb = self.get_base_layer()
        if emb.max_norm is not None:
            raise ValueError(
                f"CapaBoost-LoRA cannot adapt {self.capaboost_name!r}: its Embedding has max_norm={emb.max_norm}, "
                "which renormalises the looked-up rows in place, so neither the adapter lookup nor a merge could "
                "reproduce it; exclude it with exclude_modules."
            )

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, spec: MaskSpec,
        init_lora_weights: bool = True, use_dora: bool = False,
    ) -> None:
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, spec, init_lora_weights, use_dora)
        with torch.no_grad():  # the packed values are a subset of a dense init: drawing them directly is the same
            packed_a, packed_b = self.cblora_A[adapter_name], self.cblora_B[adapter_name]
            packed_a.zero_() if init_lora_weights else nn.init.normal_(packed_a)
            nn.init.normal_(packed_b)
        self.lora_dropout[adapter_name] = nn.Identity()

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x  # token ids stay integers

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        emb = self.get_base_layer()
        a_cat, b_cat = self.cat_factors(adapter)
        # dense gradients: the gathered A_cat is no leaf, so a sparse gradient could not reach the packed values
        h = F.embedding(x, a_cat.t(), emb.padding_idx, None, emb.norm_type, emb.scale_grad_by_freq, False)
        delta = (h @ b_cat.t()) * self.scaling[adapter]
        embed_scale = self._get_embed_scale()
        if embed_scale is not None:
            delta = delta * embed_scale.to(delta.dtype)
        return result + delta.to(result.dtype)


class _ConvNd(ConvLoraMixin, _Wrapper):
    """CapaBoost-LoRA around ``nn.Conv{1,2,3}d`` (grouped too); see :class:`capaboost.lora.conv.ConvLoraMixin`."""


class Conv1d(_ConvNd):
    """CapaBoost-LoRA around ``nn.Conv1d``; see :class:`_ConvNd`."""

    conv_type = nn.Conv1d
    conv_fn = staticmethod(F.conv1d)


class Conv2d(_ConvNd):
    """CapaBoost-LoRA around ``nn.Conv2d``; see :class:`_ConvNd`."""

    conv_type = nn.Conv2d
    conv_fn = staticmethod(F.conv2d)


class Conv3d(_ConvNd):
    """CapaBoost-LoRA around ``nn.Conv3d``; see :class:`_ConvNd`."""

    conv_type = nn.Conv3d
    conv_fn = staticmethod(F.conv3d)


def create_module(
    target: nn.Module, adapter_name: str, capaboost_name: str, config: Any, **layer_kwargs: Any
) -> nn.Module:
    """Wrap a supported base layer, or fail with an error that names the layer type."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but the target is torch.nn.Linear; using fan_in_fan_out=False.")
        return Linear(target, adapter_name, capaboost_name, fan_in_fan_out=False, **layer_kwargs)
    if isinstance(base, Conv1D):
        return Linear(target, adapter_name, capaboost_name, fan_in_fan_out=True, **layer_kwargs)
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, capaboost_name, fan_in_fan_out=True, **layer_kwargs)  # W: in x out
    for conv_class in (Conv1d, Conv2d, Conv3d):
        if isinstance(base, conv_class.conv_type):
            return conv_class(target, adapter_name, capaboost_name, **layer_kwargs)
    raise ValueError(
        f"CapaBoost-LoRA cannot adapt {capaboost_name!r} of type {type(base).__module__}.{type(base).__name__}: "
        "supported layer types are torch.nn.Linear, transformers' Conv1D, torch.nn.Embedding and "
        "torch.nn.Conv1d/Conv2d/Conv3d (grouped too). "
        "Remove it from target_modules (or exclude it with exclude_modules)."
    )
