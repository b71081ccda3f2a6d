"""CapaBoost-LoRA on quantized bases: bitsandbytes NF4 / FP4 / LLM.int8 and torchao int8 weight-only, all on CPU.

Bases are the tiny LLaMA of ``helpers.tiny_llama``, quantized either by ``quantize_base`` (in place) or the way
users load one: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...) / TorchAoConfig(...))``.
A backend's tests skip only when its package is not installed.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import helpers
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import capaboost  # noqa: F401  (registers the methods)
from capaboost import CapaBoostLoraConfig, export_as_lora
from capaboost.lora import quantized as Q
from capaboost.quantize import _torchao_tensor, quantize_base, storage_bytes
from capaboost.lora.layer import Linear

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed")
needs_torchao = pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao is not installed")
KINDS = [
    pytest.param("nf4", marks=needs_bnb),
    pytest.param("fp4", marks=needs_bnb),
    pytest.param("8bit", marks=needs_bnb),
    pytest.param("int8", marks=needs_torchao),
]
LAYER = {"nf4": Q.Linear4bit, "fp4": Q.Linear4bit, "8bit": Q.Linear8bitLt, "int8": Q.TorchaoLinear}
PEFT_LAYER = {"nf4": "Linear4bit", "fp4": "Linear4bit", "8bit": "Linear8bitLt", "int8": "TorchaoLoraLinear"}
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bnb's fp16 cast notice, the merge rounding warnings
        yield


def quantized_llama(kind: str, seed: int = 0):
    return quantize_base(helpers.tiny_llama(seed).eval(), kind)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    helpers.tiny_llama().save_pretrained(path)
    return str(path)


def loaded_llama(path: str, kind: str):
    """The user's route: transformers' own quantizer from a saved float checkpoint."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM, TorchAoConfig

    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        qc = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    elif kind == "8bit":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu", dtype=torch.float32).eval()


def cb_config(**kw):
    return CapaBoostLoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "num_copies": 2,
                                  "mask_density": 0.5, "mask_seed": 0, **kw})


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def randomize_b(model, scale: float = 0.2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "cblora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor as stored (bnb packed bytes, torchao int8 data), for 'nothing else changed'."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "cblora_" in name:
            continue
        inner = t.qdata if _torchao_tensor(t) else t.data
        out[name] = inner.detach().clone()
    return out


# ------------------------------------------------------------------ quantize_base


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_base_quantizes_the_blocks_and_keeps_the_head(kind):
    float_model = helpers.tiny_llama().eval()
    model = quantized_llama(kind)
    attn = model.model.layers[0].self_attn
    if kind == "int8":
        assert type(attn.q_proj) is torch.nn.Linear and _torchao_tensor(attn.q_proj.weight)
    else:
        import bitsandbytes as bnb

        assert isinstance(attn.q_proj, bnb.nn.Linear8bitLt if kind == "8bit" else bnb.nn.Linear4bit)
        assert getattr(model, "is_loaded_in_8bit" if kind == "8bit" else "is_loaded_in_4bit") is True
    assert type(model.lm_head) is torch.nn.Linear and not _torchao_tensor(model.lm_head.weight)
    assert torch.equal(model.lm_head.weight, float_model.lm_head.weight)
    # a quantized base computes nearly the float model (within the format's rounding)
    err = (logits(model) - logits(float_model)).abs().max().item()
    assert 0 < err < {"nf4": 0.15, "fp4": 0.2, "8bit": 0.03, "int8": 0.03}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_storage_bytes_counts_the_quantized_storage(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False))
    dense = storage_bytes(model)
    assert dense == 256 * 256 * 4
    quantize_base(model, kind, skip=())
    ratio = storage_bytes(model) / dense
    # 4-bit: 1/8 of float32 plus the block statistics; int8: 1/4 plus per-row scales
    assert {"nf4": 0.125, "fp4": 0.125, "8bit": 0.25, "int8": 0.25}[kind] < ratio < {
        "nf4": 0.14, "fp4": 0.14, "8bit": 0.26, "int8": 0.26}[kind]


