"""CapaBoost-DoRA (``use_dora=True``): PEFT's DoRA with the masked rank-d*r ΔW (issue 14 item 5).

Checked against PEFT's own ``LoraConfig(use_dora=True)`` at d=1, s=1 (factors and magnitude copied over: outputs,
gradients, ΔW and merged weights), and at d=2, s=0.5 against a dense reference written from the DoRA formula
``m ⊙ (W0 + s ΔW) / ||W0 + s ΔW||_row`` with ΔW = Σ_i (B⊙m_Bi)(A⊙m_Ai); then merge/unmerge, disable, two adapters,
mixed batches, save/load (PEFT's key ``lora_magnitude_vector``), export to stock PEFT DoRA, hotswap, and the refusals
(Embedding, Conv, quantized bases).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers.pytorch_utils import Conv1D

import capaboost  # noqa: F401  (registers the methods)
from capaboost import CapaBoostLoraConfig, export_as_lora
from capaboost.lora import CapaBoostLoraLayer
from capaboost.lora.hotswap import hotswap_adapter

D1 = dict(num_copies=1, mask_density=1.0)
D2 = dict(num_copies=2, mask_density=0.5)
X = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    """Two nn.Linear layers (bias on lin0, none on lin1) or two transformers Conv1D layers (fan_in_fan_out)."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = Conv1D(20, 10) if conv1d else nn.Linear(10, 20)
        self.lin1 = Conv1D(6, 20) if conv1d else nn.Linear(20, 6, bias=False)
        if conv1d:  # Conv1D starts with a zero bias and std 0.02 weights: make both matter
            with torch.no_grad():
                for layer in (self.lin0, self.lin1):
                    layer.weight.normal_()
                    layer.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def cb(conv1d: bool = False, setting: dict = D2, **kw) -> PeftModel:
    kw = {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "use_dora": True, **setting, **kw}
    if conv1d:
        kw["fan_in_fan_out"] = True
    return get_peft_model(MLP(conv1d), CapaBoostLoraConfig(**kw))


def layers(model: nn.Module) -> dict[str, CapaBoostLoraLayer]:
    return {m.capaboost_name: m for m in model.modules() if isinstance(m, CapaBoostLoraLayer)}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def train_one_step(model: PeftModel) -> None:
    """Move every trainable tensor (factors and magnitudes) off its init, so later checks see trained values."""
    model.train()
    model(X).pow(2).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.02 * p.grad / p.grad.pow(2).mean().sqrt().clamp_min(1e-12)  # ~0.02 per entry: m stays > 0
                p.grad = None
    model.eval()


