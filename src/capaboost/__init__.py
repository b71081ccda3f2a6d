"""CapaBoost: masked parallel PEFT modules that raise the rank for free (Song et al., ICLR 2024).

``import capaboost`` registers the methods with PEFT, so ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``merge_and_unload`` and the HF ``Trainer`` work unchanged.
"""

from .accounting import delta_ranks, parameter_counts
from .export import export_as_lora
from .lora import CapaBoostLoraConfig, CapaBoostLoraModel
from .masks import GENERATOR_VERSION, MaskSpec

__version__ = "0.1.0"

__all__ = [
    "GENERATOR_VERSION",
    "CapaBoostLoraConfig",
    "CapaBoostLoraModel",
    "MaskSpec",
    "delta_ranks",
    "export_as_lora",
    "parameter_counts",
]
