"""Multi-task training: one task per batch, each task its share of every epoch in a reproducible order that a
resumed run continues bitwise, per-task metrics and their average, the best checkpoint by the average, the
run's task names reaching task-aware methods, and `leantune train` on two tasks from a YAML config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import make_tiny_bert, make_tiny_t5, tokenizer

import leantune
from leantune import context
from leantune.cli import build_parser, main
from leantune.commands.train import spec_from_args
from leantune.errors import CheckpointError, ConfigError
from leantune.tasks import MultiTask
from leantune.tasks.core import Example, Task
from leantune.train import loop
from leantune.train.checkpoint import latest_checkpoint
from leantune.train.data import task_encoders
from leantune.train.evaluation import evaluate_tasks
from leantune.train.sampling import epoch_order, epoch_schedule

SENTIMENT = {0: ["good", "great", "fine", "nice", "happy"], 1: ["bad", "awful", "poor", "sad", "ugly"]}
TOPIC = {0: ["goal", "match", "team", "coach"], 1: ["stock", "bank", "price", "trade"],
         2: ["vote", "party", "law", "senate"]}
BATCH_SIZES = {"sentiment": 8, "topic": 4}
SETTINGS = dict(max_length=32, progress=False, seed=5, learning_rate=5e-3, eval_batch_size=16)


def word_task(name: str, words: dict[int, list[str]], labels: list[str], n_train: int, n_eval: int = 12,
              seed: int = 0) -> Task:
    """Three words of one class per example."""
    rng = random.Random(seed)

    def examples(n: int) -> list[Example]:
        out = []
        for _ in range(n):
            label = rng.randrange(len(words))
            out.append(Example(" ".join(rng.choice(words[label]) for _ in range(3)), label))
        return out

    return Task(name, {"train": examples(n_train), "validation": examples(n_eval), "test": examples(n_eval)},
                labels, prefix=name, input_names=("text", ""))


def two_tasks(n_sentiment: int = 32, n_topic: int = 14) -> MultiTask:
    """Sentiment (2 classes, 4 batches of 8 per epoch) and topic (3 classes, 3 batches of 4; 2 left over)."""
    return MultiTask([word_task("sentiment", SENTIMENT, ["positive", "negative"], n_sentiment),
                      word_task("topic", TOPIC, ["sports", "money", "politics"], n_topic, seed=1)],
                     dict(BATCH_SIZES))


def per_task_bert(seed: int = 0, **options) -> leantune.TunedModel:
    """Tiny BERT with a joint head (2 + 3 outputs) and one adapter per task."""
    config = leantune.make_config("adapter", tasks=["sentiment", "topic"], sharing="multiple", reduction_factor=4,
                                  **options)
    return leantune.wrap(make_tiny_bert(seed=seed, num_labels=5), config)


# --- the schedule -------------------------------------------------------------------------------------------------
def test_epoch_schedule_gives_each_task_exactly_its_batches_in_a_reproducible_order() -> None:
    counts = [6, 3, 4]
    schedule = epoch_schedule(counts, seed=3, epoch=1)
    assert len(schedule) == sum(counts)
    for task, count in enumerate(counts):
        assert [number for t, number in schedule if t == task] == list(range(count))
    assert schedule == epoch_schedule(counts, seed=3, epoch=1)
    tasks_in_order = [t for t, _ in schedule]
    assert tasks_in_order != [t for t, _ in epoch_schedule(counts, seed=4, epoch=1)]
    assert tasks_in_order != [t for t, _ in epoch_schedule(counts, seed=3, epoch=2)]
    assert epoch_schedule([4], seed=3, epoch=1) == [(0, i) for i in range(4)]  # one task: its batches in order
    # The first task keeps the single-task example order; the others are shuffled by their own stream.
    legacy = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)).tolist()
    assert epoch_order(50, seed=3, epoch=1) == legacy
    second = epoch_order(50, seed=3, epoch=1, task_index=1)
    assert sorted(second) == list(range(50)) and second != legacy
    assert second == epoch_order(50, seed=3, epoch=1, task_index=1)


def test_every_batch_holds_one_task_and_each_task_gets_its_share_in_the_schedule_order() -> None:
    tasks = two_tasks()
    tuned = per_task_bert()
    seen: list[tuple[str, list[str]]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            texts = tokenizer().batch_decode(kwargs["input_ids"], skip_special_tokens=True)
            seen.append((context.get("task"), texts))

    tuned.base_model.register_forward_pre_hook(record, with_kwargs=True)
    result = leantune.train(tuned, tasks, tokenizer(), epochs=2, **SETTINGS)
    counts = [32 // 8, 14 // 4]
    expected = [("sentiment", "topic")[t] for epoch in range(2) for t, _ in epoch_schedule(counts, 5, epoch)]
    assert [task for task, _ in seen] == expected and result.steps == 2 * sum(counts)
    vocabulary = {"sentiment": {w for ws in SENTIMENT.values() for w in ws}, "topic": {w for ws in TOPIC.values()
                                                                                     for w in ws}}
    for task, texts in seen:
        assert len(texts) == BATCH_SIZES[task]
        assert all(set(text.split()) <= vocabulary[task] for text in texts)  # every example is of the batch's task
    # Each epoch runs every task's selected examples exactly once.
    for epoch in range(2):
        epoch_texts = [t for task, texts in seen[epoch * 7:(epoch + 1) * 7] if task == "topic" for t in texts]
        order = epoch_order(14, 5, epoch, task_index=1)[:12]
        assert sorted(epoch_texts) == sorted(tasks.tasks[1].splits["train"][i].text for i in order)


# --- evaluation, results, best checkpoint --------------------------------------------------------------------------
def test_per_task_metrics_and_their_average_in_the_log_and_results(tmp_path: Path) -> None:
    tasks = two_tasks()
    tuned = per_task_bert()
    result = leantune.train(tuned, tasks, tokenizer(), epochs=3, output_dir=tmp_path, **SETTINGS)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and result.metric == "average"
    for entry in log:
        per_task = [entry["validation_sentiment_accuracy"], entry["validation_topic_accuracy"]]
        assert entry["validation_average"] == pytest.approx(sum(per_task) / 2)
        assert entry["train_loss_sentiment"] > 0 and entry["train_loss_topic"] > 0
    best = max(log, key=lambda e: e["validation_average"])
    assert result.best_step == best["step"] and result.validation_metric == best["validation_average"]
    assert {n: m["validation"] for n, m in result.task_metrics.items()} == {
        "sentiment": best["validation_sentiment_accuracy"], "topic": best["validation_topic_accuracy"]}
    assert result.test_metric == pytest.approx(sum(m["test"] for m in result.task_metrics.values()) / 2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task_metrics"] == result.task_metrics and saved["test_metric"] == result.test_metric
    # The reported test metrics are the best checkpoint's: reload best/ into a fresh model and score each task.
    reloaded = leantune.load(make_tiny_bert(num_labels=5), tmp_path / "best")
    config = leantune.TrainConfig(**SETTINGS)
    tests = evaluate_tasks(reloaded, task_encoders(tasks, tokenizer(), reloaded, 32, 16), "test", config)
    assert tests == {n: m["test"] for n, m in result.task_metrics.items()}
    assert log[-1]["train_loss_topic"] < log[0]["train_loss_topic"]  # both tasks learn through the joint head
    assert log[-1]["train_loss_sentiment"] < log[0]["train_loss_sentiment"]


def test_the_best_checkpoint_is_chosen_by_the_average_not_by_any_one_task(tmp_path: Path, monkeypatch) -> None:
    # Scripted validation metrics: the first task peaks at the first evaluation, the second at the last, the
    # average at the second.
    scripted = iter([{"sentiment": 0.9, "topic": 0.2}, {"sentiment": 0.6, "topic": 0.6},
                     {"sentiment": 0.1, "topic": 0.9}])
    snapshots: list[dict[str, torch.Tensor]] = []
    real = loop.evaluate_tasks

    def evaluate_tasks_scripted(model, encoders, split, config, ctx=None):
        if split != "validation":
            return real(model, encoders, split, config, ctx)
        snapshots.append({n: t.detach().clone() for n, t in model.delta_state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(loop, "evaluate_tasks", evaluate_tasks_scripted)
    result = leantune.train(per_task_bert(), two_tasks(), tokenizer(), epochs=3, output_dir=tmp_path, **SETTINGS)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["best"] for e in log] == [True, True, False]
    assert result.best_step == log[1]["step"] and result.validation_metric == pytest.approx(0.6)
    best = load_file(str(tmp_path / "best" / "delta.safetensors"))
    assert all(torch.equal(best[n], snapshots[1][n]) for n in best)
    assert not all(torch.equal(best[n], snapshots[2][n]) for n in best)


# --- resuming ------------------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_a_run_stopped_mid_epoch_resumes_the_same_order_to_bitwise_equal_weights(tmp_path: Path) -> None:
    settings = dict(epochs=2, checkpoint_every=1, **SETTINGS)  # 7 steps per epoch
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    leantune.train(per_task_bert(), two_tasks(), tokenizer(), output_dir=straight, **settings)

    interrupted = per_task_bert()
    calls = {"n": 0}

    def stop_at_step_10(module: torch.nn.Module, args: tuple) -> None:
        calls["n"] += module.training
        if calls["n"] == 10:  # step 10 starts: the checkpoint of step 9 (epoch 2, position 2) is complete
            raise Stop

    interrupted.register_forward_pre_hook(stop_at_step_10)
    with pytest.raises(Stop):
        leantune.train(interrupted, two_tasks(), tokenizer(), output_dir=stopped, **settings)
    assert latest_checkpoint(stopped).name == "step-000009"
    leantune.train(per_task_bert(), two_tasks(), tokenizer(), output_dir=stopped, resume=True, **settings)
    expected = load_file(str(latest_checkpoint(straight) / "delta.safetensors"))
    resumed = load_file(str(latest_checkpoint(stopped) / "delta.safetensors"))
    assert latest_checkpoint(stopped).name == "step-000014" and expected.keys() == resumed.keys()
    assert all(torch.equal(expected[n], resumed[n]) for n in expected)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (straight, stopped)]
    for entries in logs:
        for entry in entries:
            entry.pop("elapsed_s")
    assert logs[0] == logs[1]
    changed = two_tasks()
    changed.batch_sizes["topic"] = 2
    with pytest.raises(CheckpointError, match=r"topic \(batch 4, 14 training examples\).*topic \(batch 2"):
        leantune.train(per_task_bert(), changed, tokenizer(), output_dir=stopped, resume=True, **settings)


# --- heads, text-to-text, the method's tasks -----------------------------------------------------------------------
def test_a_head_model_needs_one_joint_head_with_a_slice_per_task() -> None:
    tuned = leantune.wrap(make_tiny_bert(num_labels=3), leantune.make_config("lora"))
    with pytest.raises(ConfigError, match=r"sentiment 2, topic 3 outputs make num_labels=5, but the model's head "
                                          r"has 3"):
        leantune.train(tuned, two_tasks(), tokenizer(), max_steps=1, **SETTINGS)


def test_a_method_built_for_other_tasks_is_refused_naming_both_lists() -> None:
    config = leantune.make_config("adapter", tasks=["sentiment", "news"], sharing="multiple")
    tuned = leantune.wrap(make_tiny_bert(num_labels=5), config)
    with pytest.raises(ConfigError, match=r"serves the tasks \['sentiment', 'news'\], but this run trains "
                                          r"\['topic'\]"):
        leantune.train(tuned, two_tasks(), tokenizer(), max_steps=1, **SETTINGS)


def test_text_to_text_tasks_each_generate_their_own_label_words() -> None:
    # A frozen random T5 learns little through adapters in a few steps; full fine-tuning shows the form works.
    tasks = two_tasks(n_sentiment=48, n_topic=48)
    tuned = leantune.wrap(make_tiny_t5(), leantune.make_config("full"))
    result = leantune.train(tuned, tasks, tokenizer(), epochs=6, max_target_length=10,
                            **{**SETTINGS, "learning_rate": 1e-2})
    first, last = result.history[0], result.history[-1]
    for name in tasks.names:
        assert last[f"train_loss_{name}"] < 0.3 * first[f"train_loss_{name}"]
    assert result.validation_metric > first["validation_average"]  # generated words parse as each task's labels
    assert result.test_metric == pytest.approx(sum(m["test"] for m in result.task_metrics.values()) / 2)
    tuned.eval()
    encoders = task_encoders(tasks, tokenizer(), tuned, 32, 10)
    for encoder in encoders:
        inputs = encoder.inputs(encoder.task.splits["test"])
        with torch.no_grad():
            predicted = encoder.predictions(tuned, inputs)
        assert set(predicted) <= set(range(encoder.task.num_labels)) | {-1}
        assert any(p >= 0 for p in predicted)


# --- the command line ----------------------------------------------------------------------------------------------
def write_task_files(folder: Path) -> tuple[Path, Path]:
    """Two local CSV files: sentiment (2 labels) and topic (3 labels)."""
    files = []
    for name, words, labels in (("sentiment", SENTIMENT, ["positive", "negative"]),
                                ("topic", TOPIC, ["sports", "money", "politics"])):
        task = word_task(name, words, labels, n_train=40, seed=len(files))
        rows = [f"{e.text},{labels[e.label]}" for e in task.splits["train"]]
        path = folder / f"{name}.csv"
        path.write_text("text,label\n" + "\n".join(rows) + "\n")
        files.append(path)
    return files[0], files[1]


def test_flags_pair_tasks_and_data_in_order(tmp_path: Path) -> None:
    def spec(*argv: str):
        args = build_parser().parse_args(["train", *argv])
        return spec_from_args(args, args.method)

    multi = spec("--task", "reviews", "--data", "a.csv", "--data", "b.csv", "--task", "tweets", "--task", "bbc")
    assert multi.tasks == [{"name": "reviews", "data": "a.csv"}, {"data": "b.csv"}, {"task": "tweets"},
                           {"task": "bbc"}]
    assert multi.task_names() == ["reviews", "b", "tweets", "bbc"] and multi.data is None
    one = spec("--task", "SST-2")
    assert (one.tasks, one.task, one.task_names()) == (None, "SST-2", ["sst2"])
    assert spec("--data", "a.csv", "--text-column", "review").data["text_column"] == "review"
    with pytest.raises(ConfigError, match="--text-column applies to one --data file; with several tasks"):
        spec("--data", "a.csv", "--data", "b.csv", "--text-column", "review")


def test_train_on_two_tasks_from_a_yaml_config(tmp_path: Path, tiny_bert_dir: Path, capsys) -> None:
    sentiment, topic = write_task_files(tmp_path)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_bert_dir), "method": "adapter", "options": {"sharing": "multiple", "reduction_factor": 4},
        "tasks": [{"data": str(sentiment), "batch_size": 8, "prefix": "sentiment:"},
                  {"name": "news", "data": str(topic), "batch_size": 4}],
        "train": {"epochs": 2, "learning_rate": 0.01, "max_length": 32, "progress": False,
                  "measure_memory": False}}))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["task_metrics"]
    assert list(metrics) == ["sentiment", "news"] and results["metric"] == "average"
    assert f"test average: {results['test_metric']:.4f}" in out
    for name, m in metrics.items():
        assert f"  {name}: test accuracy {m['test']:.4f} (validation {m['validation']:.4f})" in out
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and {"validation_average", "validation_sentiment_accuracy",
                              "validation_news_accuracy"} <= set(log[0])
    # 32 training rows each (the 80/10/10 split of 40): 4 batches of 8 and 8 batches of 4 per epoch
    assert log[0]["step"] == 12 and results["steps"] == 24
    saved = json.loads((run_dir / "best" / "leantune_config.json").read_text())
    assert saved["options"]["tasks"] == ["sentiment", "news"]  # the run gave the method its task names
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"test average {results['test_metric']:.4f}" in out
    assert all(f"  {name}: test accuracy {m['test']:.4f}" in out for name, m in metrics.items())


def test_a_method_task_list_that_differs_from_the_run_is_refused(tmp_path: Path, tiny_bert_dir: Path,
                                                                 capsys) -> None:
    sentiment, topic = write_task_files(tmp_path)
    code = main(["train", "--model", str(tiny_bert_dir), "--data", str(sentiment), "--data", str(topic),
                 "--method", "adapter", "--set", "sharing=multiple", "--set", "tasks=[sentiment, news]",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "tasks=['sentiment', 'news'] does not match the run's tasks ['sentiment', 'topic']" in err
    assert not (tmp_path / "run").exists()


def test_compare_table_shows_the_average_and_a_column_per_task() -> None:
    from leantune.commands.compare import format_table

    def row(method: str, sentiment: float, topic: float) -> dict:
        return {"method": method, "metric": "average", "test_metric": (sentiment + topic) / 2,
                "validation_metric": 0.5, "trainable_percent": 1.0, "peak_memory_bytes": 2**20,
                "seconds_per_step": 0.1, "wall_seconds": 3.0,
                "task_metrics": {"sentiment": {"metric": "accuracy", "validation": 0.5, "test": sentiment},
                                 "topic": {"metric": "accuracy", "validation": 0.5, "test": topic}}}

    header, _, lora, adapter = format_table([row("lora", 0.75, 0.25), row("adapter", 1.0, 0.5)]).splitlines()
    assert "test average" in header and header.index("sentiment") < header.index("topic")
    assert lora.split()[1:5] == ["0.5000", "0.5000", "0.7500", "0.2500"]
    assert adapter.split()[1:5] == ["0.7500", "0.5000", "1.0000", "0.5000"]


def test_hyperformer_without_task_names_trains_a_single_task_through_the_cli(tmp_path: Path,
                                                                             tiny_bert_dir: Path) -> None:
    reviews = Path(__file__).parent / "fixtures" / "local" / "reviews.csv"
    run_dir = tmp_path / "run"
    code = main(["train", "--model", str(tiny_bert_dir), "--data", str(reviews), "--method", "hyperformer",
                 "--max-steps", "3", "--batch-size", "4", "--max-length", "24", "--no-progress", "--no-baselines",
                 "--no-measure-memory", "--output-dir", str(run_dir)])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 3 and 0.0 <= results["test_metric"] <= 1.0
