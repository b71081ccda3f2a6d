"""Test helpers: tiny in-memory models, tiny saved models and data files in every supported layout.

Import it as ``import helpers`` (pytest puts tests/ on the path; so does running a tests/ script).
Everything is written to a caller-given folder; nothing is downloaded. The text data is a toy
sentiment task (positive words vs negative words) that a 2-layer, 32-wide BERT learns in a few steps.

The in-memory builders (``tiny_bert``, ``tiny_gpt2``, ``tiny_llama``, ``tiny_vit``) seed torch, take the
config's fields as keywords over a small default and return the model as constructed (train mode): call
``.eval()`` where dropout must be off.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "really", "story", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER + ["?", ".", "what", "who", "which", "quality"]


# ---------------------------------------------------------------- in-memory tiny models
TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
BERT_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4)
GPT2_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TINY_LLAMA = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                patch_size=4)


def tiny_bert(seed: int = 0, **config):
    """``BertForSequenceClassification`` of ``TINY_BERT`` updated by ``config``, initialised from ``seed``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**TINY_BERT, **config}))


def tiny_gpt2(seed: int = 0, **config):
    """``GPT2LMHeadModel`` of ``TINY_GPT2`` updated by ``config``, initialised from ``seed``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, **config}))


def tiny_llama(seed: int = 0, **config):
    """``LlamaForCausalLM`` of ``TINY_LLAMA`` updated by ``config``, initialised from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))


def tiny_vit(seed: int = 0, **config):
    """``ViTForImageClassification`` of ``TINY_VIT`` updated by ``config``, initialised from ``seed``."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**{**TINY_VIT, **config}))


# ---------------------------------------------------------------- saved models and data files
def save_tiny_bert(path: str | Path, hidden: int = 32, layers: int = 2) -> str:
    """A randomly initialised BERT (hidden 32, 2 layers) with a WordPiece tokenizer, saved for ``--model``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return str(path)


def save_tiny_vit(path: str | Path, image_size: int = 16, hidden: int = 32, layers: int = 2) -> str:
    """A randomly initialised ViT (hidden 32, 2 layers, 16x16 input, 4x4 patches), saved for ``--model``."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size, patch_size=4, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (sentence, label) pairs; label 1 iff the sentiment word is positive. Balanced."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, 4)
        words.insert(rng.randrange(5), word)
        out.append((" ".join(words) + " .", label))
    return out


def _tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_glue(task: str, folder: str | Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> str:
    """``train.tsv`` + dev file(s) of ``task`` in its GLUE release layout, with learnable toy labels."""
    folder = Path(folder)
    for name, n, s in (("train", n_train, seed), ("dev", n_dev, seed + 1)):
        data = sentences(n, s)
        second = [(sentences(1, s * 1000 + i)[0][0], lab) for i, (_, lab) in enumerate(data)]
        if task == "cola":
            _tsv(folder / f"{name}.tsv", None, [["src", lab, "" if lab else "*", t] for t, lab in data])
        elif task == "sst2":
            _tsv(folder / f"{name}.tsv", ["sentence", "label"], [[t, lab] for t, lab in data])
        elif task == "mrpc":
            rows = [[lab, i, i + 1, t, p] for i, ((t, lab), (p, _)) in enumerate(zip(data, second))]
            _tsv(folder / f"{name}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], rows)
        elif task == "qqp":
            rows = [[i, i, i + 1, t, p, lab] for i, ((t, lab), (p, _)) in enumerate(zip(data, second))]
            _tsv(folder / f"{name}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], rows)
        elif task == "stsb":
            rows = [[i, t, p, f"{4.0 * lab + 0.5 * (i % 3):.2f}"] for i, ((t, lab), (p, _)) in enumerate(zip(data, second))]
            _tsv(folder / f"{name}.tsv", ["index", "sentence1", "sentence2", "score"], rows)
        elif task in ("mnli", "qnli", "rte"):
            names = {"mnli": ["contradiction", "entailment", "neutral"], "qnli": ["entailment", "not_entailment"],
                     "rte": ["entailment", "not_entailment"]}[task]
            cols = {"mnli": ["index", "sentence1", "sentence2", "gold_label"],
                    "qnli": ["index", "question", "sentence", "label"],
                    "rte": ["index", "sentence1", "sentence2", "label"]}[task]
            rows = [[i, t, p, names[(lab + i % 2 * (task == "mnli")) % len(names)]]
                    for i, ((t, lab), (p, _)) in enumerate(zip(data, second))]
            files = ["dev_matched", "dev_mismatched"] if task == "mnli" and name == "dev" else [name]
            for f in files:
                _tsv(folder / f"{f}.tsv", cols, rows)
        else:
            raise ValueError(f"no GLUE fixture for task {task!r}")
    return str(folder)


def write_text(path: str | Path, n: int = 60, seed: int = 0, text_column: str = "review", label_column: str = "sentiment") -> str:
    """A labelled text file (``.csv``, ``.tsv`` or ``.jsonl`` by suffix) with named columns and string labels."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(t, "pos" if lab else "neg") for t, lab in sentences(n, seed)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({text_column: t, label_column: lab}) + "\n" for t, lab in rows))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writerow([text_column, label_column])
            writer.writerows(rows)
    return str(path)


def write_squad(folder: str | Path, version_2: bool = False, n_train: int = 24, n_dev: int = 12, seed: int = 0) -> str:
    """SQuAD-format ``train``/``dev`` JSON: "what quality was the film?" -> its sentiment word."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "v2.0" if version_2 else "v1.1"
    for split, n, s in (("train", n_train, seed), ("dev", n_dev, seed + 1)):
        rng = random.Random(s)
        paragraphs = []
        for i in range(n):
            word = rng.choice(POSITIVE + NEGATIVE)
            context = f"the film was {word} and the plot was {rng.choice(FILLER)} ."
            qa = {"id": f"{split}-{i}", "question": "what quality was the film ?", "answers": []}
            if version_2 and i % 4 == 3:
                qa["question"] = "who was the actor ?"
                qa["is_impossible"] = True
            else:
                qa["answers"] = [{"text": word, "answer_start": context.index(word)}]
            paragraphs.append({"context": context, "qas": [qa]})
        data = {"version": suffix, "data": [{"title": "toy", "paragraphs": paragraphs}]}
        (folder / f"{split}-{suffix}.json").write_text(json.dumps(data))
    return str(folder)


def write_images_npz(path: str | Path, n_train: int = 40, n_test: int = 20, size: int = 8, seed: int = 0) -> str:
    """An NPZ of (N, H, W, 3) uint8 images: class 0 dark, class 1 bright (learnable), with a test set."""
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        x = rng.integers(0, 100, size=(n, size, size, 3)) + 150 * y[:, None, None, None]
        return x.astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=np.array(["dark", "bright"]))
    return str(path)
