"""The masked-parallel core shared by every CapaBoost method.

A CapaBoost module keeps ONE down factor ``A`` (k x n_in) and ONE up factor ``B`` (n_out x k) and
applies d static binary masks to each, giving d "copies" whose sum has rank up to d*k.  This module
holds everything that does not depend on the PEFT method:

* a counter-based generator keyed by (seed, module name, role, copy): identical masks on every
  machine, process, device and library version, and independent of torch's global RNG;
* random masks with an exact count per copy, N:M masks, and the ablation modes;
* digests and fingerprints of the masks, which checkpoints record.

How the masks become packed parameters and the one rank-d*k product is in :mod:`capaboost.packing`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

#: Bump only with a deliberate change of the mask stream; checkpoints record it and refuse to load
#: under another version (the golden-hash test pins the stream).
GENERATOR_VERSION = 1

MASK_MODES = ("diff", "same", "dropout")
ROLES = ("A", "B")  # A: down factor (k x n_in); B: up factor (n_out x k)
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_MAX_REDRAWS = 64

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective mix of a 64-bit counter (wrap-around arithmetic)."""
    z = counter * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def mask_key(seed: int, name: str, role: str, copy: int, redraw: int = 0) -> int:
    """64-bit stream key. Hashing the key tuple (not Python's salted ``hash``) keeps it stable."""
    text = f"capaboost/v{GENERATOR_VERSION}|{int(seed)}|{name}|{role}|{int(copy)}"
    if redraw:
        text += f"|redraw{redraw}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def random_bits(key: int, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 words of stream ``key``: word i = mix(key + i), pure arithmetic."""
    counter = np.arange(n, dtype=np.uint64) + np.uint64(key)
    return _splitmix64(counter)


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """``"random"`` -> None; ``"N:M"`` -> (N, M). Anything else is a ValueError."""
    if pattern == "random":
        return None
    match = _NM_RE.match(str(pattern))
    if not match:
        raise ValueError(
            f"mask_pattern={pattern!r} is malformed: use 'random' or 'N:M' with integers 1 <= N <= M (e.g. '2:4')."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n <= m:
        raise ValueError(f"mask_pattern={pattern!r} needs 1 <= N <= M (N kept in every group of M), got N={n}, M={m}.")
    return n, m


@dataclass(frozen=True)
class MaskSpec:
    """What determines a module's masks, apart from its name and shape."""

    num_copies: int = 2
    density: float = 0.5
    pattern: str = "random"
    mode: str = "diff"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_copies, bool) or not isinstance(self.num_copies, int) or self.num_copies < 1:
            raise ValueError(f"num_copies must be an integer >= 1, got {self.num_copies!r}.")
        if not isinstance(self.density, (int, float)) or not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"mask_density must be in (0, 1], got {self.density!r}.")
        if self.mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mode!r}.")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            n, m = nm
            if not math.isclose(float(self.density), n / m, rel_tol=0, abs_tol=1e-9):
                raise ValueError(
                    f"mask_pattern={self.pattern!r} fixes the density to N/M={n / m:g}, but mask_density="
                    f"{self.density!r}; set mask_density={n / m:g} (or use mask_pattern='random')."
                )
            if self.mode == "dropout":
                raise ValueError("mask_mode='dropout' draws fresh random masks; it cannot use an N:M mask_pattern.")

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_pattern(self.pattern)


def random_mask(key: int, shape: tuple[int, int], density: float) -> np.ndarray:
    """Exactly round(s*n) ones, chosen by the smallest words of the stream (stable sort: no ties issue)."""
    n = shape[0] * shape[1]
    k = int(math.floor(density * n + 0.5))
    if k < 1:
        raise ValueError(
            f"mask_density={density} keeps round({density}*{n})=0 entries of a {shape[0]}x{shape[1]} factor; "
            "raise mask_density or r."
        )
    order = np.argsort(random_bits(key, n), kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(shape)


def nm_mask(key: int, shape: tuple[int, int], n: int, m: int) -> np.ndarray:
    """N kept in every group of M consecutive entries along the input (last) dimension."""
    rows, cols = shape
    if cols % m:
        raise ValueError(f"an N:M mask with M={m} needs an input dimension divisible by M, got {cols}.")
    bits = random_bits(key, rows * cols).reshape(rows, cols // m, m)
    ranks = np.argsort(np.argsort(bits, axis=-1, kind="stable"), axis=-1, kind="stable")
    return (ranks < n).reshape(shape)


def copy_masks(spec: MaskSpec, name: str, role: str, shape: tuple[int, int]) -> torch.Tensor:
    """The d static masks (d, rows, cols) of one factor; distinct across copies in mode 'diff'."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
    d = spec.num_copies
    if spec.mode == "dropout" or spec.density == 1.0:
        return torch.ones((d, *shape), dtype=torch.bool)
    nm = spec.nm

    def draw(copy: int, redraw: int) -> np.ndarray:
        key = mask_key(spec.seed, name, role, copy, redraw)
        return random_mask(key, shape, spec.density) if nm is None else nm_mask(key, shape, *nm)

    if spec.mode == "same":
        return torch.from_numpy(np.stack([draw(0, 0)] * d))
    masks: list[np.ndarray] = []
    for copy in range(d):
        for redraw in range(_MAX_REDRAWS):
            mask = draw(copy, redraw)
            if not any(np.array_equal(mask, prev) for prev in masks):
                break
        else:
            raise ValueError(
                f"could not draw {d} distinct masks of density {spec.density} for the {shape[0]}x{shape[1]} "
                f"factor {role} of {name!r}; the factor is too small: lower num_copies or raise r."
            )
        masks.append(mask)
    return torch.from_numpy(np.stack(masks))


def masks_digest(masks: torch.Tensor) -> str:
    """Short hex digest of a bool mask tensor (golden tests, checkpoint fingerprints)."""
    packed = np.packbits(masks.cpu().numpy().astype(np.uint8).reshape(-1))
    header = ",".join(str(s) for s in masks.shape).encode()
    return hashlib.sha256(header + b"|" + packed.tobytes()).hexdigest()[:16]


def fingerprint(digests: dict[str, str]) -> str:
    """Order-independent digest of all the masks of one adapter, keyed by module name."""
    text = "\n".join(f"{name}:{digest}" for name, digest in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:24]
