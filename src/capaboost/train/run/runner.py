"""``train()``, the runner behind ``capaboost train``: one loop for every task and method.

Built on ``accelerate.Accelerator`` so the same code runs on one CPU process or under
``torchrun``/``accelerate launch``. ``batch_size`` is the GLOBAL batch: each of the N processes takes
its contiguous ``batch_size / N`` slice of every batch, so one optimizer step sees the same examples
whatever N is. Only the main process writes files, every file is written atomically, and a failed
write raises on every process (none waits at a barrier for ever; :mod:`capaboost.checkpoint`). The main
process holds an exclusive lock on the output folder for the whole run, so a second run on the same
folder fails at once instead of mixing its files in, and ``run.json`` records the options and data
files a later ``--resume`` must match (:mod:`..run_folder`).
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ...checkpoint import on_main_process
from ..errors import ConfigError
from ..run_config import RunConfig
from ..run_folder.folder import prepare_output
from ..run_folder.lock import folder_lock
from . import loop
from .device import forget_precision
from .results import finish
from .session import Session

LOG = logging.getLogger("capaboost.train")


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
    session = Session(cfg)
    try:
        with ExitStack() as held:  # the folder's lock, held on the main process until the run ends
            on_main_process(lambda: held.enter_context(folder_lock(session.out)), "the run folder's lock")
            return _train_locked(session)
    finally:
        if cfg.precision != "fp32":
            forget_precision()


def _train_locked(session: Session) -> dict[str, Any]:
    cfg = session.cfg
    finished = prepare_output(cfg, session.accelerator)
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
        loop.train_loop(session)  # looked up on the module: tests wrap it
        return finish(session)
    finally:
        session.restore_tf32()
        if handler is not None:
            LOG.removeHandler(handler)
            handler.close()


def _log_to_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    return handler
