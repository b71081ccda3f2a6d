"""CapaBoost-LoRA on bare nn.Parameters (``target_parameters``): PEFT's MlpUsingParameters and a tiny Mixtral,
whose experts are (experts, out, in) nn.Parameters used expert by expert (two parameters of one module: nested
wrappers)."""

from __future__ import annotations

import copy

import pytest
import torch

import capaboost  # noqa: F401  (registers CapaBoostLoraConfig with PEFT)
from capaboost import CapaBoostLoraConfig, export_as_lora
from capaboost.lora.param import ParamWrapper
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper as LoraParamWrapper

import peft_custom_models as pcm

D1 = dict(num_copies=1, mask_density=1.0)
D2 = dict(num_copies=2, mask_density=0.5)


def _mixtral() -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )
    return MixtralForCausalLM(config).eval()


# (name, base model factory, adapter kwargs, input factory, output getter)
CASES = {
    "mlp_using_parameters": (
        lambda: pcm.build_model("MlpUsingParameters").eval(), {"target_parameters": ["lin0.weight", "lin1.weight"]},
        lambda: torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), lambda out: out,
    ),
    "mixtral_experts": (
        _mixtral, {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
        lambda: torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1)), lambda out: out.logits,
    ),
}


def _run(model: torch.nn.Module, case: str) -> torch.Tensor:
    _, _, inputs, get = CASES[case]
    return get(model(inputs()))


def _cb(case: str, setting: dict, **extra) -> PeftModel:
    make, kwargs, _, _ = CASES[case]
    config = CapaBoostLoraConfig(r=2, lora_alpha=4, **kwargs, **setting, **extra)
    return get_peft_model(make(), config)


def _wrappers(model: torch.nn.Module, cls: type) -> dict[str, torch.nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, cls)}


def _peft_twin(case: str, cb: PeftModel) -> PeftModel:
    """PEFT LoRA of the same row with CapaBoost's (d=1, s=1) factors copied in, wrapper by wrapper."""
    make, kwargs, _, _ = CASES[case]
    lora = get_peft_model(make(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kwargs))
    ours, theirs = _wrappers(cb, ParamWrapper), _wrappers(lora, LoraParamWrapper)
    assert sorted(ours) == sorted(theirs) and ours
    with torch.no_grad():
        for path, layer in ours.items():
            assert layer.parameter_name == theirs[path].parameter_name
            a_cat, b_cat = layer.lora_weights("default")
            theirs[path].lora_A["default"].weight.copy_(a_cat)
            theirs[path].lora_B["default"].weight.copy_(b_cat)
    return lora


