"""Chat ``messages`` rows of the causal-LM task: chat template, assistant-only labels, truncation, errors, packing,
and a run through the runner (tiny offline tokenizers with hand-written chat templates, tiny GPT-2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from capaboost.data.causal_lm import (
    IGNORE_INDEX,
    CausalLMCollator,
    CausalLMExample,
    pack_features,
    read_causal_lm_jsonl,
    tokenize_example,
)
from capaboost.data.chat import tokenize_chat
from capaboost.data.errors import DataError
from capaboost.train.errors import ConfigError
from capaboost.train.run_config import RunConfig
import helpers
from test_causal_lm_data import CLM_GPT2, WORDS, write_jsonl

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# A minimal template: BOS, then "<|role|> content <|end|>" per turn; the generation prompt opens an assistant turn.
TINY_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# Qwen2.5's ChatML template (a default system prompt when none is given), as real chat models ship it.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CONVERSATION = [
    {"role": "system", "content": "yes no"},
    {"role": "user", "content": "what is one plus one"},
    {"role": "assistant", "content": "two"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four a b"},
]


def chat_tokenizer(template: str | None = TINY_TEMPLATE) -> PreTrainedTokenizerFast:
    """test_causal_lm_data's word-level vocabulary plus role tokens; EOS is the end-of-turn token, as in chat models."""
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab.update({t: len(vocab) + i for i, t in enumerate(ROLE_TOKENS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(ROLE_TOKENS)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<|end|>", unk_token="<unk>",
                                  pad_token="<eos>")
    out.chat_template = template
    return out


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2/Qwen style, merges across spaces and newlines) trained here, with ChatML."""
    corpus = ["You are a helpful assistant.", "What is the capital of France?", "Paris is the capital of France.",
              "And of Italy? Rome, of course.", "one two three four five"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.chat_template = CHATML_TEMPLATE
    return out


def labelled_runs(feature: dict[str, list[int]]) -> list[list[int]]:
    """The maximal runs of consecutive labelled tokens, with their labels checked to be the input ids."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    return runs + ([current] if current else [])


def template_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---------------------------------------------------------------- reading


def test_messages_rows_are_detected_per_row(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}, {"prompt": "a", "response": " b"}, {"text": "c"}])
    rows = read_causal_lm_jsonl(tmp_path / "d.jsonl")
    assert rows[0].messages == CONVERSATION and rows[0].source == (str(tmp_path / "d.jsonl"), 1)
    assert not rows[0].has_reference and rows[1].has_reference and not rows[2].has_reference
    assert rows[1:] == [CausalLMExample("a", " b"), CausalLMExample("", "c", is_text=True)]


@pytest.mark.parametrize("messages, message", [
    ("hi", "'messages' must be a non-empty list.*got str"),
    ([], "got an empty list"),
    (["hi"], "message 1 must be an object"),
    ([{"role": "bot", "content": "x"}], "message 1 has role 'bot'; roles are system, user, assistant"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}],
     r"message 2 \(assistant\): 'content' must be a string, got int"),
    ([{"role": "user", "content": "x"}, {"role": "assistant"}], "'content' must be a string, got NoneType"),
    ([{"role": "user", "content": "x"}], "no assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], "every assistant turn is empty"),
    ([{"role": "assistant", "content": "x", "name": "bob"}], r"fields \['name'\]; only 'role' and 'content'"),
])
def test_bad_messages_name_file_and_line(tmp_path, messages, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "ok"}, {"messages": messages}])
    with pytest.raises(DataError, match=message) as err:
        read_causal_lm_jsonl(path)
    assert str(err.value).startswith(f"{path}, line 2, column 'messages': ")


def test_messages_beside_prompt_or_text_are_refused(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION, "text": "a"}])
    with pytest.raises(DataError, match=r"line 1.*either 'messages' or \['text'\]"):
        read_causal_lm_jsonl(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- labels


def test_labels_cover_exactly_the_assistant_turns_and_their_end_token():
    tok = chat_tokenizer()
    feature = tokenize_chat(CONVERSATION, tok, max_length=64)
    assert feature["input_ids"] == template_ids(tok, CONVERSATION)  # the template's own tokenization
    end = tok.convert_tokens_to_ids("<|end|>")
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert labelled_runs(feature) == [ids("two") + [end], ids("four a b") + [end]]
    assert tok.decode(sum(labelled_runs(feature), [])) == "two <|end|> four a b <|end|>"
    # a single-turn conversation without a system message
    single = tokenize_chat(CONVERSATION[1:3], tok, 64)
    assert labelled_runs(single) == [ids("two") + [end]]
    assert sum(x != IGNORE_INDEX for x in single["labels"]) == 2


def test_a_real_chatml_template_with_byte_level_bpe():
    tok = chatml_tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris is the capital of France."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome, of course."}]
    feature = tokenize_chat(messages, tok, max_length=512)
    assert feature["input_ids"] == template_ids(tok, messages)
    runs = [tok.decode(run) for run in labelled_runs(feature)]
    assert runs == ["Paris is the capital of France.<|im_end|>", "Rome, of course.<|im_end|>"]
    # everything else (default system prompt, headers, user turns, the newline after <|im_end|>) is masked
    masked = "".join(tok.decode([t]) for t, x in zip(feature["input_ids"], feature["labels"]) if x == IGNORE_INDEX)
    assert masked == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" "\n"
                      "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n" "\n")


