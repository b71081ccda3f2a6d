"""The fine-tuning runner behind ``capaboost train``: one loop for every task and method.

Built on ``accelerate.Accelerator`` so the same code runs on one CPU process or under
``torchrun``/``accelerate launch``. ``batch_size`` is the GLOBAL batch: each of the N processes takes
its contiguous ``batch_size / N`` slice of every batch, so one optimizer step sees the same examples
whatever N is. Only the main process writes files, every file is written atomically, and a failed
write raises on every process (none waits at a barrier for ever). The main process holds an exclusive
lock on the output folder for the whole run, so a second run on the same folder fails at once instead of
mixing its files in, and ``run.json`` records the options and data files a later ``--resume`` must
match. Randomness is a pure function of
the seed: the data order of epoch e comes from (seed, e) alone and the torch RNG is reseeded from
(seed, step, rank) before each step, which is why a run resumed from a checkpoint reproduces the
uninterrupted run, also under another number of processes (up to float rounding of the gradient
all-reduce, and only with dropout off: dropout draws per process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..data.errors import DataError
from ..distributed import accelerator_kwargs, per_rank_batch_size, verify_masks_identical
from .checkpoint import (
    CHECKPOINT_DIR,
    atomic_write_dir,
    atomic_write_json,
    data_changes,
    data_fingerprint,
    file_sha256,
    folder_lock,
    load_checkpoint,
    read_json,
    remove_stale_temps,
    resolve_dir,
    save_checkpoint,
)
from .errors import ConfigError
from .methods import METHODS, MethodContext, adapter_ranks, apply_method, count_parameters, head_names, is_head
from .run_config import RunConfig
from .task_base import Task
from .tasks import TASKS
from .trained import RUN_INFO

FAIL_ENV = "CAPABOOST_FAIL_AFTER_STEPS"  # test hook: raise SimulatedInterruption after this global step
RUN_FILE = "run.json"  # the run's identity (resolved options + data fingerprint), checked by --resume
LOG = logging.getLogger("capaboost.train")


class RunExistsError(ConfigError):
    """The output directory already holds a run; the message says which flag continues or replaces it."""


class SimulatedInterruption(RuntimeError):
    """Raised by the ``CAPABOOST_FAIL_AFTER_STEPS`` hook to test ``--resume``."""


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    from .. import __version__

    return {
        "capaboost": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


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


def identity_diff(saved: dict[str, Any], cfg: RunConfig, where: str) -> Optional[str]:
    """The --resume refusal when ``cfg``'s options that change what is trained differ from ``saved``, else None."""
    mine = json.loads(json.dumps(cfg.identity(), default=str))
    saved = {k: v for k, v in saved.items() if k not in RunConfig.RUNTIME_ONLY}  # metrics.json's config is full
    # an option the record lacks was added later: the run had its default (e.g. precision fp32)
    saved = {**{k: v for k, v in json.loads(json.dumps(RunConfig().identity(), default=str)).items() if k not in saved},
             **saved}
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if not diff:
        return None
    return (
        f"--resume: options {diff} differ from {where} ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); resume "
        "with the original options, or drop --resume and pass --overwrite to replace the run, or choose another "
        "--output-dir."
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1024 + rank


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


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a CPU batch (the sum of its attention mask; 0 without one, e.g. images)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else 0


PREFIX_METHODS = ("prefix", "capaboost-prefix")


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


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def predict(
    model: torch.nn.Module, task: Task, features: list[dict], batch_size: int, accelerator: Any
) -> dict[str, np.ndarray]:
    """Model outputs (``task.output_keys``) for ``features``, in their order.

    Sorted by length for little padding, split across processes and gathered; no_grad and eval mode.
    """
    lengths = [len(f.get("input_ids", ())) for f in features]
    order = sorted(range(len(features)), key=lambda i: lengths[i])
    mine = order[accelerator.process_index :: accelerator.num_processes]
    rows: list[tuple[int, dict[str, np.ndarray]]] = []
    device = accelerator.device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            batch = task.collate([features[i] for i in idx])
            batch = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
            batch = batch_to_device(batch, device)
            out = model(**batch)
            arrays = {k: getattr(out, k).float().cpu().numpy() for k in task.output_keys}
            rows.extend((i, {k: a[j] for k, a in arrays.items()}) for j, i in enumerate(idx))
    model.train(was_training)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda r: r[0])
    result = {}
    for key in task.output_keys:
        parts = [r[1][key] for r in rows]
        width = max((p.shape[0] for p in parts if p.ndim), default=0)
        if any(p.ndim and p.shape[0] != width for p in parts):  # token-level outputs: pad to one width
            parts = [np.pad(p, (0, width - p.shape[0]), constant_values=-1e9) for p in parts]
        result[key] = np.stack(parts)
    return result


