"""The trainer: it learns, keeps the best checkpoint, resumes bitwise after SIGKILL (several processes:
tests/test_train_distributed.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file
from tiny import make_model

import leantune
from leantune import context
from leantune.context import CallInput
from leantune.errors import CheckpointError, ConfigError
from leantune.tasks.core import DataError, Example, Task
from leantune.train.checkpoint import latest_checkpoint
from leantune.train.data import Encoder, to_device
from leantune.train.loop import TrainingDivergedError, linear_schedule

WORKER = Path(__file__).parent / "fixtures" / "train_worker.py"
WORDS = {0: ["good", "great", "fine", "nice", "happy"], 1: ["bad", "awful", "poor", "sad", "ugly"]}


def tokenizer() -> hf.PreTrainedTokenizerBase:
    """A byte-level tokenizer that needs no files (vocabulary 384)."""
    return hf.ByT5Tokenizer()


def make_tiny_bert(seed: int = 0, num_labels: int = 2, dropout: float = 0.1) -> hf.BertForSequenceClassification:
    torch.manual_seed(seed)
    return hf.BertForSequenceClassification(hf.BertConfig(
        vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))


def make_tiny_t5(seed: int = 0) -> hf.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=384, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1))


def make_task(n_train: int = 64, n_eval: int = 16, flip_validation: bool = False, seed: int = 0) -> Task:
    """Three words of one sentiment per example; ``flip_validation`` inverts the validation labels."""
    rng = random.Random(seed)

    def examples(n: int, flip: bool = False) -> list[Example]:
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            out.append(Example(" ".join(rng.choice(WORDS[label]) for _ in range(3)), 1 - label if flip else label))
        return out

    return Task("toy", {"train": examples(n_train), "validation": examples(n_eval, flip_validation),
                        "test": examples(n_eval)}, ["positive", "negative"], prefix="toy", input_names=("text", ""))


SETTINGS = dict(batch_size=16, max_length=24, progress=False, seed=1)


def test_training_lowers_the_loss_and_learns() -> None:
    tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("full"))
    result = leantune.train(tuned, make_task(), tokenizer(), learning_rate=3e-3, epochs=4, **SETTINGS)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0]
    assert result.test_metric >= 0.8
    assert result.trainable_parameters == result.total_parameters


def test_frozen_parameters_stay_bitwise_unchanged() -> None:
    tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("lora"))
    frozen = {n: p.detach().clone() for n, p in tuned.named_parameters() if not p.requires_grad}
    leantune.train(tuned, make_task(), tokenizer(), learning_rate=1e-2, epochs=1, **SETTINGS)
    assert all(torch.equal(p, frozen[n]) for n, p in tuned.named_parameters() if not p.requires_grad)


def test_text_to_text_t5_trains_and_is_scored_by_generate() -> None:
    tuned = leantune.wrap(make_tiny_t5(), leantune.make_config("full"))
    task = make_task()
    task.label_names = ["yes", "no"]
    result = leantune.train(tuned, task, tokenizer(), learning_rate=1e-2, epochs=6, eval_every=12, **SETTINGS)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.test_metric > 0.5  # greedy generate produces the label words


def test_regression_head_trains_on_mse_and_is_scored_by_correlation() -> None:
    rng = random.Random(0)

    def examples(n: int) -> list[Example]:
        out = []
        for _ in range(n):
            good = rng.randint(0, 3)
            words = rng.sample(WORDS[0], good) + rng.sample(WORDS[1], 3 - good)
            out.append(Example(" ".join(rng.sample(words, 3)), float(good)))
        return out

    task = Task("score", {"train": examples(64), "validation": examples(16), "test": examples(16)}, None,
                metric="pearson_spearman")
    tuned = leantune.wrap(make_tiny_bert(num_labels=1), leantune.make_config("full"))
    tuned.config.problem_type = "regression"
    result = leantune.train(tuned, task, tokenizer(), learning_rate=3e-3, epochs=8, **SETTINGS)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.metric == "pearson_spearman" and result.test_metric > 0.3


def test_best_checkpoint_is_the_best_validation_epoch_and_test_is_scored_there(tmp_path: Path) -> None:
    # Validation labels are inverted, so validation accuracy falls as training succeeds: the best epoch is early.
    tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("lora"))
    task = make_task(flip_validation=True)
    result = leantune.train(tuned, task, tokenizer(), learning_rate=2e-2, epochs=5, output_dir=tmp_path,
                            **SETTINGS)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    metrics = [entry["validation_accuracy"] for entry in log]
    assert len(log) == 5 and max(metrics) > min(metrics)
    best_index = metrics.index(max(metrics))
    assert result.best_step == log[best_index]["step"] and result.best_step != log[-1]["step"]
    assert result.validation_metric == max(metrics)
    # The reported test metric is the best checkpoint's: reload best/ into a fresh model and score it.
    reloaded = leantune.load(make_tiny_bert(), tmp_path / "best")
    from leantune.train.loop import evaluate

    config = leantune.TrainConfig(**SETTINGS)
    encoder = Encoder(task, tokenizer(), False, config.max_length, config.max_target_length)
    assert evaluate(reloaded, encoder, task.splits["test"], config) == result.test_metric
    assert evaluate(reloaded, encoder, task.splits["validation"], config) == result.validation_metric
    assert json.loads((tmp_path / "results.json").read_text())["best_step"] == result.best_step


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("lora"))
    calls = {"n": 0}

    def poison(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += module.training
        return output * float("nan") if module.training and calls["n"] > 6 else output

    tuned.base_model.classifier.register_forward_hook(poison)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step \d+.*last good checkpoint"):
        leantune.train(tuned, make_task(), tokenizer(), learning_rate=1e-3, epochs=3, checkpoint_every=2,
                       output_dir=tmp_path, **SETTINGS)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "delta.safetensors")).values())


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    task = make_task()
    leantune.train(leantune.wrap(make_tiny_bert(), leantune.make_config("bitfit")), task, tokenizer(),
                   max_steps=2, output_dir=tmp_path, **SETTINGS)
    with pytest.raises(CheckpointError, match="already holds a run"):
        leantune.train(leantune.wrap(make_tiny_bert(), leantune.make_config("bitfit")), task, tokenizer(),
                       max_steps=2, output_dir=tmp_path, **SETTINGS)
    with pytest.raises(CheckpointError, match="training settings differ.*learning_rate"):
        leantune.train(leantune.wrap(make_tiny_bert(), leantune.make_config("bitfit")), task, tokenizer(),
                       max_steps=2, learning_rate=1.0, output_dir=tmp_path, resume=True, **SETTINGS)


def test_gradient_accumulation_matches_one_big_batch() -> None:
    results = []  # without dropout: micro-batches would draw other dropout masks than one batch
    for accumulation in (1, 4):
        tuned = leantune.wrap(make_tiny_bert(dropout=0.0), leantune.make_config("full"))
        leantune.train(tuned, make_task(), tokenizer(), learning_rate=1e-3, max_steps=3,
                       grad_accumulation=accumulation, **SETTINGS)
        results.append(tuned.delta_state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6)


def test_no_weight_decay_on_biases_and_norms_and_warmup_then_linear_decay() -> None:
    tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("full"))
    decay, no_decay = tuned.method.parameter_groups(tuned, 0.01)
    names = {id(p): n for n, p in tuned.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    factor = linear_schedule(warmup_steps=4, total_steps=12)
    assert [factor(s) for s in (0, 2, 4, 8, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def _start_worker(args: list[str], *launcher: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *launcher, str(WORKER), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]


def _last_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    return load_file(str(checkpoint / "delta.safetensors"))


def test_sigkilled_run_resumes_to_bitwise_equal_weights(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = _start_worker([str(straight)])
    process = _start_worker([str(killed), "--slow", "0.15"])  # checkpoints every step, evaluates every 4
    pointer = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.is_file() and int(pointer.read_text().strip().split("-")[1]) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stopped_at = int(pointer.read_text().strip().split("-")[1])
    assert 5 <= stopped_at < 12
    _finish(_start_worker([str(killed), "--resume"]))
    _finish(uninterrupted)
    expected, resumed = _last_delta(straight), _last_delta(killed)
    assert latest_checkpoint(killed).name == "step-000012"
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[n], resumed[n]) for n in expected)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (straight, killed)]
    for entries in logs:
        for entry in entries:
            entry.pop("elapsed_s")
    assert len(logs[0]) == 3 and logs[0] == logs[1]  # same losses, metrics and best flags
    best_a, best_b = load_file(str(straight / "best" / "delta.safetensors")), load_file(
        str(killed / "best" / "delta.safetensors"))
    assert all(torch.equal(best_a[n], best_b[n]) for n in best_a)



# --- time and progress that can be trusted (issue 9, defects 7 and 8) ------------------------------------------------
def test_wall_time_counts_what_came_before_train_and_the_phases_add_up(tmp_path: Path) -> None:
    tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("lora", r=2))
    began = time.perf_counter() - 5.0  # as if loading the model had taken 5 s
    result = leantune.train(tuned, make_task(), tokenizer(), output_dir=tmp_path / "run", epochs=1,
                            wall_start=began, **SETTINGS)
    phases = result.phase_seconds
    assert set(phases) == {"load_and_init", "set_up", "train", "evaluate", "checkpoint"}  # no memory measurement
    assert phases["load_and_init"] >= 5.0 and phases["train"] == round(result.train_seconds, 3)
    assert phases["evaluate"] > 0 and result.wall_seconds >= sum(phases.values()) - 0.01
    assert result.steps == result.steps_run == 4
    assert result.seconds_per_step == pytest.approx(result.train_seconds / 4)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["phase_seconds"] == phases and saved["wall_seconds"] == result.wall_seconds


def test_a_resumed_run_times_only_its_own_steps_and_a_finished_one_reports_no_rate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from leantune.commands.train import time_line
    from leantune.train import loop

    run_dir, run_step = tmp_path / "run", loop.train_step

    def stop_at_step_two(run: loop.RunState) -> float:
        if run.progress.global_step == 2:
            raise KeyboardInterrupt
        return run_step(run)

    def attempt(resume: bool) -> leantune.TrainResult:
        tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("lora", r=2))
        return leantune.train(tuned, make_task(), tokenizer(), output_dir=run_dir, resume=resume, epochs=1,
                              checkpoint_every=2, **SETTINGS)

    monkeypatch.setattr(loop, "train_step", stop_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        attempt(resume=False)
    monkeypatch.setattr(loop, "train_step", run_step)
    resumed = attempt(resume=True)
    assert (resumed.steps, resumed.steps_run) == (4, 2)
    assert resumed.seconds_per_step == pytest.approx(resumed.train_seconds / 2)
    assert "training " in time_line(resumed) and "2 steps of 4 (resumed at step 2) at " in time_line(resumed)
    finished = attempt(resume=True)
    assert (finished.steps_run, finished.train_seconds, finished.seconds_per_step) == (0, 0.0, None)
    assert finished.test_metric == resumed.test_metric
    line = time_line(finished)
    assert "no step left to train (the run had finished its 4 steps)" in line and "s/step" not in line


def test_evaluation_shows_a_bar_once_it_runs_longer_than_the_delay(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from leantune.train import evaluation

    def run(progress: bool) -> str:
        tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("lora", r=2))
        leantune.train(tuned, make_task(), tokenizer(), **{**SETTINGS, "progress": progress}, max_steps=1)
        return capsys.readouterr().err

    assert "validation toy" not in run(progress=True)  # a quick evaluation stays quiet
    monkeypatch.setattr(evaluation, "BAR_DELAY", 0.0)
    shown = run(progress=True)
    assert "validation toy" in shown and "test toy" in shown and "batch" in shown
    assert run(progress=False) == ""


# --- examples with a task name and non-text inputs ------------------------------------------------------------------
def image_task(n_train: int = 48, n_eval: int = 24, as_paths: bool = False) -> Task:
    """Tiny 28x28 'images' whose class c brightens channel c; ``as_paths`` gives names instead of tensors."""
    generator = torch.Generator().manual_seed(0)

    def examples(n: int, split: str) -> list[Example]:
        out = []
        for i in range(n):
            label = i % 3
            image = torch.randn(3, 28, 28, generator=generator) * 0.5
            image[label] += 1.0
            IMAGES[f"{split}/{i}.png"] = image
            out.append(Example(None, label, inputs={"pixel_values": f"{split}/{i}.png" if as_paths else image}))
        return out

    return Task("shapes", {"train": examples(n_train, "train"), "validation": examples(n_eval, "validation"),
                           "test": examples(n_eval, "test")}, ["r", "g", "b"])


IMAGES: dict[str, torch.Tensor] = {}


def test_a_model_without_text_trains_on_non_text_inputs_with_no_tokenizer() -> None:
    calls: list[tuple[str, int]] = []

    def load_images(name: str, paths: list) -> dict[str, torch.Tensor]:  # what an image processor does
        calls.append((name, len(paths)))
        return {name: torch.stack([IMAGES[p] for p in paths])}

    for as_paths in (False, True):
        tuned = leantune.wrap(make_model("vit"), leantune.make_config("full"))
        result = leantune.train(tuned, image_task(as_paths=as_paths), None, learning_rate=3e-3, epochs=3,
                                input_processor=load_images if as_paths else None, **SETTINGS)
        losses = [h["train_loss"] for h in result.history]
        assert losses[-1] < 0.7 * losses[0]
        assert result.test_metric > 0.6  # 3 classes
    assert calls and all(name == "pixel_values" and size in (16, 24) for name, size in calls)


def test_text_without_a_tokenizer_and_raw_inputs_without_a_processor_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="task 'toy' has text to tokenise but no tokenizer was given"):
        leantune.train(leantune.wrap(make_tiny_bert(), leantune.make_config("lora")), make_task(), None,
                       max_steps=1, **SETTINGS)
    with pytest.raises(DataError, match="input 'pixel_values' holds str values.*input_processor"):
        leantune.train(leantune.wrap(make_model("vit"), leantune.make_config("full")), image_task(as_paths=True),
                       None, max_steps=1, **SETTINGS)


def test_the_batch_task_reaches_a_method_that_declares_it_and_mixed_batches_are_refused() -> None:

    tuned = leantune.wrap(make_tiny_bert(), leantune.make_config("lora"))
    tuned.method.call_inputs = (CallInput("task", "the batch's task"),)  # as a per-task method declares it
    seen: list[str] = []
    tuned.base_model.classifier.register_forward_hook(lambda module, args, output: seen.append(context.get("task")))
    task = make_task()
    named = {s: [dataclasses.replace(e, task="sentiment") for e in task.splits[s]] for s in task.splits}
    leantune.train(tuned, Task("toy", named, task.label_names), tokenizer(), max_steps=2, **SETTINGS)
    assert len(seen) > 2 and set(seen) == {"sentiment"}

    encoder = Encoder.for_model(task, tokenizer(), tuned, 24, 4)
    unnamed = encoder.batch(task.splits["train"][:4])
    assert unnamed["task"] == "toy"  # examples without a task name belong to the task itself
    assert to_device(unnamed, torch.device("cpu"))["task"] == "toy"
    mixed = [dataclasses.replace(e, task=name) for e, name in zip(task.splits["train"][:4], "abab")]
    with pytest.raises(DataError, match="mixes the tasks a, b"):
        encoder.batch(mixed)
    assert "task" not in Encoder.for_model(task, tokenizer(), make_tiny_bert(), 24, 4).batch(mixed)

