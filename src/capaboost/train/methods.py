"""The runner's method table: method name -> how to build its PEFT config from the run's options.

CapaBoost methods come from this package; every baseline is PEFT's own implementation, never a
re-implementation. Paper defaults: LoRA-style methods on query/value (PEFT's per-architecture
default targets) with r=8 per copy, d=2, s=0.5; adapters with bottleneck 64; the new head trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

from .errors import ConfigError

if TYPE_CHECKING:  # annotations only: run_config reads METHODS, so importing it here would close a circle
    from .run_config import RunConfig

# Names of the task heads that are created fresh, per PEFT task type (PEFT trains/saves these itself).
HEADS = {"SEQ_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass(frozen=True)
class MethodContext:
    """What a config builder needs to know besides the options: the task's head and the schedule."""

    task_type: Optional[str]
    head_modules: tuple[str, ...]
    total_steps: int
    default_targets: tuple[str, ...] = ()


def _nothing_after_step(model: nn.Module, step: int) -> None:
    pass


def _no_state(model: nn.Module) -> dict[str, Any]:
    return {}


def _no_state_to_load(model: nn.Module, state: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class Method:
    build: Callable[[RunConfig, MethodContext], Any]  # -> a PeftConfig, or None for bitfit/full
    lr: float  # default learning rate (paper-style values for a MiniLM/BERT-base scale model)
    family: str  # "capaboost", "peft" or "native"
    summary: str
    # RunConfig options this builder reads beyond the ones every run reads; given to another method they
    # are refused (run_config.refuse_unused), so a flag never silently does nothing.
    options: frozenset[str] = frozenset()
    # Hooks for a method that does more than its optimizer step; ``model`` is the unwrapped (PEFT) model.
    after_step: Callable[[nn.Module, int], None] = _nothing_after_step  # after optimizer.step() of step N
    state: Callable[[nn.Module], dict[str, Any]] = _no_state  # kept outside parameters/optimizer: checkpointed
    load_state: Callable[[nn.Module, dict[str, Any]], None] = _no_state_to_load  # what ``state`` returned


MASK_OPTIONS = frozenset({"d", "density", "mask_seed", "mask_pattern", "mask_mode"})
LORA_OPTIONS = frozenset({"r", "alpha", "dropout", "target_modules"})
ADAPTER_OPTIONS = frozenset({"bottleneck", "adapter_placement"})
PREFIX_OPTIONS = frozenset({"num_virtual_tokens", "prefix_hidden"})


def _common(cfg: RunConfig, ctx: MethodContext, targets: bool = True) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"task_type": ctx.task_type}
    if ctx.task_type is None and ctx.head_modules:
        kwargs["modules_to_save"] = list(ctx.head_modules)
    chosen = cfg.target_modules or ctx.default_targets
    if targets and chosen:
        kwargs["target_modules"] = list(chosen)
    return kwargs


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The paper's placement, attention query/value, under the names the model uses (BERT, ViT, Llama, ...).

    Other architectures (fused qkv, e.g. GPT-2) get () and with it PEFT's per-architecture defaults.
    """
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (("query", "value"), ("q_proj", "v_proj"), ("qkv",)):  # timm ViTs fuse q, k, v
        if set(pair) <= names:
            return pair
    return ()


def _masks(cfg: RunConfig, plain: bool = False) -> dict[str, Any]:
    """Mask fields of a CapaBoost config; ``plain``: d=1, s=1, the unmasked base method."""
    if plain:
        return {"num_copies": 1, "mask_density": 1.0, "mask_seed": cfg.mask_seed}
    return {
        "num_copies": cfg.d,
        "mask_density": cfg.density,
        "mask_seed": cfg.mask_seed,
        "mask_pattern": cfg.mask_pattern,
        "mask_mode": cfg.mask_mode,
    }


def _rank(cfg: RunConfig, default: int) -> int:
    return cfg.r if cfg.r is not None else default


def _alpha(cfg: RunConfig, r: int) -> float:
    return cfg.alpha if cfg.alpha is not None else 2 * r


def _capaboost_lora(cfg: RunConfig, ctx: MethodContext, use_dora: bool = False) -> Any:
    from ..lora import CapaBoostLoraConfig

    r = _rank(cfg, 8)
    return CapaBoostLoraConfig(
        r=r, lora_alpha=_alpha(cfg, r), lora_dropout=cfg.dropout, scale_by_density=cfg.scale_by_density,
        use_dora=use_dora, **_masks(cfg), **_common(cfg, ctx),
    )


def _lora(cfg: RunConfig, ctx: MethodContext, use_dora: bool = False) -> Any:
    from peft import LoraConfig

    r = _rank(cfg, 8)
    return LoraConfig(r=r, lora_alpha=_alpha(cfg, r), lora_dropout=cfg.dropout, use_dora=use_dora, **_common(cfg, ctx))


def _capaboost_dora(cfg: RunConfig, ctx: MethodContext) -> Any:
    return _capaboost_lora(cfg, ctx, use_dora=True)


def _dora(cfg: RunConfig, ctx: MethodContext) -> Any:
    return _lora(cfg, ctx, use_dora=True)


def _adalora(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import AdaLoraConfig

    r, total = _rank(cfg, 8), ctx.total_steps
    # AdaLoRA starts above the budget and prunes down to target_r between tinit and total - tfinal.
    return AdaLoraConfig(
        init_r=max(r + 1, round(1.5 * r)), target_r=r, lora_alpha=_alpha(cfg, r), lora_dropout=cfg.dropout,
        total_step=total, tinit=total // 10, tfinal=total // 5, deltaT=max(1, total // 20), **_common(cfg, ctx),
    )


# AdaLoRA reallocates its rank budget after every step from importance scores it keeps beside the optimizer;
# a resumed run needs those scores and the rank pattern they led to.
ADALORA_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _adalora_after_step(model: nn.Module, step: int) -> None:
    model.base_model.update_and_allocate(step)


def _adalora_state(model: nn.Module) -> dict[str, Any]:
    base = model.base_model
    config = next(iter(base.peft_config.values()))
    return {"rankallocator": {k: getattr(base.rankallocator, k) for k in ADALORA_SCORES},
            "rank_pattern": config.rank_pattern}


def _adalora_load_state(model: nn.Module, state: dict[str, Any]) -> None:
    if not state:  # the checkpoint holds no extra.pt
        return
    base = model.base_model
    for key, value in state["rankallocator"].items():
        setattr(base.rankallocator, key, value)
    next(iter(base.peft_config.values())).rank_pattern = state["rank_pattern"]


def _loha(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import LoHaConfig

    r = _rank(cfg, 8)
    return LoHaConfig(r=r, alpha=_alpha(cfg, r), rank_dropout=cfg.dropout, **_common(cfg, ctx))


def _vera(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import VeraConfig

    # r is VeRA's shared random projection size; targets must have equal shapes (query/value do).
    return VeraConfig(r=_rank(cfg, 256), vera_dropout=cfg.dropout, projection_prng_key=cfg.seed, **_common(cfg, ctx))


def _randlora(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import RandLoraConfig

    return RandLoraConfig(
        r=_rank(cfg, 32), randlora_dropout=cfg.dropout, projection_prng_key=cfg.seed, **_common(cfg, ctx)
    )


def _shira(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import ShiraConfig

    return ShiraConfig(r=_rank(cfg, 8), random_seed=cfg.seed, **_common(cfg, ctx))


def _hira(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import HiraConfig

    return HiraConfig(r=_rank(cfg, 8), hira_dropout=cfg.dropout, **_common(cfg, ctx))


def _gralora(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import GraloraConfig

    r = _rank(cfg, 8)
    if cfg.alpha is not None and not float(cfg.alpha).is_integer():
        raise ConfigError(f"--alpha must be a whole number for gralora (its alpha is an int), got {cfg.alpha!r}.")
    return GraloraConfig(r=r, alpha=int(_alpha(cfg, r)), gralora_dropout=cfg.dropout, **_common(cfg, ctx))


def _needs_task_type(cfg: RunConfig, ctx: MethodContext) -> None:
    if ctx.task_type is None:
        raise ConfigError(f"method {cfg.method!r} (prefix tuning) supports text tasks only, not {cfg.task!r}.")


def _prefix(cfg: RunConfig, ctx: MethodContext) -> Any:
    from peft import PrefixTuningConfig

    _needs_task_type(cfg, ctx)
    return PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=True, encoder_hidden_size=cfg.prefix_hidden,
        task_type=ctx.task_type,
    )


def _capaboost_prefix(cfg: RunConfig, ctx: MethodContext) -> Any:
    from ..prefix import CapaBoostPrefixConfig

    _needs_task_type(cfg, ctx)
    return CapaBoostPrefixConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.prefix_hidden, task_type=ctx.task_type,
        **_masks(cfg),
    )


def _adapter(style: str, masked: bool) -> Callable[[RunConfig, MethodContext], Any]:
    def build(cfg: RunConfig, ctx: MethodContext) -> Any:
        from ..adapter import CapaBoostAdapterConfig

        masks = _masks(cfg, plain=not masked)
        if cfg.target_modules:
            raise ConfigError(
                f"method {cfg.method!r} places adapters by architecture (PAdapter after the FFN); to move them pass "
                "--adapter-placement JSON, not --target-modules."
            )
        return CapaBoostAdapterConfig(
            style=style, bottleneck=cfg.bottleneck, adapter_placement=cfg.adapter_placement, **masks,
            **_common(cfg, ctx, targets=False),
        )

    return build


def _native(cfg: RunConfig, ctx: MethodContext) -> None:
    return None


# Methods that hand the model a key/value cache as their prefix: no gradient checkpointing (which turns the cache
# off) and no packed causal-LM batches (PEFT drops position_ids for them, so packed examples would mix).
PREFIX_METHODS = ("prefix", "capaboost-prefix")

METHODS: dict[str, Method] = {
    # LoRA's lr: scale_by_density (on by default) gives the masked update LoRA's size; with it off (the paper's
    # scaling) the update is ~d*s^2 = 0.5 of LoRA's and CapaBoost wants ~2x the lr (docs/reproduction.md, item 6)
    "capaboost-lora": Method(_capaboost_lora, 5e-4, "capaboost", "LoRA, d masked copies of one (A, B)",
                             LORA_OPTIONS | MASK_OPTIONS | {"scale_by_density", "quantize"}),
    "capaboost-padapter": Method(_adapter("pfeiffer", True), 1e-3, "capaboost", "Pfeiffer adapter, d masked copies",
                                 ADAPTER_OPTIONS | MASK_OPTIONS),
    "capaboost-hadapter": Method(_adapter("houlsby", True), 1e-3, "capaboost", "Houlsby adapter, d masked copies",
                                 ADAPTER_OPTIONS | MASK_OPTIONS),
    "capaboost-parallel": Method(_adapter("parallel", True), 1e-3, "capaboost", "parallel adapter, d masked copies",
                                 ADAPTER_OPTIONS | MASK_OPTIONS),
    "capaboost-prefix": Method(_capaboost_prefix, 5e-3, "capaboost", "prefix tuning, masked reparameterisation",
                               PREFIX_OPTIONS | MASK_OPTIONS),
    # DoRA: the LoRA counterparts' lrs; no --quantize for capaboost-dora (CapaBoost-DoRA refuses quantized bases)
    "capaboost-dora": Method(_capaboost_dora, 5e-4, "capaboost", "DoRA magnitude + CapaBoost-LoRA direction",
                             LORA_OPTIONS | MASK_OPTIONS | {"scale_by_density"}),
    "lora": Method(_lora, 5e-4, "peft", "PEFT LoRA", LORA_OPTIONS | {"quantize"}),
    "dora": Method(_dora, 5e-4, "peft", "PEFT DoRA (LoRA with a trained weight magnitude)", LORA_OPTIONS | {"quantize"}),
    "adalora": Method(_adalora, 5e-4, "peft", "PEFT AdaLoRA (rank budget pruned during training)", LORA_OPTIONS,
                      after_step=_adalora_after_step, state=_adalora_state, load_state=_adalora_load_state),
    "loha": Method(_loha, 5e-4, "peft", "PEFT LoHa (Hadamard product of two low-rank pairs)", LORA_OPTIONS),
    "vera": Method(_vera, 4e-3, "peft", "PEFT VeRA (shared random projections, trained scalings)",
                   LORA_OPTIONS - {"alpha"}),
    "randlora": Method(_randlora, 1e-3, "peft", "PEFT RandLoRA (full rank from random bases)",
                       LORA_OPTIONS - {"alpha"}),
    "shira": Method(_shira, 5e-4, "peft", "PEFT SHiRA (sparse high-rank update)", LORA_OPTIONS - {"alpha", "dropout"}),
    "hira": Method(_hira, 5e-4, "peft", "PEFT HiRA (Hadamard high-rank update)", LORA_OPTIONS - {"alpha"}),
    "gralora": Method(_gralora, 5e-4, "peft", "PEFT GraLoRA (granular block LoRA)", LORA_OPTIONS),
    "prefix": Method(_prefix, 5e-3, "peft", "PEFT prefix tuning with a reparameterisation MLP", PREFIX_OPTIONS),
    "padapter": Method(_adapter("pfeiffer", False), 1e-3, "peft", "plain Pfeiffer adapter (d=1, s=1)", ADAPTER_OPTIONS),
    "hadapter": Method(_adapter("houlsby", False), 1e-3, "peft", "plain Houlsby adapter (d=1, s=1)", ADAPTER_OPTIONS),
    "bitfit": Method(_native, 1e-3, "native", "biases and head only"),
    "full": Method(_native, 2e-5, "native", "full fine-tuning"),
}


def method_options() -> frozenset[str]:
    """Every option that only some methods read."""
    return frozenset().union(*(m.options for m in METHODS.values()))


def head_names(task_type: Optional[str], head_modules: tuple[str, ...]) -> tuple[str, ...]:
    return HEADS.get(task_type or "", ()) + tuple(head_modules)


def is_head(param_name: str, heads: tuple[str, ...]) -> bool:
    return any(part in heads for part in param_name.split("."))


def apply_method(cfg: RunConfig, model: nn.Module, ctx: MethodContext) -> nn.Module:
    """``model`` wrapped by the method's PEFT config, or with bitfit/full ``requires_grad`` set."""
    import dataclasses

    import peft

    ctx = dataclasses.replace(ctx, default_targets=default_targets(model))
    config = METHODS[cfg.method].build(cfg, ctx)
    if config is not None:
        try:
            return peft.get_peft_model(model, config)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"method {cfg.method!r} cannot wrap this model: {err}") from err
    heads = head_names(ctx.task_type, ctx.head_modules)
    for name, param in model.named_parameters():
        param.requires_grad_(cfg.method == "full" or name.endswith(".bias") or is_head(name, heads))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting each shared tensor once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """Rank of every adapted layer's ΔW: exact for CapaBoost, ``matrix_rank`` for PEFT layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..accounting import delta_ranks

    ranks = dict(delta_ranks(model))
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "capaboost_pairs") or not isinstance(module, BaseTunerLayer):
                continue
            if not hasattr(module, "get_delta_weight"):
                continue
            for adapter in module.active_adapters:
                try:
                    delta = module.get_delta_weight(adapter)
                except (KeyError, AttributeError, TypeError, RuntimeError, ValueError):
                    continue  # a layer type whose ΔW is not a plain matrix (e.g. prompts)
                if isinstance(delta, torch.Tensor) and delta.dim() == 2:
                    delta = delta.to_dense() if delta.is_sparse else delta  # SHiRA's ΔW is sparse
                    key = name.removeprefix("base_model.model.")
                    # tolerance of ΔW's own precision: float32 round-off is not rank
                    ranks[key] = int(torch.linalg.matrix_rank(delta.detach().float()))
    return ranks
