"""The mask generator: pinned stream, exact counts, N:M, modes, packing."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from capaboost.packing import MaskedFactor
from capaboost.masks import (
    MaskSpec,
    copy_masks,
    mask_key,
    masks_digest,
    parse_pattern,
    random_bits,
)

M64 = (1 << 64) - 1


def splitmix_reference(key: int, i: int) -> int:
    """Pure-Python SplitMix64 of counter key+i (no numpy): what every platform must reproduce."""
    z = ((key + i) & M64) * 0x9E3779B97F4A7C15 & M64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & M64
    return z ^ (z >> 31)


def test_stream_matches_pure_python_reference_including_wraparound():
    for key in (0, 12345, M64 - 2):
        assert random_bits(key, 5).tolist() == [splitmix_reference(key, i) for i in range(5)]


def test_golden_masks_pinned():
    # Any change of the stream, key derivation or selection rule must fail here (and bump GENERATOR_VERSION).
    assert mask_key(0, "bert.encoder.layer.0.attention.self.query", "A", 0) == 5481561111486551378
    q = "bert.encoder.layer.0.attention.self.query"
    assert masks_digest(copy_masks(MaskSpec(), q, "A", (8, 384))) == "4019b841dbdc82ea"
    assert masks_digest(copy_masks(MaskSpec(), q, "B", (384, 8))) == "1949b614ff02d6ec"
    assert masks_digest(copy_masks(MaskSpec(pattern="2:4"), "h.0.attn.c_attn", "A", (4, 64))) == "138ffa6fd61bb43a"
    spec = MaskSpec(num_copies=4, density=0.3, seed=7)
    assert masks_digest(copy_masks(spec, "x", "B", (16, 4))) == "322145415fe0c8af"


def test_masks_independent_of_torch_and_numpy_global_rng():
    a = copy_masks(MaskSpec(), "m", "A", (8, 64))
    torch.manual_seed(123)
    np.random.seed(7)
    torch.rand(100)
    assert torch.equal(a, copy_masks(MaskSpec(), "m", "A", (8, 64)))


def test_masks_identical_in_a_fresh_process():
    code = textwrap.dedent(
        """
        from capaboost.masks import MaskSpec, copy_masks, masks_digest
        print(masks_digest(copy_masks(MaskSpec(num_copies=3, density=0.4, seed=5), "enc.q", "A", (6, 40))))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    out = out.strip()
    assert out == masks_digest(copy_masks(MaskSpec(num_copies=3, density=0.4, seed=5), "enc.q", "A", (6, 40)))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.6, 0.9])
def test_exact_count_per_copy_and_distinct(density):
    masks = copy_masks(MaskSpec(num_copies=4, density=density), "m", "A", (7, 33))
    n = 7 * 33
    assert [int(m.sum()) for m in masks] == [int(np.floor(density * n + 0.5))] * 4
    for i in range(4):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j])


def test_key_components_change_the_mask():
    base = copy_masks(MaskSpec(), "m", "A", (8, 64))
    assert not torch.equal(base, copy_masks(MaskSpec(seed=1), "m", "A", (8, 64)))
    assert not torch.equal(base, copy_masks(MaskSpec(), "n", "A", (8, 64)))
    assert not torch.equal(base, copy_masks(MaskSpec(), "m", "B", (8, 64)))


def test_nm_pattern_keeps_n_of_every_m_along_input():
    masks = copy_masks(MaskSpec(density=0.5, pattern="2:4"), "m", "A", (8, 64))
    groups = masks.reshape(2, 8, 16, 4).sum(-1)
    assert torch.all(groups == 2)
    masks = copy_masks(MaskSpec(density=0.25, pattern="1:4"), "m", "B", (16, 8))
    assert torch.all(masks.reshape(2, 16, 2, 4).sum(-1) == 1)


def test_modes_same_and_dropout():
    same = copy_masks(MaskSpec(num_copies=3, mode="same"), "m", "A", (8, 32))
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])
    assert torch.all(copy_masks(MaskSpec(mode="dropout"), "m", "A", (8, 32)))


def test_packing_union_and_cat_layout():
    spec = MaskSpec(num_copies=2, density=0.5)
    fa = MaskedFactor(spec, "m", "A", (4, 12), concat_rows=True)
    fb = MaskedFactor(spec, "m", "B", (10, 4), concat_rows=False)
    dense_a, dense_b = torch.randn(4, 12), torch.randn(10, 4)
    pa, pb = fa.pack(dense_a), fb.pack(dense_b)
    assert pa.numel() == fa.numel_union == int(fa.union.sum())
    assert torch.equal(fa.unpack(pa), dense_a * fa.union)
    a_cat, b_cat = fa.cat(pa), fb.cat(pb)
    expected_a = torch.cat([dense_a * fa.masks[i] for i in range(2)], 0)
    expected_b = torch.cat([dense_b * fb.masks[i] for i in range(2)], 1)
    assert torch.equal(a_cat, expected_a) and torch.equal(b_cat, expected_b)
    # union fraction close to 1-(1-s)^d
    big = MaskedFactor(spec, "m", "A", (64, 256), concat_rows=True)
    assert abs(big.numel_union / big.numel - 0.75) < 0.01


def test_dropout_mode_is_unbiased_and_fresh():
    spec = MaskSpec(num_copies=2, density=0.5, mode="dropout")
    f = MaskedFactor(spec, "m", "A", (4, 8), concat_rows=True)
    packed = torch.ones(32)
    assert f.numel_union == 32
    assert torch.equal(f.cat(packed, training=False), torch.ones(8, 8))
    t1, t2 = f.cat(packed, training=True), f.cat(packed, training=True)
    assert not torch.equal(t1, t2)
    assert set(t1.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(density=0.0), "mask_density"),
        (dict(density=1.5), "mask_density"),
        (dict(num_copies=0), "num_copies"),
        (dict(mode="bogus"), "mask_mode"),
        (dict(pattern="2-4"), "malformed"),
        (dict(pattern="5:4", density=0.5), "N <= M"),
        (dict(pattern="2:4", density=0.3), "N/M"),
    ],
)
def test_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskSpec(**kwargs)


def test_nm_needs_m_dividing_input_dim():
    with pytest.raises(ValueError, match="must divide the input dimension"):
        MaskedFactor(MaskSpec(pattern="2:4"), "m", "A", (4, 30), concat_rows=True)


def test_too_small_for_distinct_masks():
    with pytest.raises(ValueError, match="distinct"):
        copy_masks(MaskSpec(num_copies=4, density=0.5), "m", "A", (1, 2))  # only 2 possible masks


def test_parse_pattern():
    assert parse_pattern("random") is None and parse_pattern("2:4") == (2, 4)
