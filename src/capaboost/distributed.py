"""Data-parallel training helpers: mask agreement, batch arithmetic, checkpoints for your own DDP script.

CapaBoost needs nothing from DDP/FSDP beyond what any PEFT model needs, because masks are plain
attributes regenerated from the seed on every rank (never parameters or buffers, so DDP neither
broadcasts nor all-reduces them); only the packed trainable values travel. What can still go wrong
is a rank whose masks differ (another seed, config or capaboost version): its gradients would be
averaged into the wrong entries silently. :func:`verify_masks_identical` catches that at start-up
with one all-gather of a 64-bit hash per rank.

Checkpoints hold the unwrapped model's trainable tensors and a replicated optimizer's state, so a
run saved with N processes resumes with M (the global batch stays the same; see
:func:`per_rank_batch_size`). They are checkpoint folders in the runner's one format
(:mod:`capaboost.checkpoint`): written from rank 0, atomically, with a ``.old`` fallback and checksums, and a
failure on rank 0 raises on every rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist

from . import checkpoint
from .checkpoint import atomic_replace, on_main_process
from .ranks import all_ok, collective_device, rank_and_world  # noqa: F401 - also this module's API
from .tuner import masks_fingerprint

CHECKPOINT_FORMAT = 1


def launched_world_size() -> int:
    """The world size a launcher (torchrun, accelerate launch, mpirun) set in the environment; 1 if none."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


