"""The CLI: train/eval/compare/inspect on a tiny local model, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import leantune
from leantune.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
REVIEWS = FIXTURES / "local" / "reviews.csv"
FAST = ["--no-progress", "--no-measure-memory", "--batch-size", "4", "--epochs", "2", "--max-length", "24"]


@pytest.fixture
def model_dir(tiny_bert_dir: Path) -> Path:
    return tiny_bert_dir


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_eval_reports_the_same_test_metric(tmp_path: Path, model_dir: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--model", model_dir, "--method", "lora", "--set", "r=4",
                           "--data", REVIEWS, "--learning-rate", "0.01", "--output-dir", run_dir, *FAST)
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert f"test accuracy: {results['test_metric']:.4f}" in out and "trainable parameters:" in out
    assert "peak process memory" in out and "s/step" in out
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["method"] == "lora" and spec["options"] == {"r": 4} and spec["train"]["learning_rate"] == 0.01
    assert json.loads((run_dir / "best" / "leantune_config.json").read_text())["options"]["r"] == 4
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 2
    code, out, _ = run_cli(capsys, "eval", run_dir)
    assert code == 0 and f"test accuracy {results['test_metric']:.4f}" in out


def test_config_file_with_command_line_overrides(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(model_dir), "method": "lora", "options": {"r": 2},
                                      "data": {"data": str(REVIEWS)}, "train": {"learning_rate": 0.02,
                                                                              "epochs": 1}}))
    run_dir = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--config", config, "--method", "adapter", "--set", "reduction_factor=4",
                         "--output-dir", run_dir, *FAST)
    assert code == 0
    spec = json.loads((run_dir / "run.json").read_text())
    # the config's options belong to its method (lora); --method adapter replaces both
    assert spec["method"] == "adapter" and spec["options"] == {"reduction_factor": 4}
    assert spec["train"]["learning_rate"] == 0.02 and spec["train"]["epochs"] == 2  # the flag wins over the file
    assert spec["data"]["data"] == str(REVIEWS)


def test_inspect_shows_insertion_points_and_delta_table(model_dir: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "inspect", "--model", model_dir, "--method", "adapter", "--set",
                           "reduction_factor=8")
    assert code == 0
    assert "family bert" in out
    assert "base_model.bert.encoder.layer.1.output.dense.branches.adapter: BottleneckAdapter" in out
    assert "adapter.down.weight" in out and "trainable%" in out
    facts = out[out.index("method facts:"):out.index("insertion points")]
    method = leantune.get_method("adapter")(leantune.make_config("adapter", reduction_factor=8))
    assert "mergeable: no (" in facts and "needs data at wrap: no" in facts
    assert f"default learning rate: {method.default_learning_rate:g}" in facts
    inputs = method.declared_inputs()
    assert all(f"{i.name} ({'required' if i.required else 'optional'}: {i.help})" in facts for i in inputs)
    assert ("per-call inputs: none" in facts) == (not inputs)


def test_inspect_shows_facts_of_a_mergeable_method(model_dir: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "inspect", "--model", model_dir, "--method", "lora")
    assert code == 0
    assert "mergeable: yes" in out
    assert "base_model.bert.encoder.layer.0.attention.self.query.branches.lora: LoRABranch" in out


def test_compare_trains_each_method_and_writes_table_json_and_png(tmp_path: Path, model_dir: Path, capsys) -> None:
    out_dir = tmp_path / "cmp"
    code, out, _ = run_cli(capsys, "compare", "--methods", "bitfit,lora", "--model", model_dir, "--data", REVIEWS,
                           "--set", "lora.r=2", "--output-dir", out_dir, "--learning-rate", "0.01", *FAST)
    assert code == 0
    report = json.loads((out_dir / "compare.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["bitfit", "lora"]
    for row in report["rows"]:
        assert row["test_metric"] == json.loads((out_dir / row["method"] / "results.json").read_text())["test_metric"]
    lines = out.splitlines()
    assert any(line.startswith("bitfit") for line in lines) and any(line.startswith("lora") for line in lines)
    assert (out_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out_dir / "lora" / "run.json").read_text())["options"] == {"r": 2}


def _bad_label_file(tmp_path: Path) -> Path:
    path = tmp_path / "val.csv"
    path.write_text("text,label\nnice,positive\nwhat,surprised\n")
    return path


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    return path


def _config(tmp_path: Path, values: object) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("args,message", [
    (lambda t: ["--data", t / "missing.csv"], r"data file .*missing\.csv does not exist"),
    (lambda t: ["--data", REVIEWS, "--label-column", "stars"], r"reviews\.csv has no column 'stars'"),
    (lambda t: ["--data", _empty_file(t)], r"empty\.csv has no examples"),
    (lambda t: ["--data", REVIEWS, "--validation", _bad_label_file(t)],
     r"val\.csv line 3: label 'surprised' in column 'label' does not occur in the training data"),
    (lambda t: ["--task", "wnli"], r"unknown task 'wnli'"),
    (lambda t: ["--data", REVIEWS, "--method", "nope"], r"unknown method 'nope'"),
    (lambda t: ["--data", REVIEWS, "--method", "lora", "--set", "rank=4"], r"unknown option\(s\) 'rank'"),
    (lambda t: ["--data", REVIEWS, "--method", "lora", "--set", "r=0"], r"LoRAConfig\.r must be > 0"),
    (lambda t: ["--data", REVIEWS, "--method", "lora", "--set", "r=abc"],
     r"LoRAConfig\.r must be an integer, got 'abc'"),
    (lambda t: ["--data", REVIEWS, "--set", "r"], r"--set expects KEY=VALUE, got 'r'"),
    (lambda t: ["--config", _config(t, {"modell": "x"})], r"unknown option\(s\) 'modell' for the run settings"),
    (lambda t: ["--config", _config(t, {"options": 5})], r"RunSpec\.options must be a mapping, got 5"),
    (lambda t: ["--config", _config(t, ["model"])], r"settings\.yaml must hold a mapping of settings, got list"),
    (lambda t: ["--config", _config(t, {"data": {"data": str(REVIEWS), "colour": "x"}})],
     r"unknown option\(s\) 'colour' for the run's data settings"),
    (lambda t: ["--config", _config(t, {"train": {"learning_rat": 1}})],
     r"unknown option\(s\) 'learning_rat' for the training settings"),
    (lambda t: ["--text-column", "review"], r"--text-column needs --data"),
    (lambda t: ["--data", REVIEWS, "--batch-size", "0"], r"TrainConfig\.batch_size must be > 0"),
    (lambda t: ["--config", t / "missing.yaml"], r"config file .*missing\.yaml does not exist"),
    (lambda t: ["--data", REVIEWS, "--data", REVIEWS, "--label-column", "stars"],
     r"--label-column applies to one --data file; with several tasks give each task's files and columns in the "
     r"config file's 'tasks:' list"),
    (lambda t: ["--data", REVIEWS, "--data", REVIEWS], r"two tasks are named 'reviews'"),
    (lambda t: ["--config", _config(t, {"tasks": [{"data": str(REVIEWS)}, {"name": "x"}]})],
     r"the run's tasks\[1\] needs exactly one of 'task' \(a built-in or GLUE task\) and 'data'"),
    (lambda t: ["--config", _config(t, {"tasks": [{"task": "tweets", "text_column": "x"}]})],
     r"tasks\[0\]: the local-data settings text_column need 'data', not the built-in task 'tweets'"),
    (lambda t: ["--config", _config(t, {"tasks": [{"data": str(REVIEWS), "batch_size": "8"}]})],
     r"TaskEntry\.batch_size must be an integer or None, got '8'"),
    (lambda t: ["--config", _config(t, {"tasks": [{"data": str(REVIEWS)}], "data": {"data": str(REVIEWS)}})],
     r"the run settings have 'tasks' and 'data'; list every task under 'tasks'"),
    (lambda t: ["--data", REVIEWS, "--model", "no-such-org/no-such-model"],
     r"cannot load model 'no-such-org/no-such-model': it is not a local folder and not in the Hugging Face cache"),
])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path: Path, model_dir: Path, capsys, args, message) -> None:
    argv = ["train", *FAST, *args(tmp_path), "--output-dir", tmp_path / "run"]
    if "--model" not in argv:
        argv += ["--model", model_dir]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leantune train: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path: Path, capsys, where: str) -> None:
    argv = ["train", "--data", tmp_path / "missing.csv", *FAST]
    code, _, err = run_cli(capsys, *(["--debug", *argv] if where == "before" else [*argv, "--debug"]))
    assert code == 2 and "Traceback (most recent call last)" in err and "DataError" in err


def test_debug_after_a_nested_sub_command(capsys) -> None:
    code, _, err = run_cli(capsys, "bench", "memory", "--batch-size", "0", "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err


def test_a_bug_prints_its_traceback_and_exits_1(tmp_path: Path, capsys, monkeypatch) -> None:
    def broken(args) -> int:
        return {}["no such key"]

    monkeypatch.setattr("leantune.commands.eval.run", broken)
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "KeyError: 'no such key'" in err
    assert err.strip().splitlines()[-1].startswith("leantune eval: internal error (a bug")


def test_eval_of_a_directory_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and "run.json is missing" in err and len(err.strip().splitlines()) == 1


def test_resume_needs_an_existing_run(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "train", "--resume", "--output-dir", tmp_path / "none")
    assert code == 2 and "nothing to resume" in err


def test_no_arguments_mean_the_embedded_default() -> None:
    from leantune.cli import build_parser
    from leantune.commands.train import spec_from_args
    from leantune.train.run import DEFAULT_TRAIN_SETTINGS

    args = build_parser().parse_args(["train"])
    spec = spec_from_args(args, args.method)
    assert (spec.model, spec.method, spec.task, spec.data) == ("all-MiniLM-L6-v2", "lst", "tweets", None)
    assert spec.train == DEFAULT_TRAIN_SETTINGS and spec.options == {"fisher_samples": 256}
    assert spec.train_config().learning_rate == 3e-3
    args = build_parser().parse_args(["train", "--method", "lora", "--max-length", "32"])
    spec = spec_from_args(args, args.method)
    assert spec.options == {} and spec.train["max_length"] == 32 and spec.train_config().learning_rate == 1e-3


def test_encoding_flag_reads_a_latin1_file(tmp_path: Path, model_dir: Path, capsys) -> None:
    data = tmp_path / "latin.csv"
    rows = ["text,label"] + [f"caf\xe9 {word},{label}" for word, label in
                             [("great", "pos"), ("awful", "neg"), ("nice", "pos"), ("bad", "neg"), ("good", "pos"),
                              ("rude", "neg"), ("lovely", "pos"), ("cold", "neg")]]
    data.write_bytes("\n".join(rows).encode("latin-1"))
    code, _, err = run_cli(capsys, "train", "--model", model_dir, "--data", data, "--output-dir", tmp_path / "a",
                           *FAST)
    assert code == 2 and "latin.csv line 2" in err and "--encoding" in err
    code, _, _ = run_cli(capsys, "train", "--model", model_dir, "--data", data, "--encoding", "latin-1",
                         "--output-dir", tmp_path / "b", *FAST)
    assert code == 0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["data"]["encoding"] == "latin-1"
