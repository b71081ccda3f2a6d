"""CapaBoost bottleneck adapters (PAdapter, HAdapter, parallel): config, placement, layer, model."""

from ..registry import register
from .config import CapaBoostAdapterConfig
from .layer import AdapterMergeError, CapaBoostAdapterLayer
from .model import CapaBoostAdapterModel
from .placement import PLACEMENTS, Placement, UnknownArchitectureError

register("capaboost_adapter", CapaBoostAdapterConfig, CapaBoostAdapterModel, prefix=CapaBoostAdapterModel.prefix)

__all__ = [
    "PLACEMENTS",
    "AdapterMergeError",
    "CapaBoostAdapterConfig",
    "CapaBoostAdapterLayer",
    "CapaBoostAdapterModel",
    "Placement",
    "UnknownArchitectureError",
]
