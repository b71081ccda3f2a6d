"""lm-evaluation-harness (``pip install capaboost[eval]``, tested with lm_eval 0.4.13) on a trained CapaBoost-LoRA run,
offline: a tiny GPT-2 trained with ``capaboost train``, a one-file multiple-choice task defined in a YAML beside a
local JSONL, and lm-eval's ``hf`` model (HFLM) given the adapter as ``peft=``. The per-choice loglikelihoods show
the adapter is applied (they differ from the base model's) and equal those of ``capaboost export --to merged`` and of
the stock LoRA of ``capaboost export --to lora``. Stock lm-eval (no ``import capaboost``) cannot load the CapaBoost
adapter (PEFT does not know ``CAPABOOST_LORA``) but loads the LoRA export; the documented command line
(``python -c "import capaboost; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" run ...``) loads both.
See docs/eval.md."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from functools import partialmethod
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra is not installed: pip install capaboost[eval]")

from lm_eval.tasks import TaskManager  # noqa: E402

from capaboost.cli import main  # noqa: E402
import helpers  # noqa: E402
from test_causal_lm_data import CLM_GPT2, WORDS, tiny_tokenizer  # noqa: E402

TASK = "capaboost_tiny_mc"
# multiple choice over the tiny tokenizer's words (every word is one token of the word-level vocabulary)
DOCS = [
    {"question": "what is one plus one", "choices": ["two", "three", "paris"], "label": 0},
    {"question": "the capital of france is", "choices": ["paris", "no", "four"], "label": 0},
    {"question": "two plus two equals", "choices": ["three", "four", "yes"], "label": 1},
    {"question": "is paris the capital of france", "choices": ["no", "yes"], "label": 1},
    {"question": "what is the capital of france", "choices": ["a", "b", "paris", "d"], "label": 2},
]
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, base model folder, run folder, task folder): a 3-step CapaBoost-LoRA causal-LM run, both exports."""
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "model"
    tok = tiny_tokenizer()
    tok.save_pretrained(model_dir)
    # vocab_size == len(tokenizer): lm-eval resizes the embeddings to len(tokenizer) when `peft` is given (see
    # docs/eval.md), which would change the softmax against the base / merged model evaluated without `peft`
    helpers.tiny_gpt2(**{**CLM_GPT2, "vocab_size": len(tok)}).save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 8), ("dev.jsonl", 4)):
        rows = [json.dumps({"prompt": " ".join(rng.sample(WORDS, 3)), "response": " " + rng.choice(WORDS)})
                for _ in range(n)]
        (data / name).write_text("\n".join(rows) + "\n")
    out = root / "run"
    assert main(["train", "--task", "causal-lm", "--method", "capaboost-lora", "--model", str(model_dir),
                 "--data-dir", str(data), "--output-dir", str(out), "--r", "4", "--d", "2", "--max-steps", "3",
                 "--batch-size", "4", "--lr", "0.05", "--max-seq-len", "16", "--eval-batch-size", "4",
                 "--no-progress", "--cache-dir", str(root / "cache")]) == 0
    assert main(["export", str(out), "--to", "lora"]) == 0  # -> run/adapter-lora
    assert main(["export", str(out), "--to", "merged"]) == 0  # -> run/merged
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=tasks / "docs.jsonl",
                                                         cache=root / "hf-datasets"))
    return root, model_dir, out, tasks