def test_truncation_keeps_the_head_with_aligned_labels():
    tok = chat_tokenizer()
    full = tokenize_chat(CONVERSATION, tok, max_length=64)
    cut = tokenize_chat(CONVERSATION, tok, max_length=20)
    assert len(full["input_ids"]) > 20
    assert cut == {"input_ids": full["input_ids"][:20], "labels": full["labels"][:20]}
    assert labelled_runs(cut)[0] == labelled_runs(full)[0]  # the first answer survives, the second is cut
    first = next(i for i, x in enumerate(full["labels"]) if x != IGNORE_INDEX)
    with pytest.raises(DataError, match=f"first assistant token is token {first + 1} .*--max-seq-len {first}"):
        tokenize_chat(CONVERSATION, tok, max_length=first)
    assert tokenize_chat(CONVERSATION, tok, max_length=first + 1)["labels"][-1] != IGNORE_INDEX


def test_tokenize_example_names_the_row_for_template_problems(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"text": "a"}, {"messages": CONVERSATION}])
    example = read_causal_lm_jsonl(path)[1]
    no_template = f"{path}, line 2.*chat template, and this one has none.*tokenizer.chat_template"
    with pytest.raises(DataError, match=no_template):
        tokenize_example(example, chat_tokenizer(template=None), 64)
    unstable = "{{ messages | length }}" + TINY_TEMPLATE  # earlier turns render differently once more follow
    with pytest.raises(DataError, match="line 2.*renders the first 2 messages differently"):
        tokenize_example(example, chat_tokenizer(unstable), 64)
    with pytest.raises(DataError, match=r"changes the content of message 3 \(assistant\)"):
        tokenize_example(example, chat_tokenizer(TINY_TEMPLATE.replace("m['content']", "m['content'] | upper")), 64)
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="chat template fails on this conversation: roles must alternate"):
        tokenize_example(example, chat_tokenizer(failing), 64)


# ---------------------------------------------------------------- packing


def test_packing_fills_blocks_in_order_and_masks_each_examples_first_label():
    features = [{"input_ids": [10 + i] * n, "labels": [IGNORE_INDEX] + [20 + i] * (n - 1)} | {"example": None}
                for i, n in enumerate([3, 4, 5, 2, 8, 1])]
    features[3]["labels"] = [7, 7]  # a text row: its first label is set, and must be masked once packed
    blocks = pack_features(features, max_length=8)
    assert [len(b["input_ids"]) for b in blocks] == [7, 7, 8, 1]  # 3+4 | 5+2 | 8 | 1
    assert blocks[1]["input_ids"] == [12] * 5 + [13] * 2
    assert blocks[1]["labels"] == [IGNORE_INDEX] + [22] * 4 + [IGNORE_INDEX, 7]
    assert blocks[1]["position_ids"] == [0, 1, 2, 3, 4, 0, 1]
    labelled = lambda fs: sum(x != IGNORE_INDEX for f in fs for x in f["labels"][1:])  # noqa: E731
    assert labelled(blocks) == labelled(features)  # exactly the tokens that count unpacked
    with pytest.raises(ValueError, match="longer than the block length"):
        pack_features(features, max_length=7)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_blocks_keep_examples_apart_and_give_their_unpacked_loss(arch):
    tok = chat_tokenizer()
    model = (helpers.tiny_gpt2(**CLM_GPT2) if arch == "gpt2" else helpers.tiny_llama(vocab_size=32)).eval()
    model.config.use_cache = False  # what CausalLMTask.build_model does under --packing
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:], [{"role": "assistant", "content": "yes"}]]
    features = [tokenize_chat(c, tok, 64) for c in conversations]
    blocks = pack_features(features, max_length=40)
    assert len(blocks) < len(features)
    batch = CausalLMCollator(pad_id=1)(blocks)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    assert batch["position_ids"][-1, len(blocks[-1]["input_ids"]):].tolist()[:2] == [0, 1]  # padding: own sequence

    def nll(b) -> tuple[float, int]:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
        return loss.item(), int((labels != IGNORE_INDEX).sum())

    with torch.no_grad():
        packed = nll(batch)
        alone = [nll(CausalLMCollator(pad_id=1)([f])) for f in features]
    assert packed[1] == sum(n for _, n in alone)
    assert packed[0] == pytest.approx(sum(x for x, _ in alone), rel=1e-5)  # no attention across examples
    # the second example of the first block sees only itself; with a KV cache transformers cannot see the packing
    n0, n1 = (len(f["input_ids"]) for f in features[:2])
    assert blocks[0]["position_ids"][n0] == 0 and len(blocks[0]["input_ids"]) >= n0 + n1
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([features[1]["input_ids"]])).logits[0]
        first_block = {k: v[:1] for k, v in batch.items() if k != "labels"}
        inside = lambda: model(**first_block).logits[0, n0:n0 + n1]  # noqa: E731
        assert (inside() - alone).abs().max() < 1e-5
        model.config.use_cache = True
        assert (inside() - alone).abs().max() > 1e-3


