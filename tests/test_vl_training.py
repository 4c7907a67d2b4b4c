"""`leantune train` on vision-and-language tasks from a YAML config: a tiny random T5 wrapped as a
VisionLanguageModel, VL-T5 annotation folders (VQA + NLVR2) and a features folder written by a tiny random ViT;
per-task metrics, the trained visual projection in best/, `leantune eval` reproducing the test metrics, and clear
errors for a missing features folder or image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
import yaml
from safetensors.torch import load_file
from tiny import save_tiny_vit

from leantune.cli import main
from leantune.errors import ConfigError, UnknownOptionError
from leantune.tasks.vl import VLEncoder
from leantune.train.data import MODEL_INPUT_PROCESSOR, task_encoders
from leantune.train.run import VL_BART_TOKENS, RunSpec, build, vision_language_model
from leantune.vl import VisionLanguageModel
from leantune.vl.features import FeatureSettings, extract_features

NUM_IMAGES = 6
SIZE = 28  # 4 x 4 patches of 7 pixels
ANSWERS = ["red", "blue", "two"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    hf.T5ForConditionalGeneration(hf.T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=2, num_heads=4,
                                              d_kv=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
                                  ).save_pretrained(path)
    hf.ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Features of generated images ``img0``..``img5`` from a tiny random ViT (16 tokens x 32 each)."""
    from PIL import Image

    vit = save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"), SIZE, layers=1)
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    output = tmp_path_factory.mktemp("features")
    extract_features(images, output, FeatureSettings(model=str(vit), shard_size=4, dtype="float32"), progress=False)
    return output


def write_annotations(root: Path) -> tuple[Path, Path]:
    """A VQA folder (karpathy_*.json) and an NLVR2 folder ({train,valid,test}.json) over the six images."""
    vqa, nlvr = root / "vqa", root / "nlvr"
    vqa.mkdir()
    nlvr.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        records = [{"img_id": f"img{i % NUM_IMAGES}", "sent": f"what is {i}?", "question_id": f"{split}{i}",
                    "label": {ANSWERS[i % 3]: 1.0, ANSWERS[(i + 1) % 3]: 0.3}} for i in range(n)]
        (vqa / f"karpathy_{split}.json").write_text(json.dumps(records))
    for split, n in (("train", 12), ("valid", 6), ("test", 6)):
        records = [{"identifier": f"{split}-{i}", "img0": f"img{i % NUM_IMAGES}",
                    "img1": f"img{(i + 1) % NUM_IMAGES}", "sent": f"there are {i} dogs",
                    "label": int(rng.integers(0, 2))} for i in range(n)]
        (nlvr / f"{split}.json").write_text(json.dumps(records))
    return vqa, nlvr


def write_config(tmp_path: Path, t5_dir: Path, features: Path | str) -> Path:
    vqa, nlvr = write_annotations(tmp_path)
    config = tmp_path / "vl.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(t5_dir),
        "tasks": [{"name": "vqa", "data": str(vqa), "features": str(features), "batch_size": 8},
                  {"name": "nlvr", "data": str(nlvr), "features": str(features), "batch_size": 4}],
        "train": {"epochs": 2, "learning_rate": 0.01, "max_length": 24, "max_target_length": 8, "progress": False,
                  "measure_memory": False, "seed": 3, "eval_batch_size": 8}}))
    return config