class _Session:
    """State of one train() call; methods are the loop's steps."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = make_accelerator(cfg.precision)
        self.main = self.accelerator.is_main_process
        self.start = time.perf_counter()
        self.eval_time = 0.0
        self.eval_examples = 0
        self.eval_tokens = 0
        self.tf32: Optional[bool] = None
        self.restore_tf32: Callable[[], None] = lambda: None
        self.pending_losses: list[torch.Tensor] = []  # this step's losses, on the device until the next log line
        self.pending_tokens = 0  # this process's tokens since the last flush

    # ---------- files
    def on_main(self, write: Callable[[], None], what: str) -> None:
        """Run ``write`` on the main process only; if it fails, every process raises.

        The all-reduce of the failure flag doubles as the barrier after the write, so the other ranks
        never wait for ever for a main process that died mid-save.
        """
        error: Optional[Exception] = None
        if self.main:
            try:
                write()
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = err
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.accelerator.device)
        failed = float(self.accelerator.reduce(flag, reduction="sum").item())
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"the main process failed to write {what}; the previous copy is kept (see its log).")

    def write(self, name: str, obj: Any) -> None:
        self.on_main(lambda: atomic_write_json(self.out / name, obj), name)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ConfigError(f"checkpoint tensors {missing[:3]} do not exist in this model; use --overwrite.")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device))

    def method_state(self) -> dict[str, Any]:
        """State a method keeps outside parameters/optimizer (AdaLoRA's importance scores and budget)."""
        base = getattr(self.accelerator.unwrap_model(self.model), "base_model", None)
        allocator = getattr(base, "rankallocator", None)
        if allocator is None:
            return {}
        keep = ("ipt", "exp_avg_ipt", "exp_avg_unc")
        config = next(iter(base.peft_config.values()))
        return {"rankallocator": {k: getattr(allocator, k) for k in keep}, "rank_pattern": config.rank_pattern}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        base = self.accelerator.unwrap_model(self.model).base_model
        for key, value in state["rankallocator"].items():
            setattr(base.rankallocator, key, value)
        next(iter(base.peft_config.values())).rank_pattern = state["rank_pattern"]

    def save(self) -> None:
        self.progress["world_size"] = self.world  # informative: resuming under another one is fine
        self.on_main(
            lambda: save_checkpoint(
                self.out, self.trainable_state(), self.optimizer, self.scheduler, self.progress, self.best_state,
                self.method_state(),
            ),
            CHECKPOINT_DIR,
        )

    # ---------- setup
    def prepare_output(self) -> Optional[dict]:
        """Check the folder (held under its lock) against the options; the finished run's metrics for --resume.

        Also removes the temporaries a killed run's atomic writes left, and records the run's identity
        (``run.json``) when it starts afresh, for a later --resume to compare with.
        """
        cfg, metrics = self.cfg, self.out / "metrics.json"
        ckpt_dir = resolve_dir(self.out / CHECKPOINT_DIR)
        if self.main:
            remove_stale_temps(self.out, ("adapter", CHECKPOINT_DIR, "metrics.json", RUN_FILE))
        if cfg.overwrite and self.main:
            for name in ("metrics.json", "adapter", "adapter.old", "train.log", RUN_FILE, CHECKPOINT_DIR,
                         CHECKPOINT_DIR + ".old"):
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            ckpt_dir = None
        self.accelerator.wait_for_everyone()
        if not cfg.overwrite and metrics.exists():
            if cfg.resume:
                fix = "drop --resume and pass --overwrite to train the run again, or choose another --output-dir."
                finished = read_json(metrics, fix)
                self.check_same_run(finished.get("config", {}))
                return finished
            raise RunExistsError(
                f"{str(self.out)!r} already holds a finished run (metrics.json); pass --overwrite to replace it "
                "or choose another --output-dir."
            )
        if ckpt_dir is not None and not cfg.resume and not cfg.overwrite:
            raise RunExistsError(
                f"{str(self.out)!r} holds an unfinished run (checkpoint/); pass --resume to continue it or "
                "--overwrite to start again."
            )
        if ckpt_dir is not None:
            self.check_same_run(None)  # the checkpoint's own options are compared again in setup()
        else:  # a fresh start: what later resumes must match
            self.on_main(
                lambda: atomic_write_json(self.out / RUN_FILE, {
                    "config": json.loads(json.dumps(cfg.identity(), default=str)),
                    "data": data_fingerprint(cfg.data_dir, exclude=self.data_exclude()),
                }),
                RUN_FILE,
            )
        return None

    def data_exclude(self) -> tuple[Path, ...]:
        """Folders that may lie inside --data-dir but are not data: this run's own files and the token cache."""
        from .task_base import cache_dir

        return (self.out, cache_dir(self.cfg))

    def check_same_run(self, fallback_config: Optional[dict[str, Any]]) -> None:
        """Refuse --resume with other options or changed data files than the run in the folder was started with.

        Runs from before ``run.json`` existed are checked against ``fallback_config`` (metrics.json's),
        their data cannot be checked.
        """
        cfg, path = self.cfg, self.out / RUN_FILE
        fix = "drop --resume and pass --overwrite to train the run again, or choose another --output-dir."
        if path.exists():
            saved = read_json(path, fix)
        elif fallback_config:
            saved = {"config": fallback_config}
        else:  # a checkpoint from before run.json: setup() compares its options, its data is unknown
            return
        problem = identity_diff(saved.get("config", {}), cfg, f"those of the run in {str(self.out)!r}")
        if problem:
            raise ConfigError(problem)
        if "data" in saved:
            changes = data_changes(saved["data"], cfg.data_dir, exclude=self.data_exclude())
            if changes:
                raise ConfigError(
                    f"--resume: the data files in {str(cfg.data_dir)!r} differ from those the run in {str(self.out)!r} "
                    f"started with: {', '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}; restore them, or "
                    "drop --resume and pass --overwrite to train again on the new data, or choose another --output-dir."
                )

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
        model = self.task.build_model()
        base = model
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(base, cfg.method)
        ctx = MethodContext(self.task.peft_task_type, tuple(self.task.head_modules), self.total_steps)
        model = apply_method(cfg, model, ctx)
        if cfg.gradient_checkpointing:
            drop_input_require_grads(base)  # PEFT added it again when it wrapped the checkpointed model
        verify_masks_identical(model)  # every rank regenerated the same masks (one all-gather)
        self.trainable_params, self.total_params = count_parameters(model)
        if self.trainable_params == 0:
            raise ConfigError(f"method {cfg.method!r} left no trainable parameters in this model.")
        heads = head_names(ctx.task_type, ctx.head_modules)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not is_head(n, heads)], "lr": cfg.lr},
            {"params": [p for n, p in named if is_head(n, heads)], "lr": cfg.head_lr},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(warmup, self.total_steps))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.progress: dict[str, Any] = {
            "config": json.loads(json.dumps(cfg.identity(), default=str)),
            "global_step": 0,
            "epoch": 0,
            "batch_in_epoch": 0,
            "examples": 0,
            "train_time_s": 0.0,
            "wall_time_s": 0.0,
            "validation": [],
            "best": None,
            "losses": [],
        }
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        if self.ckpt is not None:
            self.load_trainable(self.ckpt["trainable"])
            self.optimizer.load_state_dict(self.ckpt["optimizer"])
            self.scheduler.load_state_dict(self.ckpt["scheduler"])
            self.load_method_state(self.ckpt["extra"])
            self.progress = self.ckpt["progress"]
            self.best_state = self.ckpt["best"]
            LOG.info(
                "resumed from step %d (epoch %d), saved by %s process(es), now %d", self.progress["global_step"],
                self.progress["epoch"], self.progress.get("world_size", "?"), self.world,
            )

    # ---------- evaluation
    def evaluate(self, split: str) -> dict[str, float]:
        t0 = time.perf_counter()
        features = self.task.eval_splits[split]
        model = self.accelerator.unwrap_model(self.model)
        metrics = self.task.evaluate(
            model, split, lambda: predict(model, self.task, features, self.cfg.eval_batch_size, self.accelerator)
        )
        self.eval_time += time.perf_counter() - t0
        self.eval_examples += len(features)
        if self.task.scores_outputs:  # generation's tokens are not the features' tokens
            self.eval_tokens += sum(int(sum(f["attention_mask"])) for f in features if "attention_mask" in f)
        return metrics

    def validate(self) -> None:
        p = self.progress
        metrics = self.evaluate("validation")
        entry = {"epoch": round(p["global_step"] / self.steps_per_epoch, 4), "step": p["global_step"], "metrics": metrics}
        p["validation"].append(entry)
        LOG.info("step %d validation %s", p["global_step"], _fmt(metrics))
        main = metrics[self.task.main_metric]
        sign = 1 if self.task.greater_is_better else -1  # causal-lm: lower perplexity
        if self.task.model_selection() and (p["best"] is None or sign * main > sign * p["best"]["value"]):
            p["best"] = {"step": p["global_step"], "value": main}
            self.best_state = self.trainable_state()

    # ---------- training
    def train_loop(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc, p = self.cfg, self.accelerator, self.progress
        fail_at = int(os.environ.get(FAIL_ENV, "0") or 0)
        bar = tqdm(
            total=self.total_steps, initial=p["global_step"], disable=not (self.main and cfg.progress),
            desc=f"{cfg.method} on {cfg.task}", unit="step", dynamic_ncols=True,
        )
        running = p.setdefault("running_loss", [])  # losses since the last log line, checkpointed too
        p.setdefault("tokens", 0)
        while p["global_step"] < self.total_steps:
            batches = epoch_batches(len(self.task.train), self.global_batch, cfg.seed, p["epoch"])
            for b in range(p["batch_in_epoch"], len(batches)):
                t0 = time.perf_counter()
                idx = batches[b][self.rank * self.per_device : (self.rank + 1) * self.per_device]
                batch = self.task.collate([self.task.train[i] for i in idx])
                self.pending_tokens += count_tokens(batch)  # on the CPU batch: no device sync
                batch = batch_to_device(batch, acc.device)
                torch.manual_seed(step_seed(cfg.seed, p["global_step"], self.rank))
                self.model.train()
                loss = self.model(**batch).loss
                acc.backward(loss)
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                if not self.optimizer.step_was_skipped:  # fp16: the GradScaler skipped an overflowing step
                    self.scheduler.step()
                if cfg.method == "adalora":  # AdaLoRA reallocates its rank budget after every step
                    acc.unwrap_model(self.model).base_model.update_and_allocate(p["global_step"])
                self.optimizer.zero_grad(set_to_none=True)
                p["global_step"] += 1
                p["batch_in_epoch"] = b + 1
                p["examples"] += len(batches[b])
                self.pending_losses.append(loss.detach())  # read back at the next log line, not every step
                p["train_time_s"] += time.perf_counter() - t0
                bar.update(1)
                done = p["global_step"] >= self.total_steps
                epoch_end = b == len(batches) - 1
                if len(running) + len(self.pending_losses) == 20 or epoch_end or done:
                    self.flush()
                    p["losses"].append({"step": p["global_step"], "loss": float(np.mean(running))})
                    LOG.info("step %d loss %.4f", p["global_step"], np.mean(running))
                    bar.set_postfix(loss=f"{np.mean(running):.4f}")
                    running.clear()
                elif any(n and p["global_step"] % n == 0 for n in (cfg.save_steps, cfg.eval_steps)):
                    # the checkpoint holds the losses since the last log line as numbers, and the queued steps
                    # finish inside the training time, not the validation's
                    self.flush()
                if epoch_end:
                    p["epoch"] += 1
                    p["batch_in_epoch"] = 0
                if epoch_end or done or (cfg.eval_steps and p["global_step"] % cfg.eval_steps == 0):
                    self.validate()
                if epoch_end or done or (cfg.save_steps and p["global_step"] % cfg.save_steps == 0):
                    p["wall_time_s"] += self._lap()
                    self.save()
                if fail_at and p["global_step"] == fail_at:
                    raise SimulatedInterruption(f"{FAIL_ENV}={fail_at}: stopped after step {fail_at}")
                if done or epoch_end:
                    break
        bar.close()

    def flush(self) -> None:
        """Read the pending losses and token counts back from the device: all ranks' mean loss per step, the
        global token count. The one host-device sync of the loop, at log lines and checkpoints; the wait for
        the queued steps counts as training time."""
        t0 = time.perf_counter()
        acc, p = self.accelerator, self.progress
        if self.pending_losses:  # all ranks' batch, not rank 0's; element-wise, so each step's mean as before
            p["running_loss"].extend(acc.reduce(torch.stack(self.pending_losses), reduction="mean").tolist())
            self.pending_losses.clear()
        tokens = self.pending_tokens
        if self.world > 1:
            counts = torch.tensor([tokens], dtype=torch.int64, device=acc.device)
            tokens = int(acc.reduce(counts, reduction="sum").item())
        p["tokens"] += tokens
        self.pending_tokens = 0
        p["train_time_s"] += time.perf_counter() - t0

    def _lap(self) -> float:
        now = time.perf_counter()
        lap, self.start = now - self.start, now
        return lap

    # ---------- results
    def finish(self) -> dict[str, Any]:
        cfg, p, task = self.cfg, self.progress, self.task
        selected = task.model_selection() and self.best_state is not None
        if selected:
            self.load_trainable(self.best_state)
        test_sets = [k for k in task.eval_splits if k != "validation"]
        results = {}
        for split in test_sets:
            same_as_val = split == "test" and cfg.protocol == "dev" and task.eval_splits["test"] == task.eval_splits["validation"]
            last = p["validation"][-1] if p["validation"] else None
            if same_as_val and not selected and last and last["step"] == p["global_step"]:
                results[split] = dict(last["metrics"])  # dev protocol: test == validation, already scored
            else:
                results[split] = self.evaluate(split)
        model = self.accelerator.unwrap_model(self.model)
        ranks = adapter_ranks(model)
        self.on_main(lambda: self.save_adapter(model), "adapter/")
        p["wall_time_s"] += self._lap()
        metrics: dict[str, Any] = {
            "task": cfg.task,
            "method": cfg.method,
            "tag": cfg.tag,
            "main_metric": task.main_metric,
            "test": results.pop("test"),
            "extra_test": results,
            "validation": p["validation"],
            "selected_step": p["best"]["step"] if selected else p["global_step"],
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": 100.0 * self.trainable_params / self.total_params,
            "rank": max(ranks.values()) if ranks else None,
            "delta_ranks": ranks,
            "num_labels": task.num_labels,
            "sizes": task.sizes(),
            "steps": p["global_step"],
            "epochs_run": round(p["global_step"] / self.steps_per_epoch, 4),
            "world_size": self.world,
            "per_device_batch_size": self.per_device,
            "global_batch_size": self.global_batch,
            "train_loss": p["losses"],
            "wall_time_s": p["wall_time_s"],
            "train_time_s": p["train_time_s"],
            "train_examples_per_s": p["examples"] / p["train_time_s"] if p["train_time_s"] else None,
            "train_tokens_per_s": p["tokens"] / p["train_time_s"] if p["train_time_s"] and p.get("tokens") else None,
            "eval_examples_per_s": self.eval_examples / self.eval_time if self.eval_time else None,
            "eval_tokens_per_s": self.eval_tokens / self.eval_time if self.eval_time and self.eval_tokens else None,
            "precision": cfg.precision,
            "tf32": self.tf32,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "device": self.accelerator.device.type,
            "config": cfg.to_dict(),
            "versions": versions(),
        }
        if METHODS[cfg.method].family == "capaboost":
            from ..accounting import parameter_counts

            counts = parameter_counts(model)
            metrics["capaboost"] = {k: v for k, v in counts.items() if k != "modules"}
        self.write("metrics.json", metrics)
        LOG.info("test %s  (%d trainable params, %.1fs)", _fmt(metrics["test"]), self.trainable_params, p["wall_time_s"])
        return metrics

    def save_adapter(self, model: torch.nn.Module) -> None:
        """``adapter/``: the PEFT adapter (or the trained tensors for bitfit/full) and how to rebuild the base."""
        from peft import PeftModel
        from safetensors.torch import save_file

        info = {"task": self.cfg.task, "method": self.cfg.method, "model": self.cfg.model, **self.task.info()}

        def write(tmp: Path) -> None:
            if isinstance(model, PeftModel):
                model.save_pretrained(tmp)
            else:
                state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
                save_file(state, str(tmp / "trainable.safetensors"))
            sums = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))}  # load_trained checks them
            run_info = {**info, "peft": isinstance(model, PeftModel), "sha256": sums}
            (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=2))

        atomic_write_dir(self.out / "adapter", write)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _log_to_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    return handler


