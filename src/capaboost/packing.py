"""Packed storage of the union of the masks, and the gather to the one rank-d*k product.

Only entries in the union of a factor's d masks are parameters (1-D, union-sized: optimizer state, DDP
buckets and checkpoints follow). ``A_cat`` (d*k x n_in) and ``B_cat`` (n_out x d*k) are gathered from the
packed values of both factors in one ``index_select``; its backward sums each packed entry's <= d copies
with gathers, never a scatter-add (no atomic adds on a GPU, deterministic). LoRA's Linear update is one
autograd node on top of that gather.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masks import MaskSpec, copy_masks, masks_digest


class _GatherTables:
    """Index tables of one masked gather, built once on the CPU and cached per device and dtype.

    ``forward``: for every entry of the copies laid side by side, its position in the concatenated
    packed values, or the sentinel (one past the end) that reads an appended zero. ``backward``
    (d, n_packed): for every packed entry, the layout positions of its d copies, member copies
    first, so slot 0 always holds it; ``keep`` (d-1, n_packed) says whether slots 1.. hold it too.
    The backward is then a gather plus a sum over <= d slots: no index_add, so no atomics on a GPU.
    """

    def __init__(self, forward: torch.Tensor, backward: torch.Tensor, keep: torch.Tensor) -> None:
        # int32 positions when they fit: half the memory and bandwidth of int64 (index_select takes both)
        index_dtype = torch.int32 if max(forward.numel(), backward.numel()) < 2**31 - 1 else torch.long
        # flat: no view ops per step
        self.cpu = (forward.to(index_dtype), backward.reshape(-1).to(index_dtype), keep.reshape(-1))
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._values: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.on(torch.device("cpu"), torch.get_default_dtype())  # ready for CPU use (and dynamo) at once

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(forward, backward, keep, zero) on ``device``; the first call per device copies (and syncs) once."""
        values = self._values.get((device, dtype))
        if values is None:
            index = self._index.get(device)
            if index is None:
                index = self._index[device] = (self.cpu[0].to(device), self.cpu[1].to(device))
            keep = self.cpu[2].to(device=device, dtype=dtype)
            values = self._values[(device, dtype)] = (keep, torch.zeros(1, device=device, dtype=dtype))
        return (*self._index[device], *values)

    @staticmethod
    def join(parts: list[tuple[torch.Tensor, ...]], packed_sizes: list[int], layout_sizes: list[int]) -> "_GatherTables":
        """The tables of several factors (their ``gather_parts``) for ONE gather: offsets shift the positions."""
        total = sum(packed_sizes)
        forward, backward, keep = [], [], []
        packed_off = layout_off = 0
        for (fwd, bwd, kp), n_packed, n_layout in zip(parts, packed_sizes, layout_sizes):
            forward.append(torch.where(fwd == n_packed, total, fwd + packed_off))
            backward.append(bwd + layout_off)
            keep.append(kp)
            packed_off, layout_off = packed_off + n_packed, layout_off + n_layout
        return _GatherTables(torch.cat(forward), torch.cat(backward, 1), torch.cat(keep, 1))


def _gather_back(backward_index: torch.Tensor, keep: torch.Tensor, sizes: list[int], *grads: torch.Tensor):
    """Gradients of the copies laid side by side -> gradients of the packed values (one per factor).

    One gather of each packed entry's d copies (slot 0 always holds the entry) and a masked sum
    over the slots: ``addcmul`` for d=2. No ``index_add``, so no atomics and a deterministic sum.
    """
    if len(grads) > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
    else:
        flat = grads[0] if grads[0].dim() == 1 else grads[0].reshape(-1)
    copies = flat.index_select(0, backward_index)
    n = copies.shape[0] - keep.shape[0]
    if keep.shape[0] == 0:  # d = 1
        total = copies
    elif keep.shape[0] == n:  # d = 2
        total = torch.addcmul(*copies.split(n), keep)
    else:
        total = copies[:n] + (copies[n:].view(-1, n) * keep.view(-1, n)).sum(0)
    return total.split(sizes) if len(sizes) > 1 else (total,)


class _MaskedGather(torch.autograd.Function):
    """Packed values -> the masked copies side by side (``A_cat``, ``B_cat``), in one gather.

    Forward: one ``cat`` (packed factors + a cached zero) and one ``index_select``; backward:
    :func:`_gather_back`. Autograd's own backward of ``index_select`` would be an ``index_add`` whose
    masked-out half all lands on the sentinel slot: on a GPU, atomics on one address.
    """

    @staticmethod
    def forward(ctx, forward_index, backward_index, keep, zero, shapes, *packed):  # type: ignore[override]
        ctx.save_for_backward(backward_index, keep)
        ctx.sizes = [p.numel() for p in packed]
        flat = torch.cat([*packed, zero]).index_select(0, forward_index)
        if len(shapes) == 1:
            return (flat.view(shapes[0]),)
        return tuple(part.view(shape) for part, shape in zip(flat.split([s[0] * s[1] for s in shapes]), shapes))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        return (None, None, None, None, None, *_gather_back(*ctx.saved_tensors, ctx.sizes, *grads))