@pytest.mark.parametrize("case", sorted(CASES))
def test_d1_s1_equals_peft_lora(case: str) -> None:
    cb = _cb(case, D1, init_lora_weights=False)
    lora = _peft_twin(case, cb)
    cb.train(), lora.train()
    torch.manual_seed(3)
    out_cb = _run(cb, case)
    torch.manual_seed(3)
    out_lora = _run(lora, case)
    torch.testing.assert_close(out_cb, out_lora, atol=1e-6, rtol=0)
    out_cb.square().sum().backward()
    out_lora.square().sum().backward()
    ours, theirs = _wrappers(cb, ParamWrapper), _wrappers(lora, LoraParamWrapper)
    for path, layer in ours.items():
        torch.testing.assert_close(
            layer.get_delta_weight("default"), theirs[path].get_delta_weight("default"), atol=1e-6, rtol=0
        )
        pair = layer.capaboost_pairs["default"]  # d=1, s=1: the packed values are the dense factors
        torch.testing.assert_close(layer.cblora_A["default"].grad, pair.A.pack(theirs[path].lora_A["default"].weight.grad), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.cblora_B["default"].grad, pair.B.pack(theirs[path].lora_B["default"].weight.grad), atol=1e-5, rtol=1e-5)
    cb.eval(), lora.eval()
    cb.merge_adapter(), lora.merge_adapter()
    merged_cb = {k: v for k, v in cb.get_base_model().state_dict().items() if "cblora" not in k}
    merged_lora = {k: v for k, v in lora.get_base_model().state_dict().items() if "lora_" not in k}
    assert merged_cb.keys() == merged_lora.keys()
    for key in merged_cb:
        torch.testing.assert_close(merged_cb[key], merged_lora[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_d2_behaves_as_an_adapter(case: str, tmp_path) -> None:
    base_out = _run(CASES[case][0](), case)
    zero = _cb(case, D2)  # B = 0: the base model
    torch.testing.assert_close(_run(zero, case), base_out, atol=0, rtol=0)
    cb = _cb(case, D2, init_lora_weights=False)
    assert all(layer.capaboost_pairs["default"].A.masks.float().mean() < 0.9 for layer in _wrappers(cb, ParamWrapper).values())
    with torch.no_grad():
        out = _run(cb, case)
    assert (out - base_out).abs().max() > 1e-3
    with cb.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(_run(cb, case), base_out, atol=0, rtol=0)
    weights = {k: v.clone() for k, v in cb.get_base_model().state_dict().items() if "cblora" not in k}
    with torch.no_grad():
        cb.merge_adapter()
        torch.testing.assert_close(_run(cb, case), out, atol=1e-5, rtol=1e-5)
        assert any(not torch.equal(v, cb.get_base_model().state_dict()[k]) for k, v in weights.items())
        cb.unmerge_adapter()
        for key, value in cb.get_base_model().state_dict().items():
            if "cblora" not in key:
                torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(_run(cb, case), out, atol=1e-6, rtol=0)
    trainable = [n for n, p in cb.named_parameters() if p.requires_grad]
    assert trainable and all(".cblora_A." in n or ".cblora_B." in n for n in trainable)
    # save / load: bit-equal outputs
    cb.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(CASES[case][0](), tmp_path)
    with torch.no_grad():
        assert torch.equal(_run(loaded, case), out)
    # merge_and_unload gives a plain model with the adapter's outputs
    with torch.no_grad():
        plain = cb.merge_and_unload()
        assert not _wrappers(plain, ParamWrapper)
        assert not any("parametrizations" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(_run(plain, case), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_updates_only_the_adapter(case: str) -> None:
    cb = _cb(case, D2, init_lora_weights=False)
    cb.train()
    before = {n: p.detach().clone() for n, p in cb.named_parameters()}
    opt = torch.optim.SGD([p for p in cb.parameters() if p.requires_grad], lr=0.1)
    _run(cb, case).square().mean().backward()
    opt.step()
    changed = {n for n, p in cb.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("cblora_" in n for n in changed)
    assert not any("parametrizations" in n for n, _ in cb.named_parameters())  # removed after each forward


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_as_stock_lora_gives_equal_outputs(case: str, tmp_path) -> None:
    cb = _cb(case, D2, init_lora_weights=False)
    with torch.no_grad():
        out = _run(cb, case)
    names = sorted(layer.capaboost_name for layer in _wrappers(cb, ParamWrapper).values())
    assert all(any(n.endswith(t) for t in CASES[case][1]["target_parameters"]) for n in names)
    lora = export_as_lora(cb)
    config = lora.peft_config["default"]
    # alpha carries scale_by_density (on by default): lora_alpha / (d*s^2) = 8 / 0.5
    assert type(config) is LoraConfig and config.r == 4 and config.lora_alpha == 16
    assert sorted(config.target_parameters) == names  # full parameter names: each adapted parameter, exactly
    assert _wrappers(lora, LoraParamWrapper) and not _wrappers(lora, ParamWrapper)
    with torch.no_grad():
        torch.testing.assert_close(_run(lora, case), out, atol=1e-5, rtol=1e-5)
    lora.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(CASES[case][0](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_run(reloaded, case), out, atol=1e-5, rtol=1e-5)


def test_experts_get_distinct_masks_and_exact_per_expert_delta() -> None:
    """ΔW_e = scaling Σ_i (B_e⊙m_Bi,e)(A_e⊙m_Ai,e), built here by hand from the masks in PEFT's per-expert slicing."""
    cb = _cb("mixtral_experts", D2, init_lora_weights=False)
    layer = next(iter(_wrappers(cb, ParamWrapper).values()))
    pair, e, r = layer.capaboost_pairs["default"], layer.num_experts, layer.r["default"]
    a = pair.A.unpack(layer.cblora_A["default"]).reshape(e, r, -1)  # PEFT: (experts, rank, in)
    b = pair.B.unpack(layer.cblora_B["default"]).reshape(layer.out_features, r, e)  # PEFT: (out, rank, experts)
    m_a = pair.A.masks.reshape(2, e, r, -1)
    m_b = pair.B.masks.reshape(2, layer.out_features, r, e)
    expected = torch.stack([
        sum((b[..., x] * m_b[i, ..., x]) @ (a[x] * m_a[i, x]) for i in range(2)) for x in range(e)
    ]) * layer.scaling["default"]
    delta = layer.get_delta_weight("default")
    expected = expected if layer._did_swap_in_out_features else expected.transpose(-2, -1)
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)
    assert not torch.equal(m_a[0, 0], m_a[0, 1])  # experts do not share a mask


def test_refusals_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"lora_dropout=0\.1.*as in PEFT's lora\.ParamWrapper"):
        _cb("mlp_using_parameters", D2, lora_dropout=0.1)
    with pytest.raises(ValueError, match="target_parameters must be a list"):
        CapaBoostLoraConfig(target_parameters="lin0.weight")
    cb = _cb("mlp_using_parameters", D2)
    with pytest.raises(ValueError, match="all adapters must target the same parameters"):
        cb.add_adapter("other", CapaBoostLoraConfig(target_parameters=["lin0.weight"], **D2))
