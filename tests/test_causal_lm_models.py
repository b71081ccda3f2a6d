"""CapaBoost-LoRA on decoder models: GPT-2's fused Conv1D c_attn and LLaMA's q/k/v/o/gate/up/down."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from capaboost import CapaBoostLoraConfig, delta_ranks, parameter_counts
from capaboost.adapter import CapaBoostAdapterConfig
from capaboost.lora import CapaBoostLoraLayer
import helpers

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



def tiny_gpt2() -> GPT2LMHeadModel:
    return helpers.tiny_gpt2(vocab_size=50, n_positions=32, n_head=2, **helpers.GPT2_NO_DROPOUT, bos_token_id=0,
                             eos_token_id=1, pad_token_id=1).eval()


def tiny_llama() -> LlamaForCausalLM:
    return helpers.tiny_llama(vocab_size=50, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1).eval()


CASES = {
    "gpt2": (tiny_gpt2, ["c_attn"]),
    "llama": (tiny_llama, LLAMA_TARGETS),
}


def wrap(name: str, **kwargs):
    build, targets = CASES[name]
    config = CapaBoostLoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                                 task_type="CAUSAL_LM", **kwargs)
    return get_peft_model(build(), config).eval()


def greedy(model, ids, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              use_cache=use_cache, pad_token_id=1, eos_token_id=None)


@pytest.mark.parametrize("name", CASES)
def test_wraps_every_target_and_trains(name):
    model = wrap(name)
    layers = [m for m in model.modules() if isinstance(m, CapaBoostLoraLayer)]
    assert len(layers) == len(CASES[name][1]) * 2  # every target in both layers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".cblora_" in n}
    ranks = delta_ranks(model)
    assert set(ranks.values()) == {4}  # d * r = 2 * 2 for every module, at union-sized storage
    assert parameter_counts(model)["ratio"] < 1
    ids = torch.randint(2, 50, (2, 7))
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".cblora_" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_gpt2_conv1d_uses_fan_in_fan_out_and_merges_exactly():
    model = wrap("gpt2")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer.get_base_layer(), Conv1D) and layer.fan_in_fan_out
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.get_base_layer().weight.shape == (32, 96)  # Conv1D stores (in, out)
    x = torch.randn(3, 32)
    a_cat, b_cat = layer.cat_factors("default")
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * (x @ a_cat.t() @ b_cat.t())
    torch.testing.assert_close(layer(x), expected)
    before = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.get_base_layer().weight, before + delta)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_generate_merged_unmerged_with_and_without_cache(name):
    model = wrap(name)
    ids = torch.randint(2, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    unmerged_cache, unmerged_nocache = greedy(model, ids, True), greedy(model, ids, False)
    assert unmerged_cache.shape == (2, 11)
    assert torch.equal(unmerged_cache, unmerged_nocache)  # KV cache unaffected
    with torch.no_grad():
        logits_unmerged = model(input_ids=unmerged_cache).logits
    model.merge_adapter()
    merged_cache, merged_nocache = greedy(model, ids, True), greedy(model, ids, False)
    with torch.no_grad():
        logits_merged = model(input_ids=unmerged_cache).logits
    assert torch.equal(merged_cache, unmerged_cache) and torch.equal(merged_nocache, unmerged_cache)
    torch.testing.assert_close(logits_merged, logits_unmerged, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    assert torch.equal(greedy(model, ids, True), unmerged_cache)  # unmerge restores the unmerged model
    with model.disable_adapter(), torch.no_grad():
        logits_base = model(input_ids=unmerged_cache).logits
    assert not torch.allclose(logits_base, logits_unmerged, atol=1e-3)  # the adapter does change the model


@pytest.mark.parametrize("name", CASES)
def test_incremental_decoding_matches_full_forward(name):
    """Logits of the last token through the KV cache == those of a full forward pass."""
    model = wrap(name)
    ids = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_merge_and_unload_keeps_generations(name):
    model = wrap(name)
    ids = torch.randint(2, 50, (2, 4), generator=torch.Generator().manual_seed(5))
    expected = greedy(model, ids, True)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, CapaBoostLoraLayer) for m in merged.modules())
    assert torch.equal(greedy(merged, ids, True), expected)


@pytest.mark.parametrize("style", ["pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("name", CASES)
def test_capaboost_adapters_generate_on_decoders(name, style):
    config = CapaBoostAdapterConfig(style=style, bottleneck=4, init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(CASES[name][0](), config).eval()
    ids = torch.randint(2, 50, (2, 5), generator=torch.Generator().manual_seed(6))
    cached = greedy(model, ids, True)
    assert torch.equal(cached, greedy(model, ids, False))  # KV cache unaffected
    with torch.no_grad():
        full = model(input_ids=cached).logits
        prefix = model(input_ids=cached[:, :-1], use_cache=True)
        step = model(input_ids=cached[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
        with model.disable_adapter():
            base = model(input_ids=cached).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, full, atol=1e-3)  # the adapters are in the decoding path
