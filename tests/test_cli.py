"""The CLI: train/eval/compare/inspect on a tiny local model, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

import leantune
from leantune.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
REVIEWS = FIXTURES / "local" / "reviews.csv"
FAST = ["--no-progress", "--no-measure-memory", "--no-baselines", "--batch-size", "4", "--epochs", "2",
        "--max-length", "24"]


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


def test_compare_with_seeds_reports_mean_and_std_over_one_run_per_seed(tmp_path: Path, model_dir: Path,
                                                                      capsys) -> None:
    out_dir = tmp_path / "cmp"
    code, out, _ = run_cli(capsys, "compare", "--methods", "bitfit", "--seeds", "0,3", "--model", model_dir,
                           "--data", REVIEWS, "--output-dir", out_dir, "--learning-rate", "0.05", *FAST)
    assert code == 0
    per_seed = [json.loads((out_dir / f"bitfit-seed{seed}" / "results.json").read_text()) for seed in (0, 3)]
    assert [json.loads((out_dir / f"bitfit-seed{seed}" / "run.json").read_text())["train"]["seed"]
            for seed in (0, 3)] == [0, 3]
    tests = [r["test_metric"] for r in per_seed]
    (row,) = json.loads((out_dir / "compare.json").read_text())["rows"]
    assert row["seeds"] == [0, 3] and row["seed_test_metrics"] == tests
    assert row["test_metric"] == pytest.approx(statistics.mean(tests))
    assert row["test_std"] == pytest.approx(statistics.stdev(tests))
    assert row["task_metrics"]["reviews"]["test"] == pytest.approx(statistics.mean(tests))
    assert f"{statistics.mean(tests):.4f} ± {statistics.stdev(tests):.4f}" in out
    assert run_cli(capsys, "compare", "--methods", "bitfit", "--seeds", "1,1", "--model", model_dir,
                   "--data", REVIEWS, *FAST)[0] == 2


def test_compare_adds_baseline_rows_names_the_data_and_counts_the_whole_wall_time(
        tmp_path: Path, model_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from leantune.commands import compare

    plotted: list[tuple[list[dict], str]] = []
    real_plot = compare.plot
    monkeypatch.setattr(compare, "plot", lambda rows, path, title: plotted.append((rows, title))
                        or real_plot(rows, path, title))
    out_dir = tmp_path / "cmp"
    code, out, _ = run_cli(capsys, "compare", "--methods", "bitfit", "--model", model_dir, "--data", REVIEWS,
                           "--output-dir", out_dir, "--learning-rate", "0.01", "--max-steps", "2",
                           *[f for f in FAST if f != "--no-baselines"])
    assert code == 0
    report = json.loads((out_dir / "compare.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["bitfit", "majority", "features_logreg", "tfidf_logreg"]
    assert [bool(r.get("baseline")) for r in report["rows"]] == [False, True, True, True]
    assert report["rows"][1:] == json.loads((out_dir / "baselines.json").read_text())["rows"]
    assert not (out_dir / "bitfit" / "baselines.json").exists()  # scored once, not by every method's run
    table = out[out.index("method "):]
    assert "baselines (no fine-tuning, same splits" in table
    majority = report["rows"][1]
    assert re.search(rf"^majority +{majority['test_metric']:.4f} +- ", table, re.MULTILINE)
    bitfit = report["rows"][0]
    assert bitfit["phase_seconds"]["load_and_init"] > 0
    assert bitfit["wall_seconds"] >= bitfit["phase_seconds"]["load_and_init"] + bitfit["train_seconds"]
    rows, title = plotted[0]
    assert title == f"{model_dir.name}, reviews.csv" and len(rows) == 4
    # a row whose run trained no step of its own (resumed after it finished) shows no rate
    assert compare.format_table([{**bitfit, "seconds_per_step": None}]).splitlines()[2].split()[-2] == "-"


def test_train_and_compare_help_texts_are_whole_and_show_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from leantune.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("train", "compare"):
        parser = commands[name]
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help.rstrip().endswith((".", ")")), (name, action.option_strings)
        text = parser.format_help()
        assert "Evaluate on the first N validation examples." in text
        assert "Examples per optimizer step (all processes together). (default: 32)" in text
        assert "(leantune.memory). (default: on)" in text  # the command line measures memory by default
        assert "(default: the method's default learning rate" in text
        assert "--baselines, --no-baselines" in text
    assert "compare.json" in commands["compare"].format_help()
    assert "runs/<method>-<task>-<time>" in commands["train"].format_help()


def sentiment_file(tmp_path: Path, rows: int = 60) -> Path:
    """A CSV of ``rows`` short texts in two classes (one give-away word each), 80/10/10 when split."""
    words = {"positive": ["good", "great", "lovely"], "negative": ["bad", "awful", "rude"]}
    lines = ["text,label"]
    for i in range(rows):
        label = ("positive", "negative")[i % 3 == 0]
        lines.append(f"the {words[label][i % 3]} meal number {i},{label}")
    path = tmp_path / "meals.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_shows_its_phases_the_sizes_it_uses_the_baselines_and_where_the_time_went(
        tmp_path: Path, model_dir: Path, capsys) -> None:
    from leantune.baselines import BASELINE_LABELS, majority_baseline, tfidf_logreg_baseline
    from leantune.tasks.local import load_local

    data, run_dir = sentiment_file(tmp_path), tmp_path / "run"
    sizes = ["--train-examples", "12", "--validation-examples", "3", "--test-examples", "5"]
    code, out, err = run_cli(capsys, "train", "--model", model_dir, "--method", "lora", "--data", data, "--output-dir",
                             run_dir, "--batch-size", "4", "--max-steps", "2", "--max-length", "24",
                             "--no-measure-memory", *sizes)
    assert code == 0
    assert "meals (2 classes, metric accuracy): train 12, validation 3, test 5" in out  # not the file's 48/6/6
    assert f"loading {model_dir} and the data, attaching lora: done in" in err
    assert "baselines (majority class, frozen features, TF-IDF): done in" in err
    # the baselines score the run's own splits: parity with the functions run on them directly
    task = load_local(data).subset({"train": 12, "validation": 3, "test": 5})
    rows = {r["method"]: r for r in json.loads((run_dir / "baselines.json").read_text())["rows"]}
    assert list(rows) == list(BASELINE_LABELS) and all(r["baseline"] for r in rows.values())
    assert rows["majority"]["test_metric"] == majority_baseline(task)
    assert rows["tfidf_logreg"]["test_metric"] == tfidf_logreg_baseline(task)
    assert rows["features_logreg"]["train_examples"] == {"meals": 12}
    for row in rows.values():
        line = rf"{re.escape(row['label'])} +test accuracy {row['test_metric']:.4f} +\(\d+\.\d s, fitted on 12 "
        assert re.search(line, out), row
    best = max(rows.values(), key=lambda r: r["test_metric"])
    results = json.loads((run_dir / "results.json").read_text())
    gap = 100 * (results["test_metric"] - best["test_metric"])
    assert f"lora vs the best baseline ({best['label']} {best['test_metric']:.4f}): {gap:+.2f} points" in out
    phases = results["phase_seconds"]
    assert phases["load_and_init"] > 0
    assert results["wall_seconds"] >= phases["load_and_init"] + results["train_seconds"]
    assert f"time: {results['wall_seconds']:.1f} s in all (start-up, loading and initialisation " in out
    assert f"2 steps at {results['seconds_per_step']:.3f} s/step" in out
    # --no-progress: no phase lines; --no-baselines: no baselines
    code, out, err = run_cli(capsys, "train", "--model", model_dir, "--method", "lora", "--data", data,
                             "--output-dir", tmp_path / "quiet", "--max-steps", "2", *FAST, *sizes)
    assert code == 0 and "done in" not in err and "baseline" not in out
    assert not (tmp_path / "quiet" / "baselines.json").exists()


def test_baselines_of_a_regression_run_are_not_applicable(tmp_path: Path, model_dir: Path, capsys) -> None:
    data = tmp_path / "scores.csv"
    data.write_text("text,label\n" + "".join(f"text number {i},{i / 7:.3f}\n" for i in range(30)))
    code, out, _ = run_cli(capsys, "train", "--model", model_dir, "--method", "lora", "--data", data, "--output-dir",
                           tmp_path / "run", "--max-steps", "1", *[f for f in FAST if f != "--no-baselines"])
    assert code == 0
    assert "baselines: n/a (scores: regression task(s); baselines are for classification)" in out


def test_resume_skips_data_driven_initialisation_and_times_its_own_steps(
        tmp_path: Path, model_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from leantune.train import loop
    from leantune.train import run as run_module

    builds: list[dict] = []
    data_uses: list[int] = []
    build, batches, run_step = run_module.build, run_module.TaskBatches, loop.train_step

    def spy_build(spec, **options):
        builds.append(options)
        return build(spec, **options)

    def spy_batches(*args, **kwargs):
        data_uses.append(1)
        return batches(*args, **kwargs)

    def stop_at_step_two(run: loop.RunState) -> float:
        if run.progress.global_step == 2:
            raise KeyboardInterrupt
        return run_step(run)

    monkeypatch.setattr(run_module, "build", spy_build)
    monkeypatch.setattr(run_module, "TaskBatches", spy_batches)
    monkeypatch.setattr(loop, "train_step", stop_at_step_two)
    run_dir = tmp_path / "run"
    args = ["train", "--model", model_dir, "--method", "lst", "--set", "fisher_samples=4", "--data",
            sentiment_file(tmp_path), "--output-dir", run_dir, "--max-steps", "4", "--checkpoint-every", "2", *FAST]
    code, _, _ = run_cli(capsys, *args)
    assert code == 130 and builds == [{}] and data_uses == [1]  # LST's Fisher init read the data
    monkeypatch.setattr(loop, "train_step", run_step)
    code, out, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and data_uses == [1]  # not again: the checkpoint replaces it
    assert builds[1]["initialise"] is False and builds[1]["saved"]
    assert "2 steps of 4 (resumed at step 2) at " in out
    code, out, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "no step left to train (the run had finished its 4 steps)" in out and "s/step" not in out


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
    assert spec.options == {} and spec.train["max_length"] == 32
    assert spec.train_config().learning_rate == leantune.get_method("lora").default_learning_rate == 3e-3


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
