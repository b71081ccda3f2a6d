"""Parameter counts and ranks of CapaBoost modules (paper Table 1: rank d*r at ~1-(1-s)^d parameters).

Works for every CapaBoost method: it walks layers that expose ``capaboost_pairs`` (adapter ->
:class:`~capaboost.packing.MaskedPair`), ``capaboost_name`` and ``packed_factors(adapter)``.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .packing import MaskedPair


def _layers(model: torch.nn.Module, adapter_name: Optional[str]) -> Iterator[tuple[torch.nn.Module, str, MaskedPair]]:
    for module in model.modules():
        pairs = getattr(module, "capaboost_pairs", None)
        if not pairs:
            continue
        if adapter_name is None:
            active = getattr(module, "active_adapters", list(pairs))
            names = [a for a in active if a in pairs]
        else:
            names = [adapter_name] if adapter_name in pairs else []
        for name in names:
            yield module, name, pairs[name]


def delta_ranks(model: torch.nn.Module, adapter_name: Optional[str] = None) -> dict[str, int]:
    """Rank of each adapted module's ΔW = B_cat A_cat, keyed by the module's base-model name.

    Computed exactly through two thin QR factorisations (the product's singular values are those of a
    d*r x d*r core), in float64 with the tolerance numpy/torch use for the full matrix.
    """
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for module, adapter, pair in _layers(model, adapter_name):
            packed_a, packed_b = (p.detach().double() for p in module.packed_factors(adapter))
            a_cat, b_cat = pair.cat(packed_a, packed_b)
            if hasattr(module, "full_factors"):  # conv layers: the map as one product (grouped: block-diagonal B)
                a_cat, b_cat = module.full_factors(a_cat, b_cat)
            _, r_b = torch.linalg.qr(b_cat)  # b_cat = Q_b R_b
            _, r_a = torch.linalg.qr(a_cat.t())  # a_cat^T = Q_a R_a
            core = r_b @ r_a.t()
            sv = torch.linalg.svdvals(core)
            if sv.numel() == 0 or sv.max() == 0:
                ranks[module.capaboost_name] = 0
                continue
            tol = sv.max() * max(b_cat.shape[0], a_cat.shape[1]) * torch.finfo(torch.float64).eps
            ranks[module.capaboost_name] = int((sv > tol).sum())
    return ranks


def parameter_counts(model: torch.nn.Module, adapter_name: Optional[str] = None) -> dict:
    """Per-module and total counts of the masked factors.

    ``dense``: the same factors without masks (a LoRA of rank r, or a plain adapter); ``union``: what
    is stored and trained; ``per_copy_active``: entries each copy uses; ``ratio``: union / dense.
    """
    modules: dict[str, dict] = {}
    for _, _, pair in _layers(model, adapter_name):
        dense = pair.A.numel + pair.B.numel
        union = pair.A.numel_union + pair.B.numel_union
        per_copy = [a + b for a, b in zip(pair.A.active_per_copy, pair.B.active_per_copy)]
        modules[pair.name] = {
            "num_copies": pair.spec.num_copies,
            "density": pair.spec.density,
            "rank_per_copy": pair.k,
            "dense": dense,
            "union": union,
            "per_copy_active": per_copy,
            "ratio": union / dense,
        }
    dense_total = sum(m["dense"] for m in modules.values())
    union_total = sum(m["union"] for m in modules.values())
    return {
        "modules": modules,
        "dense": dense_total,
        "union": union_total,
        "ratio": union_total / dense_total if dense_total else 0.0,
    }
