"""CapaBoost prefix encoder, and its hook into PEFT's PREFIX_TUNING encoder entry."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.prefix_tuning import PrefixEncoder
from peft.tuners.tuners_utils import BasePromptEncoder
from peft.utils.peft_types import PeftType

from ..packing import MaskedPair, linear_init, warn_dense_copies
from .config import CapaBoostPrefixConfig

#: Mask key of the prefix MLP (one per adapter; the encoder is not part of the base model).
PREFIX_MASK_NAME = "prefix_encoder.transform"
#: ``capaboost_pairs`` key: PEFT builds an encoder from its config alone, without the adapter's name.
PAIR_KEY = "default"


class CapaBoostPrefixEncoder(BasePromptEncoder):
    """The prefix table ``up_cat(tanh(down_cat(E) + b_down)) + b_up`` (num_virtual_tokens x 2*layers*dim).

    Mirrors PEFT's ``PrefixEncoder``: in inference mode (a loaded checkpoint) it holds only the
    materialized table in ``embedding``, which PEFT reads directly. The MLP is computed once per
    forward on the virtual tokens, not once per batch row.
    """

    def __init__(self, config: CapaBoostPrefixConfig) -> None:
        super().__init__()
        self.prefix_projection = True
        self.inference_mode = bool(config.inference_mode)
        self.capaboost_name = PREFIX_MASK_NAME
        self.capaboost_pairs: dict[str, MaskedPair] = {}
        n, dim, k = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        out = config.num_layers * 2 * dim
        if self.inference_mode:
            self.embedding = nn.Embedding(n, out)
            return
        self.embedding = nn.Embedding(n, dim)
        spec = config.mask_spec(PREFIX_MASK_NAME)
        warn_dense_copies(spec)
        pair = self.capaboost_pairs[PAIR_KEY] = MaskedPair(spec, PREFIX_MASK_NAME, k, dim, out)
        self.cbprefix_A, self.cbprefix_B = pair.init_packed(init_b=linear_init)  # nn.Linear's init, as PEFT's MLP
        bias_a = torch.empty(k).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim))
        bias_b = torch.empty(out).uniform_(-1 / math.sqrt(k), 1 / math.sqrt(k))
        if config.init_weights == "zero":  # after the draws: the biases draw the same values either way
            self.cbprefix_B.data.zero_()
            bias_b.zero_()
        self.cbprefix_bias_A = nn.Parameter(bias_a)
        self.cbprefix_bias_B = nn.Parameter(bias_b)

    def packed_factors(self, adapter: str = PAIR_KEY) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cbprefix_A, self.cbprefix_B

    def table(self) -> torch.Tensor:
        """The prefix table (num_virtual_tokens x 2*layers*dim), differentiable."""
        if self.inference_mode:
            return self.embedding.weight
        return self.capaboost_pairs[PAIR_KEY].bottleneck(
            self.embedding.weight, self.cbprefix_A, self.cbprefix_B, self.cbprefix_bias_A, self.cbprefix_bias_B,
            torch.tanh, self.training,
        )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        return F.embedding(prefix, self.table())


class _PrefixTuningEncoder(PrefixEncoder):
    """PEFT's PREFIX_TUNING encoder entry, extended: a CapaBoost config gets a CapaBoostPrefixEncoder.

    Every other config gets a genuine ``PrefixEncoder`` (``__new__`` returns it, so stock prefix
    tuning is untouched); the state-dict classmethods PEFT calls on the entry are PrefixEncoder's.
    """

    def __new__(cls, config, *args, **kwargs):
        if isinstance(config, CapaBoostPrefixConfig):
            return CapaBoostPrefixEncoder(config)
        return PrefixEncoder(config, *args, **kwargs)


def install_prefix_entry() -> None:
    """Point PEFT's PREFIX_TUNING encoder entry at the dispatcher (idempotent)."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.PREFIX_TUNING) is not _PrefixTuningEncoder:
        PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PREFIX_TUNING] = _PrefixTuningEncoder
