"""``capaboost train --task causal-lm`` on a tiny GPT-2, in one process and under torchrun (2 CPU ranks)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from capaboost.cli import main
import helpers
from test_causal_lm_data import CLM_GPT2, WORDS, tiny_tokenizer
from test_distributed import _torchrun



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny GPT-2 + tokenizer and a copy task ("a b" -> " b a"): every response is 2 words + EOS."""
    root = tmp_path_factory.mktemp("clm")
    model_dir = root / "model"
    tiny_tokenizer().save_pretrained(model_dir)
    helpers.tiny_gpt2(**CLM_GPT2).save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 16), ("dev.jsonl", 6)):
        rows = []
        for _ in range(n):
            x, y = rng.sample(WORDS, 2)
            rows.append(json.dumps({"prompt": f"{x} {y}", "response": f" {y} {x}"}))
        extra = [json.dumps({"text": "one two three"})] if name == "dev.jsonl" else []  # scored, no exact match
        (data / name).write_text("\n".join(rows + extra) + "\n")
    return root, model_dir, data


def _args(model_dir, data, out) -> list[str]:
    # --lora-r, not --r: torchrun rejects "--r" as an ambiguous prefix of its own --rdzv-*/--role options
    return ["train", "--lora-r", "2", "--task", "causal-lm", "--method", "capaboost-lora", "--model", str(model_dir),
            "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--lr", "0.01",
            "--max-seq-len", "16", "--eval-batch-size", "4", "--no-progress", "--cache-dir",
            str(out.parent / f"cache-{out.name}")]


def test_cli_trains_causal_lm_and_reports_perplexity_and_exact_match(setup):
    root, model_dir, data = setup
    assert main(_args(model_dir, data, root / "one")) == 0
    metrics = json.loads((root / "one" / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test) == {"loss", "perplexity", "exact_match"} and metrics["main_metric"] == "perplexity"
    assert test["perplexity"] == pytest.approx(torch.tensor(test["loss"]).exp().item(), rel=1e-6)
    assert 0.0 <= test["exact_match"] <= 1.0 and metrics["sizes"] == {"train": 16, "validation": 7, "test": 7}
    assert set(metrics["delta_ranks"].values()) == {4}  # d*r on GPT-2's fused c_attn (PEFT's default target)
    assert (root / "one" / "adapter" / "adapter_config.json").is_file()


def test_cli_under_torchrun_two_ranks(setup):
    root, model_dir, data = setup
    _torchrun(root / "torchrun-cli.log", "-m", "capaboost.cli", *_args(model_dir, data, root / "two"))
    two = json.loads((root / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["global_batch_size"] == 4 and two["per_device_batch_size"] == 2
    assert set(two["test"]) == {"loss", "perplexity", "exact_match"}
    one_dir = root / "one"
    if not (one_dir / "metrics.json").is_file():
        assert main(_args(model_dir, data, one_dir)) == 0
    one = json.loads((one_dir / "metrics.json").read_text())
    # same global batches; every response has the same token count, so the rank-averaged loss is the global one
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-4)
