"""CapaBoost bottleneck adapters: reference equality, placement, accounting, save/load, Trainer, errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import transformers as T
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import capaboost
from capaboost.adapter import AdapterMergeError, CapaBoostAdapterConfig, CapaBoostAdapterLayer, UnknownArchitectureError
import helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T.logging.set_verbosity_error()
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


def tiny(arch: str) -> nn.Module:
    if arch == "bert":
        return helpers.tiny_bert(**SMALL).eval()
    if arch == "vit":
        return helpers.tiny_vit(image_size=8, patch_size=4, num_labels=3, **SMALL).eval()
    if arch == "gpt2":
        return helpers.tiny_gpt2(n_head=2, bos_token_id=0, eos_token_id=0).eval()
    if arch == "llama":
        return helpers.tiny_llama(**SMALL).eval()
    torch.manual_seed(0)
    if arch == "roberta":
        return T.RobertaModel(T.RobertaConfig(vocab_size=100, **SMALL)).eval()
    if arch == "deberta-v2":
        return T.DebertaV2Model(T.DebertaV2Config(vocab_size=100, **SMALL)).eval()
    raise KeyError(arch)


def batch(arch: str, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(0, 100, (n, 6), generator=g)}


def task(arch: str) -> str:
    return {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}.get(arch)


def wrap(arch: str, adapter_name: str = "default", **kwargs) -> PeftModel:
    kwargs.setdefault("bottleneck", 4)
    modules_to_save = ["classifier"] if arch == "vit" else None
    cfg = CapaBoostAdapterConfig(task_type=task(arch), modules_to_save=modules_to_save, **kwargs)
    return get_peft_model(tiny(arch), cfg, adapter_name=adapter_name)


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def layers(model: nn.Module) -> dict[str, CapaBoostAdapterLayer]:
    return {m.capaboost_name: m for m in model.modules() if isinstance(m, CapaBoostAdapterLayer)}


# Expected sites, written out by hand (independent of the placement table under test).
SITES = {
    ("bert", "pfeiffer"): ["bert.encoder.layer.{i}.output.dense"],
    ("bert", "houlsby"): ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
    ("bert", "parallel"): ["bert.encoder.layer.{i}.output.dense"],
    ("roberta", "houlsby"): ["encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"],
    ("deberta-v2", "houlsby"): ["encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"],
    ("vit", "houlsby"): ["vit.layers.{i}.attention.o_proj", "vit.layers.{i}.mlp"],
    ("gpt2", "houlsby"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp"],
    ("gpt2", "parallel"): ["transformer.h.{i}.mlp"],
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp"],
}
FFN_INPUT = {"bert": "bert.encoder.layer.{i}.intermediate", "gpt2": "transformer.h.{i}.mlp"}


@pytest.mark.parametrize("arch,style", sorted(SITES))
def test_sites_per_architecture_and_init_is_a_no_op(arch, style):
    inputs = batch(arch)
    reference = logits(tiny(arch), inputs)
    model = wrap(arch, style=style).eval()
    expected = {site.format(i=i) for site in SITES[arch, style] for i in range(2)}
    assert set(layers(model)) == expected
    torch.testing.assert_close(logits(model, inputs), reference, rtol=0, atol=0)


def reference_adapters(model: PeftModel, arch: str, style: str, scaling: float) -> nn.Module:
    """The base model with hand-built plain adapters (nn.Linear, ReLU) on forward hooks, same weights."""
    ref = tiny(arch)  # same seed: the same base weights
    for name, layer in layers(model).items():
        pair = layer.capaboost_pairs["default"]
        down = nn.Linear(pair.A.shape[1], pair.A.shape[0])
        up = nn.Linear(pair.B.shape[1], pair.B.shape[0])
        with torch.no_grad():
            down.weight.copy_(pair.A.unpack(layer.cbadapter_A["default"]))
            down.bias.copy_(layer.cbadapter_bias_A["default"])
            up.weight.copy_(pair.B.unpack(layer.cbadapter_B["default"]))
            up.bias.copy_(layer.cbadapter_bias_B["default"])

        def adapter(h, down=down, up=up):
            return up(torch.relu(down(h)))

        site = ref.get_submodule(name)
        if style != "parallel":
            site.register_forward_hook(lambda m, args, out, f=adapter: out + f(out))
            continue
        stash = {}
        i = name.split(".")[3 if arch == "bert" else 2]
        ref.get_submodule(FFN_INPUT[arch].format(i=i)).register_forward_pre_hook(
            lambda m, args, stash=stash: stash.update(x=args[0])
        )
        site.register_forward_hook(lambda m, args, out, f=adapter, stash=stash: out + scaling * f(stash["x"]))
    return ref


@pytest.mark.parametrize(
    "arch,style", [("bert", "pfeiffer"), ("bert", "houlsby"), ("bert", "parallel"), ("gpt2", "parallel")]
)
def test_plain_adapter_equals_hand_built_reference(arch, style):
    model = wrap(arch, style=style, num_copies=1, mask_density=1.0, init_weights=False).eval()
    inputs = batch(arch)
    ref = reference_adapters(model, arch, style, scaling=4.0).eval()
    ours = logits(model, inputs)
    assert not torch.allclose(ours, logits(tiny(arch), inputs), atol=1e-4)  # the adapters do act
    torch.testing.assert_close(ours, logits(ref, inputs), rtol=1e-5, atol=1e-6)


def test_one_concatenated_product_equals_sum_of_masked_copies():
    model = wrap("bert", style="pfeiffer", num_copies=3, mask_density=0.4, init_weights=False).eval()
    layer = next(iter(layers(model).values()))
    pair = layer.capaboost_pairs["default"]
    x = torch.randn(5, pair.A.shape[1])
    down = pair.A.unpack(layer.cbadapter_A["default"])
    up = pair.B.unpack(layer.cbadapter_B["default"])
    b_a, b_b = layer.cbadapter_bias_A["default"], layer.cbadapter_bias_B["default"]
    copies = sum(
        torch.relu(x @ (down * pair.A.masks[i]).T + b_a) @ (up * pair.B.masks[i]).T for i in range(3)
    )
    torch.testing.assert_close(layer.adapter_output("default", x), copies + b_b)
    assert capaboost.delta_ranks(model)[layer.capaboost_name] == 12  # rank d*bottleneck of the linear part


def test_union_accounting_is_three_quarters_of_the_plain_adapter():
    plain = wrap("bert", style="houlsby", bottleneck=8, num_copies=1, mask_density=1.0)
    boosted = wrap("bert", style="houlsby", bottleneck=8, num_copies=2, mask_density=0.5)
    counts, plain_counts = capaboost.parameter_counts(boosted), capaboost.parameter_counts(plain)
    assert counts["dense"] == plain_counts["dense"] == plain_counts["union"]
    assert counts["union"] / plain_counts["union"] == pytest.approx(0.75, abs=0.03)
    biases = sum(8 + 32 for _ in layers(boosted))
    head = sum(p.numel() for n, p in boosted.named_parameters() if p.requires_grad and "classifier" in n)
    assert boosted.get_nb_trainable_parameters()[0] == counts["union"] + biases + head


def test_save_load_is_bit_identical_and_compact(tmp_path):
    model = wrap("bert", style="parallel", num_copies=2, mask_density=0.5, mask_seed=7, init_weights=False).eval()
    inputs = batch("bert")
    before = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    union = capaboost.parameter_counts(model)["union"]
    assert sum(v.numel() for k, v in saved.items() if "cbadapter_A" in k or "cbadapter_B" in k) == union
    loaded = PeftModel.from_pretrained(tiny("bert"), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], CapaBoostAdapterConfig)
    assert torch.equal(logits(loaded, inputs), before)
    # An edited seed regenerates other masks: refused instead of silently wrong.
    text = (tmp_path / "adapter_config.json").read_text().replace('"mask_seed": 7', '"mask_seed": 8')
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match="differ from those it was trained with"):
        PeftModel.from_pretrained(tiny("bert"), tmp_path)


def test_merge_is_refused_and_unload_returns_the_base():
    inputs = batch("bert")
    reference = logits(tiny("bert"), inputs)
    model = wrap("bert", style="parallel", init_weights=False).eval()
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(AdapterMergeError, match="nonlinear"):
            call()
    base = model.unload()
    assert not any(isinstance(m, CapaBoostAdapterLayer) for m in base.modules())
    assert not base.bert.encoder.layer[0].intermediate._forward_pre_hooks  # the FFN-input hook is gone
    torch.testing.assert_close(logits(base, inputs), reference, rtol=0, atol=0)


def test_multiple_adapters_switch_and_delete():
    model = wrap("gpt2", adapter_name="one", style="pfeiffer", init_weights=False).eval()
    model.add_adapter("two", CapaBoostAdapterConfig(style="parallel", bottleneck=4, init_weights=False, mask_seed=1))
    inputs = batch("gpt2")
    out_a = logits(model, inputs)
    model.set_adapter("two")
    out_b = logits(model, inputs)
    assert not torch.allclose(out_a, out_b)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), logits(tiny("gpt2"), inputs), rtol=0, atol=0)
    model.delete_adapter("one")
    assert all(list(m.capaboost_pairs) == ["two"] for m in layers(model).values())
    torch.testing.assert_close(logits(model, inputs), out_b)


def labelled(arch: str, n: int = 8) -> tuple[dict, torch.Tensor]:
    inputs = batch(arch, n)
    labels = {"bert": torch.arange(n) % 2, "vit": torch.arange(n) % 3, "gpt2": inputs.get("input_ids")}[arch]
    return inputs, labels


@pytest.mark.parametrize("arch", ["bert", "vit", "gpt2"])
@pytest.mark.parametrize("style", ["pfeiffer", "houlsby", "parallel"])
def test_forward_backward(arch, style):
    model = wrap(arch, style=style, num_copies=2, mask_density=0.5).train()
    inputs, labels = labelled(arch, n=4)
    model(**inputs, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "cbadapter_" in n}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".cbadapter_B." in n)  # up-projection learns first
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


# Trainer runs are slow on a shared CPU: every architecture and every style once.
@pytest.mark.parametrize("arch,style", [("bert", "pfeiffer"), ("vit", "houlsby"), ("gpt2", "parallel")])
def test_trainer_steps(arch, style, tmp_path):
    model = wrap(arch, style=style, num_copies=2, mask_density=0.5)
    inputs, labels = labelled(arch)
    rows = [{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in range(len(labels))]
    packed_before = {n: p.detach().clone() for n, p in model.named_parameters() if "cbadapter_" in n}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = T.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert trainer.state.global_step == 3
    changed = [n for n, p in model.named_parameters() if n in packed_before and not torch.equal(p, packed_before[n])]
    assert any(".cbadapter_B." in n for n in changed) and any(".cbadapter_A." in n for n in changed)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)


def test_explicit_placement_for_an_unknown_architecture():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, x):
            return x + self.ff(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    with pytest.raises(UnknownArchitectureError, match="adapter_placement="):
        get_peft_model(Net(), CapaBoostAdapterConfig(bottleneck=2))
    placement = {"layers": r"blocks\.\d+", "ffn": "ff"}
    model = get_peft_model(Net(), CapaBoostAdapterConfig(bottleneck=2, adapter_placement=placement, init_weights=False))
    assert set(layers(model)) == {"blocks.0.ff", "blocks.1.ff"}
    model(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "cbadapter_" in n)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bottleneck=0), "bottleneck must be an integer >= 1"),
        (dict(bottleneck=2.5), "bottleneck must be an integer >= 1"),
        (dict(style="sequential"), "style must be one of"),
        (dict(non_linearity="nope"), "non_linearity='nope' is unknown"),
        (dict(target_modules="query"), "pass adapter_placement"),
        (dict(style="houlsby", adapter_placement={"layers": "h", "ffn": "mlp"}), r"needs the keys \['attn'"),
        (dict(adapter_placement={"layers": "(", "ffn": "mlp"}), "not a valid regex"),
        (dict(mask_density=0.0), "mask_density must be in"),
    ],
)
def test_bad_config_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CapaBoostAdapterConfig(**kwargs)