# --precision -> Accelerate's mixed_precision ("no": plain float32)
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def accelerator_kwargs(precision: str = "fp32") -> dict[str, Any]:
    """Arguments for ``accelerate.Accelerator``: the run's mixed precision, and data parallelism on any machine.

    ``mixed_precision`` is always passed explicitly: Accelerate keeps one process-wide state, and an
    ``Accelerator()`` without it silently inherits whatever an earlier one in the process chose.
    On a machine without CUDA, Accelerate only starts its gloo process group when asked for the CPU
    (``cpu=True``, which ``accelerate launch --cpu`` sets); otherwise N torchrun processes would
    silently train N independent copies.
    """
    if precision not in MIXED_PRECISION:
        raise ValueError(f"precision must be one of {', '.join(MIXED_PRECISION)}, got {precision!r}.")
    kwargs: dict[str, Any] = {"mixed_precision": MIXED_PRECISION[precision]}
    if launched_world_size() > 1 and not torch.cuda.is_available():
        kwargs["cpu"] = True
    return kwargs


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Peel DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, so names don't depend on them."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def per_rank_batch_size(global_batch_size: int, world_size: Optional[int] = None, grad_accum_steps: int = 1) -> int:
    """Examples each rank takes per micro-step so that every optimizer step sees ``global_batch_size``.

    Keeping the global batch fixed is what makes a run independent of the number of processes
    (and lets a checkpoint resume under another world size).
    """
    world = rank_and_world()[1] if world_size is None else world_size
    for name, value in (("global_batch_size", global_batch_size), ("world_size", world),
                        ("grad_accum_steps", grad_accum_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    parts = world * grad_accum_steps
    if global_batch_size % parts:
        lower, upper = (global_batch_size // parts) * parts, (global_batch_size // parts + 1) * parts
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by world size {world} x gradient accumulation "
            f"{grad_accum_steps} = {parts}: ranks would see different batch sizes and the gradient average would be "
            f"biased. Use a global batch size that is a multiple of {parts} (e.g. {hint}), or change the number of "
            "processes (--nproc_per_node / --num_processes) or the gradient accumulation."
        )
    return global_batch_size // parts


def shard_batch(batch: Mapping[str, torch.Tensor], rank: Optional[int] = None,
                world_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of a global batch (what ``Accelerator(split_batches=True)`` does)."""
    r, w = rank_and_world()
    r, w = (r if rank is None else rank), (w if world_size is None else world_size)
    sizes = {k: v.shape[0] for k, v in batch.items() if torch.is_tensor(v)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors disagree on the batch dimension: {sizes}.")
    n = per_rank_batch_size(next(iter(sizes.values())), w)
    return {k: v[r * n:(r + 1) * n] if torch.is_tensor(v) else v for k, v in batch.items()}


def verify_masks_identical(model: torch.nn.Module, group: Optional[Any] = None) -> str:
    """Raise RuntimeError unless every rank of ``group`` built the same masks; returns the fingerprint.

    One all-gather of a 60-bit hash: cheap enough to call before every run. A no-op (apart from
    hashing) when torch.distributed is not initialised.
    """
    digest = masks_fingerprint(unwrap_model(model))
    rank, world = rank_and_world(group)
    if world == 1:
        return digest
    value = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=collective_device(group))
    gathered = [torch.zeros_like(value) for _ in range(world)]
    dist.all_gather(gathered, value, group=group)
    seen = [int(t.item()) for t in gathered]
    if len(set(seen)) > 1:
        by_hash: dict[str, list[int]] = {}
        for r, h in enumerate(seen):
            by_hash.setdefault(f"{h:015x}", []).append(r)
        groups = "; ".join(f"ranks {ranks} -> {h}" for h, ranks in by_hash.items())
        raise RuntimeError(
            f"CapaBoost masks differ across ranks ({groups}; this is rank {rank}). Every rank must build the model "
            "with the same config (mask_seed, num_copies, mask_density, mask_pattern, mask_mode, target modules), "
            "the same base model and the same capaboost version; otherwise gradients are averaged into different "
            "entries."
        )
    return digest


def all_reduce_sum(values: list[float], group: Optional[Any] = None) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64); the values themselves without a process group."""
    if rank_and_world(group)[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def atomic_save(write: Callable[[Path], None], path: str | os.PathLike, group: Optional[Any] = None) -> Path:
    """Rank 0 calls ``write(tmp)`` then renames ``tmp`` onto ``path``; every rank returns once it is there.

    ``write`` may create a file or a directory (e.g. ``model.save_pretrained``). A crash mid-write leaves
    the previous ``path`` (or ``path.old``, see :func:`capaboost.checkpoint.atomic_replace`), never a
    truncated one. A failure on rank 0 raises on every rank instead of leaving the others waiting at a barrier.
    """
    on_main_process(lambda: atomic_replace(path, write), str(path), group)
    return Path(path)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (packed CapaBoost values, heads in modules_to_save), named as in the unwrapped model."""
    return {n: p.detach().cpu().clone() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    step: int = 0,
    extra: Optional[dict] = None,
    group: Optional[Any] = None,
) -> Path:
    """Write a resumable training checkpoint folder from rank 0 only, atomically (call it on every rank).

    The folder has the runner's format (:func:`capaboost.checkpoint.save_checkpoint`: one ``.pt`` per part,
    ``progress.json``, checksums, a ``.old`` fallback while it is replaced). Assumes a replicated optimizer
    (DDP, single process); FSDP shards the optimizer state, use ``accelerate``'s ``save_state`` there.
    """
    progress = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "world_size": rank_and_world(group)[1],
        "mask_fingerprint": masks_fingerprint(unwrap_model(model)),
    }

    def parts() -> dict[str, Any]:  # rank 0 only
        return {
            "trainable": trainable_state_dict(model),
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "extra": extra or {},
        }

    return checkpoint.save_checkpoint(path, parts, progress, group)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
) -> dict:
    """Restore a :func:`save_checkpoint` folder into ``model`` (and optimizer/scheduler) on this rank.

    Works under any world size. Returns ``{"step", "world_size", "extra"}`` of the saved run.
    """
    fix = "pass the folder save_checkpoint wrote (a capaboost training checkpoint), or start without resuming."
    if Path(path).is_file():
        raise ValueError(f"{path} is a file, not a capaboost training checkpoint folder (format {CHECKPOINT_FORMAT}); "
                         f"{fix}")
    state = checkpoint.load_checkpoint(path, fix, required=("trainable",))
    if state is None:
        raise ValueError(f"{path} does not exist; {fix}")
    progress = state["progress"]
    if progress.get("format") != CHECKPOINT_FORMAT or "mask_fingerprint" not in progress:
        raise ValueError(f"{path} is not a capaboost training checkpoint (format {CHECKPOINT_FORMAT}); {fix}")
    inner = unwrap_model(model)
    actual = masks_fingerprint(inner)
    if progress["mask_fingerprint"] != actual:
        raise ValueError(
            f"{path} was trained with masks {progress['mask_fingerprint']}, but this model's masks are {actual}: "
            "build the model with the same CapaBoost config (seed, copies, density, pattern, targets) to resume."
        )
    params = dict(inner.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    saved = state["trainable"]
    if set(saved) != trainable:
        missing, unexpected = sorted(trainable - set(saved)), sorted(set(saved) - trainable)
        raise ValueError(
            f"{path} does not match this model's trainable parameters: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Build the model exactly as for the saved run."
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return {"step": progress["step"], "world_size": progress["world_size"], "extra": state.get("extra") or {}}
