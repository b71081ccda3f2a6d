"""Causal-LM JSONL reading, response-only labels, padding, perplexity and exact match (tiny offline tokenizer)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from capaboost import CapaBoostLoraConfig
from capaboost.data.causal_lm import (
    IGNORE_INDEX,
    CausalLMCollator,
    CausalLMExample,
    load_causal_lm,
    read_causal_lm_jsonl,
    tokenize_example,
)
from capaboost.data.errors import DataError
from capaboost.train.tasks.causal_lm import evaluate_causal_lm, exact_match, greedy_generate, perplexity
import helpers

WORDS = "what is one two three four five plus equals the capital of france paris yes no a b c d".split()



# the tiny GPT-2 of the causal-LM tests (tokenizer: tiny_tokenizer's 24 ids + room)
CLM_GPT2 = dict(vocab_size=32, n_positions=64, n_head=2, **helpers.GPT2_NO_DROPOUT, bos_token_id=0, eos_token_id=1)


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_gpt2() -> torch.nn.Module:
    base = helpers.tiny_gpt2(**CLM_GPT2)
    peft_config = CapaBoostLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                                      task_type="CAUSAL_LM")
    return get_peft_model(base, peft_config).eval()


def write_jsonl(path, rows) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_reads_pairs_and_text(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "one plus one", "response": " two"}, "", {"text": "yes no"}])
    assert read_causal_lm_jsonl(tmp_path / "d.jsonl") == [
        CausalLMExample("one plus one", " two"), CausalLMExample("", "yes no", is_text=True)]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a"}, r"line 2, column 'response': missing field 'response'.*'text' or 'messages'; fields found: "
                      r"\['prompt'\]"),
    ({"text": "a", "prompt": "b"}, "either 'text' or 'prompt'/'response'"),
    ({"prompt": "a", "response": 3}, "'response' must be a string, got int"),
    ({"prompt": "a", "response": "  "}, "'response' is empty"),
    ({"text": ""}, "'text' is empty"),
    ('{"prompt": ', "line 2: invalid JSON"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "ok"}, row])
    with pytest.raises(DataError, match=message) as err:
        read_causal_lm_jsonl(path)
    assert str(path) in str(err.value)


def test_labels_mask_the_prompt_and_truncate_from_the_ends():
    tok = tiny_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    feature = tokenize_example(CausalLMExample("what is one plus one", " two"), tok, max_length=16)
    assert feature["input_ids"] == ids("what is one plus one") + ids("two") + [1]
    assert feature["labels"] == [IGNORE_INDEX] * 5 + ids("two") + [1]
    short = tokenize_example(CausalLMExample("what is one plus one", " two three four"), tok, max_length=5)
    assert short["input_ids"] == ids("one two three four") + [1]  # the prompt keeps its tail
    assert short["labels"] == [IGNORE_INDEX] + ids("two three four") + [1]
    shorter = tokenize_example(CausalLMExample("what is one plus one", " two three four"), tok, max_length=3)
    assert shorter["labels"] == [IGNORE_INDEX] + ids("two three")  # the response keeps its head
    text = tokenize_example(CausalLMExample("", "yes no", is_text=True), tiny_tokenizer(bos=True), 8)
    assert text == {"input_ids": [0] + ids("yes no") + [1], "labels": [IGNORE_INDEX] + ids("yes no") + [1]}
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tokenize_example(CausalLMExample("a", "b"), tok, 1)


def test_collator_pads_right_with_ignored_labels():
    batch = CausalLMCollator(pad_id=1)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                        {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_load_folder_and_missing_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": " b"}] * 3)
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "c d"}, {"prompt": "a", "response": " c"}])
    data = load_causal_lm(tmp_path, max_train_samples=2)
    assert data.sizes() == {"train": 2, "validation": 2, "test": 2} and data.main_metric == "perplexity"
    (tmp_path / "dev.jsonl").unlink()
    with pytest.raises(DataError, match="missing validation.jsonl or dev.jsonl"):
        load_causal_lm(tmp_path)


def test_perplexity_is_exp_of_response_token_nll_independent_of_batching():
    tok, model = tiny_tokenizer(), tiny_gpt2()
    examples = [CausalLMExample("what is one plus one", " two"), CausalLMExample("the capital of", " france paris"),
                CausalLMExample("", "a b c d", is_text=True)]
    features = [tokenize_example(e, tok, 32) for e in examples]
    collate = CausalLMCollator(pad_id=1)
    with torch.no_grad():  # HF's own loss: mean NLL over the labelled tokens of one unpadded sequence
        singles = [(model(**collate([f])).loss.item(), sum(x != IGNORE_INDEX for x in f["labels"][1:]))
                   for f in features]
    expected = sum(loss * n for loss, n in singles) / sum(n for _, n in singles)
    batched = perplexity(model, [collate(features)])
    assert batched["loss"] == pytest.approx(expected, rel=1e-5)
    assert batched["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert perplexity(model, [collate(features[:1]), collate(features[1:])])["loss"] == pytest.approx(expected, 1e-5)


def test_exact_match_of_left_padded_batched_greedy_generation():
    tok, model = tiny_tokenizer(), tiny_gpt2()
    prompts = ["what is one plus one", "the capital of france", "yes"]
    alone = [greedy_generate(model, tok, [p], max_new_tokens=3)[0] for p in prompts]  # no padding at all
    assert greedy_generate(model, tok, prompts, max_new_tokens=3, batch_size=3) == alone
    assert exact_match([" " + a + " " for a in alone], alone) == 1.0
    assert exact_match(alone[:2] + ["zzz"], alone) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        exact_match(alone[:2], alone)
    examples = [CausalLMExample(p, a) for p, a in zip(prompts, alone)] + [CausalLMExample("", "a b", True)]
    metrics = evaluate_causal_lm(model, tok, examples, max_new_tokens=3)
    assert metrics["exact_match"] == 1.0 and metrics["perplexity"] > 1


def test_training_lowers_perplexity_and_reaches_exact_match():
    tok, model = tiny_tokenizer(), tiny_gpt2()
    examples = [CausalLMExample("what is one plus one", " two"), CausalLMExample("the capital of france", " paris")]
    batch = CausalLMCollator(pad_id=1)([tokenize_example(e, tok, 32) for e in examples])
    before = evaluate_causal_lm(model, tok, examples)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(20):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = evaluate_causal_lm(model, tok, examples)
    # a frozen random head with tied tiny embeddings bounds the logits, so perplexity cannot approach 1 here
    assert after["perplexity"] < 0.7 * before["perplexity"]
    assert after["exact_match"] == 1.0 > before["exact_match"]
