"""No config option is accepted and ignored: each field is honoured (a named test shows it) or refused by name.

A field PEFT adds to LoraConfig or PrefixTuningConfig fails ``test_every_field_is_decided`` until someone
decides which set it belongs to.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from transformers import BertForSequenceClassification

import capaboost  # noqa: F401  (registers the methods)
from capaboost import CapaBoostAdapterConfig, CapaBoostLoraConfig, CapaBoostPrefixConfig, export_as_lora
from capaboost.lora import CapaBoostLoraLayer
import helpers

TESTS = Path(__file__).resolve().parent
HERE = "test_config_fields.py"

# Fields every CapaBoost config shares: PEFT's own (PeftConfig) and the masks (MaskedParallelConfig).
COMMON_HONOURED = {
    "task_type": "test_lora.py::test_init_is_noop",
    "peft_type": "test_lora.py::test_config_roundtrip",
    "auto_mapping": f"{HERE}::test_peft_metadata_survives_save_load_and_export",
    "peft_version": f"{HERE}::test_peft_metadata_survives_save_load_and_export",
    "base_model_name_or_path": f"{HERE}::test_peft_metadata_survives_save_load_and_export",
    "revision": f"{HERE}::test_peft_metadata_survives_save_load_and_export",
    "inference_mode": f"{HERE}::test_inference_mode_freezes_the_adapter",
    "modules_to_save": f"{HERE}::test_modules_to_save_trains_a_copy",
    "num_copies": "test_lora.py::test_rank_is_d_times_r",
    "mask_density": "test_lora.py::test_trainable_count_is_union",
    "mask_seed": "test_masks.py::test_key_components_change_the_mask",
    "mask_pattern": "test_lora.py::test_nm_masks_and_input_dim_error",
    "mask_mode": "test_lora.py::test_dropout_mode_trains_and_eval_is_deterministic",
    "generator_version": "test_lora.py::test_config_bad_input",
    "mask_fingerprint": "test_lora.py::test_tampered_config_refused",
}
LORA_HONOURED = {
    **COMMON_HONOURED,
    "copies_pattern": "test_allocation.py::test_patterns_set_copies_density_rank_and_reload_bit_identically",
    "density_pattern": "test_allocation.py::test_patterns_set_copies_density_rank_and_reload_bit_identically",
    "r": "test_lora.py::test_rank_is_d_times_r",
    "scale_by_density": "test_update_scale.py::test_delta_weight_and_layer_output_scale_by_one_over_d_s2",
    "lora_alpha": "test_lora.py::test_d1_s1_equals_peft_lora",
    "lora_dropout": f"{HERE}::test_lora_dropout_acts_in_training_only",
    "target_modules": "test_lora.py::test_target_not_found_and_unsupported_layer",
    "exclude_modules": f"{HERE}::test_module_selection_fields",
    "layers_to_transform": f"{HERE}::test_module_selection_fields",
    "layers_pattern": f"{HERE}::test_module_selection_fields",
    "fan_in_fan_out": "test_lora.py::test_gpt2_conv1d_merge_exact",
    "bias": f"{HERE}::test_bias_trains_and_saves_the_chosen_biases",
    "init_lora_weights": f"{HERE}::test_init_lora_weights_is_true_or_false_and_nothing_else",
    "rank_pattern": f"{HERE}::test_rank_and_alpha_patterns_set_the_scaling",
    "alpha_pattern": f"{HERE}::test_rank_and_alpha_patterns_set_the_scaling",
    "trainable_token_indices": "test_trainable_tokens.py::test_d1_s1_equals_peft_lora",
    "use_dora": "test_dora.py::test_d1_s1_equals_peft_dora",
    "target_parameters": "test_target_parameters.py::test_d1_s1_equals_peft_lora",
}
# A non-default value of each refused field (JSON-serialisable, so the load path is tested too).
LORA_REFUSED = {
    "use_rslora": True,
    "megatron_config": {"tensor_model_parallel_size": 2},
    "megatron_core": "my.megatron",
    "loftq_config": {"loftq_bits": 4},
    "eva_config": {"rho": 2.0},
    "corda_config": {"corda_method": "kpm"},
    "lora_ga_config": {"direction": "ArB2r"},
    "velora_config": {"rank": 4},
    "alora_invocation_tokens": [1, 2],
    "use_qalora": True,
    "qalora_group_size": 32,
    "monteclora_config": {"num_samples": 2},
    "layer_replication": [[0, 1]],
    "lora_bias": True,
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 1.0},
    "ensure_weight_tying": True,
}
# LoraConfig fields CapaBoostLoraConfig does not declare: runtime-only (PEFT strips it from adapter_config.json),
# so passing it is Python's TypeError and no saved config can carry it.
LORA_NOT_DECLARED = {"runtime_config"}

ADAPTER_HONOURED = {
    **COMMON_HONOURED,
    "copies_pattern": "test_lora.py::test_unmatched_mask_pattern_is_an_error",
    "density_pattern": "test_lora.py::test_unmatched_mask_pattern_is_an_error",
    "style": "test_adapter.py::test_plain_adapter_equals_hand_built_reference",
    "bottleneck": "test_adapter.py::test_union_accounting_is_three_quarters_of_the_plain_adapter",
    "non_linearity": "test_adapter.py::test_plain_adapter_equals_hand_built_reference",
    "adapter_scaling": f"{HERE}::test_adapter_scaling_scales_the_adapter_output",
    "adapter_placement": "test_adapter.py::test_explicit_placement_for_an_unknown_architecture",
    "target_modules": f"{HERE}::test_adapter_target_modules_only_as_derived_from_the_placement",
    "init_weights": f"{HERE}::test_adapter_init_weights_is_true_or_false_and_nothing_else",
}
ADAPTER_REFUSED: dict = {}  # target_modules is refused unless it is the placement's own (tested separately)

PREFIX_HONOURED = {
    **COMMON_HONOURED,
    "num_virtual_tokens": f"{HERE}::test_prefix_shape_fields_shape_the_table",
    "token_dim": f"{HERE}::test_prefix_shape_fields_shape_the_table",
    "num_transformer_submodules": f"{HERE}::test_prefix_shape_fields_shape_the_table",
    "num_attention_heads": f"{HERE}::test_prefix_shape_fields_shape_the_table",
    "num_layers": f"{HERE}::test_prefix_shape_fields_shape_the_table",
    "encoder_hidden_size": f"{HERE}::test_prefix_shape_fields_shape_the_table",
    "init_weights": f"{HERE}::test_prefix_init_weights_zero_gives_a_zero_table",
}
PREFIX_REFUSED = {
    "prefix_projection": False, "copies_pattern": {"transform": 3}, "density_pattern": {"transform": 0.25},
}

DECISIONS = {
    CapaBoostLoraConfig: (LORA_HONOURED, LORA_REFUSED),
    CapaBoostAdapterConfig: (ADAPTER_HONOURED, ADAPTER_REFUSED),
    CapaBoostPrefixConfig: (PREFIX_HONOURED, PREFIX_REFUSED),
}
REQUIRED = {CapaBoostLoraConfig: {}, CapaBoostAdapterConfig: {}, CapaBoostPrefixConfig: {"num_virtual_tokens": 4}}


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def bert(layers: int = 2) -> BertForSequenceClassification:
    return helpers.tiny_bert(num_hidden_layers=layers, **helpers.BERT_NO_DROPOUT).eval()


IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def lora(**kw) -> CapaBoostLoraConfig:
    return CapaBoostLoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                                  "task_type": "SEQ_CLS", **kw})


def adapted(model: torch.nn.Module) -> list[str]:
    return sorted(m.capaboost_name for m in model.modules() if hasattr(m, "capaboost_pairs") and m.capaboost_pairs)


# --- the table ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", list(DECISIONS), ids=lambda c: c.__name__)
def test_every_field_is_decided(cls):
    honoured, refused = DECISIONS[cls]
    assert not honoured.keys() & refused.keys()
    assert names(cls) == honoured.keys() | refused.keys(), "decide: honour (with a test) or refuse the new field"
    if cls is CapaBoostLoraConfig:  # not a LoraConfig subclass: LoRA's own new fields must be decided too
        assert names(LoraConfig) - names(cls) <= LORA_NOT_DECLARED, "declare and decide the new LoraConfig field"
    if cls is CapaBoostPrefixConfig:
        assert names(PrefixTuningConfig) <= names(cls)


@pytest.mark.parametrize("ref", sorted({r for h, _ in DECISIONS.values() for r in h.values()}))
def test_each_honoured_field_names_an_existing_test(ref):
    file, func = ref.split("::")
    tree = ast.parse((TESTS / file).read_text())
    assert func in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, ref


REFUSALS = [(cls, name, value) for cls, (_, refused) in DECISIONS.items() for name, value in refused.items()]


@pytest.mark.parametrize("cls, name, value", REFUSALS, ids=[f"{c.__name__}.{n}" for c, n, _ in REFUSALS])
def test_refused_field_fails_at_construction_and_on_load(cls, name, value, tmp_path):
    with pytest.raises(ValueError, match=rf"{name}={value!r}".replace("[", r"\[").replace("(", r"\(")):
        cls(**REQUIRED[cls], **{name: value})
    cls(**REQUIRED[cls]).save_pretrained(tmp_path)  # an adapter_config.json that carries the option
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), name: value}))
    with pytest.raises(ValueError, match=name):
        PeftConfig.from_pretrained(tmp_path)


def test_runtime_config_is_not_accepted():
    with pytest.raises(TypeError, match="runtime_config"):
        CapaBoostLoraConfig(runtime_config={"ephemeral_gpu_offload": True})


def test_refused_lora_options_stay_out_of_adapter_config_json(tmp_path):
    lora().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not saved.keys() & LORA_REFUSED.keys()


# --- honoured: behaviour --------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["pissa", "olora", "loftq", "gaussian", "mica", "corda", "eva", "bogus", 1])
def test_init_lora_weights_is_true_or_false_and_nothing_else(value, tmp_path):
    def b(cfg: CapaBoostLoraConfig) -> torch.Tensor:
        return torch.cat([m.cblora_B["default"] for m in get_peft_model(bert(), cfg).modules()
                          if isinstance(m, CapaBoostLoraLayer)])

    assert torch.count_nonzero(b(lora(init_lora_weights=True))) == 0
    assert torch.count_nonzero(b(lora(init_lora_weights=False))) > 0
    with pytest.raises(ValueError, match=rf"init_lora_weights={value!r}.*peft.LoraConfig"):
        lora(init_lora_weights=value)
    lora().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": value}))
    with pytest.raises(ValueError, match="init_lora_weights"):
        PeftConfig.from_pretrained(tmp_path)


def test_module_selection_fields():
    def q(*layers: int) -> list[str]:
        return [f"bert.encoder.layer.{n}.attention.self.query" for n in layers]

    assert adapted(get_peft_model(bert(3), lora(target_modules=["query"], layers_to_transform=[1]))) == q(1)
    cfg = lora(target_modules=["query"], layers_to_transform=[0, 2], layers_pattern="layer")
    assert adapted(get_peft_model(bert(3), cfg)) == q(0, 2)
    cfg = lora(target_modules=["query"], exclude_modules=q(0))
    assert adapted(get_peft_model(bert(3), cfg)) == q(1, 2)
    with pytest.raises(ValueError, match="layers_pattern='layer' needs layers_to_transform"):
        lora(layers_pattern="layer")
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] does nothing when target_modules is a regex"):
        lora(target_modules=r".*query", layers_to_transform=[0])


def test_rank_and_alpha_patterns_set_the_scaling():
    model = get_peft_model(bert(), lora(rank_pattern={"query": 2}, alpha_pattern={"value": 32}, scale_by_density=False))
    scaling = {m.capaboost_name.rsplit(".", 1)[1]: (m.r["default"], m.scaling["default"])
               for m in model.modules() if isinstance(m, CapaBoostLoraLayer)}
    assert scaling == {"query": (2, 4.0), "value": (4, 8.0)}


def test_lora_dropout_acts_in_training_only():
    model = get_peft_model(bert(), lora(lora_dropout=0.5, init_lora_weights=False))
    drops = [m.lora_dropout["default"] for m in model.modules() if isinstance(m, CapaBoostLoraLayer)]
    assert all(isinstance(d, torch.nn.Dropout) and d.p == 0.5 for d in drops)
    model.train()
    assert not torch.equal(model(IDS).logits, model(IDS).logits)
    model.eval()
    assert torch.equal(model(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("bias", ["all", "cblora_only"])
def test_bias_trains_and_saves_the_chosen_biases(bias, tmp_path):
    model = get_peft_model(bert(), lora(bias=bias))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    adapted_biases = {n for n in trained if ".query.base_layer" in n or ".value.base_layer" in n}
    assert len(adapted_biases) == 4
    assert (trained - adapted_biases - {n for n in trained if "classifier" in n} != set()) == (bias == "all")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in adapted_biases:
                p.add_(1.0)
    out = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(bert(), tmp_path).eval()
    assert torch.equal(loaded(IDS).logits, out)
    exported = export_as_lora(model.eval())
    assert exported.peft_config["default"].bias == {"all": "all", "cblora_only": "lora_only"}[bias]
    torch.testing.assert_close(exported(IDS).logits, out, rtol=0, atol=1e-5)


METHODS = {
    "lora": lambda **kw: lora(**kw),
    "adapter": lambda **kw: CapaBoostAdapterConfig(task_type="SEQ_CLS", bottleneck=4, **kw),
    "prefix": lambda **kw: CapaBoostPrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=8,
                                                 **kw),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_inference_mode_freezes_the_adapter(method):
    def trainable(cfg) -> list[str]:
        model = get_peft_model(bert(), cfg)
        return [n for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]

    if method == "prefix":  # as PEFT's prefix tuning: only the materialized table, no MLP (PEFT keeps it trainable)
        assert len(trainable(METHODS[method]())) == 5
        assert trainable(METHODS[method](inference_mode=True)) == ["prompt_encoder.default.embedding.weight"]
        return
    assert trainable(METHODS[method]())
    assert trainable(METHODS[method](inference_mode=True)) == []


@pytest.mark.parametrize("method", list(METHODS))
def test_modules_to_save_trains_a_copy(method):
    model = get_peft_model(bert(), METHODS[method](modules_to_save=["pooler"]))
    pooler = model.get_base_model().bert.pooler
    assert isinstance(pooler, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in pooler.modules_to_save["default"].parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_metadata_survives_save_load_and_export(method, tmp_path):
    cfg = METHODS[method](revision="v1")
    base = bert()
    base.name_or_path = "org/tiny-bert"  # PEFT sets base_model_name_or_path from the base model
    model = get_peft_model(base, cfg)
    model.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert (loaded.base_model_name_or_path, loaded.revision) == ("org/tiny-bert", "v1")
    assert loaded.peft_version == cfg.peft_version and loaded.auto_mapping == cfg.auto_mapping
    if method == "lora":
        exported = export_as_lora(model).peft_config["default"]
        assert (exported.base_model_name_or_path, exported.revision) == ("org/tiny-bert", "v1")


def test_adapter_scaling_scales_the_adapter_output():
    def delta(scaling: float) -> torch.Tensor:
        torch.manual_seed(0)
        cfg = CapaBoostAdapterConfig(task_type="SEQ_CLS", bottleneck=4, init_weights=False, adapter_scaling=scaling)
        model = get_peft_model(bert(), cfg).eval()
        return model.get_base_model().bert(IDS).last_hidden_state

    ref = bert().bert(IDS).last_hidden_state
    assert not torch.allclose(delta(1.0), ref)
    assert torch.allclose(delta(0.0), ref)


def test_adapter_target_modules_only_as_derived_from_the_placement():
    placement = {"layers": r"bert\.encoder\.layer\.\d+", "attn": "attention.output", "ffn": "output"}
    cfg = CapaBoostAdapterConfig(adapter_placement=placement)
    with pytest.raises(ValueError, match="target_modules='query' would be replaced by the sites of adapter_placement"):
        CapaBoostAdapterConfig(adapter_placement=placement, target_modules="query")
    model = get_peft_model(bert(), cfg)
    CapaBoostAdapterConfig(adapter_placement=placement, target_modules=model.peft_config["default"].target_modules)


@pytest.mark.parametrize("value", ["zero", 0, None])
def test_adapter_init_weights_is_true_or_false_and_nothing_else(value):
    def ups(init: bool) -> torch.Tensor:
        model = get_peft_model(bert(), METHODS["adapter"](init_weights=init))
        return torch.cat([p for n, p in model.named_parameters() if "cbadapter_B" in n])

    assert torch.count_nonzero(ups(True)) == 0 and torch.count_nonzero(ups(False)) > 0
    with pytest.raises(ValueError, match=rf"init_weights must be True .* got {value!r}"):
        METHODS["adapter"](init_weights=value)


def test_prefix_shape_fields_shape_the_table():
    model = get_peft_model(bert(), METHODS["prefix"]())
    cfg = model.peft_config["default"]
    assert (cfg.token_dim, cfg.num_layers, cfg.num_attention_heads, cfg.num_transformer_submodules) == (32, 2, 4, 1)
    encoder = model.prompt_encoder["default"]
    assert encoder.table().shape == (4, 2 * 2 * 32) and encoder.capaboost_pairs["default"].k == 8


def test_prefix_init_weights_zero_gives_a_zero_table():
    def table(init):
        return get_peft_model(bert(), METHODS["prefix"](init_weights=init)).prompt_encoder["default"].table()

    assert torch.count_nonzero(table("zero")) == 0 and torch.count_nonzero(table(None)) > 0