# ---------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model_dir = root / "model"
    chat_tokenizer().save_pretrained(model_dir)
    helpers.tiny_gpt2(**CLM_GPT2).save_pretrained(model_dir)
    data = root / "data"
    data.mkdir()
    words = WORDS[:8]
    for name, n in (("train.jsonl", 12), ("dev.jsonl", 4)):
        rows = [{"messages": [{"role": "user", "content": f"{words[i % 8]} {words[(i + 1) % 8]}"},
                              {"role": "assistant", "content": f"{words[(i + 1) % 8]} {words[i % 8]}"}]}
                for i in range(n)]
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, str(model_dir), str(data)


@pytest.mark.parametrize("packing", [False, True])
def test_runner_trains_on_messages(chat_setup, packing, monkeypatch):
    from capaboost.train.run import train
    from capaboost.train.tasks import causal_lm

    seen: list[set] = []

    class Recording(CausalLMCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            seen.append(set(batch))
            return batch

    monkeypatch.setattr(causal_lm, "CausalLMCollator", Recording)
    built, build = [], causal_lm.CausalLMTask.build_model
    monkeypatch.setattr(causal_lm.CausalLMTask, "build_model", lambda self: built.append(build(self)) or built[-1])
    root, model_dir, data = chat_setup
    out = root / f"out-{packing}"
    metrics = train(RunConfig(task="causal-lm", method="capaboost-lora", model=model_dir, data_dir=data, r=2,
                              max_steps=3, batch_size=2, lr=0.01, max_seq_len=32, packing=packing, threads=1,
                              progress=False, output_dir=str(out), cache_dir=str(root / "cache")))
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["test"]) == {"loss", "perplexity"}  # chat rows: no exact match
    assert math.isfinite(saved["test"]["loss"]) and saved["test"]["loss"] == metrics["test"]["loss"]
    assert saved["config"]["packing"] is packing
    # each conversation is 9 tokens ("<bos> <|user|> x y <|end|> <|assistant|> y x <|end|>"): 3 per 32-token block
    assert saved["sizes"] == {"train": 4 if packing else 12, "validation": 4, "test": 4}
    packed_keys, plain_keys = {"input_ids", "labels", "position_ids"}, {"input_ids", "labels", "attention_mask"}
    assert seen.count(packed_keys) == (3 if packing else 0)  # the 3 training steps' batches
    assert seen.count(plain_keys) == len(seen) - seen.count(packed_keys) >= 2  # evaluation: never packed
    assert built and all(m.config.use_cache is not packing for m in built)  # packed batches need no KV cache
    assert saved["train_tokens_per_s"] > 0  # packed batches have no attention mask: every position counts


def test_packing_is_refused_with_prefix_tuning_and_other_tasks(chat_setup, tmp_path, capsys):
    from capaboost.cli import main
    from capaboost.train.tasks.causal_lm import CausalLMTask

    _, model_dir, data = chat_setup
    cfg = RunConfig(task="causal-lm", method="prefix", model=model_dir, data_dir=data, packing=True)
    with pytest.raises(ConfigError, match="--packing does not work with 'prefix'"):
        CausalLMTask(cfg).load()
    assert main(["train", "--task", "sst2", "--data-dir", str(tmp_path), "--packing", "--output-dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --packing does nothing for task 'sst2'") and "causal-lm" in err