# ------------------------------------------------------------------------------------------------ d=1, s=1: PEFT DoRA


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_d1_s1_equals_peft_dora(conv1d, dropout):
    kw = dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
              fan_in_fan_out=conv1d, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out for Conv1D
        lora = get_peft_model(MLP(conv1d), LoraConfig(**kw))
    model = get_peft_model(MLP(conv1d), CapaBoostLoraConfig(**kw, **D1))
    pairs = {}
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            peft_layer, layer = lora.base_model.model.get_submodule(name), model.base_model.model.get_submodule(name)
            pair = layer.capaboost_pairs["default"]
            layer.cblora_A["default"].copy_(pair.A.pack(peft_layer.lora_A["default"].weight))
            layer.cblora_B["default"].copy_(pair.B.pack(peft_layer.lora_B["default"].weight))
            # B is random: both magnitudes are ||W0 + s ΔW|| of the same factors at init
            close(layer.lora_magnitude_vector["default"], peft_layer.lora_magnitude_vector["default"].weight)
            peft_layer.lora_magnitude_vector["default"].weight.add_(torch.rand(layer.out_features))  # trained-like
            layer.lora_magnitude_vector["default"].copy_(peft_layer.lora_magnitude_vector["default"].weight)
            pairs[name] = peft_layer, layer
    assert model.get_nb_trainable_parameters() == lora.get_nb_trainable_parameters()
    # the same checkpoint keys: PEFT's lora_magnitude_vector, our packed factors in place of lora_A/lora_B
    keys = {k for k in get_peft_model_state_dict(model) if "magnitude" in k}
    assert keys == {k for k in get_peft_model_state_dict(lora) if "magnitude" in k} and len(keys) == 2

    lora.eval(), model.eval()
    out = lora(X)
    close(model(X), out)
    with lora.disable_adapter():
        assert not torch.allclose(lora(X), out, atol=1e-3)  # not vacuous

    lora.train(), model.train()
    torch.manual_seed(1)
    y_lora = lora(X)
    torch.manual_seed(1)
    y_cb = model(X)
    close(y_cb, y_lora)
    y_lora.pow(2).sum().backward()
    y_cb.pow(2).sum().backward()
    for peft_layer, layer in pairs.values():
        pair = layer.capaboost_pairs["default"]
        close(layer.cblora_A["default"].grad, pair.A.pack(peft_layer.lora_A["default"].weight.grad), 1e-5)
        close(layer.cblora_B["default"].grad, pair.B.pack(peft_layer.lora_B["default"].weight.grad), 1e-5)
        grad_m = layer.lora_magnitude_vector["default"].grad
        assert grad_m is not None and grad_m.abs().sum() > 0
        close(grad_m, peft_layer.lora_magnitude_vector["default"].weight.grad, 1e-5)
        close(layer.get_delta_weight("default"), peft_layer.get_delta_weight("default"))

    lora.eval(), model.eval()
    merged_lora, merged_cb = lora.merge_and_unload(), model.merge_and_unload()
    sd_lora, sd_cb = merged_lora.state_dict(), merged_cb.state_dict()
    assert sorted(sd_lora) == sorted(sd_cb)
    for key in sd_lora:
        close(sd_cb[key], sd_lora[key], 1e-5)
    close(merged_cb(X), out, 1e-5)


# ------------------------------------------------------------------------------------------------ d=2, s=0.5


def _reference(layer: CapaBoostLoraLayer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """DoRA written out densely: y = x W'ᵀ + b with W' = m ⊙ V / ||V||_row (norm detached), V = W0 + s ΔW."""
    pair, scaling = layer.capaboost_pairs[adapter], layer.scaling[adapter]
    a_cat, b_cat = pair.cat(layer.cblora_A[adapter], layer.cblora_B[adapter])
    base = layer.get_base_layer()
    w0 = base.weight.t() if layer.fan_in_fan_out else base.weight
    v = w0 + scaling * b_cat @ a_cat
    w = layer.lora_magnitude_vector[adapter].view(-1, 1) * v / v.norm(dim=1, keepdim=True).detach()
    return nn.functional.linear(x, w, base.bias)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_masked_dora_equals_the_dense_formula_with_its_gradients(conv1d):
    model = cb(conv1d, init_lora_weights=False)
    train_one_step(model)
    layer = layers(model)["lin0"]
    assert layer.capaboost_pairs["default"].spec.num_copies == 2
    x = torch.randn(5, 10)
    y = layer(x)
    ref = _reference(layer, x)
    close(y, ref, 1e-5)
    # gradients of factors and magnitude through the same (detached-norm) graph
    params = [layer.cblora_A["default"], layer.cblora_B["default"], layer.lora_magnitude_vector["default"]]
    g = torch.autograd.grad(y.pow(2).sum(), params)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), params)
    for actual, expected in zip(g, g_ref):
        close(actual, expected, 1e-4)
    # the plain CapaBoost-LoRA output differs once m is trained: DoRA is not a no-op
    assert not torch.allclose(y, layer.get_base_layer()(x) + layer.scaling["default"] *
                              nn.functional.linear(x, layer.get_delta_weight("default").t() if conv1d else
                                                   layer.get_delta_weight("default")), atol=1e-4)


