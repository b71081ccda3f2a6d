"""Config of CapaBoost-LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from ..config import MaskedParallelConfig
from ..registry import peft_type

CAPABOOST_LORA = peft_type("CAPABOOST_LORA")


@dataclass
class CapaBoostLoraConfig(MaskedParallelConfig, PeftConfig):
    """LoRA whose ΔW is the sum of d masked copies of one (B, A) pair: rank d*r at ~1-(1-s)^d of the parameters.

    ``r`` and ``lora_alpha`` are per copy: ΔW = (lora_alpha / r) * Σ_i (B⊙m_Bi)(A⊙m_Ai), so
    :func:`capaboost.export_as_lora` writes a LoRA of rank d*r with alpha d*lora_alpha.
    """

    r: int = field(default=8, metadata={"help": "Rank of each copy (ΔW has rank num_copies * r)."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, as in LoRA."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to adapt (default: PEFT's LoRA defaults)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for weights stored (in, out), e.g. Conv1D."})
    bias: Literal["none", "all", "cblora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained and saved."})
    init_lora_weights: bool = field(
        default=True, metadata={"help": "True: B = 0 (the wrapped model equals the base). False: random B (tests)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Module regex -> r."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Module regex -> lora_alpha."})
    use_dora: bool = field(default=False, metadata={"help": "Not supported; must stay False."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CAPABOOST_LORA
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.use_dora:
            raise NotImplementedError("CapaBoost-LoRA does not support DoRA (use_dora=True); use use_dora=False.")
        for name, value in [("r", self.r), *[(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()]]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "cblora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'cblora_only', got {self.bias!r}.")
        self._validate_masks()

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Per-module (r, lora_alpha), honouring rank_pattern/alpha_pattern as PEFT's LoRA does."""
        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), key), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), key), self.lora_alpha)
        return r, alpha