def test_quantize_base_refuses_bad_input():
    with pytest.raises(ValueError, match="quantize kind must be one of"):
        quantize_base(helpers.tiny_llama(), "3bit")
    with pytest.raises(ValueError, match="before get_peft_model"):
        quantize_base(get_peft_model(helpers.tiny_llama(), cb_config()), "nf4")
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        quantize_base(torch.nn.Sequential(torch.nn.ReLU()), "nf4")


def test_dispatch_leaves_float_layers_to_create_module():
    model = helpers.tiny_llama()
    assert Q.dispatch_quantized(model.model.layers[0].self_attn.q_proj, "default", "q", cb_config()) is None


# ------------------------------------------------------------------ dispatch, and d=1, s=1 is PEFT's LoRA


@pytest.mark.parametrize("route", ["quantize_base", "from_pretrained"])
@pytest.mark.parametrize("kind", KINDS)
def test_get_peft_model_dispatches_quantized_layers(kind, route, saved_llama):
    base = quantized_llama(kind) if route == "quantize_base" else loaded_llama(saved_llama, kind)
    reference = logits(base)
    model = get_peft_model(base, cb_config())
    wrapped = layers(model, Q._QuantizedLinear)
    assert len(wrapped) == 2 * len(TARGETS) and all(type(m) is LAYER[kind] for m in wrapped)
    assert all(m._base_is_quantized() for m in wrapped)
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"cblora_A", "cblora_B"}
    assert torch.equal(logits(model), reference)  # B = 0: the wrapped model is the quantized base


@pytest.mark.parametrize("kind", KINDS)
def test_d1_s1_equals_peft_lora_on_the_same_quantized_base(kind, saved_llama):
    lora = get_peft_model(loaded_llama(saved_llama, kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                      init_lora_weights=False))
    cb = get_peft_model(loaded_llama(saved_llama, kind), cb_config(num_copies=1, mask_density=1.0))
    assert type(lora.base_model.model.model.layers[0].self_attn.q_proj).__name__ == PEFT_LAYER[kind]
    with torch.no_grad():
        for name, module in cb.base_model.model.named_modules():
            if isinstance(module, Q._QuantizedLinear):
                peft_layer = lora.base_model.model.get_submodule(name)
                module.cblora_A["default"].copy_(peft_layer.lora_A["default"].weight.reshape(-1))
                module.cblora_B["default"].copy_(peft_layer.lora_B["default"].weight.reshape(-1))
    expected, got = logits(lora), logits(cb)
    assert (expected - logits(loaded_llama(saved_llama, kind))).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and the same gradients for the same loss
    lora.train(), cb.train()
    lora(IDS, labels=IDS).loss.backward()
    cb(IDS, labels=IDS).loss.backward()
    for name, module in cb.base_model.model.named_modules():
        if isinstance(module, Q._QuantizedLinear):
            peft_layer = lora.base_model.model.get_submodule(name)
            torch.testing.assert_close(module.cblora_A["default"].grad,
                                       peft_layer.lora_A["default"].weight.grad.reshape(-1), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ training, save / load


@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_only_the_packed_adapter_and_round_trips(kind, tmp_path):
    model = get_peft_model(quantized_llama(kind), cb_config())
    before = frozen_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dim() == 1 for p in params)  # packed union values only
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    after = frozen_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    model.eval()
    out = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_llama(kind), tmp_path).eval()
    assert all(type(m) is LAYER[kind] for m in layers(loaded, Q._QuantizedLinear))
    assert torch.equal(logits(loaded), out)


# ------------------------------------------------------------------ merging