def _loglikelihoods(samples) -> list[list[float]]:
    """Per document, the loglikelihood of each choice (samples as lm-eval logs them, in memory or in its JSONL)."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def scores(run):
    """Per-choice loglikelihoods and accuracy of the base model, the adapter, its LoRA export and the merged model."""
    _, model_dir, out, tasks = run
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # only the tiny task: no index of ~15k
    models = {"base": dict(pretrained=str(model_dir)),
              "capaboost": dict(pretrained=str(model_dir), peft=str(out / "adapter")),
              "lora": dict(pretrained=str(model_dir), peft=str(out / "adapter-lora")),
              "merged": dict(pretrained=str(out / "merged"))}
    result = {}
    for name, model_args in models.items():
        res = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=[TASK], task_manager=manager,
                                      device="cpu", batch_size=8, log_samples=True)
        result[name] = (_loglikelihoods(res["samples"][TASK]), res["results"][TASK]["acc,none"])
    return result


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b] == [len(d["choices"]) for d in DOCS]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def _accuracy(lls: list[list[float]]) -> float:
    return sum(max(range(len(row)), key=row.__getitem__) == d["label"] for row, d in zip(lls, DOCS)) / len(DOCS)


def test_peft_path_applies_the_adapter_and_matches_the_merged_and_lora_exports(scores):
    base, capaboost, lora, merged = (scores[k][0] for k in ("base", "capaboost", "lora", "merged"))
    assert _max_diff(capaboost, base) > 1e-3  # the adapter is applied
    assert _max_diff(capaboost, merged) < 1e-4  # = the model with the adapter folded in
    assert _max_diff(capaboost, lora) < 1e-5  # = the stock LoRA export (the same product, another layout)
    for name, (lls, acc) in scores.items():
        assert acc == pytest.approx(_accuracy(lls)), name  # lm-eval's acc is the argmax of these loglikelihoods


def test_command_line_with_capaboost_imported_loads_the_capaboost_adapter(run, scores, monkeypatch, tmp_path):
    """The documented wrapper `python -c "import capaboost; from lm_eval.__main__ import cli_evaluate; cli_evaluate()"
    run ...`, here in this process (capaboost is imported): results and logged samples land in --output_path."""
    from lm_eval.__main__ import cli_evaluate

    _, model_dir, out, tasks = run
    # test-only speed-up: the CLI indexes lm-eval's ~15k built-in task configs (tens of seconds on 2 cores)
    monkeypatch.setattr(TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False))
    monkeypatch.setattr(sys, "argv", [
        "lm-eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir},peft={out / 'adapter'}",
        "--tasks", TASK, "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8",
        "--output_path", str(tmp_path / "results"), "--log_samples"])
    cli_evaluate()
    results = list((tmp_path / "results").rglob("results_*.json"))
    samples = list((tmp_path / "results").rglob(f"samples_{TASK}_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    assert json.loads(results[0].read_text())["results"][TASK]["acc,none"] == scores["capaboost"][1]
    logged = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert _max_diff(_loglikelihoods(logged), scores["capaboost"][0]) < 1e-5


WITHOUT_CAPABOOST = """
import json, sys
sys.modules["capaboost"] = None  # any import of capaboost fails: stock lm-eval + PEFT only
import lm_eval
from lm_eval.tasks import TaskManager
base, adapter, lora, tasks, task = sys.argv[1:6]
out = {}
try:
    lm_eval.simple_evaluate(model="hf", model_args=dict(pretrained=base, peft=adapter), tasks=[task],
                            task_manager=TaskManager(include_path=tasks, include_defaults=False), device="cpu")
except Exception as err:
    out["capaboost_error"] = f"{type(err).__name__}: {err}"
res = lm_eval.simple_evaluate(model="hf", model_args=dict(pretrained=base, peft=lora), tasks=[task], device="cpu",
                              task_manager=TaskManager(include_path=tasks, include_defaults=False), log_samples=True)
out["lora"] = [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]
print("RESULT " + json.dumps(out))
"""


def test_stock_lm_eval_needs_capaboost_for_the_adapter_but_not_for_the_lora_export(run, scores):
    _, model_dir, out, tasks = run
    proc = subprocess.run([sys.executable, "-c", WITHOUT_CAPABOOST, str(model_dir), str(out / "adapter"),
                           str(out / "adapter-lora"), str(tasks), TASK],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(line[-1][len("RESULT "):])
    assert result.get("capaboost_error") == "KeyError: 'CAPABOOST_LORA'"  # PEFT's registry lacks the type
    assert _max_diff(result["lora"], scores["capaboost"][0]) < 1e-5
