"""CapaBoost: masked parallel PEFT modules that raise the rank for free (Song et al., ICLR 2024).

``import capaboost`` registers the methods with PEFT, so ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``merge_and_unload`` and the HF ``Trainer`` work unchanged.
"""

from . import compat

compat.import_torchao_quietly()  # before peft/transformers import it (noisy on a CPU)

from .accounting import delta_ranks, parameter_counts
from .adapter import CapaBoostAdapterConfig, CapaBoostAdapterModel
from .export import export_as_lora, export_as_prefix
from .lora import CapaBoostLoraConfig, CapaBoostLoraModel
from .lora.hotswap import hotswap_adapter
from .masks import GENERATOR_VERSION, MaskSpec
from .prefix import CapaBoostPrefixConfig

__version__ = "0.1.0"

compat.install()

__all__ = [
    "GENERATOR_VERSION",
    "CapaBoostAdapterConfig",
    "CapaBoostAdapterModel",
    "CapaBoostLoraConfig",
    "CapaBoostLoraModel",
    "CapaBoostPrefixConfig",
    "MaskSpec",
    "delta_ranks",
    "export_as_lora",
    "export_as_prefix",
    "hotswap_adapter",
    "parameter_counts",
]
