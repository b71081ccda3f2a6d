"""SQuAD reader, HF-style features with an offline WordPiece tokenizer, and decoding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from capaboost.data import DataError, SquadData, load_task
from capaboost.data.squad import (
    SquadExample,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_file,
    references,
)
from capaboost.data.metrics import compute_metrics

FILLER = " ".join(f"w{i}" for i in range(40))
CONTEXT_A = f"The Broncos won Super Bowl 50 in Santa Clara. {FILLER} The city of Denver is in Colorado."
CONTEXT_B = f"{FILLER} Paris is the capital of France, not Lyon."


def _answer(context: str, text: str, nth: int = 0) -> dict:
    starts = [m.start() for m in re.finditer(re.escape(text), context)]
    return {"text": text, "answer_start": starts[nth]}


def squad_json(version_2: bool) -> dict:
    qas_a = [
        {"id": "a1", "question": " Who won Super Bowl 50?", "answers": [_answer(CONTEXT_A, "The Broncos"), _answer(CONTEXT_A, "Broncos")]},
        {"id": "a2", "question": "Where is Denver?", "answers": [_answer(CONTEXT_A, "Colorado")]},
    ]
    qas_b = [{"id": "b1", "question": "What is the capital of France?", "answers": [_answer(CONTEXT_B, "Paris")]}]
    if version_2:
        qas_b.append({"id": "b2", "question": "What is the capital of Spain?", "answers": [],
                      "plausible_answers": [_answer(CONTEXT_B, "Lyon")], "is_impossible": True})
    return {"version": "2.0" if version_2 else "1.1", "data": [
        {"title": "Football", "paragraphs": [{"context": CONTEXT_A, "qas": qas_a}]},
        {"title": "France", "paragraphs": [{"context": CONTEXT_B, "qas": qas_b}]},
    ]}


def write_squad(folder: Path, version_2: bool = False, names: tuple[str, str] = ("train.json", "dev.json")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(json.dumps(squad_json(version_2)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import BertTokenizerFast

    words = set()
    for text in (CONTEXT_A, CONTEXT_B, json.dumps(squad_json(True))):
        words |= set(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(path))
    assert tok.is_fast and tok.convert_tokens_to_ids("broncos") != tok.unk_token_id
    return tok


def test_reader_parses_examples(tmp_path: Path) -> None:
    write_squad(tmp_path, version_2=True)
    ex = read_squad_file(tmp_path / "dev.json", version_2=True)
    assert [e.id for e in ex] == ["a1", "a2", "b1", "b2"]
    a1 = ex[0]
    assert a1.answer_texts == ["The Broncos", "Broncos"] and a1.context[a1.answer_starts[1]:].startswith("Broncos")
    assert a1.title == "Football" and not a1.is_impossible
    assert ex[3].is_impossible and ex[3].answer_texts == [] and ex[3].answer_starts == []
    assert references(ex)["b2"] == []


def test_load_task_standard_names_and_protocol(tmp_path: Path) -> None:
    write_squad(tmp_path / "v1", names=("train-v1.1.json", "dev-v1.1.json"))
    data = load_task("squad", tmp_path / "v1", protocol="propetl")
    assert isinstance(data, SquadData) and not data.version_2
    assert data.sizes() == {"train": 3, "validation": 1, "test": 2}  # small task: dev split in half
    write_squad(tmp_path / "v2", version_2=True, names=("train-v2.0.json", "dev-v2.0.json"))
    v2 = load_task("squad_v2", tmp_path / "v2")
    assert v2.version_2 and v2.main_metric == "f1" and len(v2.test) == 4


def _perfect_logits(train_feats: dict) -> tuple[np.ndarray, np.ndarray]:
    n, length = len(train_feats["input_ids"]), len(train_feats["input_ids"][0])
    start, end = np.zeros((n, length)), np.zeros((n, length))
    start[np.arange(n), train_feats["start_positions"]] = 10.0
    end[np.arange(n), train_feats["end_positions"]] = 10.0
    return start, end


def _single_answer(examples: list[SquadExample]) -> list[SquadExample]:
    # Training targets use the first gold answer; keep one so perfect logits mean "that answer".
    return [SquadExample(e.id, e.question, e.context, e.answer_texts[:1], e.answer_starts[:1], e.is_impossible, e.title)
            for e in examples]


def test_train_features_windows_and_labels(tokenizer, tmp_path: Path) -> None:
    examples = _single_answer(read_squad_file(write_squad(tmp_path) / "dev.json"))
    feats = prepare_train_features(examples, tokenizer, max_len=32, doc_stride=8)
    n = len(feats["input_ids"])
    assert n > len(examples)  # long contexts overflow into several windows
    assert all(len(ids) == 32 for ids in feats["input_ids"])
    cls = tokenizer.cls_token_id
    hits = 0
    for ids, s, e in zip(feats["input_ids"], feats["start_positions"], feats["end_positions"]):
        if s == 0:
            assert e == 0 and ids[0] == cls  # window without the answer -> CLS
            continue
        hits += 1
        span = tokenizer.decode(ids[s : e + 1])
        assert span in {"the broncos", "colorado", "paris"}
    assert hits >= len(examples)


def test_perfect_logits_recover_gold_v1(tokenizer, tmp_path: Path) -> None:
    examples = _single_answer(read_squad_file(write_squad(tmp_path) / "dev.json"))
    train_feats = prepare_train_features(examples, tokenizer, max_len=32, doc_stride=8)
    eval_feats = prepare_eval_features(examples, tokenizer, max_len=32, doc_stride=8)
    assert eval_feats["input_ids"] == train_feats["input_ids"]
    assert eval_feats["example_id"][0] == "a1" and eval_feats["offset_mapping"][0][0] is None
    start, end = _perfect_logits(train_feats)
    preds = postprocess_predictions(examples, eval_feats, start, end)
    assert preds == {"a1": "The Broncos", "a2": "Colorado", "b1": "Paris"}
    assert compute_metrics("squad", preds, references(examples)) == {"exact_match": 100.0, "f1": 100.0}


def test_v2_no_answer_and_threshold(tokenizer, tmp_path: Path) -> None:
    examples = _single_answer(read_squad_file(write_squad(tmp_path, version_2=True) / "dev.json", version_2=True))
    train_feats = prepare_train_features(examples, tokenizer, max_len=32, doc_stride=8)
    eval_feats = prepare_eval_features(examples, tokenizer, max_len=32, doc_stride=8)
    b2 = [i for i, q in enumerate(eval_feats["example_id"]) if q == "b2"]
    assert b2 and all(train_feats["start_positions"][i] == 0 for i in b2)
    start, end = _perfect_logits(train_feats)
    preds = postprocess_predictions(examples, eval_feats, start, end, version_2=True)
    assert preds["b2"] == "" and preds["b1"] == "Paris"
    out = compute_metrics("squad_v2", preds, references(examples))
    assert out["exact_match"] == 100.0 and out["no_answer_total"] == 1.0
    # A huge threshold forbids "no answer": the best span is returned instead.
    forced = postprocess_predictions(examples, eval_feats, start, end, version_2=True, null_threshold=1e9)
    assert forced["b2"] != "" and forced["b1"] == "Paris"
    # Under v1 the null score is ignored altogether.
    assert postprocess_predictions(examples, eval_feats, start, end)["b2"] != ""


def test_max_answer_len_limits_spans(tokenizer, tmp_path: Path) -> None:
    examples = _single_answer(read_squad_file(write_squad(tmp_path) / "dev.json"))[:1]
    feats = prepare_eval_features(examples, tokenizer, max_len=32, doc_stride=8)
    train = prepare_train_features(examples, tokenizer, max_len=32, doc_stride=8)
    start, end = _perfect_logits(train)
    assert postprocess_predictions(examples, feats, start, end, max_answer_len=1)["a1"] != "The Broncos"


# ------------------------------------------------------------------ errors
def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "dev.json"
    p.write_text('{"data": [\n  {"paragraphs": [}\n]}')
    with pytest.raises(DataError, match=r"dev\.json, line 2: invalid JSON at column \d+"):
        read_squad_file(p)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("data"), r"<root>: missing key 'data'"),
        (lambda d: d["data"][1]["paragraphs"][0].pop("context"), r"data\[1\]\.paragraphs\[0\]: missing key 'context'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("question"), r"qas\[1\]: missing key 'question'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start="3"),
         r"answers\[0\]\.answer_start: expected int, got str"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=10_000),
         r"answer_start 10000 .* outside the context"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="a1"), r"duplicate question id 'a1'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(answers=[]), r"no answers; unanswerable questions need squad_v2"),
        (lambda d: d.update(data=[]), r"no questions"),
    ],
)
def test_malformed_structure(tmp_path: Path, mutate, message: str) -> None:
    d = squad_json(False)
    mutate(d)
    p = tmp_path / "train.json"
    p.write_text(json.dumps(d))
    with pytest.raises(DataError, match=message) as err:
        read_squad_file(p)
    assert str(p) in str(err.value)


def test_missing_files_name_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing train file; expected one of \['train-v2\.0\.json', 'train\.json'\]"):
        load_task("squad_v2", tmp_path)
    (tmp_path / "train.json").write_text(json.dumps(squad_json(False)))
    with pytest.raises(DataError, match=r"dev\.json.*missing dev file"):
        load_task("squad", tmp_path)


def test_slow_tokenizer_is_refused() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        prepare_eval_features([], Slow(), 32, 8)
