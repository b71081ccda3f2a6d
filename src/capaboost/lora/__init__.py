"""CapaBoost-LoRA: config, layer, model (PEFT's per-method layout)."""

from ..registry import register
from .config import CapaBoostLoraConfig
from .layer import CapaBoostLoraLayer, Linear
from .model import CapaBoostLoraModel

register("capaboost_lora", CapaBoostLoraConfig, CapaBoostLoraModel, prefix=CapaBoostLoraModel.prefix)

__all__ = ["CapaBoostLoraConfig", "CapaBoostLoraLayer", "CapaBoostLoraModel", "Linear"]
