"""The fingerprint of a run's data files, recorded when it starts and compared on ``--resume``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ...checkpoint import file_sha256

MAX_DATA_FILES = 500  # as the tokenization cache's key (tasks.base.files_fingerprint)


def _data_files(data_dir: Optional[str], exclude: tuple[Path, ...]) -> dict[str, Path]:
    """The files under ``data_dir`` (or the file itself) by name relative to it, none inside ``exclude``."""
    if not data_dir:
        return {}
    root = Path(data_dir)
    if root.is_file():
        return {root.name: root}
    skip = [Path(e).resolve() for e in exclude]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(p.resolve().is_relative_to(e) for e in skip))
    return {str(p.relative_to(root)): p for p in files[:MAX_DATA_FILES]}


def data_fingerprint(data_dir: Optional[str], exclude: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """{file: size, mtime, SHA-256} of a run's data files, stored in the run folder to check a resume against."""
    result = {}
    for name, path in _data_files(data_dir, exclude).items():
        stat = path.stat()
        result[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
    return result


def data_changes(
    saved: dict[str, dict[str, Any]], data_dir: Optional[str], exclude: tuple[Path, ...] = ()
) -> list[str]:
    """What differs between ``saved`` (a :func:`data_fingerprint`) and the files now: ``["train.tsv (changed)", ...]``.

    Size and mtime unchanged counts as unchanged (no re-hashing); a new mtime is only a change if the
    bytes differ, so copying or touching the data does not block a resume.
    """
    now = _data_files(data_dir, exclude)
    changes = []
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            changes.append(f"{name} (missing)")
        elif name not in saved:
            changes.append(f"{name} (new)")
        else:
            stat, old = now[name].stat(), saved[name]
            if stat.st_size != old.get("size"):
                changes.append(f"{name} (changed)")
            elif stat.st_mtime_ns != old.get("mtime_ns") and file_sha256(now[name]) != old.get("sha256"):
                changes.append(f"{name} (changed)")
    return changes
