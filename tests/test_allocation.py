"""Per-module (num_copies, r) by pattern, and the budgeted allocator."""

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertForSequenceClassification

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig, parameter_counts
from capaboost.allocation import (
    AllocationError,
    allocate,
    assign,
    check_patterns,
    describe,
    module_shapes,
    sensitivity,
    union_count,
)
import helpers

TARGETS = ["query", "value", "intermediate.dense"]


def tiny_bert() -> BertForSequenceClassification:
    return helpers.tiny_bert(num_attention_heads=2, max_position_embeddings=32, num_labels=2).eval()


def config(**kw) -> CapaBoostLoraConfig:
    base = dict(r=2, lora_alpha=4, target_modules=TARGETS, num_copies=2, mask_density=0.5, mask_seed=1)
    return CapaBoostLoraConfig(**{**base, **kw})


def batches(n: int = 3, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (4, 12), generator=gen),
             "labels": torch.randint(0, 2, (4,), generator=gen)} for _ in range(n)]


def test_patterns_set_copies_density_rank_and_reload_bit_identically(tmp_path):
    cfg = config(
        init_lora_weights=False,
        rank_pattern={r"layer\.0\.attention\.self\.query": 4},
        copies_pattern={r"layer\.1\..*value": 3, "intermediate.dense": 1},
        density_pattern={r"layer\.1\..*value": 0.25},
    )
    model = get_peft_model(tiny_bert(), cfg).eval()
    pairs = {m.capaboost_name: m.capaboost_pairs["default"] for m in model.modules() if hasattr(m, "capaboost_pairs")}
    q0, v1, v0 = (pairs[f"bert.encoder.layer.{i}.attention.self.{n}"] for i, n in [(0, "query"), (1, "value"), (0, "value")])
    assert (q0.k, q0.spec.num_copies, q0.spec.density) == (4, 2, 0.5)
    assert (v1.k, v1.spec.num_copies, v1.spec.density) == (2, 3, 0.25)
    assert (v0.k, v0.spec.num_copies, v0.spec.density) == (2, 2, 0.5)
    assert pairs["bert.encoder.layer.1.intermediate.dense"].spec.num_copies == 1
    ids = batches(1)[0]["input_ids"]
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    loaded = reloaded.peft_config["default"]
    for field in ("rank_pattern", "copies_pattern", "density_pattern", "alpha_pattern"):
        assert getattr(loaded, field) == getattr(cfg, field)
    assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_assign_follows_importance_and_never_exceeds_budget():
    cfg = config()
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}
    budget = 3 * 2 * 128 * 6  # room for ~ d*r = 12 per module on average
    alloc = assign(shapes, {"a": 6.0, "b": 3.0, "c": 1.0}, cfg, budget)
    ranks = {n: d * r for n, (d, r) in alloc.items()}
    assert ranks["a"] > ranks["b"] > ranks["c"] >= 2
    assert 1.5 <= ranks["a"] / ranks["b"] <= 2.5 and 2 <= ranks["b"] / ranks["c"] <= 4  # ~ importance ratios
    from capaboost.packing import MaskedPair

    spent = sum(
        MaskedPair(cfg._spec(d, 0.5), n, r, *shapes[n]).A.numel_union
        + MaskedPair(cfg._spec(d, 0.5), n, r, *shapes[n]).B.numel_union
        for n, (d, r) in alloc.items()
    )
    assert budget - 2 * 128 < spent <= budget  # nothing left that would fit one more rank


def test_assign_may_raise_copies_from_the_allowed_set():
    alloc = assign({"a": (64, 64), "b": (64, 64)}, {"a": 5.0, "b": 1.0}, config(), 1500, copies=(1, 2, 4))
    assert {d for d, _ in alloc.values()} <= {1, 2, 4}
    assert alloc["a"][0] * alloc["a"][1] > alloc["b"][0] * alloc["b"][1]


def test_budget_below_one_rank_per_module_is_refused():
    shapes = {"a": (64, 64), "b": (64, 64)}
    with pytest.raises(AllocationError, match="below one rank per module.*2 adapted modules need"):
        assign(shapes, {"a": 1.0, "b": 1.0}, config(), budget=100)
    assert issubclass(AllocationError, ValueError)


def test_pattern_naming_an_unsupported_or_missing_layer_is_refused():
    model = get_peft_model(tiny_bert(), config())
    adapted = list(module_shapes(model))
    base = model.get_base_model()
    with pytest.raises(AllocationError, match=r"LayerNorm.*cannot adapt"):
        check_patterns(base, config(copies_pattern={r"attention\.output\.LayerNorm": 3}), adapted)
    with pytest.raises(AllocationError, match=r"'key'.*not in target_modules"):
        check_patterns(base, config(rank_pattern={"key": 4}), adapted)
    with pytest.raises(AllocationError, match=r"'quer'.*matches no module"):
        check_patterns(base, config(density_pattern={"quer": 0.25}), adapted)
    check_patterns(base, config(rank_pattern={"query": 4}), adapted)  # a valid key passes


def test_sensitivity_scores_every_module_and_leaves_base_weights_alone():
    base = tiny_bert()
    before = {n: p.clone() for n, p in base.named_parameters()}
    scores = sensitivity(base, config(), batches(3))
    assert set(scores) == set(module_shapes(get_peft_model(tiny_bert(), config())))
    assert all(s > 0 for s in scores.values())
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # deep-copied, untouched


def test_allocate_end_to_end_within_the_uniform_budget(tmp_path):
    uniform = config(r=2)
    budget = union_count(tiny_bert, uniform)
    allocated = allocate(tiny_bert, uniform, budget, batches(3), copies=(1, 2, 3))
    names = list(module_shapes(get_peft_model(tiny_bert(), uniform)))
    assert sorted(allocated.rank_pattern) == sorted(re.escape(n) for n in names)
    table = describe(allocated, names)
    assert len(set(table.values())) > 1  # not the uniform allocation
    model = get_peft_model(tiny_bert(), allocated)
    assert parameter_counts(model)["union"] <= budget
    for name, (d, r) in table.items():  # alpha follows r: scaling stays lora_alpha / r of the base config
        assert allocated.rank_and_alpha(name) == (r, r * 2.0)
    model.save_pretrained(tmp_path)
    assert PeftModel.from_pretrained(tiny_bert(), tmp_path).peft_config["default"].copies_pattern == allocated.copies_pattern


def test_allocate_refuses_tiny_budget_and_bad_input():
    with pytest.raises(AllocationError, match="below one rank per module"):
        allocate(tiny_bert, config(), 10, batches(1), importance={})
    with pytest.raises(AllocationError, match="positive integer"):
        allocate(tiny_bert, config(), 0, batches(1))
    with pytest.raises(AllocationError, match="empty"):
        allocate(tiny_bert, config(), 10_000, [])
