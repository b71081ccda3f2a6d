"""trainable_token_indices: CapaBoost-LoRA trains selected embedding rows exactly as PEFT's LoRA does.

The rows are PEFT's own TrainableTokensWrapper (no masks), set up by BaseTuner.inject_adapter for any tuner; these
tests pin that CapaBoost inherits it whole: the d=1/s=1 model equals PEFT LoRA step for step, only the chosen rows
move, the adapter file holds those rows and not the embedding, and save/load, merge_and_unload and unload agree with
the adapted forward, untied (Llama) and with an lm_head tied to the embedding (GPT-2).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils.other import TrainableTokensWrapper
from safetensors.torch import load_file

import capaboost  # noqa: F401  (registers the method)
from capaboost import CapaBoostLoraConfig, export_as_lora
from capaboost.lora import CapaBoostLoraLayer
import helpers

NEW = [3, 5, 97]  # e.g. the ids of added tokens
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
IDS[0, 2:5] = torch.tensor(NEW)  # every selected row gets a gradient, untied or tied
VOCAB, DIM = 100, 32
# kind -> (base model builder, embedding name, target_modules, fan_in_fan_out); gpt2's lm_head is tied to wte
MODELS = {
    "llama": (lambda: helpers.tiny_llama(tie_word_embeddings=False).eval(), "embed_tokens", ["q_proj", "v_proj"], False),
    "gpt2": (lambda: helpers.tiny_gpt2(**helpers.GPT2_NO_DROPOUT).eval(), "wte", ["c_attn"], True),
}


def base(kind: str) -> torch.nn.Module:
    return MODELS[kind][0]()


def tokens(kind: str, form: str):
    return NEW if form == "list" else {MODELS[kind][1]: NEW}


def cb_config(kind: str, form: str = "dict", d: int = 2, s: float = 0.5, **kw) -> CapaBoostLoraConfig:
    _, _, targets, fan = MODELS[kind]
    kw = {"trainable_token_indices": tokens(kind, form), **kw}
    return CapaBoostLoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan, num_copies=d,
                               mask_density=s, init_lora_weights=False, task_type="CAUSAL_LM", **kw)


def perturb_rows(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the trainable rows a visible change (they start as copies of the base rows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=gen))


def sgd_step(model: torch.nn.Module, lr: float = 0.5) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def table(module: torch.nn.Module) -> torch.Tensor:
    """The rows an embedding (or a Linear lm_head, as vocab x dim) currently uses, wrapper included."""
    with torch.no_grad():
        if isinstance(getattr(module, "original_module", module), torch.nn.Embedding):
            return module(torch.arange(VOCAB)).clone()
        return module(torch.eye(DIM)).t().clone()


def trained_model(kind: str, form: str = "dict") -> torch.nn.Module:
    model = get_peft_model(base(kind), cb_config(kind, form))
    perturb_rows(model)
    sgd_step(model)
    return model


@pytest.mark.parametrize("form", ["list", "dict"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_d1_s1_equals_peft_lora(kind, form):
    _, _, targets, fan = MODELS[kind]
    lora = get_peft_model(base(kind), LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan,
                                                 init_lora_weights=False, trainable_token_indices=tokens(kind, form),
                                                 task_type="CAUSAL_LM"))
    cb = get_peft_model(base(kind), cb_config(kind, form, d=1, s=1.0))
    lora_layers = [m for n, m in lora.named_modules() if n.endswith(tuple(targets))]
    cb_layers = [m for m in cb.modules() if isinstance(m, CapaBoostLoraLayer)]
    assert len(cb_layers) == len(lora_layers) > 0
    with torch.no_grad():
        for lora_layer, cb_layer in zip(lora_layers, cb_layers):
            cb_layer.cblora_A["default"].copy_(lora_layer.lora_A["default"].weight.reshape(-1))
            cb_layer.cblora_B["default"].copy_(lora_layer.lora_B["default"].weight.reshape(-1))
    perturb_rows(lora), perturb_rows(cb)

    def rows(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens" in n}

    assert {n: p.shape for n, p in rows(cb).items()} == {n: p.shape for n, p in rows(lora).items()}
    assert [p.shape for p in rows(cb).values()] == [torch.Size([len(NEW), DIM])]  # tied lm_head: no second copy
    torch.testing.assert_close(cb(IDS).logits, lora(IDS).logits, rtol=0, atol=1e-6)
    sgd_step(lora), sgd_step(cb)
    for (name, want), got in zip(rows(lora).items(), rows(cb).values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(cb(IDS).logits, lora(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_step_changes_only_the_selected_rows(kind):
    model = get_peft_model(base(kind), cb_config(kind))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, TrainableTokensWrapper)
    assert isinstance(head, TrainableTokensWrapper) == (kind == "gpt2")  # the tied lm_head follows the rows
    base_weight = embedding.token_adapter.get_base_layer().weight.detach().clone()
    before, head_before = table(embedding), table(head)
    adapted = {n: p.detach().clone() for n, p in model.named_parameters() if "cblora_" in n}
    sgd_step(model)
    after, head_after = table(embedding), table(head)
    others = [i for i in range(VOCAB) if i not in NEW]
    assert torch.equal(after[others], before[others])
    assert all(not torch.equal(after[i], before[i]) for i in NEW)
    assert torch.equal(embedding.token_adapter.get_base_layer().weight, base_weight)  # the base is never written
    if kind == "gpt2":
        assert torch.equal(head_after, after)  # still tied
    else:
        assert torch.equal(head_after, head_before)
    assert all(not torch.equal(p, adapted[n]) for n, p in model.named_parameters() if "cblora_" in n)


@pytest.mark.parametrize("form", ["list", "dict"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_save_load_stores_only_the_rows(kind, form, tmp_path):
    model = trained_model(kind, form)
    out = model(IDS).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    row_keys = [k for k in saved if "trainable_tokens" in k]
    assert len(row_keys) == 1 and saved[row_keys[0]].shape == (len(NEW), DIM)
    assert not [k for k, v in saved.items() if VOCAB in v.shape]  # no whole embedding, no lm_head
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == tokens(kind, form)
    loaded = PeftModel.from_pretrained(base(kind), tmp_path).eval()
    assert torch.equal(loaded(IDS).logits, out)
    assert torch.equal(table(loaded.get_input_embeddings()), table(model.get_input_embeddings()))


@pytest.mark.parametrize("kind", list(MODELS))
def test_merge_and_unload_equals_the_adapted_forward(kind):
    model = trained_model(kind)
    out, rows = model(IDS).logits, table(model.get_input_embeddings())
    merged = model.merge_and_unload()
    embedding = merged.get_input_embeddings()
    assert type(embedding) is torch.nn.Embedding and torch.equal(embedding.weight, rows)
    if kind == "gpt2":
        assert merged.lm_head.weight is embedding.weight
    torch.testing.assert_close(merged(IDS).logits, out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_unload_gives_back_the_base_model(kind):
    model = trained_model(kind)
    unloaded = model.unload()
    assert not any(isinstance(m, (TrainableTokensWrapper, CapaBoostLoraLayer)) for m in unloaded.modules())
    assert torch.equal(unloaded(IDS).logits, base(kind)(IDS).logits)


def test_mixed_adapter_batch_uses_each_rows_adapter():
    model = get_peft_model(base("llama"), cb_config("llama"))
    model.add_adapter("other", cb_config("llama", mask_seed=1, trainable_token_indices={"embed_tokens": [3, 7]}))
    perturb_rows(model, seed=2)
    model.eval()
    mixed = model(IDS, adapter_names=["default", "other"]).logits
    for row, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        assert torch.equal(mixed[row], model(IDS).logits[row])
    assert not torch.equal(mixed[0], mixed[1])


def test_bad_indices_are_refused_by_name(tmp_path):
    for value in ([], {"embed_tokens": []}, [1, "2"], [-1], {"embed_tokens": 3}, 5):
        with pytest.raises(ValueError, match=r"trainable_token_indices=.*non-empty list of token ids"):
            cb_config("llama", trainable_token_indices=value)
    with pytest.raises(ValueError, match="embed_tokenz"):
        get_peft_model(base("llama"), cb_config("llama", trainable_token_indices={"embed_tokenz": NEW}))
    cb_config("llama").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "trainable_token_indices": []}))
    with pytest.raises(ValueError, match="trainable_token_indices"):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", list(MODELS))
def test_export_carries_the_rows_over(kind, tmp_path):
    model = trained_model(kind)
    out = model(IDS).logits
    exported = export_as_lora(model)
    assert exported.peft_config["default"].trainable_token_indices == tokens(kind, "dict")
    torch.testing.assert_close(exported(IDS).logits, out, rtol=0, atol=1e-5)
    exported.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(kind), tmp_path).eval()
    torch.testing.assert_close(loaded(IDS).logits, out, rtol=0, atol=1e-5)
