"""Run options: every RunConfig field is honoured or refused, ranges, config-file types, --max-seq-len limits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from capaboost.cli import main
from capaboost.train.methods import METHODS, MethodContext
from capaboost.train.errors import ConfigError
from capaboost.train.run_config import RunConfig, make_config, read_config_file
from capaboost.train.tasks import TASKS
import helpers

TESTS = Path(__file__).parent

# Options every run reads, whatever its task and method, with the test that shows the runner honours each.
# A new RunConfig field fails test_every_option_is_honoured_or_refused until it is added here (with its
# test) or to a method's/task's option table (then it is refused elsewhere).
HONOURED = {
    "task": "test_runner.py::test_every_glue_layout_trains_and_reports_its_metrics",
    "method": "test_runner_methods.py::test_lora_rank_is_r_and_capaboost_rank_is_d_times_r",
    "model": "test_runner_methods.py::test_timm_vision_model_trains_with_capaboost_lora",
    "output_dir": "test_cli.py::test_train_from_yaml_with_flags_overriding_it",
    "tag": "test_options.py::test_report_never_averages_two_settings_that_share_a_tag",
    "protocol": "test_runner.py::test_dev_protocol_reports_the_final_model_and_propetl_the_best",
    "max_train_samples": "test_runner.py::test_subsampling_is_fixed_by_the_seed",
    "max_eval_samples": "test_data_glue.py::test_mnli_caps_apply_to_mismatched",
    "seed": "test_runner.py::test_subsampling_is_fixed_by_the_seed",
    "epochs": "test_runner.py::test_metrics_json_has_the_documented_keys_and_counts",
    "max_steps": "test_cli.py::test_train_from_yaml_with_flags_overriding_it",
    "lr": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "head_lr": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "weight_decay": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "warmup_ratio": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "max_grad_norm": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "batch_size": "test_runner.py::test_metrics_json_has_the_documented_keys_and_counts",
    "eval_batch_size": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "eval_steps": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "threads": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "save_steps": "test_runner.py::test_resume_after_an_interruption_gives_identical_results",
    "resume": "test_runner.py::test_resume_after_an_interruption_gives_identical_results",
    "overwrite": "test_runner.py::test_finished_runs_are_not_overwritten_silently",
    "progress": "test_options.py::test_config_file_values_are_coerced_by_field_type",
    "cache_dir": "test_options.py::test_runner_honours_optimisation_and_runtime_options",
    "precision": "test_runner_gpu_options.py::test_bf16_trains_under_autocast_and_fp32_does_not",
    "gradient_checkpointing": "test_runner_gpu_options.py::test_gradient_checkpointing_recomputes_layers_with_the_same_losses",
    "tf32": "test_runner_gpu_options.py::test_tf32_flags_are_set_for_cuda_devices_only_and_restored",
}

# A valid non-default value of every option that only some methods/tasks read.
SAMPLE = {
    "d": 3, "density": 0.3, "mask_seed": 7, "mask_pattern": "2:4", "mask_mode": "same", "r": 16, "alpha": 8.0,
    "dropout": 0.1, "target_modules": ["query"], "bottleneck": 16, "adapter_placement": {"layers": [0]},
    "num_virtual_tokens": 4, "prefix_hidden": 16, "data_dir": ".", "max_seq_len": 64, "doc_stride": 16,
    "text_column": "review", "label_column": "y", "text_pair_column": "b", "drop_labels": ["x"],
    "deduplicate": True, "is_regression": True, "test_fraction": 0.3, "image_size": 16, "train_size": 10,
    "val_size": 5, "reader_kwargs": {"skip_malformed": True}, "quantize": "4bit", "scale_by_density": True,
    "packing": True,
}


def _test_exists(ref: str) -> bool:
    file, name = ref.split("::")
    path = TESTS / file
    return path.is_file() and f"def {name}(" in path.read_text()


def test_every_option_is_honoured_or_refused():
    from capaboost.train.methods import method_options
    from capaboost.data.task_specs import TASK_OPTIONS

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    scoped = set(method_options()) | set(TASK_OPTIONS)
    assert not set(HONOURED) & scoped, "an option is either read by every run or scoped, not both"
    undecided = fields - set(HONOURED) - scoped
    assert not undecided, f"decide for {sorted(undecided)}: honoured by every run (HONOURED + a test) or scoped"
    assert not (set(HONOURED) | scoped) - fields, "the tables name options RunConfig no longer has"
    missing = {k: ref for k, ref in HONOURED.items() if not _test_exists(ref)}
    assert not missing, f"these honoured options name no existing test: {missing}"
    assert set(SAMPLE) == scoped
    for users in TASK_OPTIONS.values():
        assert set(users) <= set(TASKS)


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_scoped_options_are_refused_where_nothing_reads_them(name):
    from capaboost.train.run_config import option_users

    kind, users = option_users(name)
    others = [n for n in (METHODS if kind == "method" else TASKS) if n not in users]
    assert others, name
    where = {"method": "lora", "task": "sst2"}
    where[kind] = others[0]
    if kind == "method":  # a task every method supports
        where["task"] = "sst2"
    with pytest.raises(ConfigError) as err:
        make_config({**where, name: SAMPLE[name]})
    message = str(err.value)
    assert f"--{name.replace('_', '-')}" in message and users[0] in message and "\n" not in message
    make_config({**where, kind: users[0], name: SAMPLE[name]})  # fine where it is read


def test_every_numeric_option_has_a_range():
    from capaboost.train.run_config import RANGES, field_kinds

    numeric = {name for name, kind in field_kinds().items() if kind in (int, float)}
    assert numeric == set(RANGES)


@pytest.mark.parametrize("option, value", [
    ("max_grad_norm", -1), ("warmup_ratio", 2), ("alpha", -16), ("weight_decay", -0.1), ("dropout", 1.0),
    ("test_fraction", 1.0), ("seed", -1), ("lr", float("nan")), ("lr", float("inf")), ("max_seq_len", 1),
    ("max_seq_len", 2), ("num_virtual_tokens", 0), ("eval_steps", 0), ("mask_seed", -3),
])
def test_out_of_range_values_are_refused(option, value):
    method = "capaboost-prefix" if option == "num_virtual_tokens" else "capaboost-lora"
    task = "text" if option == "test_fraction" else "sst2"
    with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')} must be"):
        make_config({"task": task, "method": method, option: value})


def test_cli_refuses_bad_values_and_unused_flags_with_one_line(tmp_path, capsys):
    base = ["train", "--task", "sst2", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    for extra, words in [
        (["--max-grad-norm", "-1"], ["--max-grad-norm", ">= 0"]),
        (["--warmup-ratio", "2"], ["--warmup-ratio", "[0, 1]"]),
        (["--method", "lora", "--alpha", "-16"], ["--alpha", "> 0"]),
        (["--method", "lora", "--d", "3"], ["--d", "method 'lora'", "capaboost-lora"]),
        (["--method", "lora", "--mask-pattern", "2:4"], ["--mask-pattern", "capaboost-lora"]),
        (["--max-seq-len", "1"], ["--max-seq-len", ">= 8"]),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert all(w in err for w in words), (extra, err)
    assert not (tmp_path / "out").exists()


def test_max_seq_len_above_the_models_maximum_is_refused_before_training(tmp_path):
    bert = helpers.save_tiny_bert(tmp_path / "bert")  # max_position_embeddings 128
    data = helpers.write_glue("sst2", tmp_path / "sst2")
    ok = RunConfig(task="sst2", data_dir=data, model=bert, max_seq_len=128).resolved()
    assert ok.max_seq_len == 128
    with pytest.raises(ConfigError, match=r"--max-seq-len 129 exceeds the model's maximum of 128 tokens"):
        RunConfig(task="sst2", data_dir=data, model=bert, max_seq_len=129).resolved()


def test_config_file_values_are_coerced_by_field_type(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text('task: text\nlr: 1e-3\nhead_lr: 5.0e-3\nprogress: "false"\nmax_steps: 8.0\nr: "16"\n'
                      "target_modules: query, value\ndrop_labels: [0]\n")
    raw = read_config_file(config)
    assert raw["lr"] == "1e-3"  # what PyYAML hands over
    cfg = make_config(raw)
    assert (cfg.lr, cfg.head_lr, cfg.progress, cfg.max_steps, cfg.r) == (1e-3, 5e-3, False, 8, 16)
    assert cfg.target_modules == ["query", "value"] and cfg.drop_labels == ["0"]
    for line, words in [
        ("max_steps: 8.5", ["'max_steps'", "8.5", "int"]),
        ("progress: maybe", ["'progress'", "'maybe'", "bool"]),
        ("mask_pattern: 2:4", ["'mask_pattern'", "124", "str"]),  # YAML 1.1 reads 2:4 as a base-60 number
        ("lr: fast", ["'lr'", "'fast'", "float"]),
        ("reader_kwargs: [1]", ["'reader_kwargs'", "dict"]),
    ]:
        config.write_text(f"task: sst2\n{line}\n")
        assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), (line, err)


def test_runner_honours_optimisation_and_runtime_options(tmp_path, monkeypatch):
    import accelerate

    from capaboost.train import run as runner
    from capaboost.train.run import evaluation

    seen: dict[str, list] = {"lrs": [], "decay": [], "clip": [], "eval_batch": [], "threads": []}

    class Recording(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            seen["lrs"].append([g["lr"] for g in self.param_groups])
            seen["decay"].append([g["weight_decay"] for g in self.param_groups])
            return super().step(*args, **kwargs)

    clip, predict, set_threads = accelerate.Accelerator.clip_grad_norm_, runner.predict, torch.set_num_threads

    def recording_clip(self, parameters, max_norm, norm_type=2):
        seen["clip"].append(max_norm)
        return clip(self, parameters, max_norm, norm_type)

    def recording_predict(model, task, features, batch_size, accelerator):
        seen["eval_batch"].append(batch_size)
        return predict(model, task, features, batch_size, accelerator)

    def recording_threads(n):
        seen["threads"].append(n)
        set_threads(n)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(evaluation, "predict", recording_predict)
    monkeypatch.setattr(torch, "set_num_threads", recording_threads)
    bert = helpers.save_tiny_bert(tmp_path / "bert")
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=16, n_dev=8)
    metrics = runner.train(RunConfig(
        task="sst2", method="lora", data_dir=data, model=bert, max_steps=4, batch_size=8, eval_batch_size=3, lr=0.01,
        head_lr=0.02, weight_decay=0.3, warmup_ratio=0.5, max_grad_norm=0.25, eval_steps=1, max_seq_len=32,
        threads=1, progress=False, output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache")))
    # warm-up over 2 of 4 steps: factors 1/3, 2/3, then linear decay 2/2, 1/2; groups: adapter, head
    factors = [1 / 3, 2 / 3, 1.0, 0.5]
    assert [lr for lrs in seen["lrs"] for lr in lrs] == pytest.approx([x * f for f in factors for x in (0.01, 0.02)])
    assert seen["decay"] == [[0.3, 0.3]] * 4
    assert seen["clip"] == [0.25] * 4
    assert [v["step"] for v in metrics["validation"]] == [1, 2, 3, 4]
    assert seen["eval_batch"] and set(seen["eval_batch"]) == {3}
    assert seen["threads"] == [1]
    assert list((tmp_path / "cache").glob("sst2-*.pkl"))


def test_max_grad_norm_zero_turns_clipping_off(tmp_path, monkeypatch):
    import accelerate

    from capaboost.train.run import train

    calls = []
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    bert = helpers.save_tiny_bert(tmp_path / "bert")
    data = helpers.write_glue("sst2", tmp_path / "sst2", n_train=16, n_dev=8)
    train(RunConfig(task="sst2", method="lora", data_dir=data, model=bert, max_steps=1, batch_size=8,
                    max_grad_norm=0, max_seq_len=32, threads=1, progress=False, output_dir=str(tmp_path / "out"),
                    cache_dir=str(tmp_path / "cache")))
    assert calls == []


def test_method_options_reach_the_peft_config():
    ctx = MethodContext("SEQ_CLS", (), 10, ("query", "value"))
    cfg = make_config({"task": "sst2", "method": "lora", "r": 4, "alpha": 6, "dropout": 0.2, "target_modules": "query"})
    lora = METHODS["lora"].build(cfg, ctx)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (4, 6.0, 0.2, {"query"})
    with pytest.raises(ConfigError, match="whole number for gralora"):  # GraLoRA's alpha is an int: 2.5 -> 2
        METHODS["gralora"].build(make_config({"method": "gralora", "alpha": 2.5}), ctx)


def test_reader_kwargs_reach_the_glue_reader(tmp_path):
    from capaboost.data.errors import DataError
    from capaboost.train.tasks.text import TextClassificationTask

    data = Path(helpers.write_glue("sst2", tmp_path / "sst2"))
    lines = (data / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].split("\t")[0]  # a row with its label missing
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 4"):
        TextClassificationTask(RunConfig(task="sst2", data_dir=str(data))).read()
    task = TextClassificationTask(RunConfig(task="sst2", data_dir=str(data), reader_kwargs={"skip_malformed": True}))
    assert len(task.read().train) == len(lines) - 2  # header and the bad row


# ---------------------------------------------------------------- reports


def _run(task, tag, seed, test, config=None, main_metric="accuracy"):
    return {"task": task, "method": tag, "tag": tag, "main_metric": main_metric, "test": test,
            "trainable_params": 1000, "config": {"seed": seed, **(config or {})}, "rank": None}


def test_report_scales_fractions_only():
    from capaboost.train.report.sweep import markdown_table, summarize

    runs = [_run("causal-lm", "lora", 0, {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.5}, None, "perplexity"),
            _run("squad", "lora", 0, {"exact_match": 70.0, "f1": 80.0}, None, "f1"),
            _run("sst2", "lora", 0, {"accuracy": 0.8}),
            _run("stsb", "lora", 0, {"pearson": 0.5, "spearman": 0.7, "combined": 0.6}, None, "combined")]
    summary = summarize(runs)
    assert summary[("causal-lm", "lora")]["metrics"] == {"loss": (2.0, 0.0), "perplexity": (7.39, 0.0),
                                                         "exact_match": (50.0, 0.0)}
    assert summary[("squad", "lora")]["metrics"]["f1"] == (80.0, 0.0)
    assert summary[("sst2", "lora")]["metrics"]["accuracy"] == (pytest.approx(80.0), 0.0)
    assert summary[("stsb", "lora")]["metrics"]["combined"] == (pytest.approx(60.0), 0.0)
    row = next(line for line in markdown_table(summary).splitlines() if line.startswith("| lora |"))
    assert "7.4 ± 0.0" in row and row.endswith("| – |")  # no average of perplexity with accuracies


def test_report_never_averages_two_settings_that_share_a_tag(tmp_path):
    from capaboost.train.report.sweep import summarize, write_report

    runs = [_run("sst2", "lora", 0, {"accuracy": 0.8}, {"r": 8, "mask_seed": 0}),
            _run("sst2", "lora", 1, {"accuracy": 0.9}, {"r": 8, "mask_seed": 1}),
            _run("sst2", "lora", 0, {"accuracy": 0.5}, {"r": 16, "mask_seed": 0})]
    summary = summarize(runs)
    assert len(summary) == 2
    means = sorted(round(s["metrics"]["accuracy"][0], 6) for s in summary.values())
    assert means == [50.0, 85.0]
    assert all(tag.startswith("lora [") for _, tag in summary)
    for i, m in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(m))
    text = write_report(tmp_path, [tmp_path / "0", tmp_path / "1"])  # only the runs a sweep names
    assert "(3 runs)" not in text and "85.0 ± 7.1 (n=2)" in text