def test_train_and_eval_vision_language_tasks(tmp_path: Path, t5_dir: Path, features_dir: Path, capsys) -> None:
    config = write_config(tmp_path, t5_dir, features_dir)
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(config), "--output-dir", str(run_dir), "--method", "adapter",
            "--set", "sharing=multiple"]
    assert main(args) == 0
    out = capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["task_metrics"]
    assert list(metrics) == ["vqa", "nlvr"] and results["metric"] == "average"
    assert metrics["vqa"]["metric"] == "vqa_accuracy" and metrics["nlvr"]["metric"] == "accuracy"
    assert all(0.0 <= m["test"] <= 1.0 for m in metrics.values())
    assert f"test average: {results['test_metric']:.4f}" in out
    # 16 VQA questions in batches of 8 and 12 NLVR2 statements in batches of 4, per epoch
    assert results["steps"] == 2 * (2 + 3)

    # The rebuilt model (what `leantune eval` loads into) is a VisionLanguageModel reading the features folder,
    # and the visual projection in best/ moved away from its initial values.
    spec = RunSpec.read(run_dir)
    base, tokenizer, tasks, _ = build(spec, for_loading=True)
    assert isinstance(base, VisionLanguageModel)
    assert getattr(base, MODEL_INPUT_PROCESSOR).feature_dim == 32
    vqa, nlvr = task_encoders(tasks, tokenizer, base, 24, 8)  # the run's input processor comes with the model
    assert isinstance(vqa, VLEncoder) and isinstance(nlvr, VLEncoder)
    vqa_batch = vqa.batch(tasks.tasks[0].splits["train"][:8])
    assert vqa_batch["visual_features"].shape == (8, 16, 32)
    weights = vqa_batch["loss_weights"]  # the drawn answer's score
    assert bool((torch.isclose(weights, torch.tensor(1.0)) | torch.isclose(weights, torch.tensor(0.3))).all())
    assert nlvr.batch(tasks.tasks[1].splits["train"][:4])["visual_features"].shape == (4, 2, 16, 32)
    delta = load_file(str(run_dir / "best" / "delta.safetensors"))
    initial = {f"visual_projection.{n}": p for n, p in base.visual_projection.state_dict().items()}
    trained = {n: t for n, t in delta.items() if "visual_projection" in n}
    assert trained and len(trained) == len(initial)
    weight = next(n for n in trained if n.endswith("features.0.weight"))
    assert trained[weight].shape == initial["visual_projection.features.0.weight"].shape
    assert not torch.allclose(trained[weight], initial["visual_projection.features.0.weight"])

    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"test average {results['test_metric']:.4f}" in out
    assert f"  vqa: test vqa_accuracy {metrics['vqa']['test']:.4f}" in out
    assert f"  nlvr: test accuracy {metrics['nlvr']['test']:.4f}" in out


def test_missing_features_folder_is_named(tmp_path: Path, t5_dir: Path) -> None:
    config = write_config(tmp_path, t5_dir, tmp_path / "nowhere")
    spec = RunSpec.from_dict(yaml.safe_load(config.read_text()))
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(vqa\): features folder .*nowhere does not exist"):
        build(spec, for_loading=True)


def test_missing_image_is_named_with_its_file(tmp_path: Path, t5_dir: Path, features_dir: Path) -> None:
    config = write_config(tmp_path, t5_dir, features_dir)
    test_file = tmp_path / "nlvr" / "test.json"
    records = json.loads(test_file.read_text())
    records[2]["img1"] = "img99"
    test_file.write_text(json.dumps(records))
    spec = RunSpec.from_dict(yaml.safe_load(config.read_text()))
    with pytest.raises(ConfigError, match=r"tasks\[1\] \(nlvr\): image 'img99' of .*nlvr/test\.json has no "
                                          r"features in"):
        build(spec, for_loading=True)


def test_vl_folder_without_features_is_refused(tmp_path: Path, t5_dir: Path) -> None:
    vqa, _ = write_annotations(tmp_path)
    with pytest.raises(ConfigError, match=r"tasks\[0\]: data .*vqa is a folder; .* needs 'features'"):
        RunSpec.from_dict({"model": str(t5_dir), "tasks": [{"data": str(vqa)}, {"task": "sst2"}]})


