"""The two evaluation protocols of the CapaBoost paper, as pure index arithmetic.

GLUE test labels are private, so papers carve validation/test sets out of
train and dev:

* ``"propetl"`` (ProPETL, used for CapaBoost's main tables): a task with more
  than 10k training examples holds out 1k training examples as validation and
  uses dev as test; a smaller task splits dev in half into validation and
  test. Model selection (best checkpoint) happens on validation.
* ``"dev"``: dev is the test set *and* the validation set. Selecting a
  checkpoint on it would leak the test set, so under this protocol the runner
  must report the final model, not the best validation checkpoint.

Every random choice uses ``numpy.random.default_rng`` seeded with
``[seed, purpose]`` so splits are identical on any machine and Python
version, and the split and the later subsampling draw independent streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

PROTOCOLS = ("propetl", "dev")
LARGE_TASK_THRESHOLD = 10_000  # "more than 10k training examples"
HELD_OUT_VALIDATION = 1_000

# Purpose tags mixed into the seed: changing one split never shifts another.
_SPLIT, _FRACTION = 1, 4
_STREAMS = {"train": 2, "eval": 3}


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), purpose])


def split_indices(
    n_train: int, n_dev: int, protocol: str = "dev", seed: int = 0
) -> tuple[list[int], list[tuple[str, int]], list[tuple[str, int]]]:
    """Assign examples to splits without touching them.

    Returns ``(train_idx, validation, test)``; ``train_idx`` indexes the
    training pool, and validation/test are ``("train"|"dev", index)`` pairs
    because under ProPETL validation may come from train. Indices keep file
    order within each split, so the result does not depend on how a caller
    later iterates.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    if protocol == "dev":
        dev = [("dev", i) for i in range(n_dev)]
        return list(range(n_train)), dev, list(dev)
    perm = _rng(seed, _SPLIT)
    if n_train > LARGE_TASK_THRESHOLD:
        held = set(perm.permutation(n_train)[:HELD_OUT_VALIDATION].tolist())
        train = [i for i in range(n_train) if i not in held]
        return train, [("train", i) for i in sorted(held)], [("dev", i) for i in range(n_dev)]
    # Odd dev sizes: validation gets the smaller half.
    order = perm.permutation(n_dev)
    half = n_dev // 2
    val = sorted(order[:half].tolist())
    test = sorted(order[half:].tolist())
    return list(range(n_train)), [("dev", i) for i in val], [("dev", i) for i in test]


def apply_protocol(
    train: Sequence[T],
    dev: Sequence[T],
    protocol: str = "dev",
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[list[T], list[T], list[T]]:
    """Split ``train``/``dev`` into (train, validation, test) and subsample.

    Subsampling happens after the split so that e.g. SST-2-10k keeps the
    same validation/test sets as full SST-2.
    """
    tr_idx, val_ref, test_ref = split_indices(len(train), len(dev), protocol, seed)
    pools = {"train": train, "dev": dev}
    out_train = [train[i] for i in tr_idx]
    val = [pools[p][i] for p, i in val_ref]
    test = [pools[p][i] for p, i in test_ref]
    out_train = subsample(out_train, max_train_samples, seed, "train")
    # Same stream for both: under "dev" validation and test must stay identical.
    val = subsample(val, max_eval_samples, seed, "eval")
    test = subsample(test, max_eval_samples, seed, "eval")
    return out_train, val, test


def subsample(items: Sequence[T], max_samples: int | None, seed: int = 0, stream: str = "train") -> list[T]:
    """A fixed-seed subset of at most ``max_samples`` items, in original order.

    ``stream`` ("train" or "eval") selects an independent random stream, so
    capping eval sets does not change which training examples are kept.
    """
    if max_samples is None or max_samples >= len(items):
        return list(items)
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    keep = np.sort(_rng(seed, _STREAMS[stream]).permutation(len(items))[:max_samples])
    return [items[i] for i in keep.tolist()]


def split_fraction(items: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split one pool into (rest, held_out) with ``round(fraction * n)`` held out.

    For datasets shipped as a single file: the held-out part then plays the
    role of GLUE's dev set in :func:`apply_protocol`.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(items)
    n_out = int(round(fraction * n))
    held = set(_rng(seed, _FRACTION).permutation(n)[:n_out].tolist())
    rest = [items[i] for i in range(n) if i not in held]
    return rest, [items[i] for i in sorted(held)]


def vtab_split(
    n_pool: int, train_size: int = 800, val_size: int = 200, seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """VTAB-1k: 800 train / 200 validation drawn from the pool; returns (train, val, rest) indices."""
    if train_size < 0 or val_size < 0:
        raise ValueError("train_size and val_size must be >= 0")
    if n_pool < train_size + val_size:
        raise ValueError(
            f"training pool has {n_pool} examples, fewer than train_size + val_size = {train_size + val_size}"
        )
    perm = _rng(seed, _SPLIT).permutation(n_pool)
    train = sorted(perm[:train_size].tolist())
    val = sorted(perm[train_size : train_size + val_size].tolist())
    rest = sorted(perm[train_size + val_size :].tolist())
    return train, val, rest
