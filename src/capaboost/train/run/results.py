"""The end of a run: the test scores (of the best step under propetl), ``adapter/`` and ``metrics.json``."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import atomic_write_dir, atomic_write_json, file_sha256, on_main_process
from ..methods import adapter_ranks
from ..trained import RUN_INFO
from .evaluation import evaluate, format_metrics
from .session import Session

LOG = logging.getLogger("capaboost.train")


def finish(session: Session) -> dict[str, Any]:
    """Score the test splits, save the adapter, write and return ``metrics.json``."""
    cfg, p, task = session.cfg, session.progress, session.task
    selected = task.model_selection() and session.best_state is not None
    if selected:
        session.load_trainable(session.best_state)
    results = {split: score_split(session, split, selected) for split in task.eval_splits if split != "validation"}
    model = session.unwrapped
    ranks = adapter_ranks(model)
    on_main_process(lambda: save_adapter(session, model), "adapter/")
    p["wall_time_s"] += session.lap()
    metrics = {
        **run_summary(session, results, selected, ranks),
        **throughput(session),
        "precision": cfg.precision,
        "tf32": session.tf32,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "device": session.accelerator.device.type,
        "config": cfg.to_dict(),
        "versions": versions(),
    }
    if session.method.family == "capaboost":
        from ...accounting import parameter_counts

        counts = parameter_counts(model)
        metrics["capaboost"] = {k: v for k, v in counts.items() if k != "modules"}
    on_main_process(lambda: atomic_write_json(session.out / "metrics.json", metrics), "metrics.json")
    LOG.info("test %s  (%d trainable params, %.1fs)", format_metrics(metrics["test"]), session.trainable_params,
             p["wall_time_s"])
    return metrics


def score_split(session: Session, split: str, selected: bool) -> dict[str, float]:
    """``split``'s metrics; under the dev protocol the test split is the validation split, scored at the last step."""
    cfg, p, task = session.cfg, session.progress, session.task
    same_as_val = split == "test" and cfg.protocol == "dev" and task.eval_splits["test"] == task.eval_splits["validation"]
    last = p["validation"][-1] if p["validation"] else None
    if same_as_val and not selected and last and last["step"] == p["global_step"]:
        return dict(last["metrics"])  # already scored
    return evaluate(session, split)


def run_summary(session: Session, results: dict[str, dict[str, float]], selected: bool,
                ranks: dict[str, int]) -> dict[str, Any]:
    """What ran and what it scored: task, method, metrics, sizes, steps and batch arithmetic."""
    cfg, p, task = session.cfg, session.progress, session.task
    results = dict(results)
    return {
        "task": cfg.task,
        "method": cfg.method,
        "tag": cfg.tag,
        "main_metric": task.main_metric,
        "test": results.pop("test"),
        "extra_test": results,
        "validation": p["validation"],
        "selected_step": p["best"]["step"] if selected else p["global_step"],
        "trainable_params": session.trainable_params,
        "total_params": session.total_params,
        "trainable_percent": 100.0 * session.trainable_params / session.total_params,
        "rank": max(ranks.values()) if ranks else None,
        "delta_ranks": ranks,
        "num_labels": task.num_labels,
        "sizes": task.sizes(),
        "steps": p["global_step"],
        "epochs_run": round(p["global_step"] / session.steps_per_epoch, 4),
        "world_size": session.world,
        "per_device_batch_size": session.per_device,
        "global_batch_size": session.global_batch,
        "train_loss": p["losses"],
    }


def throughput(session: Session) -> dict[str, Any]:
    p, train_s, eval_s = session.progress, session.progress["train_time_s"], session.eval_time
    return {
        "wall_time_s": p["wall_time_s"],
        "train_time_s": train_s,
        "train_examples_per_s": p["examples"] / train_s if train_s else None,
        "train_tokens_per_s": p["tokens"] / train_s if train_s and p.get("tokens") else None,
        "eval_examples_per_s": session.eval_examples / eval_s if eval_s else None,
        "eval_tokens_per_s": session.eval_tokens / eval_s if eval_s and session.eval_tokens else None,
    }


def save_adapter(session: Session, model: torch.nn.Module) -> None:
    """``adapter/``: the PEFT adapter (or the trained tensors for bitfit/full) and how to rebuild the base."""
    from peft import PeftModel
    from safetensors.torch import save_file

    cfg = session.cfg
    info = {"task": cfg.task, "method": cfg.method, "model": cfg.model, **session.task.info()}

    def write(tmp: Path) -> None:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp)
        else:
            state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(state, str(tmp / "trainable.safetensors"))
        sums = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))}  # load_trained checks them
        run_info = {**info, "peft": isinstance(model, PeftModel), "sha256": sums}
        (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=2))

    atomic_write_dir(session.out / "adapter", write)


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    from ... import __version__

    return {
        "capaboost": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
