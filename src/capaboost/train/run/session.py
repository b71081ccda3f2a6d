"""One run's state, and its set-up: the task's data, the model wrapped by the method, the optimizer and
schedule, and (``--resume``) everything restored from the checkpoint."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ...data.errors import DataError
from ...distributed import per_rank_batch_size, trainable_state_dict, verify_masks_identical
from ..errors import ConfigError
from ..methods import METHODS, MethodContext, apply_method, count_parameters, head_names, is_head
from ..run_config import RunConfig
from ..run_folder.checkpoint import load_checkpoint, save_checkpoint
from ..run_folder.folder import as_json, identity_diff
from ..tasks import TASKS
from .device import drop_input_require_grads, enable_gradient_checkpointing, make_accelerator, set_tf32

LOG = logging.getLogger("capaboost.train")


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class Session:
    """The state of one ``train()`` call, shared by its phases (set-up, loop, evaluation, results)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = make_accelerator(cfg.precision)
        self.main = self.accelerator.is_main_process
        self.method = METHODS[cfg.method]
        self.start = time.perf_counter()
        self.eval_time = 0.0
        self.eval_examples = 0
        self.eval_tokens = 0
        self.tf32: Optional[bool] = None
        self.restore_tf32: Callable[[], None] = lambda: None
        self.pending_losses: list[torch.Tensor] = []  # this step's losses, on the device until the next log line
        self.pending_tokens = 0  # this process's tokens since the last flush

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return trainable_state_dict(self.unwrapped)

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.unwrapped.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ConfigError(f"checkpoint tensors {missing[:3]} do not exist in this model; use --overwrite.")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device))

    def save(self) -> None:
        self.progress["world_size"] = self.world  # informative: resuming under another one is fine
        parts = lambda: {  # noqa: E731 - built on the main process only
            "trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best": self.best_state,
            "extra": self.method.state(self.unwrapped) or None,
        }
        save_checkpoint(self.out, parts, self.progress)

    def lap(self) -> float:
        """Seconds since the last lap (wall time is accumulated in laps, so a resumed run adds up)."""
        now = time.perf_counter()
        lap, self.start = now - self.start, now
        return lap

    # ---------- set-up
    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        from transformers import set_seed

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tf32, self.restore_tf32 = set_tf32(acc.device, cfg.tf32)
        self.world, self.rank = acc.num_processes, acc.process_index
        try:  # before anything slow: a batch the processes cannot share evenly is a usage error
            self.per_device = per_rank_batch_size(cfg.batch_size, self.world)
        except ValueError as err:
            raise ConfigError(f"--batch-size is the global batch, split over the processes: {err}") from None
        self.global_batch = cfg.batch_size
        self.ckpt = load_checkpoint(self.out) if cfg.resume else None
        if self.ckpt is not None:
            problem = identity_diff(self.ckpt["progress"]["config"], cfg, "the checkpoint's")
            if problem:
                raise ConfigError(problem)
        set_seed(cfg.seed)
        t0 = time.perf_counter()
        self.task = TASKS[cfg.task](cfg)
        self.task.load()
        if not self.task.train:
            raise DataError(f"task {cfg.task!r} has no training examples", cfg.data_dir)
        self.load_time = time.perf_counter() - t0
        self.steps_per_epoch = math.ceil(len(self.task.train) / self.global_batch)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        set_seed(cfg.seed)  # the head's init does not depend on what loading drew
        model = self.build_model()
        self.build_optimizer(model)
        self.progress: dict[str, Any] = {
            "config": as_json(cfg.identity()), "global_step": 0, "epoch": 0, "batch_in_epoch": 0, "examples": 0,
            "train_time_s": 0.0, "wall_time_s": 0.0, "validation": [], "best": None, "losses": [],
        }
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        if self.ckpt is not None:
            self.resume(self.ckpt)

    def build_model(self) -> torch.nn.Module:
        """The task's model wrapped by the method (gradient checkpointing first, when asked for)."""
        cfg = self.cfg
        model = base = self.task.build_model()
        if cfg.quantize:  # QLoRA-style: frozen base in 4/8 bit, the adapter in float
            from ...quantize import quantize_base

            quantize_base(base, "nf4" if cfg.quantize == "4bit" else cfg.quantize)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(base, cfg.method)
        self.context = MethodContext(self.task.peft_task_type, tuple(self.task.head_modules), self.total_steps)
        model = apply_method(cfg, model, self.context)
        if cfg.gradient_checkpointing:
            drop_input_require_grads(base)  # PEFT added it again when it wrapped the checkpointed model
        verify_masks_identical(model)  # every rank regenerated the same masks (one all-gather)
        self.trainable_params, self.total_params = count_parameters(model)
        if self.trainable_params == 0:
            raise ConfigError(f"method {cfg.method!r} left no trainable parameters in this model.")
        return model

    def build_optimizer(self, model: torch.nn.Module) -> None:
        """AdamW with the new head in its own group (``--head-lr``), the warm-up/decay schedule, Accelerate's wrap."""
        cfg = self.cfg
        heads = head_names(self.context.task_type, self.context.head_modules)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not is_head(n, heads)], "lr": cfg.lr},
            {"params": [p for n, p in named if is_head(n, heads)], "lr": cfg.head_lr},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(warmup, self.total_steps))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def resume(self, ckpt: dict[str, Any]) -> None:
        self.load_trainable(ckpt["trainable"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.method.load_state(self.unwrapped, ckpt["extra"])
        self.progress = ckpt["progress"]
        self.best_state = ckpt["best"]
        LOG.info(
            "resumed from step %d (epoch %d), saved by %s process(es), now %d", self.progress["global_step"],
            self.progress["epoch"], self.progress.get("world_size", "?"), self.world,
        )
