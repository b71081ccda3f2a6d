"""The masked-parallel core shared by every CapaBoost method.

A CapaBoost module keeps ONE down factor ``A`` (k x n_in) and ONE up factor ``B`` (n_out x k) and
applies d static binary masks to each, giving d "copies" whose sum has rank up to d*k.  This module
holds everything that does not depend on the PEFT method:

* a counter-based generator keyed by (seed, module name, role, copy): identical masks on every
  machine, process, device and library version, and independent of torch's global RNG;
* random masks with an exact count per copy, N:M masks, and the ablation modes;
* packing: only entries in the union of the d masks are stored (and trained);
* the concatenated product: ``A_cat`` (d*k x n_in) and ``B_cat`` (n_out x d*k) are gathered from
  the packed values in one indexing op, so d copies cost one rank-d*k product.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
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

    @property
    def union_fraction(self) -> float:
        """Expected trainable fraction 1-(1-s)^d (exact for 'same': s; for 'dropout': 1)."""
        if self.mode == "same":
            return float(self.density)
        if self.mode == "dropout":
            return 1.0
        return 1.0 - (1.0 - float(self.density)) ** self.num_copies


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


class MaskedFactor:
    """One factor shared by d masked copies, stored packed (union entries only).

    ``concat_rows=True`` stacks the copies along the rows (the down factor A -> d*k x n_in),
    ``False`` along the columns (the up factor B -> n_out x d*k): exactly the operands of one
    rank-d*k product. The gather index is built once and cached per device; masks are plain
    tensors (neither parameters nor buffers) since they are regenerated from the seed.
    """

    def __init__(self, spec: MaskSpec, name: str, role: str, shape: tuple[int, int], concat_rows: bool) -> None:
        self.spec, self.name, self.role, self.shape, self.concat_rows = spec, name, role, tuple(shape), concat_rows
        if spec.nm is not None and shape[1] % spec.nm[1]:
            raise ValueError(
                f"mask_pattern={spec.pattern!r}: M={spec.nm[1]} must divide the input dimension of factor {role} of "
                f"{name!r}, which is {shape[1]} (for A the layer's input features, for B the rank r); "
                "choose another M or r, or mask_pattern='random'."
            )
        self.masks = copy_masks(spec, name, role, self.shape)  # (d, rows, cols) bool, CPU
        self.union = self.masks.any(0)
        self.numel_union = int(self.union.sum())
        flat_union = self.union.reshape(-1)
        pos = torch.cumsum(flat_union.long(), 0) - 1  # packed position of each union entry
        self._union_index = flat_union.nonzero().squeeze(1)
        idx = torch.where(self.masks.reshape(spec.num_copies, -1), pos, self.numel_union)  # sentinel -> 0
        self._gather_cpu = self._layout(idx.reshape(spec.num_copies, *self.shape))
        self._gather: dict[torch.device, torch.Tensor] = {}

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def active_per_copy(self) -> list[int]:
        return [int(m.sum()) for m in self.masks]

    @property
    def digest(self) -> str:
        return masks_digest(self.masks)

    def _layout(self, stacked: torch.Tensor) -> torch.Tensor:
        """(d, rows, cols) -> (d*rows, cols) or (rows, d*cols)."""
        d, rows, cols = stacked.shape
        if self.concat_rows:
            return stacked.reshape(d * rows, cols)
        return stacked.permute(1, 0, 2).reshape(rows, d * cols)

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        """Union entries of a dense (rows, cols) factor, in row-major order."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"expected a {self.shape} factor for {self.name!r}.{self.role}, got {tuple(dense.shape)}.")
        return dense.reshape(-1)[self._union_index.to(dense.device)]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """The shared dense factor (zeros outside the union)."""
        dense = packed.new_zeros(self.numel)
        dense[self._union_index.to(packed.device)] = packed
        return dense.reshape(self.shape)

    def gather_index(self, device: torch.device) -> torch.Tensor:
        index = self._gather.get(device)
        if index is None:
            index = self._gather[device] = self._gather_cpu.to(device)
        return index

    def cat(self, packed: torch.Tensor, training: bool = False) -> torch.Tensor:
        """The d masked copies side by side, from the packed values (differentiable)."""
        if self.spec.mode == "dropout":
            dense = packed.reshape(self.shape)
            stacked = dense.unsqueeze(0).expand(self.spec.num_copies, *self.shape)
            if training and self.spec.density < 1.0:
                keep = torch.rand(stacked.shape, device=packed.device) < self.spec.density
                stacked = stacked * keep.to(packed.dtype) / self.spec.density  # inverted dropout: eval needs no mask
            return self._layout(stacked)
        extended = torch.cat([packed, packed.new_zeros(1)])
        index = self.gather_index(packed.device)  # index_select: its backward is ~30x faster on CPU than [index]'s
        return extended.index_select(0, index.reshape(-1)).view(index.shape)


def warn_dense_copies(spec: MaskSpec) -> None:
    if spec.num_copies > 1 and spec.density == 1.0 and spec.mode != "dropout":
        warnings.warn(
            f"num_copies={spec.num_copies} with mask_density=1.0: all copies coincide, so CapaBoost reduces to the "
            f"base method with its output scaled by {spec.num_copies}; use mask_density < 1 to raise the rank.",
            UserWarning,
            stacklevel=3,
        )


class MaskedPair:
    """The (A, B) factor pair of one module and adapter: A is k x n_in (down), B is n_out x k (up).

    Every CapaBoost tuner layer keeps one per adapter in ``layer.capaboost_pairs[adapter]`` and its
    base-model-relative name in ``layer.capaboost_name``; accounting, fingerprints and export walk
    those, whatever the method.
    """

    def __init__(self, spec: MaskSpec, name: str, k: int, n_in: int, n_out: int) -> None:
        self.spec, self.name, self.k = spec, name, k
        self.A = MaskedFactor(spec, name, "A", (k, n_in), concat_rows=True)
        self.B = MaskedFactor(spec, name, "B", (n_out, k), concat_rows=False)

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.name}|{self.A.digest}|{self.B.digest}".encode()).hexdigest()[:16]

    def cat(self, packed_a: torch.Tensor, packed_b: torch.Tensor, training: bool = False) -> tuple[torch.Tensor, ...]:
        """(A_cat, B_cat): the operands of the one rank-d*k product."""
        return self.A.cat(packed_a, training), self.B.cat(packed_b, training)

    def delta(self, packed_a: torch.Tensor, packed_b: torch.Tensor) -> torch.Tensor:
        """Σ_i (B⊙m_Bi)(A⊙m_Ai) = B_cat @ A_cat (n_out x n_in), at eval (no dropout masks)."""
        a_cat, b_cat = self.cat(packed_a, packed_b)
        return b_cat @ a_cat


def fingerprint(digests: dict[str, str]) -> str:
    """Order-independent digest of all the masks of one adapter, keyed by module name."""
    text = "\n".join(f"{name}:{digest}" for name, digest in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:24]
