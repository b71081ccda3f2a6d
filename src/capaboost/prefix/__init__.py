"""CapaBoost prefix-tuning: masked reparameterization MLP, run by PEFT's own prefix-tuning machinery."""

from ..registry import register
from .config import CapaBoostPrefixConfig
from .model import CapaBoostPrefixEncoder, install_prefix_entry

register("capaboost_prefix", CapaBoostPrefixConfig, CapaBoostPrefixEncoder, prefix="cbprefix_")
install_prefix_entry()

__all__ = ["CapaBoostPrefixConfig", "CapaBoostPrefixEncoder"]
