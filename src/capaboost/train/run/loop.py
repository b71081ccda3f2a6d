"""The training loop: :func:`train_step` runs one optimizer step, :func:`after_step` decides what follows it
(a log line, a validation, a checkpoint) and :func:`train_loop` walks the epochs' batches.

Randomness is a pure function of the seed: the data order of epoch e comes from (seed, e) alone and the
torch RNG is reseeded from (seed, step, rank) before each step, which is why a run resumed from a
checkpoint reproduces the uninterrupted run, also under another number of processes (up to float
rounding of the gradient all-reduce, and only with dropout off: dropout draws per process).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch

from .device import batch_to_device
from .evaluation import validate
from .session import Session

FAIL_ENV = "CAPABOOST_FAIL_AFTER_STEPS"  # test hook: raise SimulatedInterruption after this global step
LOG_EVERY = 20  # steps per loss log line (and per host-device sync)
LOG = logging.getLogger("capaboost.train")


class SimulatedInterruption(RuntimeError):
    """Raised by the ``CAPABOOST_FAIL_AFTER_STEPS`` hook to test ``--resume``."""


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index batches of one epoch, a function of (seed, epoch) only: never of the number of processes.

    Every batch is full: the last one is topped up from the epoch's start (as DistributedSampler
    pads), so any world size dividing ``global_batch`` splits it evenly, and a checkpoint taken with
    N processes continues with M on exactly the batches the N-process run would have seen.
    """
    order = np.random.default_rng([seed, 17, epoch]).permutation(n)
    steps = math.ceil(n / global_batch)
    order = np.resize(order, steps * global_batch)  # repeats the order's start (several times if n < batch)
    return [order[i : i + global_batch] for i in range(0, len(order), global_batch)]


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1024 + rank


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a CPU batch: the sum of its attention mask; a packed causal-LM batch (no mask: blocks told
    apart by ``position_ids``) counts every position, its few padding positions included; 0 for images."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return ids.numel() if ids is not None else 0


def train_loop(session: Session) -> None:
    from tqdm.auto import tqdm

    cfg, p = session.cfg, session.progress
    bar = tqdm(
        total=session.total_steps, initial=p["global_step"], disable=not (session.main and cfg.progress),
        desc=f"{cfg.method} on {cfg.task}", unit="step", dynamic_ncols=True,
    )
    p.setdefault("running_loss", [])  # losses since the last log line, checkpointed too
    p.setdefault("tokens", 0)
    while p["global_step"] < session.total_steps:
        batches = epoch_batches(len(session.task.train), session.global_batch, cfg.seed, p["epoch"])
        for b in range(p["batch_in_epoch"], len(batches)):
            t0 = time.perf_counter()
            train_step(session, batches[b])
            p["batch_in_epoch"] = b + 1
            p["train_time_s"] += time.perf_counter() - t0
            bar.update(1)
            epoch_end = b == len(batches) - 1
            after_step(session, bar, epoch_end)
            if epoch_end or p["global_step"] >= session.total_steps:
                break
    bar.close()


def train_step(session: Session, batch_indices: np.ndarray) -> None:
    """One optimizer step on this process's slice of the global batch; the loss stays on the device."""
    cfg, acc, p = session.cfg, session.accelerator, session.progress
    mine = batch_indices[session.rank * session.per_device : (session.rank + 1) * session.per_device]
    batch = session.task.collate([session.task.train[i] for i in mine])
    session.pending_tokens += count_tokens(batch)  # on the CPU batch: no device sync
    batch = batch_to_device(batch, acc.device)
    torch.manual_seed(step_seed(cfg.seed, p["global_step"], session.rank))
    session.model.train()
    loss = session.model(**batch).loss
    acc.backward(loss)
    if cfg.max_grad_norm:
        acc.clip_grad_norm_(session.model.parameters(), cfg.max_grad_norm)
    session.optimizer.step()
    if not session.optimizer.step_was_skipped:  # fp16: the GradScaler skipped an overflowing step
        session.scheduler.step()
    session.method.after_step(session.unwrapped, p["global_step"])
    session.optimizer.zero_grad(set_to_none=True)
    p["global_step"] += 1
    p["examples"] += len(batch_indices)
    session.pending_losses.append(loss.detach())  # read back at the next log line, not every step


def after_step(session: Session, bar: Any, epoch_end: bool) -> None:
    """The cadence: a loss line every LOG_EVERY steps, validation and a checkpoint every ``--eval-steps`` /
    ``--save-steps`` and at every epoch's end, and the ``CAPABOOST_FAIL_AFTER_STEPS`` test hook."""
    cfg, p = session.cfg, session.progress
    step = p["global_step"]
    done = step >= session.total_steps
    every = lambda n: bool(n) and step % n == 0  # noqa: E731
    if len(p["running_loss"]) + len(session.pending_losses) == LOG_EVERY or epoch_end or done:
        log_loss(session, bar)
    elif every(cfg.save_steps) or every(cfg.eval_steps):
        # the checkpoint holds the losses since the last log line as numbers, and the queued steps
        # finish inside the training time, not the validation's
        flush(session)
    if epoch_end:
        p["epoch"] += 1
        p["batch_in_epoch"] = 0
    if epoch_end or done or every(cfg.eval_steps):
        validate(session)
    if epoch_end or done or every(cfg.save_steps):
        p["wall_time_s"] += session.lap()
        session.save()
    fail_at = int(os.environ.get(FAIL_ENV, "0") or 0)
    if fail_at and step == fail_at:
        raise SimulatedInterruption(f"{FAIL_ENV}={fail_at}: stopped after step {fail_at}")


def log_loss(session: Session, bar: Any) -> None:
    """A loss line: the mean of every process's loss over the steps since the last one."""
    p = session.progress
    flush(session)
    running = p["running_loss"]
    p["losses"].append({"step": p["global_step"], "loss": float(np.mean(running))})
    LOG.info("step %d loss %.4f", p["global_step"], np.mean(running))
    bar.set_postfix(loss=f"{np.mean(running):.4f}")
    running.clear()


def flush(session: Session) -> None:
    """Read the pending losses and token counts back from the device: all ranks' mean loss per step, the
    global token count. The one host-device sync of the loop, at log lines and checkpoints; the wait for
    the queued steps counts as training time."""
    t0 = time.perf_counter()
    acc, p = session.accelerator, session.progress
    if session.pending_losses:  # all ranks' batch, not rank 0's; element-wise, so each step's mean as before
        p["running_loss"].extend(acc.reduce(torch.stack(session.pending_losses), reduction="mean").tolist())
        session.pending_losses.clear()
    tokens = session.pending_tokens
    if session.world > 1:
        counts = torch.tensor([tokens], dtype=torch.int64, device=acc.device)
        tokens = int(acc.reduce(counts, reduction="sum").item())
    p["tokens"] += tokens
    session.pending_tokens = 0
    p["train_time_s"] += time.perf_counter() - t0