class _MaskedLowRank(torch.autograd.Function):
    """``result + scaling * x A_catᵀ B_catᵀ`` straight from the packed values: one autograd node.

    The kernels of a rank-d*k LoRA plus one gather each way: forward ``cat``, ``index_select``,
    ``mm``, ``addmm`` (the scaled product lands in the base output); backward four GEMMs (scaling
    folded into their ``alpha``) and :func:`_gather_back`. No host sync, no data-dependent shapes.
    """

    @staticmethod
    def forward(ctx, result, x, packed_a, packed_b, forward_index, backward_index, keep, zero, shapes, scaling):  # type: ignore[override]
        (a_rows, a_cols), (b_rows, b_cols) = shapes
        flat = torch.cat([packed_a, packed_b, zero]).index_select(0, forward_index)
        a_cat = flat.as_strided((a_rows, a_cols), (a_cols, 1))
        b_cat_t = flat.as_strided((b_cols, b_rows), (1, b_cols), a_rows * a_cols)  # B_catᵀ, no copy
        x2 = x.reshape(-1, a_cols)
        h = F.linear(x2, a_cat)  # all d copies: d*k features at once
        flat_result = result.reshape(-1, b_rows)
        if flat_result.dtype == h.dtype:
            out = torch.addmm(flat_result, h, b_cat_t, alpha=scaling)
        else:  # e.g. a bf16 base with float32 adapter weights: the product in the adapter's dtype
            out = flat_result + torch.addmm(zero, h, b_cat_t, beta=0, alpha=scaling).to(flat_result.dtype)
        ctx.save_for_backward(x2, h, a_cat, b_cat_t, backward_index, keep, zero)
        ctx.sizes, ctx.scaling, ctx.x_shape = [packed_a.numel(), packed_b.numel()], scaling, x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, h, a_cat, b_cat_t, backward_index, keep, zero = ctx.saved_tensors
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_a = grad_b = None
        if need_x or need_a or need_b:
            g2 = grad.reshape(-1, b_cat_t.shape[1])
            if g2.dtype != h.dtype:
                g2 = g2.to(h.dtype)
            grad_h = torch.addmm(zero, g2, b_cat_t.t(), beta=0, alpha=ctx.scaling)  # beta=0: zero is never read
            if need_x:
                grad_x = torch.mm(grad_h, a_cat).view(ctx.x_shape)
            if need_a or need_b:  # both GEMMs write into one buffer: the gather needs no cat
                (a_rows, a_cols), b_rows = a_cat.shape, b_cat_t.shape[1]
                flat = torch.empty(a_cat.numel() + b_cat_t.numel(), dtype=h.dtype, device=h.device)
                torch.mm(grad_h.t(), x2, out=flat.as_strided((a_rows, a_cols), (a_cols, 1)))
                torch.addmm(zero, g2.t(), h, beta=0, alpha=ctx.scaling,
                            out=flat.as_strided((b_rows, a_rows), (a_rows, 1), a_cat.numel()))
                grad_a, grad_b = _gather_back(backward_index, keep, ctx.sizes, flat)
        return (grad if need_result else None, grad_x, grad_a, grad_b, None, None, None, None, None, None)


class MaskedFactor:
    """One factor shared by d masked copies, stored packed (union entries only).

    ``concat_rows=True`` stacks the copies along the rows (the down factor A -> d*k x n_in),
    ``False`` along the columns (the up factor B -> n_out x d*k): exactly the operands of one
    rank-d*k product. The gather tables are built once and cached per device; masks are plain
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
        self._union_index = self.union.reshape(-1).nonzero().squeeze(1)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def layout_shape(self) -> tuple[int, int]:
        rows, cols = self.shape
        d = self.spec.num_copies
        return (d * rows, cols) if self.concat_rows else (rows, d * cols)

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

    def gather_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CPU tables of :class:`_GatherTables` for this factor alone (built on demand, not kept)."""
        d, numel = self.spec.num_copies, self.numel
        flat_masks = self.masks.reshape(d, numel)
        pos = torch.cumsum(self.union.reshape(-1).long(), 0) - 1  # packed position of each union entry
        gather = torch.where(flat_masks, pos, self.numel_union)  # sentinel -> the appended zero
        # layout position of every (copy, entry), to send each copy's gradient back to its packed entry
        where = torch.empty(d * numel, dtype=torch.long)
        where[self._layout(torch.arange(d * numel).view(d, *self.shape)).reshape(-1)] = torch.arange(d * numel)
        member = flat_masks[:, self._union_index]  # (d, n_union): which copies hold each entry
        order = torch.argsort((~member).to(torch.uint8), dim=0, stable=True)  # holders first
        return (
            self._layout(gather.view(d, *self.shape)).reshape(-1),
            where.view(d, numel)[order, self._union_index],
            member.gather(0, order)[1:],
        )

    @functools.cached_property
    def tables(self) -> "_GatherTables":
        """Tables for gathering this factor on its own (a pair gathers both factors in one op instead)."""
        return _GatherTables(*self.gather_parts())

    def cat(self, packed: torch.Tensor, training: bool = False) -> torch.Tensor:
        """The d masked copies side by side, from the packed values (differentiable)."""
        if self.spec.mode == "dropout":
            dense = packed.reshape(self.shape)
            stacked = dense.unsqueeze(0).expand(self.spec.num_copies, *self.shape)
            if training and self.spec.density < 1.0:
                keep = torch.rand(stacked.shape, device=packed.device) < self.spec.density
                stacked = stacked * keep.to(packed.dtype) / self.spec.density  # inverted dropout: eval needs no mask
            return self._layout(stacked)
        tables = self.tables.on(packed.device, packed.dtype)
        return _MaskedGather.apply(*tables, (self.layout_shape,), packed)[0]


