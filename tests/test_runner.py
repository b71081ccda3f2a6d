"""The fine-tuning runner on a tiny BERT/ViT: every task format, both protocols, metrics, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from capaboost.data.errors import DataError
from capaboost.train.errors import ConfigError
from capaboost.train.run_config import RunConfig
from capaboost.train.run import FAIL_ENV, RunExistsError, SimulatedInterruption, epoch_batches, predict, train
from capaboost.train.tasks import TASKS
from capaboost.train.trained import load_trained
import helpers

GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]


def run(tmp_path, bert, cache, **options):
    opts = dict(model=bert, output_dir=str(tmp_path / "out"), batch_size=8, threads=1, progress=False, cache_dir=cache)
    return train(RunConfig(**{**opts, **options}))


def test_metrics_json_has_the_documented_keys_and_counts(tmp_path, bert, cache):
    data = helpers.write_glue("sst2", tmp_path / "sst2")
    metrics = run(tmp_path, bert, cache, task="sst2", method="capaboost-lora", data_dir=data, epochs=2)
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("task", "method", "trainable_params", "total_params", "test", "validation", "wall_time_s", "config",
                "versions", "train_examples_per_s", "eval_examples_per_s", "global_batch_size"):
        assert key in metrics, key
    assert [v["epoch"] for v in metrics["validation"]] == [1.0, 2.0]
    assert metrics["steps"] == 2 * 6  # 48 examples / batch 8, two epochs
    # CapaBoost: rank d*r = 16 per module at ~1-(1-s)^d = 75% of the dense factors.
    assert set(metrics["delta_ranks"].values()) == {16}
    assert 0.65 < metrics["capaboost"]["ratio"] < 0.85
    model, _ = load_trained(tmp_path / "out")
    assert metrics["trainable_params"] == sum(p.numel() for n, p in model.named_parameters()
                                              if "cblora_" in n or "modules_to_save" in n)
    assert (tmp_path / "out" / "train.log").read_text().count(" validation accuracy=") == 2
    assert metrics["config"]["mask_seed"] == 0 and metrics["config"]["lr"] == 5e-4  # the method's default: LoRA's (docs/reproduction.md)
    assert metrics["config"]["scale_by_density"] is True


def _manual_predictions(out_dir, task_name, data_dir, bert, cache, split="test"):
    model, _ = load_trained(out_dir)
    cfg = RunConfig(task=task_name, data_dir=data_dir, model=bert, cache_dir=cache).resolved()
    task = TASKS[task_name](cfg)
    task.load()
    rows = task.eval_splits[split]
    with torch.no_grad():
        batch = {k: v for k, v in task.collate(rows).items() if k != "labels"}
        logits = model(**batch).logits.numpy()
    return logits, np.array([r["labels"] for r in rows])


def test_reported_accuracy_is_that_of_the_saved_model_and_full_finetuning_learns(tmp_path, bert, cache):
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=64, n_dev=32)
    metrics = run(tmp_path, bert, cache, task="sst2", method="full", data_dir=data, epochs=15, lr=1e-3)
    logits, labels = _manual_predictions(tmp_path / "out", "sst2", data, bert, cache)
    assert metrics["test"]["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).mean()))
    assert metrics["test"]["accuracy"] >= 0.9  # the toy task is separable by one word
    assert metrics["validation"][0]["metrics"]["accuracy"] < metrics["test"]["accuracy"]


def test_stsb_regression_reports_pearson_spearman_of_the_saved_model(tmp_path, bert, cache):
    data = helpers.write_glue("stsb", tmp_path / "stsb")
    metrics = run(tmp_path, bert, cache, task="stsb", method="lora", data_dir=data, max_steps=3)
    preds, labels = _manual_predictions(tmp_path / "out", "stsb", data, bert, cache)
    assert metrics["test"]["pearson"] == pytest.approx(pearsonr(preds[:, 0], labels)[0], abs=1e-5)
    assert metrics["test"]["spearman"] == pytest.approx(spearmanr(preds[:, 0], labels)[0], abs=1e-5)
    assert metrics["test"]["combined"] == pytest.approx((metrics["test"]["pearson"] + metrics["test"]["spearman"]) / 2)


@pytest.mark.parametrize("task", GLUE)
def test_every_glue_layout_trains_and_reports_its_metrics(tmp_path, bert, cache, task):
    data = helpers.write_glue(task, tmp_path / task, n_train=16, n_dev=8)
    metrics = run(tmp_path, bert, cache, task=task, method="capaboost-lora", data_dir=data, max_steps=1)
    expected = {"cola": {"matthews_correlation"}, "stsb": {"pearson", "spearman", "combined"},
                "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}}.get(task, {"accuracy"})
    assert set(metrics["test"]) == expected
    assert metrics["num_labels"] == {"stsb": 1, "mnli": 3}.get(task, 2)
    if task == "mnli":
        assert set(metrics["extra_test"]["test_mismatched"]) == {"accuracy"}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_generic_text_files_with_named_columns(tmp_path, bert, cache, suffix):
    data = helpers.write_text(tmp_path / f"reviews{suffix}", n=40)
    metrics = run(tmp_path, bert, cache, task="text", method="lora", data_dir=data, max_steps=2,
                  text_column="review", label_column="sentiment")
    assert set(metrics["test"]) == {"accuracy", "macro_f1"}
    assert metrics["sizes"]["test"] == 8  # 20% of 40 held out as the dev/test role


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_squad_question_answering_reports_em_and_f1(tmp_path, bert, cache, task):
    data = helpers.write_squad(tmp_path / task, version_2=task == "squad_v2")
    metrics = run(tmp_path, bert, cache, task=task, method="capaboost-lora", data_dir=data, max_steps=2, max_seq_len=32)
    assert {"exact_match", "f1"} <= set(metrics["test"])
    assert 0.0 <= metrics["test"]["exact_match"] <= metrics["test"]["f1"] <= 100.0
    if task == "squad_v2":
        assert metrics["test"]["no_answer_total"] == 3.0  # every 4th dev question is unanswerable


def test_squad_score_decodes_spans_from_logits(tmp_path, bert, cache):
    """Logits peaked on the gold span must score EM = F1 = 100 through the task's decoding."""
    data = helpers.write_squad(tmp_path / "sq")
    cfg = RunConfig(task="squad", data_dir=data, model=bert, cache_dir=cache, max_seq_len=32).resolved()
    task = TASKS["squad"](cfg)
    task.load()
    meta, rows = task.eval_meta["test"], task.eval_splits["test"]
    start = np.full((len(rows), 32), -10.0)
    end = np.full((len(rows), 32), -10.0)
    by_id = {ex.id: ex for ex in meta["examples"]}
    for i, offsets in enumerate(meta["offset_mapping"]):
        ex = by_id[meta["example_id"][i]]
        s, e = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answer_texts[0])
        for j, off in enumerate(offsets):
            if off is not None and off[0] == s:
                start[i, j] = 10.0
            if off is not None and off[1] == e:
                end[i, j] = 10.0
    scores = task.score("test", {"start_logits": start, "end_logits": end})
    assert scores["exact_match"] == 100.0 and scores["f1"] == 100.0


