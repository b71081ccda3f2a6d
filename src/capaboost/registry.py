"""Registration of the CapaBoost methods with PEFT.

PEFT 0.21 only registers names already in its ``PeftType`` enum, so we add our members to that enum
(once, idempotently) before calling ``peft.utils.register_peft_method``. After ``import capaboost``,
``PeftType("CAPABOOST_LORA")`` resolves, and ``get_peft_model``/``PeftModel.from_pretrained`` dispatch
to our classes. Without the import, PEFT fails with a KeyError naming the type: never plain LoRA.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType


def peft_type(name: str) -> PeftType:
    """The ``PeftType`` member called ``name``, added to the enum if missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register(name: str, config_cls: type, model_cls: type | None, prefix: str | None = None) -> None:
    """Register a method with PEFT; a no-op when it is already registered (re-imports, reloads)."""
    member = peft_type(name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is config_cls:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
