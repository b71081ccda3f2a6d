"""The run's device settings: Accelerate's mixed precision, TF32, gradient checkpointing, host-to-device copies."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from ...distributed import accelerator_kwargs
from ..errors import ConfigError
from ..methods import PREFIX_METHODS


def tf32_wanted(capability: Optional[tuple[int, int]], flag: bool) -> Optional[bool]:
    """Whether TF32 matmuls and convolutions run on a CUDA device of compute ``capability``; None without CUDA.

    TF32 exists from Ampere (compute capability 8.0) on, so it is on there unless ``--no-tf32`` (``flag``
    False) and off on older GPUs, where it would mean nothing.
    """
    if capability is None:
        return None
    return bool(flag) and capability[0] >= 8


def set_tf32(device: torch.device, flag: bool) -> tuple[Optional[bool], Callable[[], None]]:
    """Apply :func:`tf32_wanted` on ``device``: (the decision, a function that restores the previous settings)."""
    if device.type != "cuda":
        return None, lambda: None
    wanted = tf32_wanted(torch.cuda.get_device_capability(device), flag)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(wanted)

    def restore() -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    return wanted, restore


def precision_problem(precision: str, device_type: str) -> Optional[str]:
    """Why ``--precision`` cannot run on a device of ``device_type``, or None."""
    if precision == "fp16" and device_type != "cuda":
        return (
            f"--precision fp16 needs a CUDA GPU (this run's device is {device_type!r}): Accelerate's fp16 mixed "
            "precision scales the loss with a CUDA GradScaler and elsewhere would silently train in float32. Use "
            "--precision bf16 (autocast, which also runs on the CPU) or --precision fp32, or run on a CUDA GPU."
        )
    return None


def make_accelerator(precision: str) -> Any:
    """``accelerate.Accelerator`` with the run's mixed precision; a ConfigError where that precision cannot run.

    Accelerate keeps one state per process and refuses (or, without an explicit ``mixed_precision``, silently
    inherits) another precision later on; several runs in one process (sweeps, tests) each get their own.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = accelerator_kwargs(precision)  # gloo on CPU-only torchrun launches too
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", kwargs["mixed_precision"]):
        raise ConfigError(
            f"the launcher asked for mixed precision {launched!r} (accelerate launch --mixed_precision or "
            f"ACCELERATE_MIXED_PRECISION) but --precision is {precision!r}: pass --precision {launched} to the run "
            "instead, or launch without --mixed_precision."
        )
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != kwargs["mixed_precision"]:
        AcceleratorState._reset_state()  # keeps the process group (PartialState); only the precision changes
    accelerator = Accelerator(**kwargs)
    problem = precision_problem(precision, accelerator.device.type)
    if problem:
        forget_precision()
        raise ConfigError(problem)
    return accelerator


def forget_precision() -> None:
    """Drop Accelerate's process-wide mixed precision, so that a later plain ``Accelerator()`` in this process
    (a user's, another library's) does not inherit this run's; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A CPU batch on ``device``: via pinned memory and an asynchronous copy for CUDA, a plain ``.to`` elsewhere."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def enable_gradient_checkpointing(model: torch.nn.Module, method: str) -> None:
    """Non-reentrant gradient checkpointing on the base model (before the method wraps it), or a ConfigError."""
    if method in PREFIX_METHODS:
        raise ConfigError(
            f"--gradient-checkpointing cannot be used with method {method!r}: prefix tuning hands its prefixes to "
            "the model as a key/value cache, which gradient checkpointing turns off (PEFT refuses the pair); drop "
            "--gradient-checkpointing or choose another method."
        )
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if not (supported and hasattr(model, "gradient_checkpointing_enable")):
        raise ConfigError(
            f"--gradient-checkpointing: the model ({type(model).__name__}) does not support gradient checkpointing "
            "(only transformers models that declare supports_gradient_checkpointing do); drop the flag."
        )
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    drop_input_require_grads(model)


def drop_input_require_grads(model: torch.nn.Module) -> None:
    """Remove the hook that makes the embeddings' output require grad (transformers and PEFT add it for
    reentrant checkpointing). Non-reentrant checkpointing reaches the adapters inside the checkpointed layers
    without it, and without it the backward stops at the lowest trained module instead of the embeddings."""
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