def test_bart_gets_vl_barts_added_tokens() -> None:
    """VL-BART's <extra_id_*> and <vis_extra_id_*> tokens are added (those missing), the embeddings resized and
    the vocabulary ends with <vis_extra_id_0>; two builds with one seed give the same new rows."""

    def vl_bart() -> tuple[VisionLanguageModel, hf.ByT5Tokenizer]:
        torch.manual_seed(0)
        bart = hf.BartForConditionalGeneration(hf.BartConfig(
            vocab_size=384, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
        tokenizer = hf.ByT5Tokenizer()  # has <extra_id_0..124> already: only the 100 visual ones are missing
        store = type("Store", (), {"feature_dim": 16})()
        return vision_language_model(bart, tokenizer, store, seed=5, num_answers=0), tokenizer

    first, tokenizer = vl_bart()
    second, _ = vl_bart()
    vocabulary = tokenizer.get_vocab()
    assert all(token in vocabulary for token in VL_BART_TOKENS) and len(tokenizer) == 384 + 100
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<vis_extra_id_0>"
    assert first.get_input_embeddings().weight.shape == (484, 32) and first.config.vocab_size == 484
    assert torch.equal(first.get_input_embeddings().weight, second.get_input_embeddings().weight)


@pytest.mark.parametrize("method", ["fish", "lst"])
def test_data_initialised_methods_read_soft_vqa_labels_in_a_joint_answer_head(
        tmp_path: Path, tiny_bert_dir: Path, features_dir: Path, method: str) -> None:
    """An encoder-only VL run with VQA (soft answer scores) and NLVR2 in one answer head: the batches that
    initialise FISH's mask and LST's Fisher pruning carry labels of the joint head's width."""
    config = write_config(tmp_path, tiny_bert_dir, features_dir)
    run_dir = tmp_path / "run"
    options = ["fisher_samples=8"] if method == "lst" else ["num_samples=8", "keep_ratio=0.5"]
    assert main(["train", "--config", str(config), "--output-dir", str(run_dir), "--method", method,
                 "--max-steps", "2", *[a for option in options for a in ("--set", option)]]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2 and list(results["task_metrics"]) == ["vqa", "nlvr"]


def test_the_vision_settings_build_the_model_and_standardize_by_the_training_images(
        tmp_path: Path, t5_dir: Path, features_dir: Path) -> None:
    from leantune.vl.features import FeatureStore

    values = yaml.safe_load(write_config(tmp_path, t5_dir, features_dir).read_text())
    values["vision"] = {"num_images": 3, "use_boxes": False, "standardize": True}
    spec = RunSpec.from_dict(values)
    base, _, tasks, _ = build(spec, for_loading=True)
    assert base.visual_projection.image_order.num_embeddings == 3 and base.visual_projection.boxes is None
    used = {i for task in tasks for e in task.splits["train"] for i in task.record(e).image_ids}
    expected = FeatureStore(features_dir)
    expected.standardize(sorted(used))
    store = getattr(base, MODEL_INPUT_PROCESSOR)
    for image_id in ("img0", "img5"):
        torch.testing.assert_close(store.get(image_id), expected.get(image_id))
    raw = FeatureStore(features_dir).get("img0")
    assert not torch.allclose(store.get("img0").float(), raw.float())


@pytest.mark.parametrize("vision,message", [
    ({"pooling": "max"}, "pooling must be one of"),
    ({"images": 2}, "unknown option.*'images'.*the run's 'vision' settings"),
    ({"num_images": 0}, "num_images must be > 0"),
])
def test_bad_vision_settings_are_named(tmp_path: Path, t5_dir: Path, features_dir: Path, vision: dict,
                                       message: str) -> None:
    values = yaml.safe_load(write_config(tmp_path, t5_dir, features_dir).read_text())
    with pytest.raises((ConfigError, UnknownOptionError), match=message):
        RunSpec.from_dict({**values, "vision": vision})


def test_vision_settings_without_features_are_refused() -> None:
    with pytest.raises(ConfigError, match="'vision'.*this run has none"):
        RunSpec.from_dict({"task": "tweets", "vision": {"pooling": "mean"}})
