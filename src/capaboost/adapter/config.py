"""Config of CapaBoost bottleneck adapters (PAdapter, HAdapter, parallel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig
from transformers.activations import ACT2FN

from ..config import MaskedParallelConfig
from ..registry import peft_type
from .placement import STYLES, Placement

CAPABOOST_ADAPTER = peft_type("CAPABOOST_ADAPTER")


@dataclass
class CapaBoostAdapterConfig(MaskedParallelConfig, PeftConfig):
    """Bottleneck adapter whose two projections are shared by d masked copies (paper eq. 5).

    ``z = h + Σ_i f(x (down⊙m_i) + b_down)(up⊙m'_i) + b_up``, computed as one down-projection to
    d*bottleneck features, f, and one up-projection. ``num_copies=1, mask_density=1.0`` is the plain
    adapter. Where the adapter sits is decided by ``style`` and the architecture's placement (see
    :mod:`capaboost.adapter.placement`); ``target_modules`` is derived from it.
    """

    style: str = field(default="pfeiffer", metadata={"help": "'pfeiffer', 'houlsby' or 'parallel'."})
    bottleneck: int = field(default=64, metadata={"help": "Bottleneck width of each copy (>= 1)."})
    non_linearity: str = field(default="relu", metadata={"help": "Activation between the projections (ACT2FN name)."})
    adapter_scaling: Optional[float] = field(
        default=None, metadata={"help": "Output scale s; default 1.0 (sequential) or 4.0 (parallel, He et al. 2021)."}
    )
    adapter_placement: Optional[dict] = field(
        default=None,
        metadata={"help": "{'layers', 'attn', 'ffn', 'ffn_in'} for an architecture without a built-in placement."},
    )
    target_modules: Optional[str] = field(
        default=None, metadata={"help": "Derived from the placement when the adapter is injected; do not set."}
    )
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained and saved."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: up-projection and biases 0 (the model equals the base). False: random."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CAPABOOST_ADAPTER
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}.")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck must be an integer >= 1, got {self.bottleneck!r}.")
        if self.non_linearity not in ACT2FN:
            raise ValueError(
                f"non_linearity={self.non_linearity!r} is unknown; use one of transformers' ACT2FN names, e.g. "
                "'relu', 'gelu', 'silu', 'tanh'."
            )
        if self.adapter_scaling is None:
            self.adapter_scaling = 4.0 if self.style == "parallel" else 1.0
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"init_weights must be True (up-projection and biases 0: the model starts as the base model) or "
                f"False (random), got {self.init_weights!r}."
            )
        if self.adapter_placement is not None:
            derived = Placement.from_dict(self.adapter_placement, self.style).target_regex(self.style)  # validates
            if self.target_modules is not None and self.target_modules != derived:  # it would be overwritten
                raise ValueError(
                    f"target_modules={self.target_modules!r} would be replaced by the sites of adapter_placement "
                    f"({derived!r}); choose the modules through adapter_placement and leave target_modules unset."
                )
        elif self.target_modules is not None:
            raise ValueError(
                f"target_modules={self.target_modules!r} is not used: CapaBoostAdapterConfig derives target_modules "
                "from the placement; to choose the modules, pass "
                "adapter_placement={'layers': ..., 'attn': ..., 'ffn': ..., 'ffn_in': ...} instead."
            )
        self._validate_masks()
