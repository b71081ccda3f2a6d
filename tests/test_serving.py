"""Servable exports: ``capaboost export --to merged`` (plain transformers, loads without capaboost) and the vLLM
LoRA-loader check of ``--to lora`` (``capaboost.serving.vllm_compatibility``)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from capaboost import CapaBoostLoraConfig, export_as_lora
from capaboost.cli import main
from capaboost.serving import VLLM_MAX_LORA_RANKS, vllm_compatibility, vllm_max_lora_rank
from capaboost.train.trained import load_trained
import helpers
from test_causal_lm_data import CLM_GPT2, WORDS, tiny_tokenizer

IDS = [[3, 7, 11, 4, 19, 5], [8, 8, 2, 21, 13, 6]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny causal-LM CapaBoost-LoRA runs on a saved GPT-2 + tokenizer: d=2, r=8 (rank 16) and d=3, r=8 (24)."""
    root = tmp_path_factory.mktemp("serving")
    model_dir = root / "model"
    tiny_tokenizer().save_pretrained(model_dir)
    helpers.tiny_gpt2(**CLM_GPT2).save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 8), ("dev.jsonl", 4)):
        rows = [json.dumps({"prompt": " ".join(rng.sample(WORDS, 2)), "response": " yes"}) for _ in range(n)]
        (data / name).write_text("\n".join(rows) + "\n")
    out = {}
    for d in (2, 3):
        out[d] = root / f"run-d{d}"
        assert main(["train", "--task", "causal-lm", "--method", "capaboost-lora", "--model", str(model_dir),
                     "--data-dir", str(data), "--output-dir", str(out[d]), "--r", "8", "--d", str(d),
                     "--max-steps", "2", "--batch-size", "4", "--lr", "0.05", "--max-seq-len", "16",
                     "--eval-batch-size", "4", "--no-progress", "--cache-dir", str(root / f"cache-{d}")]) == 0
    return root, model_dir, out


def _adapter_logits(run) -> torch.Tensor:
    model, _ = load_trained(run)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


LOAD_WITHOUT_CAPABOOST = """
import sys, json, torch
sys.modules["capaboost"] = None  # any import of capaboost (or of a module needing it) fails
sys.modules["peft"] = None       # and so does PEFT: a plain transformers checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer
path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids)).logits
torch.save({"logits": logits, "dtype": str(next(model.parameters()).dtype), "encoded": tok("one plus two")["input_ids"],
            "type": type(model).__name__}, out)
"""


def test_merged_export_is_sharded_and_loads_in_plain_transformers_with_the_adapter_logits(runs, tmp_path, capsys):
    root, model_dir, out = runs
    merged = tmp_path / "merged"
    assert main(["export", str(out[2]), "--to", "merged", "--out", str(merged), "--max-shard-size", "20KB"]) == 0
    assert "with the tokenizer" in capsys.readouterr().out
    shards = sorted(merged.glob("*.safetensors"))
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size < 40_000 for p in shards)  # 20KB shards (a single tensor may exceed it: none here)
    assert not any("lora" in name for name in index["weight_map"])  # the adapter is folded in, not carried
    assert not (merged / "adapter_config.json").exists() and (merged / "tokenizer.json").is_file()

    result = tmp_path / "loaded.pt"
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CAPABOOST, str(merged), json.dumps(IDS), str(result)],
                   check=True, timeout=300)
    loaded = torch.load(result)
    assert loaded["type"] == "GPT2LMHeadModel" and loaded["dtype"] == "torch.float32"
    assert loaded["encoded"] == tiny_tokenizer()("one plus two")["input_ids"]
    adapter = _adapter_logits(out[2])
    torch.testing.assert_close(loaded["logits"], adapter, atol=1e-5, rtol=1e-5)
    # the adapter was trained: merging it is not the base model again
    base = helpers.tiny_gpt2(**CLM_GPT2).eval()
    with torch.no_grad():
        assert (base(input_ids=torch.tensor(IDS)).logits - adapter).abs().max() > 1e-4


def test_merged_export_default_is_one_file_and_options_are_checked(runs, tmp_path, capsys):
    root, model_dir, out = runs
    merged = tmp_path / "one"
    assert main(["export", str(out[2]), "--to", "merged", "--out", str(merged)]) == 0
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    assert not (merged / "model.safetensors.index.json").exists()
    capsys.readouterr()
    assert main(["export", str(out[2]), "--to", "merged", "--out", str(merged)]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(out[2]), "--to", "merged", "--out", str(merged), "--overwrite"]) == 0
    lora = tmp_path / "lora"
    assert main(["export", str(out[2]), "--to", "lora", "--out", str(lora)]) == 0
    capsys.readouterr()
    # --overwrite replaces only an export of the same kind
    assert main(["export", str(out[2]), "--to", "merged", "--out", str(lora), "--overwrite"]) == 2
    assert "no config.json" in capsys.readouterr().err
    for bad in (["--to", "merged", "--check-serving"], ["--to", "merged", "--max-shard-size", "big"],
                ["--to", "lora", "--max-shard-size", "1GB"]):
        assert main(["export", str(out[2]), "--out", str(tmp_path / "x"), *bad]) == 2
        assert capsys.readouterr().err.startswith("error: --")
    assert not (tmp_path / "x").exists()


