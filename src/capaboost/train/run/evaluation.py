"""Scoring the model on an evaluation split, sharded over the processes; picking the best step (propetl)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..tasks.base import Task
from .device import batch_to_device

if TYPE_CHECKING:
    from .session import Session

LOG = logging.getLogger("capaboost.train")


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


def evaluate(session: Session, split: str) -> dict[str, float]:
    """The task's metrics of ``split``; the time and the examples/tokens scored count towards eval throughput."""
    t0 = time.perf_counter()
    task = session.task
    features = task.eval_splits[split]
    model = session.accelerator.unwrap_model(session.model)
    metrics = task.evaluate(
        model, split, lambda: predict(model, task, features, session.cfg.eval_batch_size, session.accelerator)
    )
    session.eval_time += time.perf_counter() - t0
    session.eval_examples += len(features)
    if task.scores_outputs:  # generation's tokens are not the features' tokens
        session.eval_tokens += sum(int(sum(f["attention_mask"])) for f in features if "attention_mask" in f)
    return metrics


def validate(session: Session) -> None:
    """Score the validation split, record it, and keep the trainable tensors when they are the best so far."""
    p, task = session.progress, session.task
    metrics = evaluate(session, "validation")
    entry = {"epoch": round(p["global_step"] / session.steps_per_epoch, 4), "step": p["global_step"], "metrics": metrics}
    p["validation"].append(entry)
    LOG.info("step %d validation %s", p["global_step"], format_metrics(metrics))
    main = metrics[task.main_metric]
    sign = 1 if task.greater_is_better else -1  # causal-lm: lower perplexity
    if task.model_selection() and (p["best"] is None or sign * main > sign * p["best"]["value"]):
        p["best"] = {"step": p["global_step"], "value": main}
        session.best_state = session.trainable_state()


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
