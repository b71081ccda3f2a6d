"""Import timm where torchvision cannot be imported.

timm 1.0 imports torchvision at import time (transforms, datasets, FrozenBatchNorm2d), but the only
torchvision wheels for torch 2.13 are CUDA builds that fail to load against the CPU torch this
project pins. timm's *models* never call torchvision, so when torchvision is unusable we let timm
import against inert placeholders, then drop them from ``sys.modules`` so nothing else (e.g.
transformers' availability checks) mistakes them for torchvision.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _PlaceholderMeta(name, (cls,), {})  # distinct per name: timm keys dicts by enum members
        setattr(cls, name, sub)
        return sub

    def __iter__(cls):
        return iter(())


class _Placeholder(metaclass=_PlaceholderMeta):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError("this timm feature needs torchvision, which is not importable here.")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def getattr_(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            sub = _PlaceholderMeta(attr, (_Placeholder,), {})
            setattr(module, attr, sub)
            return sub

        module.__getattr__ = getattr_
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _drop_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_timm() -> types.ModuleType:
    """``import timm``, with torchvision placeholders only if the real torchvision fails to import."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        importlib.import_module("torchvision")
        return importlib.import_module("timm")
    except Exception:  # missing, or a CUDA build failing to register its ops against CPU torch
        _drop_torchvision()
    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        _drop_torchvision()