def test_magnitude_init_and_union_sized_factors():
    plain = get_peft_model(MLP(), CapaBoostLoraConfig(target_modules=["lin0", "lin1"], r=4, **D2))
    model = cb()
    for name, layer in layers(model).items():
        twin = layers(plain)[name]
        assert layer.cblora_A["default"].shape == twin.cblora_A["default"].shape  # union-sized, as without DoRA
        assert layer.cblora_B["default"].shape == twin.cblora_B["default"].shape
        exact(layer.lora_magnitude_vector["default"], layer.get_base_layer().weight.norm(dim=1))  # B = 0: ||W0||
    extra = sum(layer.out_features for layer in layers(model).values())
    assert model.get_nb_trainable_parameters()[0] == plain.get_nb_trainable_parameters()[0] + extra
    model.eval()
    exact(model(X), MLP()(X))  # B = 0: the base model
    # init_lora_weights=False: m = ||W0 + s ΔW||, so at init DoRA equals the plain masked LoRA of the same factors
    dora, lora = cb(init_lora_weights=False).eval(), get_peft_model(MLP(), CapaBoostLoraConfig(
        target_modules=["lin0", "lin1"], r=4, lora_alpha=8, init_lora_weights=False, **D2)).eval()
    close(dora(X), lora(X), 1e-5)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_unmerge_disable_unload(conv1d):
    model = cb(conv1d, init_lora_weights=False)
    train_one_step(model)
    base_out = MLP(conv1d)(X)
    out = model(X)
    assert not torch.allclose(out, base_out, atol=1e-4)
    weights = {n: l.get_base_layer().weight.detach().clone() for n, l in layers(model).items()}
    with model.disable_adapter():
        exact(model(X), base_out)
    model.merge_adapter()
    close(model(X), out, 1e-5)
    with model.disable_adapter():  # unmerges
        close(model(X), base_out, 1e-5)
    model.merge_adapter(safe_merge=True)
    model.unmerge_adapter()
    for name, layer in layers(model).items():
        close(layer.get_base_layer().weight, weights[name], 1e-5)
    close(model(X), out, 1e-5)
    close(copy.deepcopy(model).unload()(X), base_out, 1e-5)  # the weights went through a merge/unmerge round trip
    close(model.merge_and_unload(safe_merge=True)(X), out, 1e-5)


def test_two_adapters_active_together_merge_like_their_forward_and_mix_with_plain_lora():
    model = cb(init_lora_weights=False)
    model.add_adapter("other", CapaBoostLoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8,
                                                   init_lora_weights=False, use_dora=True, mask_seed=1, **D2))
    model.add_adapter("plain", CapaBoostLoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False, **D2))
    model.base_model.set_adapter(["default", "other", "plain"])
    train_one_step(model)
    layer = layers(model)["lin0"]
    assert set(layer.lora_magnitude_vector) == {"default", "other"}  # "plain" has none: plain CapaBoost-LoRA
    outs = {}
    for adapter in ("default", "other", "plain"):
        model.base_model.set_adapter(adapter)
        outs[adapter] = model(X)
    assert not torch.allclose(outs["default"], outs["other"])
    model.base_model.set_adapter(["default", "other", "plain"])
    together = model(X)
    model.merge_adapter()  # PEFT's composition: each DoRA adapter rescales the weight merged before it
    close(model(X), together, 1e-5)
    model.unmerge_adapter()
    close(model(X), together, 1e-5)
    # only the active adapter trains, and deleting removes its magnitude
    model.base_model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    assert any("lora_magnitude_vector.other" in n for n in trainable)
    model.delete_adapter("other")
    assert "other" not in layer.lora_magnitude_vector and not any(".other" in k for k in model.state_dict())
    model.base_model.set_adapter("default")
    close(model(X), outs["default"], 1e-5)  # after a merge/unmerge round trip of the base weights


def test_mixed_batch_rows_use_their_own_dora_adapter():
    model = cb(init_lora_weights=False)
    model.add_adapter("other", CapaBoostLoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8,
                                                   init_lora_weights=False, use_dora=True, mask_seed=1, **D2))
    model.base_model.set_adapter(["default", "other"])
    train_one_step(model)
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    mixed = model(X, adapter_names=names)
    expected = {}
    for adapter in ("default", "other"):
        model.base_model.set_adapter(adapter)
        expected[adapter] = model(X)
    with model.disable_adapter():
        expected["__base__"] = model(X)
    for i, name in enumerate(names):
        close(mixed[i], expected[name][i], 1e-6)