@pytest.mark.parametrize("layout", ["npz", "folders"])
def test_image_classification_with_a_tiny_vit(tmp_path, cache, layout):
    vit = helpers.save_tiny_vit(tmp_path / "vit")
    npz = helpers.write_images_npz(tmp_path / "img" / "data.npz", n_train=30, n_test=10)
    data = str(tmp_path / "img")
    if layout == "folders":
        from PIL import Image

        arrays = np.load(npz)
        data = str(tmp_path / "tree")
        for i, (x, y) in enumerate(zip(arrays["x_train"], arrays["y_train"])):
            (tmp_path / "tree" / f"c{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(tmp_path / "tree" / f"c{y}" / f"{i}.png")
    metrics = train(RunConfig(task="image", method="capaboost-lora", data_dir=data, model=vit, train_size=16, val_size=6,
                              output_dir=str(tmp_path / "out"), max_steps=2, batch_size=8, threads=1, progress=False))
    assert set(metrics["test"]) == {"accuracy"}
    assert metrics["sizes"]["train"] == 16 and metrics["sizes"]["validation"] == 6
    assert set(metrics["delta_ranks"].values()) == {16}  # query/value found under ViT's q_proj/v_proj names


def test_dev_protocol_reports_the_final_model_and_propetl_the_best(tmp_path, bert, cache):
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=64, n_dev=32)
    dev = run(tmp_path / "dev", bert, cache, task="sst2", method="full", data_dir=data, epochs=6, lr=1e-3)
    assert dev["selected_step"] == dev["steps"]
    assert dev["test"] == dev["validation"][-1]["metrics"]
    assert dev["sizes"]["validation"] == dev["sizes"]["test"] == 32
    pro = run(tmp_path / "pro", bert, cache, task="sst2", method="full", data_dir=data, epochs=6, lr=1e-3,
              protocol="propetl")
    assert pro["sizes"]["validation"] == 16 and pro["sizes"]["test"] == 16  # small task: dev split in half
    curve = [v["metrics"]["accuracy"] for v in pro["validation"]]
    assert pro["selected_step"] == pro["validation"][int(np.argmax(curve))]["step"]


def test_subsampling_is_fixed_by_the_seed(tmp_path, bert, cache):
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=64)
    a = run(tmp_path / "a", bert, cache, task="sst2", method="bitfit", data_dir=data, max_steps=1, max_train_samples=20)
    b = run(tmp_path / "b", bert, cache, task="sst2", method="bitfit", data_dir=data, max_steps=1, max_train_samples=20)
    assert a["sizes"]["train"] == 20
    assert a["test"] == b["test"] and a["train_loss"] == b["train_loss"]


