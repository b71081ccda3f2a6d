"""Config of CapaBoost-LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from ..config import MaskedParallelConfig
from ..registry import peft_type

CAPABOOST_LORA = peft_type("CAPABOOST_LORA")

_LORA_VARIANT = "is a PEFT LoRA variant that masked copies do not implement; use peft.LoraConfig for it"
# PEFT LoraConfig options that CapaBoost-LoRA does not implement, with the way out. They are declared (at
# PEFT's defaults) so that setting one, in code or in an adapter_config.json, fails here by name instead of
# a bare TypeError or PEFT's silent drop of unknown keys on load. They are never written to adapter_config.json.
LORA_ONLY_OPTIONS: dict[str, str] = {
    "use_rslora": "the scaling is lora_alpha / r; for rsLoRA's lora_alpha / sqrt(r) pass lora_alpha * sqrt(r) "
    "as lora_alpha (and in alpha_pattern for the modules of rank_pattern)",
    "megatron_config": "Megatron parallel layers are not supported; adapt a model built from torch.nn.Linear",
    "megatron_core": "Megatron parallel layers are not supported; adapt a model built from torch.nn.Linear",
    "loftq_config": "LoftQ initialisation is LoRA-only; use peft.LoraConfig(init_lora_weights='loftq', ...)",
    "eva_config": "EVA initialisation is LoRA-only; use peft.LoraConfig(init_lora_weights='eva', ...)",
    "corda_config": "CorDA initialisation is LoRA-only; use peft.LoraConfig(init_lora_weights='corda', ...)",
    "lora_ga_config": "LoRA-GA initialisation is LoRA-only; use peft.LoraConfig(init_lora_weights='lora_ga', ...)",
    "velora_config": f"VeLoRA {_LORA_VARIANT}",
    "alora_invocation_tokens": f"activated LoRA (aLoRA) {_LORA_VARIANT}",
    "use_qalora": f"QALoRA {_LORA_VARIANT}",
    "qalora_group_size": f"QALoRA {_LORA_VARIANT}",
    "monteclora_config": f"MonteCLoRA {_LORA_VARIANT}",
    "layer_replication": "replicate the layers before get_peft_model, or use peft.LoraConfig(layer_replication=...)",
    "lora_bias": "B has no bias of its own; to train the adapted layers' biases use bias='cblora_only'",
    "use_bdlora": f"BD-LoRA {_LORA_VARIANT}",
    "arrow_config": f"Arrow routing {_LORA_VARIANT}",
    "kasa_config": f"KaSA {_LORA_VARIANT}",
    "ensure_weight_tying": "adapters are not tied across tied weights; leave tied embeddings out of target_modules "
    "and modules_to_save, or use peft.LoraConfig(ensure_weight_tying=True)",
}


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
        default=True,
        metadata={"help": "True: B = 0 (the wrapped model equals the base). False: random B. Nothing else."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Module regex -> r."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Module regex -> lora_alpha."})
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "CapaBoost-DoRA: PEFT's DoRA (trained per-row magnitude lora_magnitude_vector, detached weight "
            "norm) with the masked rank-d*r ΔW as the direction's update. nn.Linear and transformers' Conv1D only; "
            "Embedding, Conv and quantized layers refuse it by name."
        },
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "As peft.LoraConfig: train only these rows of the input embedding (a list of token ids) or of "
            "named embeddings ({'embed_tokens': [ids]}); the adapter file stores only those rows. A tied lm_head "
            "follows the embedding's rows. PEFT's own TrainableTokensWrapper, no masks."
        },
    )
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "As peft.LoraConfig: names of nn.Parameters to adapt directly (e.g. MoE experts stored as one "
            "(experts, in, out) tensor), matched at the end of their full names. PEFT's ParamWrapper mechanics (the "
            "module's forward sees W + ΔW), with masks keyed by the parameter name; lora_dropout, fan_in_fan_out "
            "and use_dora are refused there, as in PEFT."
        },
    )
    scale_by_density: bool = field(
        default=True,
        metadata={
            "help": "Divide each module's scaling by the mean number of copies that keep a term of B A (d*s^2; "
            "d for mask_mode='dropout', whose masks are already rescaled by 1/s), so the update has LoRA's size "
            "and LoRA's learning rate carries over (on by default: swapping LoraConfig for this config keeps the "
            "lr). False is the paper's eq. 4, scaling = lora_alpha / r, which wants ~1/(d*s^2) x LoRA's lr; an "
            "adapter_config.json written without this field (before it existed) loads with False."
        },
    )
    # LORA_ONLY_OPTIONS: refused unless left at PEFT's default (see there for what to use instead).
    use_rslora: bool = False
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    loftq_config: Optional[dict] = None
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Any] = None
    layer_replication: Optional[list] = None
    lora_bias: bool = False
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CAPABOOST_LORA
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}.")
        for name, advice in LORA_ONLY_OPTIONS.items():
            value = getattr(self, name)
            if value not in (None, False, {}, []) and value != self.__dataclass_fields__[name].default:
                raise ValueError(f"CapaBoostLoraConfig does not support {name}={value!r}: {advice}.")
        self._validate_token_indices()
        tp = self.target_parameters
        if tp is not None and (isinstance(tp, str) or not all(isinstance(n, str) for n in tp)):
            raise ValueError(f"target_parameters must be a list of parameter names (as PEFT), got {tp!r}.")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(
                f"CapaBoostLoraConfig does not support init_lora_weights={self.init_lora_weights!r}: use True (B = 0, "
                "the model starts as the base model) or False (random B). PiSSA, OLoRA, LoftQ, EVA, CorDA, MiCA, "
                "Gaussian and the other LoRA initialisations are LoRA-only: use peft.LoraConfig(init_lora_weights=...)."
            )
        for name, value in [("r", self.r), *[(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()]]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.scale_by_density, bool):
            raise ValueError(f"scale_by_density must be True or False, got {self.scale_by_density!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "cblora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'cblora_only', got {self.bias!r}.")
        # as LoraConfig: PEFT ignores the layer filter for a regex target, and needs indices for a pattern
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(self, name) is not None and isinstance(self.target_modules, str):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} does nothing when target_modules is a regex string "
                    f"({self.target_modules!r}): pass target_modules as a list of names, or put the layers in the "
                    "regex."
                )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt); "
                "set it, or drop layers_pattern."
            )
        self._validate_masks()

    def _validate_token_indices(self) -> None:
        """PEFT takes any value here and fails (or wraps nothing) deep inside injection: name the bad value."""
        value = self.trainable_token_indices
        if value is None:
            return
        groups = value.items() if isinstance(value, dict) else [("", value)]
        for name, ids in groups:
            ok = isinstance(name, str) and isinstance(ids, (list, tuple)) and len(ids) > 0
            if not ok or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(
                    f"trainable_token_indices={value!r}: give a non-empty list of token ids (for the input "
                    "embedding) or a dict {embedding module name: non-empty list of token ids}."
                )

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict:
        """PEFT's hook on ``from_pretrained``: a file without ``scale_by_density`` was written before the option
        existed, when every adapter trained with the paper's scaling, so it loads with False, not the new default."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("scale_by_density", False)
        return kwargs

    def to_dict(self) -> dict:
        """The refused LoRA options always hold their defaults: keep them out of adapter_config.json."""
        return {k: v for k, v in super().to_dict().items() if k not in LORA_ONLY_OPTIONS}

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Per-module (r, lora_alpha), honouring rank_pattern/alpha_pattern as PEFT's LoRA does."""
        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), key), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), key), self.lora_alpha)
        return r, alpha

    def update_scale(self, key: Optional[str]) -> float:
        """Factor on module ``key``'s scaling: 1, or with ``scale_by_density`` 1 / (mean copies keeping a term).

        Each copy keeps a term B[o, k] A[k, i] of B A with probability s^2 (both masks), so the masked sum
        Σ_i (B⊙m_Bi)(A⊙m_Ai) averages d*s^2 * B A: half of a rank-r LoRA's B A at d=2, s=0.5. 'dropout' masks
        are rescaled by 1/s each, which leaves d. Honours copies_pattern/density_pattern (``key``: the module
        name; None: the global d and s).
        """
        if not self.scale_by_density:
            return 1.0
        spec = self.mask_spec(key)
        mean_copies = spec.num_copies if spec.mode == "dropout" else spec.num_copies * spec.density**2
        return 1.0 / mean_copies