def train(cfg: RunConfig) -> dict[str, Any]:
    """Fine-tune one (task, method) run and return its metrics (also in ``output_dir/metrics.json``).

    ``cfg.resume`` continues from ``output_dir/checkpoint`` (or returns the finished run's metrics);
    the adapter goes to ``output_dir/adapter`` and the log to ``output_dir/train.log``.
    """
    cfg = cfg.resolved()
    if cfg.resume and cfg.overwrite:
        raise ConfigError(
            "--resume continues the run in --output-dir and --overwrite deletes it: pass only one of them."
        )
    session = _Session(cfg)
    try:
        with ExitStack() as held:  # the folder's lock, held on the main process until the run ends
            session.on_main(lambda: held.enter_context(folder_lock(session.out)), "the run folder's lock")
            return _train_locked(session)
    finally:
        if cfg.precision != "fp32":
            forget_precision()


def _train_locked(session: _Session) -> dict[str, Any]:
    cfg = session.cfg
    finished = session.prepare_output()
    if finished is not None:
        return finished
    handler = _log_to_file(session.out / "train.log") if session.main else None
    try:
        LOG.info("run %s", json.dumps(cfg.to_dict(), default=str))
        session.setup()
        LOG.info(
            "task %s sizes %s, %d/%d trainable params, %d steps (global batch %d = %d x %d processes)",
            cfg.task, session.task.sizes(), session.trainable_params, session.total_params, session.total_steps,
            session.global_batch, session.per_device, session.world,
        )
        session.train_loop()
        return session.finish()
    finally:
        session.restore_tf32()
        if handler is not None:
            LOG.removeHandler(handler)
            handler.close()
