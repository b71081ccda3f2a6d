"""Config of CapaBoost prefix-tuning: the reparameterization MLP of Li & Liang (2021), CapaBoost-masked."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PrefixTuningConfig

from ..config import MaskedParallelConfig
from ..registry import peft_type

CAPABOOST_PREFIX = peft_type("CAPABOOST_PREFIX")


@dataclass
class CapaBoostPrefixConfig(MaskedParallelConfig, PrefixTuningConfig):
    """Prefix-tuning whose prefix MLP ``up(tanh(down(E)))`` has d masked copies of each projection.

    Masking a flat prefix table would only rescale entries, so the masks go on the MLP: the table is
    ``up_cat(tanh(down_cat(E) + b_down)) + b_up``, rank up to d*encoder_hidden_size at ~1-(1-s)^d of the
    MLP's weights. ``num_copies=1, mask_density=1.0`` is PEFT's prefix tuning with ``prefix_projection``.

    How PEFT sees it: PEFT switches prefix-tuning behaviour (past_key_values, prompt saving, loading)
    on ``peft_type == PeftType.PREFIX_TUNING`` in some twenty places, so at run time this config reports
    ``PREFIX_TUNING`` and is told apart by its class. Two things differ: ``adapter_config.json`` records
    ``"peft_type": "CAPABOOST_PREFIX"`` (so loading dispatches back to this class, and stock PEFT
    without capaboost refuses it by name), and PEFT's PREFIX_TUNING encoder entry is extended (see
    :mod:`capaboost.prefix.model`) to build :class:`CapaBoostPrefixEncoder` for this config and the
    stock ``PrefixEncoder`` for every other. Saving follows PEFT: the checkpoint holds the
    materialized prefix table, which :func:`capaboost.export_as_prefix` turns into a stock config.
    """

    prefix_projection: bool = field(default=True, metadata={"help": "Always True: the masks live on the MLP."})

    def __post_init__(self) -> None:
        super().__post_init__()  # PrefixTuningConfig: peft_type = PREFIX_TUNING (see the class docstring)
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_virtual_tokens (the prefix length) must be an integer >= 1, got {n!r}.")
        k = self.encoder_hidden_size
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"encoder_hidden_size (the prefix MLP width) must be an integer >= 1 or None, got {k!r}.")
        if not self.prefix_projection:
            raise ValueError(
                "CapaBoostPrefixConfig masks the prefix MLP, so prefix_projection must be True; for a flat prefix "
                "table use peft.PrefixTuningConfig(prefix_projection=False)."
            )
        for name in ("copies_pattern", "density_pattern"):  # the prefix MLP is one module: nothing to pattern
            if getattr(self, name):
                raise ValueError(
                    f"CapaBoostPrefixConfig does not support {name}={getattr(self, name)!r}: the prefix MLP is a "
                    "single module; set num_copies and mask_density instead."
                )
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
        self._validate_masks()

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["peft_type"] = CAPABOOST_PREFIX.value
        return output