def test_save_load_under_peft_key(tmp_path):
    model = cb(init_lora_weights=False)
    train_one_step(model)
    out = model(X)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k for k in saved if "magnitude" in k} == {f"base_model.model.{n}.lora_magnitude_vector" for n in ("lin0", "lin1")}
    loaded = PeftModel.from_pretrained(MLP(), tmp_path).eval()
    exact(loaded(X), out)
    for name, layer in layers(loaded).items():
        exact(layer.lora_magnitude_vector["default"], layers(model)[name].lora_magnitude_vector["default"])
    loaded.load_adapter(tmp_path, adapter_name="again")
    loaded.set_adapter("again")
    exact(loaded(X), out)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_export_as_lora_writes_stock_peft_dora(conv1d, tmp_path):
    model = cb(conv1d, init_lora_weights=False)
    train_one_step(model)
    out = model(X)
    mags = {n: l.lora_magnitude_vector["default"].detach().clone() for n, l in layers(model).items()}
    exported = export_as_lora(model).eval()
    config = exported.peft_config["default"]
    # alpha carries scale_by_density (on by default): lora_alpha / (d*s^2) = 16 / 0.5
    assert type(config) is LoraConfig and config.use_dora and config.r == 8 and config.lora_alpha == 32
    close(exported(X), out, 1e-5)
    for name, mag in mags.items():
        exact(exported.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight, mag)
    exported.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(MLP(conv1d), tmp_path).eval()
    close(reloaded(X), out, 1e-5)


def test_hotswap_swaps_factors_and_magnitudes(tmp_path):
    first, second = cb(init_lora_weights=False), cb(init_lora_weights=False)
    train_one_step(first)
    train_one_step(second)
    train_one_step(second)
    second.save_pretrained(tmp_path / "second")
    expected = second(X)
    hotswap_adapter(first, str(tmp_path / "second"))
    exact(first(X), expected)
    get_peft_model(MLP(), CapaBoostLoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, **D2)).save_pretrained(
        tmp_path / "plain")
    with pytest.raises(ValueError, match="use_dora"):
        hotswap_adapter(first, str(tmp_path / "plain"))


# ------------------------------------------------------------------------------------------------ refusals


class EmbConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(8, 8)


@pytest.mark.parametrize("target, kind", [("emb", "Embedding"), ("conv", "Conv2d")])
def test_dora_refused_on_embedding_and_conv(target, kind):
    with pytest.raises(ValueError, match=rf"use_dora=True \(DoRA\) to '{target}' of type torch\.nn\..*{kind}") as err:
        get_peft_model(EmbConv(), CapaBoostLoraConfig(target_modules=[target, "lin"], use_dora=True))
    assert "peft.LoraConfig(use_dora=True)" in str(err.value) and "exclude_modules" in str(err.value)
    # adding a DoRA adapter to an existing plain layer is refused the same way
    model = get_peft_model(EmbConv(), CapaBoostLoraConfig(target_modules=[target]))
    with pytest.raises(ValueError, match=r"use_dora=True \(DoRA\)"):
        model.add_adapter("dora", CapaBoostLoraConfig(target_modules=[target], use_dora=True))


@pytest.mark.parametrize("kind", [
    pytest.param("nf4", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bnb")),
    pytest.param("int8", marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="no torchao")),
])
def test_dora_refused_on_quantized_bases(kind):
    import helpers
    from capaboost.quantize import quantize_base

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_base(helpers.tiny_llama().eval(), kind)
        with pytest.raises(ValueError, match=r"use_dora=True \(DoRA\) to '.*q_proj' of type .*\((bitsandbytes 4-bit|torchao int8)\)"):
            get_peft_model(model, CapaBoostLoraConfig(target_modules=["q_proj"], use_dora=True))