def merge_errors(kind: str) -> dict[str, float]:
    """Max |logit| error of each merge against the unmerged quantized model (B random, so ΔW is sizeable)."""
    model = get_peft_model(quantized_llama(kind), cb_config()).eval()
    randomize_b(model)
    unmerged = logits(model)
    scale = unmerged.abs().max().item()
    model.merge_adapter()  # re-quantizes W + ΔW, as PEFT's LoRA does
    requantized = logits(model)
    model.unmerge_adapter()
    round_trip = logits(model)

    fresh = get_peft_model(quantized_llama(kind), cb_config()).eval()
    randomize_b(fresh)
    Q.dequantize_base(fresh)
    dequantized = logits(fresh)
    merged = fresh.merge_and_unload()
    quantized = ("Params4bit", "Int8Params")
    assert not any(_torchao_tensor(p) or type(p).__name__ in quantized for p in merged.parameters())
    return {
        "scale": scale,
        "requantized": (requantized - unmerged).abs().max().item(),
        "unmerge_round_trip": (round_trip - unmerged).abs().max().item(),
        "dequantized_unmerged": (dequantized - unmerged).abs().max().item(),
        "dequantized_merged": (logits(merged) - unmerged).abs().max().item(),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_like_peft_and_dequantized_merge_is_exact(kind, saved_llama):
    err = merge_errors(kind)
    assert type(get_peft_model(quantized_llama(kind), cb_config()).merge_and_unload().model.layers[0].self_attn
                .q_proj).__name__ == ("Linear" if kind == "int8" else PEFT_LAYER[kind])
    # the re-quantized merge carries one re-quantization's rounding, like PEFT's LoRA merge of the same ΔW
    cb = get_peft_model(loaded_llama(saved_llama, kind), cb_config()).eval()
    randomize_b(cb)
    unmerged = logits(cb)
    lora = export_as_lora(cb)  # PEFT's own quantized LoRA layers, same outputs
    lora.merge_adapter()
    peft_err = (logits(lora) - unmerged).abs().max().item()
    assert 0 < err["requantized"] <= 1.5 * peft_err + 1e-6, (err, peft_err)
    assert err["requantized"] < {"nf4": 0.2, "fp4": 0.25, "8bit": 0.05, "int8": 0.05}[kind] * max(err["scale"], 1)
    # dequantized: float merge; exact up to float rounding, except that LLM.int8 also quantizes activations
    tol = 0.05 if kind == "8bit" else 1e-5
    assert err["dequantized_unmerged"] <= tol
    assert err["dequantized_merged"] <= tol
    assert abs(err["dequantized_merged"] - err["dequantized_unmerged"]) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_nan(kind):
    model = get_peft_model(quantized_llama(kind), cb_config()).eval()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "cblora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


def test_after_dequantize_base_the_layer_merges_like_linear():
    model = get_peft_model(quantized_llama("nf4"), cb_config()).eval()
    randomize_b(model)
    Q.dequantize_base(model)
    layer = layers(model, Q.Linear4bit)[0]
    assert not layer._base_is_quantized() and type(layer.get_base_layer()) is torch.nn.Linear
    before = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    assert not getattr(model.base_model.model, "is_loaded_in_4bit", False)


# ------------------------------------------------------------------ export, refusals


@pytest.mark.parametrize("kind", KINDS)
def test_export_as_lora_on_the_quantized_base(kind, tmp_path):
    model = get_peft_model(quantized_llama(kind), cb_config()).eval()
    randomize_b(model)
    base_out = logits(quantized_llama(kind))
    out = logits(model)
    assert (out - base_out).abs().max() > 1e-2
    lora = export_as_lora(model)
    assert type(lora.base_model.model.model.layers[0].self_attn.q_proj).__name__ == PEFT_LAYER[kind]
    torch.testing.assert_close(logits(lora), out, rtol=0, atol=1e-5)
    lora.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(quantized_llama(kind), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), out, rtol=0, atol=1e-5)


@needs_bnb
def test_8bit_with_trainable_fp16_weights_is_refused():
    import bitsandbytes as bnb

    model = helpers.tiny_llama().eval()
    q = bnb.nn.Linear8bitLt(32, 32, bias=False, has_fp16_weights=True)
    model.model.layers[0].self_attn.q_proj = q
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        get_peft_model(model, cb_config(target_modules=["q_proj"]))


@needs_torchao
def test_torchao_other_than_int8_weight_only_is_refused():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = helpers.tiny_llama().eval()
    quantize_(model.model.layers[0].self_attn.q_proj, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(ValueError, match="only int8 weight-only"):
        get_peft_model(model, cb_config(target_modules=["q_proj"]))


def test_quantized_layers_reuse_the_linear_core():
    # the forward and ΔW are Linear's (masks.py): the quantized layers only override merging
    for cls in (Q.Linear4bit, Q.Linear8bitLt, Q.TorchaoLinear):
        assert issubclass(cls, Linear)
        assert cls.forward is Linear.forward and cls._add_delta is Linear._add_delta
        assert cls.get_delta_weight is Linear.get_delta_weight
