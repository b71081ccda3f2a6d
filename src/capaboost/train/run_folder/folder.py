"""What a run may do with its ``--output-dir``: start afresh, resume, replace (``--overwrite``) or refuse.

Runs under the folder's lock (:mod:`.lock`). A fresh start records the run's identity in ``run.json`` (the
options that change what is trained, and the data files' fingerprint); ``--resume`` must match it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ...checkpoint import atomic_write_json, on_main_process, read_json, remove_stale_temps, resolve_dir
from ..errors import ConfigError
from ..run_config import RunConfig
from .checkpoint import CHECKPOINT_DIR
from .data_files import data_changes, data_fingerprint

if TYPE_CHECKING:
    from accelerate import Accelerator

RUN_FILE = "run.json"  # the run's identity (resolved options + data fingerprint), checked by --resume
METRICS = "metrics.json"
# Everything a run writes into its folder, which --overwrite removes.
RUN_OUTPUTS = (METRICS, "adapter", "adapter.old", "train.log", RUN_FILE, CHECKPOINT_DIR, CHECKPOINT_DIR + ".old")
RESUME_FIX = "drop --resume and pass --overwrite to train the run again, or choose another --output-dir."


class RunExistsError(ConfigError):
    """The output directory already holds a run; the message says which flag continues or replaces it."""


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from a JSON file (paths and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))


def identity_diff(saved: dict[str, Any], cfg: RunConfig, where: str) -> Optional[str]:
    """The --resume refusal when ``cfg``'s options that change what is trained differ from ``saved``, else None."""
    mine = as_json(cfg.identity())
    saved = {k: v for k, v in saved.items() if k not in RunConfig.RUNTIME_ONLY}  # metrics.json's config is full
    # an option the record lacks was added later: the run had its default (e.g. precision fp32)
    saved = {**{k: v for k, v in as_json(RunConfig().identity()).items() if k not in saved}, **saved}
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if not diff:
        return None
    return (
        f"--resume: options {diff} differ from {where} ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); resume "
        "with the original options, or drop --resume and pass --overwrite to replace the run, or choose another "
        "--output-dir."
    )


def data_exclude(cfg: RunConfig) -> tuple[Path, ...]:
    """Folders that may lie inside --data-dir but are not data: this run's own files and the token cache."""
    from ..tasks.base import cache_dir

    return (Path(cfg.output_dir), cache_dir(cfg))


def check_same_run(cfg: RunConfig, fallback_config: Optional[dict[str, Any]]) -> None:
    """Refuse --resume with other options or changed data files than the run in the folder was started with.

    Runs from before ``run.json`` existed are checked against ``fallback_config`` (metrics.json's),
    their data cannot be checked.
    """
    out = Path(cfg.output_dir)
    if (out / RUN_FILE).exists():
        saved = read_json(out / RUN_FILE, RESUME_FIX)
    elif fallback_config:
        saved = {"config": fallback_config}
    else:  # a checkpoint from before run.json: the session compares its options, its data is unknown
        return
    problem = identity_diff(saved.get("config", {}), cfg, f"those of the run in {str(out)!r}")
    if problem:
        raise ConfigError(problem)
    if "data" in saved:
        changes = data_changes(saved["data"], cfg.data_dir, exclude=data_exclude(cfg))
        if changes:
            raise ConfigError(
                f"--resume: the data files in {str(cfg.data_dir)!r} differ from those the run in {str(out)!r} "
                f"started with: {', '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}; restore them, or "
                "drop --resume and pass --overwrite to train again on the new data, or choose another --output-dir."
            )


def prepare_output(cfg: RunConfig, accelerator: "Accelerator") -> Optional[dict]:
    """Check the folder (held under its lock) against the options; the finished run's metrics for --resume.

    Also removes the temporaries a killed run's atomic writes left, and records the run's identity
    (``run.json``) when it starts afresh, for a later --resume to compare with.
    """
    out = Path(cfg.output_dir)
    ckpt_dir = resolve_dir(out / CHECKPOINT_DIR)
    if accelerator.is_main_process:
        remove_stale_temps(out, ("adapter", CHECKPOINT_DIR, METRICS, RUN_FILE))
        if cfg.overwrite:
            for path in (out / name for name in RUN_OUTPUTS):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    if cfg.overwrite:
        ckpt_dir = None
    accelerator.wait_for_everyone()
    if not cfg.overwrite and (out / METRICS).exists():
        if cfg.resume:
            finished = read_json(out / METRICS, RESUME_FIX)
            check_same_run(cfg, finished.get("config", {}))
            return finished
        raise RunExistsError(
            f"{str(out)!r} already holds a finished run (metrics.json); pass --overwrite to replace it "
            "or choose another --output-dir."
        )
    if ckpt_dir is not None and not cfg.resume:  # (not --overwrite: that cleared ckpt_dir)
        raise RunExistsError(
            f"{str(out)!r} holds an unfinished run (checkpoint/); pass --resume to continue it or "
            "--overwrite to start again."
        )
    if ckpt_dir is not None:
        check_same_run(cfg, None)  # the checkpoint's own options are compared again by the session
    else:  # a fresh start: what later resumes must match
        on_main_process(lambda: atomic_write_json(out / RUN_FILE, {
            "config": as_json(cfg.identity()),
            "data": data_fingerprint(cfg.data_dir, exclude=data_exclude(cfg)),
        }), RUN_FILE)
    return None