@pytest.mark.parametrize("method", ["capaboost-lora", "adalora"])
def test_resume_after_an_interruption_gives_identical_results(tmp_path, bert, cache, monkeypatch, method):
    data = helpers.write_glue("sst2", tmp_path / "sst2")
    opts = dict(task="sst2", method=method, data_dir=data, epochs=2, save_steps=2, dropout=0.1, lr=5e-3)
    whole = run(tmp_path / "whole", bert, cache, **opts)
    monkeypatch.setenv(FAIL_ENV, "5")  # dies after step 5; the last checkpoint is from step 4
    with pytest.raises(SimulatedInterruption):
        run(tmp_path / "cut", bert, cache, **opts)
    assert not (tmp_path / "cut" / "out" / "metrics.json").exists()
    monkeypatch.delenv(FAIL_ENV)
    with pytest.raises(RunExistsError, match="--resume"):
        run(tmp_path / "cut", bert, cache, **opts)
    resumed = run(tmp_path / "cut", bert, cache, resume=True, **opts)
    assert resumed["test"] == whole["test"]
    assert resumed["validation"] == whole["validation"]
    assert resumed["train_loss"] == whole["train_loss"]
    again = run(tmp_path / "cut", bert, cache, resume=True, **opts)  # finished: returns, trains nothing
    assert again["test"] == whole["test"]


def test_resume_refuses_changed_options(tmp_path, bert, cache, monkeypatch):
    data = helpers.write_glue("sst2", tmp_path / "sst2")
    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(SimulatedInterruption):
        run(tmp_path, bert, cache, task="sst2", method="lora", data_dir=data, epochs=1, save_steps=1)
    monkeypatch.delenv(FAIL_ENV)
    with pytest.raises(ConfigError, match="lr"):
        run(tmp_path, bert, cache, task="sst2", method="lora", data_dir=data, epochs=1, save_steps=1, lr=0.1, resume=True)


def test_finished_runs_are_not_overwritten_silently(tmp_path, bert, cache):
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=16)
    run(tmp_path, bert, cache, task="sst2", method="bitfit", data_dir=data, max_steps=1)
    with pytest.raises(RunExistsError, match="--overwrite"):
        run(tmp_path, bert, cache, task="sst2", method="bitfit", data_dir=data, max_steps=1)
    assert run(tmp_path, bert, cache, task="sst2", method="bitfit", data_dir=data, max_steps=2, overwrite=True)["steps"] == 2


def test_epoch_order_depends_only_on_seed_and_epoch_and_batches_are_full():
    a = epoch_batches(10, 4, seed=3, epoch=1)
    assert [list(x) for x in a] == [list(x) for x in epoch_batches(10, 4, seed=3, epoch=1)]
    assert [list(x) for x in a] != [list(x) for x in epoch_batches(10, 4, seed=3, epoch=2)]
    # 3 full batches: every example once, the last batch topped up with the epoch's first 2
    flat = np.concatenate(a)
    assert [len(b) for b in a] == [4, 4, 4] and sorted(flat[:10].tolist()) == list(range(10))
    assert flat[10:].tolist() == flat[:2].tolist()
    small = epoch_batches(3, 8, seed=0, epoch=0)  # fewer examples than one batch: the order repeats
    assert len(small) == 1 and len(small[0]) == 8 and sorted(np.bincount(small[0]).tolist()) == [2, 3, 3]


def test_predict_returns_outputs_in_feature_order_despite_length_sorting(tmp_path, bert, cache):
    from accelerate import Accelerator

    data = helpers.write_glue("mrpc", tmp_path / "mrpc", n_train=8, n_dev=12)
    cfg = RunConfig(task="mrpc", data_dir=data, model=bert, cache_dir=cache).resolved()
    task = TASKS["mrpc"](cfg)
    task.load()
    model = task.build_model().eval()
    rows = task.eval_splits["test"]
    batched = predict(model, task, rows, 5, Accelerator())["logits"]
    with torch.no_grad():
        one_by_one = np.concatenate([model(**{k: v for k, v in task.collate([r]).items() if k != "labels"}).logits.numpy()
                                     for r in rows])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_bad_options_and_data_fail_with_named_errors(tmp_path, bert, cache):
    with pytest.raises(ConfigError, match="--data-dir"):
        run(tmp_path, bert, cache, task="cola", method="lora")
    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path, bert, cache, task="cola", method="lora", data_dir=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="unknown method 'boft'"):
        run(tmp_path, bert, cache, task="cola", method="boft", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--density"):
        run(tmp_path, bert, cache, task="sst2", method="capaboost-lora", data_dir=str(tmp_path), density=1.5)
    with pytest.raises(ConfigError, match="--model"):
        run(tmp_path, str(tmp_path / "no-model"), cache, task="sst2", method="lora",
            data_dir=helpers.write_glue("sst2", tmp_path / "sst2"))
