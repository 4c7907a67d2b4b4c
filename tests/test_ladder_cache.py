"""LST's cached ladders (TrainConfig.cache_ladders, issue 9): the same numbers as the backbone up to fp16 rounding,
no backbone forward once an epoch's examples are stored, exactly the real tokens on disk, one-line refusals, and a
resumed run bitwise equal to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import make_task, make_tiny_bert, make_tiny_t5, tokenizer

import leantune
from leantune.errors import ConfigError
from leantune.methods.lst import ladder_cache
from leantune.tasks.multitask import MultiTask
from leantune.train import loop
from leantune.train.checkpoint import latest_checkpoint
from leantune.train.data import Encoder

SETTINGS = dict(batch_size=16, max_length=24, progress=False, seed=1, learning_rate=3e-3)
FP16_UNIT_ROUNDOFF = 2.0**-11


def tuned_lst(**options: object) -> leantune.TunedModel:
    """Tiny BERT (dropout 0.1 in its config) with LST whose backbone always runs in eval mode."""
    return leantune.wrap(make_tiny_bert(), leantune.make_config(
        "lst", init="random", **{"backbone_train_mode": False, **options}))


def count_backbone_calls(tuned: leantune.TunedModel, monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """{step: backbone forwards during that training step}, filled while ``leantune.train`` runs."""
    calls: dict[int, int] = {}
    step = {"now": 0}
    run_step = loop.train_step

    def counted_step(run: loop.RunState) -> float:
        step["now"] = run.progress.global_step + 1
        calls.setdefault(step["now"], 0)
        try:
            return run_step(run)
        finally:
            step["now"] = 0

    def hook(*_: object) -> None:
        if step["now"]:
            calls[step["now"]] += 1

    tuned.base_model.base_model.register_forward_hook(hook)
    monkeypatch.setattr(loop, "train_step", counted_step)
    return calls


def test_cached_ladders_give_the_backbone_logits_up_to_fp16_rounding(tmp_path: Path) -> None:
    tuned = tuned_lst().eval()  # no side dropout: the comparison is of the ladders alone
    task = make_task(n_train=16)
    examples = task.splits["train"]
    encoder = Encoder.for_model(task, tokenizer(), tuned, max_length=24, max_target_length=8)
    cache = ladder_cache.open_for_run(tuned, MultiTask.of(task), tmp_path / "cache", resumed=False)
    first = encoder.batch(examples[:8])
    with torch.no_grad(), cache.serving(0, range(8)):
        stored = tuned(**first)  # epoch 1: the backbone runs, the ladders are stored and read fp16-rounded
    with torch.no_grad(), cache.serving(0, range(8)):
        read_back = tuned(**first)
    assert torch.equal(stored.logits, read_back.logits)  # computed or read: the same numbers

    order = [5, 2, 7, 0]  # another batch of stored examples (other padding), all read back
    batch = encoder.batch([examples[i] for i in order])
    with torch.no_grad():
        uncached = tuned(**batch)
        with cache.serving(0, order):
            cached = tuned(**batch)
    # each ladder element is rounded to fp16 (relative error <= 2^-11); the side network carries such relative
    # errors through to its logits and loss, so they must agree to a few units of that roundoff
    scale = uncached.logits.abs().max()
    assert (cached.logits - uncached.logits).abs().max() <= 4 * FP16_UNIT_ROUNDOFF * scale
    assert abs(cached.loss - uncached.loss) <= 4 * FP16_UNIT_ROUNDOFF * uncached.loss
    assert not torch.equal(cached.logits, uncached.logits)  # the cache was really read
    ladder_cache.close_for_run(tuned, cache)


def test_epoch_two_runs_no_backbone_and_the_cache_holds_exactly_the_real_tokens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tuned = tuned_lst()
    calls = count_backbone_calls(tuned, monkeypatch)
    folder, sizes, counted_step = tmp_path / "run" / ladder_cache.FOLDER, {}, loop.train_step

    def snapshot_before_the_last_step(run: loop.RunState) -> float:
        if run.progress.global_step == 7:
            sizes.update({f.name: f.stat().st_size for f in folder.iterdir()})
            sizes["index"] = np.fromfile(folder / "index.bin", dtype=np.int64).reshape(-1, 3)
        return counted_step(run)

    monkeypatch.setattr(loop, "train_step", snapshot_before_the_last_step)
    task = make_task(n_train=64)
    result = leantune.train(tuned, task, tokenizer(), output_dir=tmp_path / "run", epochs=2, cache_ladders=True,
                            **SETTINGS)
    assert calls == {1: 1, 2: 1, 3: 1, 4: 1, 5: 0, 6: 0, 7: 0, 8: 0}  # 4 steps per epoch, batch 16

    texts = [e.text for e in task.splits["train"]]
    tokens = sum(len(ids) for ids in tokenizer()(texts, truncation=True, max_length=24)["input_ids"])
    ladders, width = 1 + 2, 32  # embeddings + 2 blocks, hidden size 32
    assert sizes["ladders.bin"] == tokens * ladders * width * 2
    assert sizes["index.bin"] == 64 * 3 * 8
    index = sizes["index"]
    assert sorted(index[:, 0].tolist()) == list(range(64)) and index[:, 2].sum() == tokens
    assert result.ladder_cache_bytes == sizes["ladders.bin"] + sizes["index.bin"] + sizes["meta.json"]
    assert not folder.exists()  # deleted once training has ended


def test_examples_an_epoch_left_out_are_stored_when_they_come(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tuned = tuned_lst()
    calls = count_backbone_calls(tuned, monkeypatch)
    leantune.train(tuned, make_task(n_train=72), tokenizer(), epochs=3, cache_ladders=True, **SETTINGS)
    # epoch 1 drops the 8 examples of its incomplete last batch; epoch 2's batches that hold any of them run the
    # backbone once and store them; epoch 3 reads everything
    assert all(calls[s] == 1 for s in range(1, 5))
    assert 1 <= sum(calls[s] for s in range(5, 9)) <= 4
    assert all(calls[s] == 0 for s in range(9, 13))


def test_refusals_are_one_line_and_name_the_fix() -> None:
    task, settings = make_task(n_train=16), {**SETTINGS, "max_steps": 1, "cache_ladders": True}
    cases = [
        (leantune.wrap(make_tiny_bert(), leantune.make_config("lst", init="random")),
         "dropout is active while training (LSTConfig.backbone_train_mode=True, embeddings.dropout p=0.1); "
         "pass --set backbone_train_mode=false"),
        (leantune.wrap(make_tiny_bert(), leantune.make_config("lora", r=2)), "this run tunes with 'lora'"),
        (leantune.wrap(make_tiny_t5(), leantune.make_config("lst", init="random", backbone_train_mode=False)),
         "supports LST on encoder classifiers; 't5' is encoder-decoder"),
    ]
    for tuned, expected in cases:
        with pytest.raises(ConfigError, match="TrainConfig.cache_ladders") as caught:
            leantune.train(tuned, task, tokenizer(), **settings)
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    # no dropout module active: allowed even with the backbone in train mode
    without_dropout = leantune.wrap(make_tiny_bert(dropout=0.0), leantune.make_config("lst", init="random"))
    leantune.train(without_dropout, task, tokenizer(), **settings)


def test_the_cli_refuses_before_loading_data_or_running_the_fisher_init(
        tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from leantune.cli import main
    from leantune.methods.lst import method as lst_method

    monkeypatch.setattr(lst_method, "fisher_initialise", lambda *a, **k: pytest.fail("Fisher init ran"))
    data = Path(__file__).parent / "fixtures" / "local" / "reviews.csv"
    common = ["train", "--model", str(tiny_bert_dir), "--data", str(data), "--cache-ladders", "--no-progress",
              "--no-baselines", "--output-dir", str(tmp_path / "run")]
    assert main([*common, "--method", "lst"]) == 2
    assert "pass --set backbone_train_mode=false" in capsys.readouterr().err
    assert main([*common, "--method", "lora"]) == 2
    assert "this run tunes with 'lora'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _final_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the latest checkpoint's delta, best/'s delta)."""
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    return load_file(str(checkpoint / "delta.safetensors")), load_file(str(run_dir / "best" / "delta.safetensors"))