def test_cli_lora_export_prints_the_vllm_check_and_check_serving_fails_on_problems(runs, tmp_path, capsys):
    root, model_dir, out = runs
    assert main(["export", str(out[2]), "--to", "lora", "--out", str(tmp_path / "r16"), "--check-serving"]) == 0
    assert "vLLM: no problems found" in capsys.readouterr().out
    assert json.loads((tmp_path / "r16" / "adapter_config.json").read_text())["r"] == 16

    assert main(["export", str(out[3]), "--to", "lora", "--out", str(tmp_path / "r24")]) == 0  # warns only
    err = capsys.readouterr().err
    assert "vLLM: rank 24 is not one of vLLM's --max-lora-rank values" in err and "--max-lora-rank 32" in err
    assert main(["export", str(out[3]), "--to", "lora", "--out", str(tmp_path / "r24b"), "--check-serving"]) == 1
    assert "rank 24" in capsys.readouterr().err
    assert (tmp_path / "r24b" / "adapter_model.safetensors").is_file()  # written, then judged


# ---------------------------------------------------------------- vllm_compatibility on in-memory exports
def _export(tmp_path, name, **config):
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
              "init_lora_weights": False, **config}
    model = get_peft_model(helpers.tiny_llama(), CapaBoostLoraConfig(**config))
    export_as_lora(model).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_vllm_rank_rule(tmp_path):
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 16, 24, 300, 512, 513)] == [1, 8, 8, 16, 32, 320, 512, None]
    assert vllm_compatibility(_export(tmp_path, "d2", num_copies=2)) == []  # rank 16: vLLM's default max
    problems = vllm_compatibility(_export(tmp_path, "d3", num_copies=3))
    assert len(problems) == 1 and "rank 24" in problems[0] and "--max-lora-rank 32" in problems[0]
    config = json.loads((tmp_path / "d2" / "adapter_config.json").read_text())
    (tmp_path / "d2" / "adapter_config.json").write_text(json.dumps({**config, "r": 600}))
    assert "above vLLM's largest --max-lora-rank (512)" in " ".join(vllm_compatibility(tmp_path / "d2"))


def test_vllm_flags_bias_modules_to_save_rank_pattern_and_the_capaboost_folder(tmp_path):
    problems = vllm_compatibility(_export(tmp_path, "bias", num_copies=2, bias="cblora_only"))
    assert problems == ["bias='lora_only': vLLM does not support adapter biases (bias must be 'none')."]
    problems = vllm_compatibility(_export(tmp_path, "mts", num_copies=2, modules_to_save=["lm_head"]))
    assert any("modules_to_save=['lm_head']" in p for p in problems)
    assert any("tensors vLLM does not parse" in p and "lm_head" in p for p in problems)  # the saved head copy
    problems = vllm_compatibility(_export(tmp_path, "pattern", num_copies=2, rank_pattern={"v_proj": 4}))
    assert len(problems) == 1 and "rank_pattern/alpha_pattern" in problems[0]  # ranks 16 and 8 are both allowed

    model = get_peft_model(helpers.tiny_llama(), CapaBoostLoraConfig(r=8, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "native")
    assert "capaboost export RUN --to lora" in vllm_compatibility(tmp_path / "native")[0]
    assert "adapter_config.json is missing" in vllm_compatibility(tmp_path / "nowhere")[0]


def test_vllm_flags_tensor_names_and_dtypes(tmp_path):
    folder = _export(tmp_path, "ok", num_copies=2)
    assert vllm_compatibility(folder) == []
    weights = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(16, 32, dtype=torch.float64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 16, dtype=torch.bfloat16),
               "base_model.model.lm_head.weight": torch.zeros(100, 32)}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    problems = vllm_compatibility(folder)
    assert len(problems) == 2
    assert "lm_head.weight" in problems[0] and "q_proj" not in problems[0]
    assert "['F64']" in problems[1]
    (folder / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in vllm_compatibility(folder)[0]


def test_merged_model_refuses_what_cannot_be_merged_and_keeps_plain_models(tmp_path):
    from capaboost import CapaBoostAdapterConfig, CapaBoostPrefixConfig
    from capaboost.serving import merged_model, save_merged

    prefix = get_peft_model(helpers.tiny_gpt2(), CapaBoostPrefixConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                         encoder_hidden_size=8))
    with pytest.raises(ValueError, match="prompt learning"):
        merged_model(prefix)
    adapter = get_peft_model(helpers.tiny_gpt2(), CapaBoostAdapterConfig(style="pfeiffer", bottleneck=4,
                                                                         task_type="CAUSAL_LM"))
    with pytest.raises(ValueError):  # AdapterMergeError: the bottleneck's non-linearity has no merged form
        merged_model(adapter)
    with pytest.raises(ValueError, match="not a transformers model"):
        merged_model(torch.nn.Linear(2, 2))
    full = helpers.tiny_gpt2()  # full fine-tuning / BitFit: already a plain model, saved as it is
    assert merged_model(full) is full
    files = save_merged(full, tmp_path / "full", tokenizer_from=tmp_path / "no-tokenizer-here")
    assert "model.safetensors" in files and "config.json" in files and not any(f.startswith("tokenizer") for f in files)
