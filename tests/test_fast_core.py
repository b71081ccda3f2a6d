"""The fused masked core (issue 11): same values and gradients as a dense autograd reference, no
scatter-add or host-sync ops in a step, tables cached once per device, no graph break under dynamo."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import capaboost  # noqa: F401  (registers the methods)
from capaboost import CapaBoostLoraConfig
from capaboost.adapter import CapaBoostAdapterConfig, CapaBoostAdapterLayer
from capaboost.lora.layer import Conv2d, Linear
from capaboost.packing import MaskedPair
from capaboost.prefix import CapaBoostPrefixConfig
from capaboost.prefix.model import PAIR_KEY, CapaBoostPrefixEncoder

SPECS = {
    "d2": dict(num_copies=2, mask_density=0.5),
    "d3": dict(num_copies=3, mask_density=0.5),
    "d1": dict(num_copies=1, mask_density=0.5),
    "2:4": dict(num_copies=2, mask_density=0.5, mask_pattern="2:4"),
    "same": dict(num_copies=2, mask_density=0.5, mask_mode="same"),
    "dense": dict(num_copies=2, mask_density=1.0),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.c1d = Conv1D(12, 16)  # GPT-2 style (nf=12 out, nx=16 in): (in, out) weight, fan_in_fan_out
        self.conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1d(self.proj(x))


def lora_net(dtype=torch.float64, **spec) -> nn.Module:
    torch.manual_seed(0)
    cfg = CapaBoostLoraConfig(r=4, lora_alpha=8, target_modules=["proj", "c1d", "conv"], init_lora_weights=False,
                              mask_seed=3, **spec)
    with pytest.warns(UserWarning, match="coincide") if spec.get("mask_density") == 1.0 else nullcontext():
        model = get_peft_model(Net(), cfg)
    return model.to(dtype).train()


def leaves(layer, attr_a: str, attr_b: str, adapter: str = "default"):
    """Fresh leaf copies of the packed values, for the reference computation."""
    a, b = getattr(layer, attr_a)[adapter], getattr(layer, attr_b)[adapter]
    return a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()


def copies(pair: MaskedPair, packed_a: torch.Tensor, packed_b: torch.Tensor):
    """The d masked copies (A ⊙ m_Ai, B ⊙ m_Bi) from the shared dense factors, by plain autograd."""
    a, b = pair.A.unpack(packed_a), pair.B.unpack(packed_b)
    return [(a * ma.to(a.dtype), b * mb.to(b.dtype)) for ma, mb in zip(pair.A.masks, pair.B.masks)]


def reference_delta(pair: MaskedPair, packed_a: torch.Tensor, packed_b: torch.Tensor) -> torch.Tensor:
    """Σ_i (B ⊙ m_Bi)(A ⊙ m_Ai) (n_out x n_in)."""
    return sum(b @ a for a, b in copies(pair, packed_a, packed_b))


def grads(out: torch.Tensor, weight: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * weight).sum(), inputs))


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], **tol) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("name", ["proj", "c1d"])
def test_linear_values_and_gradients_equal_the_dense_reference(spec, name):
    model = lora_net(**SPECS[spec])
    layer = getattr(model.base_model.model, name)
    assert isinstance(layer, Linear)
    pair, s = layer.capaboost_pairs["default"], layer.scaling["default"]
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    w = torch.randn_like(out)
    got = grads(out, w, [x, layer.cblora_A["default"], layer.cblora_B["default"]])

    pa, pb = leaves(layer, "cblora_A", "cblora_B")
    x_ref = x.detach().clone().requires_grad_()
    ref = layer.get_base_layer()(x_ref) + s * x_ref @ reference_delta(pair, pa, pb).t()
    torch.testing.assert_close(out, ref)
    assert_close(got, grads(ref, w, [x_ref, pa, pb]))


@pytest.mark.parametrize("spec", ["d2", "d3", "2:4"])
def test_conv2d_values_and_gradients_equal_the_dense_reference(spec):
    layer = lora_net(**SPECS[spec]).base_model.model.conv
    assert isinstance(layer, Conv2d)
    conv, pair, s = layer.get_base_layer(), layer.capaboost_pairs["default"], layer.scaling["default"]
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    w = torch.randn_like(out)
    got = grads(out, w, [x, layer.cblora_A["default"], layer.cblora_B["default"]])

    pa, pb = leaves(layer, "cblora_A", "cblora_B")
    x_ref = x.detach().clone().requires_grad_()
    weight = conv.weight.detach() + s * reference_delta(pair, pa, pb).reshape(conv.weight.shape)
    ref = F.conv2d(x_ref, weight, conv.bias.detach(), conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(out, ref)
    assert_close(got, grads(ref, w, [x_ref, pa, pb]))


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return T.BertModel(cfg)


@pytest.mark.parametrize("num_copies", [2, 3])
def test_adapter_values_and_gradients_equal_the_dense_reference(num_copies):
    model = get_peft_model(tiny_bert(), CapaBoostAdapterConfig(bottleneck=4, num_copies=num_copies, init_weights=False))
    model = model.double().train()
    layer = next(m for m in model.modules() if isinstance(m, CapaBoostAdapterLayer))
    pair, s, act = layer.capaboost_pairs["default"], layer.scaling["default"], layer.activation["default"]
    x = torch.randn(2, 3, layer.get_base_layer().in_features, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    w = torch.randn_like(out)
    got = grads(out, w, [x, layer.cbadapter_A["default"], layer.cbadapter_B["default"]])

    pa, pb = leaves(layer, "cbadapter_A", "cbadapter_B")
    x_ref = x.detach().clone().requires_grad_()
    base = layer.get_base_layer()(x_ref)
    bias_a, bias_b = layer.cbadapter_bias_A["default"].detach(), layer.cbadapter_bias_B["default"].detach()
    adapter = sum(act(base @ a.t() + bias_a) @ b.t() for a, b in copies(pair, pa, pb)) + bias_b
    ref = base + s * adapter
    torch.testing.assert_close(out, ref)
    assert_close(got, grads(ref, w, [x_ref, pa, pb]))


def test_prefix_table_and_gradients_equal_the_dense_reference():
    torch.manual_seed(0)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=100))
    cfg = CapaBoostPrefixConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=8, num_copies=3)
    encoder = get_peft_model(gpt2, cfg).prompt_encoder["default"].double().train()
    assert isinstance(encoder, CapaBoostPrefixEncoder)
    pair = encoder.capaboost_pairs[PAIR_KEY]
    table = encoder.table()
    w = torch.randn_like(table)
    got = grads(table, w, [encoder.cbprefix_A, encoder.cbprefix_B])

    pa = encoder.cbprefix_A.detach().clone().requires_grad_()
    pb = encoder.cbprefix_B.detach().clone().requires_grad_()
    emb, bias_a, bias_b = encoder.embedding.weight.detach(), encoder.cbprefix_bias_A.detach(), encoder.cbprefix_bias_B.detach()
    ref = sum(torch.tanh(emb @ a.t() + bias_a) @ b.t() for a, b in copies(pair, pa, pb)) + bias_b
    torch.testing.assert_close(table, ref)
    assert_close(got, grads(ref, w, [pa, pb]))


def test_bf16_base_with_float32_adapter_and_autocast_match_the_reference():
    """PEFT keeps adapter weights in float32 on a bf16 base: the product runs in float32, lands in bf16."""
    torch.manual_seed(0)
    base = Net().to(torch.bfloat16)
    model = get_peft_model(base, CapaBoostLoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                     init_lora_weights=False)).train()
    layer = model.base_model.model.proj
    assert layer.cblora_A["default"].dtype == torch.float32
    pair, s = layer.capaboost_pairs["default"], layer.scaling["default"]
    x = torch.randn(3, 5, 12, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    w = torch.randn_like(out)
    got = grads(out, w, [x, layer.cblora_A["default"], layer.cblora_B["default"]])

    pa, pb = leaves(layer, "cblora_A", "cblora_B")
    x_ref = x.detach().clone().requires_grad_()
    ref = layer.get_base_layer()(x_ref) + (x_ref.float() @ reference_delta(pair, pa, pb).t() * s).to(torch.bfloat16)
    torch.testing.assert_close(out, ref)
    assert_close(got, grads(ref, w, [x_ref, pa, pb]), rtol=2e-2, atol=2e-2)

    # under autocast the layer takes the composite path (autograd replays the casts)
    layer32 = get_peft_model(Net(), CapaBoostLoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                        init_lora_weights=False)).train().base_model.model.proj
    x32 = torch.randn(3, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer32(x32)
    w = torch.randn_like(out)
    got = grads(out, w, [layer32.cblora_A["default"], layer32.cblora_B["default"]])
    pa, pb = leaves(layer32, "cblora_A", "cblora_B")
    ref = layer32.get_base_layer()(x32) + layer32.scaling["default"] * x32 @ reference_delta(
        layer32.capaboost_pairs["default"], pa, pb).t()
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    assert_close(got, grads(ref, w.float(), [pa, pb]), rtol=5e-2, atol=5e-2)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


#: scatter-adds (atomics on a GPU) and ops that wait for the device (.item(), data-dependent shapes)
FORBIDDEN = {"index_add", "index_add_", "index_put", "index_put_", "_index_put_impl_", "scatter_add", "scatter_add_",
             "_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "lift_fresh", "_to_copy"}


def layers_and_inputs():
    model = lora_net(dtype=torch.float32)
    net = model.base_model.model
    adapter = get_peft_model(tiny_bert(), CapaBoostAdapterConfig(bottleneck=4, init_weights=False)).train()
    site = next(m for m in adapter.modules() if isinstance(m, CapaBoostAdapterLayer))
    return [
        (net.proj, torch.randn(3, 5, 12, requires_grad=True)),
        (net.conv, torch.randn(2, 4, 9, 9, requires_grad=True)),
        (site, torch.randn(2, 3, site.get_base_layer().in_features, requires_grad=True)),
    ]


def test_training_step_has_no_scatter_add_or_sync_and_tables_are_built_once():
    for layer, x in layers_and_inputs():
        pair = layer.capaboost_pairs["default"]
        layer(x).sum().backward()  # warm-up: the tables exist on this device from now on
        cached = [id(t) for t in pair.tables.on(x.device, x.dtype)]
        with _Ops() as ops:
            layer(x).square().sum().backward()
        assert not FORBIDDEN & set(ops.names), (type(layer).__name__, FORBIDDEN & set(ops.names))
        assert "index_select" in ops.names  # the gather, both ways
        assert [id(t) for t in pair.tables.on(x.device, x.dtype)] == cached
        assert list(pair.tables._index) == [x.device]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["lora-linear", "lora-conv2d", "adapter"])
def test_no_graph_break_and_compiled_matches_eager(which):
    torch._dynamo.reset()
    layer, x = layers_and_inputs()[which]
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    params = [p for p in layer.parameters() if p.requires_grad]
    eager = layer(x)
    want = torch.autograd.grad(eager.square().sum(), [x, *params])
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    assert_close(torch.autograd.grad(out.square().sum(), [x, *params]), want)
    torch._dynamo.reset()