def test_a_stopped_run_with_a_torn_cache_resumes_to_bitwise_equal_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task(n_train=72)  # epoch 2 also stores the examples epoch 1 left out
    settings = {**SETTINGS, "epochs": 2, "cache_ladders": True, "checkpoint_every": 2}
    leantune.train(tuned_lst(), task, tokenizer(), output_dir=tmp_path / "straight", **settings)

    run_dir, run_step = tmp_path / "stopped", loop.train_step

    def stop_after_step_three(run: loop.RunState) -> float:
        if run.progress.global_step == 3:  # the checkpoint is at step 2; step 3's examples are stored already
            raise KeyboardInterrupt
        return run_step(run)

    monkeypatch.setattr(loop, "train_step", stop_after_step_three)
    with pytest.raises(KeyboardInterrupt):
        leantune.train(tuned_lst(), task, tokenizer(), output_dir=run_dir, **settings)
    monkeypatch.setattr(loop, "train_step", run_step)
    folder = run_dir / ladder_cache.FOLDER
    stored_rows = (folder / "ladders.bin").stat().st_size
    with open(folder / "ladders.bin", "ab") as rows, open(folder / "index.bin", "ab") as index:
        rows.write(b"\x01" * 100)  # a kill while writing: a torn row, a record of rows not all on disk, a torn one
        index.write(np.array([70, stored_rows // 192, 9], dtype=np.int64).tobytes() + b"\x00" * 13)

    probe = tuned_lst()
    repaired = ladder_cache.open_for_run(probe, MultiTask.of(task), folder, resumed=True)
    assert repaired.stored_examples() == 3 * 16  # the complete records of steps 1-3; the torn tail is cut off
    assert (folder / "ladders.bin").stat().st_size == stored_rows and (folder / "index.bin").stat().st_size == 48 * 24
    ladder_cache.close_for_run(probe, repaired)

    resumed_tuned = tuned_lst()
    calls = count_backbone_calls(resumed_tuned, monkeypatch)
    leantune.train(resumed_tuned, task, tokenizer(), output_dir=run_dir, resume=True, **settings)
    assert calls[3] == 0  # step 3's examples were reused from the stopped run's cache
    for expected, resumed in zip(_final_weights(tmp_path / "straight"), _final_weights(run_dir)):
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_a_fresh_run_or_other_weights_rebuild_the_cache(tmp_path: Path) -> None:
    task = make_task(n_train=16)
    tuned = tuned_lst()
    cache = ladder_cache.open_for_run(tuned, MultiTask.of(task), tmp_path / "cache", resumed=False)
    encoder = Encoder.for_model(task, tokenizer(), tuned, max_length=24, max_target_length=8)
    with torch.no_grad(), cache.serving(0, range(4)):
        tuned(**encoder.batch(task.splits["train"][:4]))
    ladder_cache.close_for_run(tuned, cache)
    kept = ladder_cache.open_for_run(tuned, MultiTask.of(task), tmp_path / "cache", resumed=True)
    assert kept.stored_examples() == 4
    ladder_cache.close_for_run(tuned, kept)
    other = leantune.wrap(make_tiny_bert(seed=1), leantune.make_config("lst", init="random",
                                                                       backbone_train_mode=False))
    rebuilt = ladder_cache.open_for_run(other, MultiTask.of(task), tmp_path / "cache", resumed=True)
    assert rebuilt.stored_examples() == 0
    ladder_cache.close_for_run(other, rebuilt)
    fresh = ladder_cache.open_for_run(tuned, MultiTask.of(task), tmp_path / "cache", resumed=False)
    assert fresh.stored_examples() == 0 and fresh.disk_bytes() == (tmp_path / "cache" / "meta.json").stat().st_size
    ladder_cache.close_for_run(tuned, fresh)


def test_an_image_classifier_caches_every_patch_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_train import image_task
    from tiny import make_model

    losses = []
    for cached in (False, True):
        tuned = leantune.wrap(make_model("dinov2"), leantune.make_config("lst"))  # no dropout in this backbone
        calls = count_backbone_calls(tuned, monkeypatch)
        result = leantune.train(tuned, image_task(), None, epochs=2, cache_ladders=cached, **SETTINGS)
        losses.append([h["train_loss"] for h in result.history])
        assert calls == ({s: 1 for s in range(1, 7)} if not cached else {1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0})
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)  # fp16-rounded ladders, the same training