def warn_dense_copies(spec: MaskSpec) -> None:
    if spec.num_copies > 1 and spec.density == 1.0 and spec.mode != "dropout":
        warnings.warn(
            f"num_copies={spec.num_copies} with mask_density=1.0: all copies coincide, so CapaBoost reduces to the "
            f"base method with its output scaled by {spec.num_copies}; use mask_density < 1 to raise the rank.",
            UserWarning,
            stacklevel=3,
        )


def linear_init(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's weight init (kaiming-uniform, a=√5), in place."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


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
        self.shapes = (self.A.layout_shape, self.B.layout_shape)
        self.tables: Optional[_GatherTables] = None  # dropout masks are drawn per step: no tables
        if spec.mode != "dropout":
            self.tables = _GatherTables.join(
                [self.A.gather_parts(), self.B.gather_parts()], [self.A.numel_union, self.B.numel_union],
                [spec.num_copies * self.A.numel, spec.num_copies * self.B.numel],
            )

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.name}|{self.A.digest}|{self.B.digest}".encode()).hexdigest()[:16]

    def init_packed(
        self, init_b: Optional[Callable[[torch.Tensor], object]] = None, device=None, dtype=None,
    ) -> tuple[nn.Parameter, nn.Parameter]:
        """The packed (A, B) parameters of a dense init: A as nn.Linear's weight, B zero (None) or ``init_b``'s draw.

        A is drawn before B, so a seeded model draws the same values whatever the method.
        """
        dense_a = linear_init(torch.empty(self.A.shape, device=device, dtype=dtype))
        dense_b = torch.zeros(self.B.shape, device=device, dtype=dtype)
        if init_b is not None:
            init_b(dense_b)
        return nn.Parameter(self.A.pack(dense_a)), nn.Parameter(self.B.pack(dense_b))

    def cat(self, packed_a: torch.Tensor, packed_b: torch.Tensor, training: bool = False) -> tuple[torch.Tensor, ...]:
        """(A_cat, B_cat): the operands of the one rank-d*k product, both from ONE gather (one backward too)."""
        if self.spec.mode == "dropout":
            return self.A.cat(packed_a, training), self.B.cat(packed_b, training)
        tables = self.tables.on(packed_a.device, packed_a.dtype)
        return _MaskedGather.apply(*tables, self.shapes, packed_a, packed_b)

    def add_lowrank(
        self, result: torch.Tensor, x: torch.Tensor, packed_a: torch.Tensor, packed_b: torch.Tensor,
        scaling: float, training: bool = False,
    ) -> torch.Tensor:
        """``result + scaling * x A_catᵀ B_catᵀ`` (LoRA's update, all d copies in one rank-d*k product).

        Static masks take one fused autograd node; dropout masks and autocast (whose casts the
        fused backward would not replay) take the composite path through :meth:`cat`.
        """
        if self.spec.mode == "dropout" or torch.is_autocast_enabled(x.device.type):
            a_cat, b_cat = self.cat(packed_a, packed_b, training)
            h = F.linear(x, a_cat)
            if result.dtype != h.dtype:
                return result + (F.linear(h, b_cat) * scaling).to(result.dtype)
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b_cat.t(), alpha=scaling)
            return flat.view(result.shape)
        tables = self.tables.on(packed_a.device, packed_a.dtype)
        return _MaskedLowRank.apply(result, x, packed_a, packed_b, *tables, self.shapes, scaling)

    def bottleneck(
        self, x: torch.Tensor, packed_a: torch.Tensor, packed_b: torch.Tensor, bias_a: torch.Tensor,
        bias_b: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor], training: bool = False,
    ) -> torch.Tensor:
        """``up_cat(f(down_cat(x) + b_down)) + b_up``: the masked MLP, one product each way (b_down shared by the copies)."""
        a_cat, b_cat = self.cat(packed_a, packed_b, training)
        hidden = activation(F.linear(x, a_cat, bias_a.repeat(self.spec.num_copies)))
        return F.linear(hidden, b_cat, bias_b)

    def delta(self, packed_a: torch.Tensor, packed_b: torch.Tensor) -> torch.Tensor:
        """Σ_i (B⊙m_Bi)(A⊙m_Ai) = B_cat @ A_cat (n_out x n_in), at eval (no dropout masks)."""
        a_cat, b_cat = self.cat(packed_a, packed_b)
        return b_cat @ a_cat
