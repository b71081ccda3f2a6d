"""Per-module allocation of (num_copies, r) under a trainable-parameter budget (the paper's future work).

A short warm-up trains the uniform CapaBoost model and scores each adapted module by AdaLoRA's
sensitivity |W ⊙ ∂L/∂W|, summed over the module's weight (∂L/∂W is also ∂L/∂ΔW, so this is the
first-order loss change the module's update can buy). The budget is then spent greedily on the
module whose next step (one more rank per copy, or one more copy) raises Σ_m I_m·log(d_m r_m) the
most per parameter: at the optimum each module's rank d_m r_m is proportional to its importance
divided by its cost per rank. Costs are exact union counts (the masks are drawn as in the model),
so the result's trainable count never exceeds the budget.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

from .accounting import parameter_counts
from .lora.config import CapaBoostLoraConfig
from .packing import MaskedPair
from .tuner import pattern_matches, unmatched_keys

ModelOrFactory = Union[nn.Module, Callable[[], nn.Module]]
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern", "copies_pattern", "density_pattern")


class AllocationError(ValueError):
    """A budget or pattern that no allocation can honour."""


def _fresh(model_or_factory: ModelOrFactory) -> nn.Module:
    """A new base model each call: injection mutates its model in place."""
    if isinstance(model_or_factory, nn.Module):
        return copy.deepcopy(model_or_factory)
    return model_or_factory()


def _supported(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.groups == 1
    return isinstance(module, (nn.Linear, Conv1D, nn.Embedding))


def check_patterns(base_model: nn.Module, config: CapaBoostLoraConfig, adapted: Sequence[str]) -> None:
    """Refuse a rank/alpha/copies/density pattern key that names no adapted module.

    PEFT silently ignores such keys, so a typo (or a LayerNorm in a pattern) would train the default
    allocation while the config claims another.
    """
    modules = dict(base_model.named_modules())
    for field_name in PATTERN_FIELDS:
        for key in unmatched_keys(getattr(config, field_name), adapted):
            named = [n for n in modules if n and pattern_matches(key, n)]
            bad = [f"{n} ({type(modules[n]).__name__})" for n in named if not _supported(modules[n])]
            if bad:
                raise AllocationError(
                    f"{field_name} key {key!r} names {', '.join(bad[:3])}, which CapaBoost-LoRA cannot adapt "
                    "(the allocator places: nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d with groups=1; "
                    "a grouped conv needs r divisible by its groups, which the allocator's ranks do not keep); "
                    "remove the key."
                )
            hint = f"it matches {named[:3]}, which are not in target_modules" if named else "it matches no module"
            raise AllocationError(
                f"{field_name} key {key!r} applies to no adapted module ({hint}); adapted modules are e.g. "
                f"{list(adapted)[:3]}. Fix the key or add the module to target_modules."
            )


def _capaboost_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "capaboost_pairs", None) and hasattr(m, "capaboost_name")]


def module_shapes(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[int, int]]:
    """(n_in, n_out) of each adapted module's ΔW as the masks see it (a conv's n_in is in*kh*kw)."""
    return {
        m.capaboost_name: (m.capaboost_pairs[adapter_name].A.shape[1], m.capaboost_pairs[adapter_name].B.shape[0])
        for m in _capaboost_layers(model)
    }


def union_count(model_or_factory: ModelOrFactory, config: CapaBoostLoraConfig) -> int:
    """Trainable (union) entries of the CapaBoost factors ``config`` gives this model: what budgets count."""
    return parameter_counts(get_peft_model(_fresh(model_or_factory), copy.deepcopy(config)))["union"]


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


def sensitivity(
    model_or_factory: ModelOrFactory,
    config: CapaBoostLoraConfig,
    warmup_batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = _default_loss,
    lr: float = 1e-3,
) -> dict[str, float]:
    """Mean |W ⊙ ∂L/∂W| per adapted module over a warm-up that trains the ``config`` model (adapters
    and modules_to_save) one AdamW step per batch; the base weights get gradients but never change."""
    model = get_peft_model(_fresh(model_or_factory), copy.deepcopy(config))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = {m.capaboost_name: m.get_base_layer().weight for m in _capaboost_layers(model)}
    for weight in layers.values():
        weight.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr)
    scores = dict.fromkeys(layers, 0.0)
    steps = 0
    for batch in warmup_batches:
        loss = loss_fn(model, batch)
        loss.backward()
        with torch.no_grad():
            for name, weight in layers.items():
                scores[name] += float((weight * weight.grad).abs().sum())
                weight.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    if steps == 0:
        raise AllocationError("warmup_batches is empty: the allocator needs at least one batch to score modules.")
    return {name: score / steps for name, score in scores.items()}


class _Costs:
    """Exact union count of a module at (d, r), cached; None where d*r exceeds the rank or the masks
    cannot be drawn distinct."""

    def __init__(self, shapes: dict[str, tuple[int, int]], config: CapaBoostLoraConfig) -> None:
        self.shapes, self.config, self.cache = shapes, config, {}

    def __call__(self, name: str, d: int, r: int) -> Optional[int]:
        key = (name, d, r)
        if key not in self.cache:
            n_in, n_out = self.shapes[name]
            self.cache[key] = None
            if d * r <= min(n_in, n_out):
                try:
                    spec = self.config._spec(d, self.config.mask_spec(name).density)
                    pair = MaskedPair(spec, name, r, n_in, n_out)
                    self.cache[key] = pair.A.numel_union + pair.B.numel_union
                except ValueError:
                    pass
        return self.cache[key]


def _copies_choices(config: CapaBoostLoraConfig, copies: Optional[Sequence[int]]) -> list[int]:
    choices = sorted(set(copies or [config.num_copies]))
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in choices):
        raise AllocationError(f"copies must be integers >= 1, got {list(copies or [])}.")
    return choices


def _minimum_spend(shapes, config, budget, copies, cost=None) -> int:
    """Parameters of one rank per module at the fewest copies; refuses a budget below it."""
    d, cost = _copies_choices(config, copies)[0], cost or _Costs(shapes, config)
    spent = 0
    for name in shapes:
        c = cost(name, d, 1)
        if c is None:
            raise AllocationError(f"module {name!r} {shapes[name]} cannot hold r=1 with {d} distinct masks.")
        spent += c
    if spent > budget:
        raise AllocationError(
            f"budget={budget} is below one rank per module: the {len(shapes)} adapted modules need {spent} trainable "
            f"parameters at r=1 and num_copies={d}. Raise the budget or target fewer modules."
        )
    return spent


def assign(
    shapes: dict[str, tuple[int, int]],
    importance: dict[str, float],
    config: CapaBoostLoraConfig,
    budget: int,
    copies: Optional[Sequence[int]] = None,
) -> dict[str, tuple[int, int]]:
    """Greedy (num_copies, r) per module whose exact union count is at most ``budget``.

    Every module starts at r=1 with the fewest allowed copies; then the step (r+1, or the next copy
    count) with the best gain I_m·Δlog(d r) per added parameter is taken until none fits.
    """
    missing = sorted(set(shapes) - set(importance))
    if missing:
        raise AllocationError(f"no importance score for modules {missing[:3]}.")
    choices, cost = _copies_choices(config, copies), _Costs(shapes, config)
    spent = _minimum_spend(shapes, config, budget, copies, cost)
    alloc = {name: (choices[0], 1) for name in shapes}
    while True:
        best: Optional[tuple[float, str, int, int, int]] = None
        for name, (d, r) in alloc.items():
            here = cost(name, d, r)
            steps = [(d, r + 1)] + [(c, r) for c in choices if c > d][:1]
            for d2, r2 in steps:
                there = cost(name, d2, r2)
                if there is None or spent - here + there > budget:
                    continue
                gain = importance[name] * (math.log(d2 * r2) - math.log(d * r))
                rate = gain / max(there - here, 1)
                if best is None or rate > best[0]:
                    best = (rate, name, d2, r2, there - here)
        if best is None:
            return alloc
        _, name, d2, r2, extra = best
        alloc[name] = (d2, r2)
        spent += extra


def config_for(config: CapaBoostLoraConfig, alloc: dict[str, tuple[int, int]]) -> CapaBoostLoraConfig:
    """``config`` with one exact (escaped, full-name) rank/copies/alpha pattern entry per module.

    alpha follows r so every copy keeps the base config's scaling lora_alpha / r.
    """
    new = copy.deepcopy(config)
    scale = config.lora_alpha / config.r
    new.rank_pattern = {re.escape(n): r for n, (_, r) in alloc.items()}
    new.alpha_pattern = {re.escape(n): r * scale for n, (_, r) in alloc.items()}
    new.copies_pattern = {re.escape(n): d for n, (d, _) in alloc.items()}
    new.mask_fingerprint = None
    new.__post_init__()  # validates the new patterns
    return new


def allocate(
    model_or_factory: ModelOrFactory,
    config: CapaBoostLoraConfig,
    budget: int,
    warmup_batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = _default_loss,
    copies: Optional[Sequence[int]] = None,
    lr: float = 1e-3,
    importance: Optional[dict[str, float]] = None,
) -> CapaBoostLoraConfig:
    """A config with per-module ``rank_pattern``/``copies_pattern`` (and matching ``alpha_pattern``)
    whose trainable union count is at most ``budget``, from a warm-up on the uniform ``config``.

    ``model_or_factory``: a base model (deep-copied, never modified) or a function returning a fresh
    one. ``copies``: the num_copies values a module may get (default: just ``config.num_copies``).
    ``importance``: precomputed scores (skips the warm-up).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise AllocationError(f"budget must be a positive integer number of parameters, got {budget!r}.")
    base = _fresh(model_or_factory)
    peft_model = get_peft_model(base, copy.deepcopy(config))
    shapes = module_shapes(peft_model)
    check_patterns(peft_model.get_base_model(), config, list(shapes))
    _minimum_spend(shapes, config, budget, copies)  # before spending a warm-up on a hopeless budget
    if importance is None:
        importance = sensitivity(model_or_factory, config, warmup_batches, loss_fn, lr)
    return config_for(config, assign(shapes, importance, config, budget, copies))


def describe(config: CapaBoostLoraConfig, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(num_copies, r) that ``config`` gives each module name: for tables and logs."""
    return {n: (config.mask_spec(n).num_copies, config.rank_and_alpha(n)[0]) for n in names}


__all__ = [
    "AllocationError",
    "allocate",
    "assign",
    "check_patterns",
    "config_for",
    "describe",
    "module_shapes",
    "sensitivity",
    "union_count",
]
