"""Image classification through the loaders and the CLI: an image folder and a CSV of image paths with bad images
(named, skipped, counted), ``leantune train`` then ``eval`` on tiny random ViT and Swin folders for a
representative set of methods, ``eval`` refusing changed images, the model loader's errors (a text task on a vision
model, an architecture the auto class does not know, a missing folder), ``inspect`` on a vision model, and a
resumed run's build without data-driven initialisation."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
from tiny import save_tiny_vit

from leantune.cli import main
from leantune.errors import ConfigError
from leantune.methods.fish.method import Fish
from leantune.tasks.core import DataError
from leantune.tasks.images import IMAGE_INPUT, load_images
from leantune.train.run import RunSpec, build, checkpoint_delta

CLASSES = ("cat", "dog", "owl")
PER_CLASS = 20
FAST = ["--no-progress", "--no-measure-memory", "--batch-size", "4", "--max-steps", "8", "--eval-every", "4"]


def save_image(path: Path, label: int, rng: np.random.Generator, size: int) -> None:
    """A small RGB image whose mean colour tells its class."""
    from PIL import Image

    pixels = np.full((size, size, 3), 80 * label, dtype=np.uint8) + rng.integers(0, 48, (size, size, 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_image_folder(root: Path, corrupt: str = "broken.jpg") -> Path:
    """Three class sub-folders of 20 images each (8x8 and 16x16), a corrupt image in ``cat/`` and a text file."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            save_image(root / name / f"{name}{i}.{'png' if i % 2 else 'jpg'}", label, rng, 8 if i % 2 else 16)
    (root / "cat" / corrupt).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "pets")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"), 28)


@pytest.fixture(scope="module")
def swin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``SwinModel`` and its PIL image processor, saved like a hub model."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    path = tmp_path_factory.mktemp("tiny-swin")
    torch.manual_seed(0)
    hf.SwinModel(hf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                               window_size=4)).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_image_folder_loads_its_classes_and_skips_the_corrupt_image(tmp_path: Path, caplog) -> None:
    image_folder = write_image_folder(tmp_path / "pets", corrupt="damaged.jpg")  # its own: warnings come once
    with caplog.at_level(logging.WARNING, logger="leantune.data"):
        task = load_images(image_folder)
    assert task.label_names == sorted(CLASSES) and task.name == "pets"
    examples = [e for split in task.splits.values() for e in split]
    paths = [e.inputs[IMAGE_INPUT] for e in examples]
    assert len(paths) == len(set(paths)) == len(CLASSES) * PER_CLASS  # every good image once, over the 3 splits
    assert all(Path(p).parent.name == CLASSES[e.label] and e.text is None for p, e in zip(paths, examples))
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [48, 6, 6]  # 80/10/10 of 60
    broken = image_folder / "cat" / "damaged.jpg"
    assert len(task.source["skipped_images"]) == 1 and task.source["skipped_images"][0].startswith(f"{broken} (")
    warned = [r.getMessage() for r in caplog.records if r.name == "leantune.data"]
    assert len(warned) == 1 and "skipped 1 unreadable image(s)" in warned[0] and str(broken) in warned[0]


def test_a_table_of_image_paths_skips_missing_and_corrupt_images(image_folder: Path, tmp_path: Path) -> None:
    rows = [(f"pets/{name}/{name}{i}.{'png' if i % 2 else 'jpg'}", name) for name in CLASSES for i in range(4)]
    rows += [("pets/cat/broken.jpg", "cat"), ("pets/cat/gone.png", "cat")]
    shutil.copytree(image_folder, tmp_path / "pets")
    table = tmp_path / "images.csv"
    table.write_text("path,animal\n" + "".join(f"{p},{label}\n" for p, label in rows))
    task = load_images(table, image_column="path", label_column="animal")
    assert task.label_names == sorted(CLASSES) and task.source["image_column"] == "path"
    examples = [e for split in task.splits.values() for e in split]
    assert len(examples) == len(rows) - 2
    assert all(Path(e.inputs[IMAGE_INPUT]).parent.name == CLASSES[e.label] for e in examples)
    skipped = task.source["skipped_images"]
    assert skipped[1] == f"{tmp_path / 'pets/cat/gone.png'} (missing)" and "broken.jpg (" in skipped[0]
    with pytest.raises(DataError, match=r"images\.csv has no column 'file' \(header, line 1"):
        load_images(table, image_column="file", label_column="animal")


def test_data_with_no_readable_image_or_an_unknown_class_is_refused(image_folder: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        (tmp_path / "bad" / name / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad: no image can be read \(first: .*x\.png .*; 2 skipped in all\)"):
        load_images(tmp_path / "bad")
    validation = tmp_path / "validation"
    shutil.copytree(image_folder / "cat", validation / "cat")
    shutil.copytree(image_folder / "dog", validation / "wolf")
    with pytest.raises(DataError, match=r"validation/wolf: class 'wolf' does not occur in the training data"):
        load_images(image_folder, validation=validation)


VIT_METHODS = [("lst", []), ("lora", ["--set", "r=2"]), ("adapter", ["--set", "reduction_factor=4"]),
               ("bitfit", []), ("full", []), ("fish", ["--set", "keep_ratio=0.05"]), ("probe", [])]


@pytest.mark.parametrize(("family", "method", "options"),
                         [("vit", m, o) for m, o in VIT_METHODS] + [("swin", "lora", ["--set", "r=2"]),
                                                                    ("swin", "adapter", [])])
def test_train_then_eval_on_an_image_folder(family: str, method: str, options: list[str], image_folder: Path,
                                            vit_dir: Path, swin_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    model = vit_dir if family == "vit" else swin_dir
    code, out, err = run_cli(capsys, "train", "--model", model, "--method", method, *options, "--data", image_folder,
                             "--output-dir", run_dir, *FAST)
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["split_sizes"] == {"pets": {"train": 48, "validation": 6, "test": 6}}
    assert [Path(p.split(" (")[0]).name for p in spec["skipped_images"]["pets"]] == ["broken.jpg"]
    assert list(spec["data_sha256"]) == [f"{image_folder}/"]
    config = json.loads((run_dir / "best" / "leantune_config.json").read_text())
    assert config["method"] == method
    code, out, err = run_cli(capsys, "eval", run_dir)
    assert code == 0, err
    assert f"test accuracy {results['test_metric']:.4f} (6 examples)" in out


def test_lst_on_swin_is_refused_in_one_line_saying_why(image_folder: Path, swin_dir: Path, capsys) -> None:
    """LST keeps one width and token count along a stack; Swin's stages downsample, so the method refuses it."""
    code, _, err = run_cli(capsys, "train", "--model", swin_dir, "--method", "lst", "--data", image_folder, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "method 'lst' cannot be applied to SwinForImageClassification: " in err and "hierarchical" in err


@pytest.mark.parametrize("form", ["folder", "table"])
def test_eval_refuses_a_run_whose_images_changed(form: str, image_folder: Path, vit_dir: Path, tmp_path: Path,
                                                 capsys) -> None:
    """The run's data hashes cover the images (a folder's, or those a table names): one edited image makes
    ``leantune eval`` refuse, naming the folder or the table and its image column."""
    folder = tmp_path / "pets"
    shutil.copytree(image_folder, folder)
    table = tmp_path / "pets.jsonl"
    table.write_text("".join(json.dumps({"file": str(p.relative_to(tmp_path)), "label": p.parent.name}) + "\n"
                             for p in sorted(folder.rglob("*.*")) if p.suffix != ".txt"))
    data = ["--data", folder] if form == "folder" else ["--data", table, "--image-column", "file"]
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", vit_dir, "--method", "probe", *data, "--output-dir", run_dir,
                           *FAST)
    assert code == 0, err
    spec = json.loads((run_dir / "run.json").read_text())
    key = f"{folder}/" if form == "folder" else f"{table}:file"
    assert sorted(spec["data_sha256"]) == ([key] if form == "folder" else [str(table), key])
    assert spec["split_sizes"]["pets"] == {"train": 48, "validation": 6, "test": 6}
    assert run_cli(capsys, "eval", run_dir)[0] == 0
    save_image(folder / "owl" / "owl0.jpg", 0, np.random.default_rng(1), 16)  # same name, other pixels
    code, _, err = run_cli(capsys, "eval", run_dir)
    assert code == 2 and f"data file {key} (its content changed since the run" in err
    assert run_cli(capsys, "eval", run_dir, "--allow-changed-data")[0] == 0


def test_a_resumed_build_attaches_without_data_driven_init(image_folder: Path, vit_dir: Path, tmp_path: Path,
                                                           capsys, monkeypatch) -> None:
    """``build(initialise=False, saved=checkpoint_delta(run))``: FISH takes its mask from the checkpoint (same
    tensors and shapes) without estimating a Fisher mask; ``checkpoint_delta`` is None for a run without any."""
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", vit_dir, "--method", "fish", "--set", "keep_ratio=0.05",
                           "--data", image_folder, "--output-dir", run_dir, *FAST)
    assert code == 0, err
    saved = checkpoint_delta(run_dir)
    assert saved and checkpoint_delta(tmp_path) is None

    def no_fisher(*args, **kwargs):
        raise AssertionError("a resumed build estimated a Fisher mask")

    monkeypatch.setattr(Fish, "_build_mask", no_fisher)
    tuned, _, _, _ = build(RunSpec.read(run_dir), initialise=False, saved=saved)
    delta = tuned.delta_state_dict()
    assert set(delta) == set(saved) and all(delta[n].shape == saved[n].shape for n in saved)
    assert all(torch.equal(delta[n], saved[n]) for n in saved if n.endswith("indices"))


def test_a_text_task_on_a_vision_model_names_the_missing_tokenizer(vit_dir: Path, capsys) -> None:
    reviews = Path(__file__).parent / "fixtures" / "local" / "reviews.csv"
    code, _, err = run_cli(capsys, "train", "--model", vit_dir, "--method", "lora", "--data", reviews, *FAST)
    assert code == 2 and f"model '{vit_dir}' has no tokenizer (a vision model?): " in err
    assert "not in the Hugging Face cache" not in err and len(err.strip().splitlines()) == 1


def test_an_architecture_the_auto_class_does_not_know_is_named(image_folder: Path, tiny_bert_dir: Path,
                                                               tmp_path: Path) -> None:
    spec = RunSpec(model=str(tiny_bert_dir), method="lora", data={"data": str(image_folder)})
    with pytest.raises(ConfigError, match=r"AutoModelForImageClassification does not know BertConfig \(model "
                                          r"type 'bert'\), which image tasks need"):
        build(spec, for_loading=True)
    vit_with_tokenizer = save_tiny_vit(tmp_path / "vit-tok", 28)
    hf.ByT5Tokenizer().save_pretrained(vit_with_tokenizer)
    reviews = Path(__file__).parent / "fixtures" / "local" / "reviews.csv"
    spec = RunSpec(model=str(vit_with_tokenizer), method="lora", data={"data": str(reviews)})
    with pytest.raises(ConfigError, match=r"AutoModelForSequenceClassification does not know ViTConfig"):
        build(spec, for_loading=True)
    spec = RunSpec(model=str(tmp_path / "nowhere"), method="lora", data={"data": str(image_folder)})
    with pytest.raises(ConfigError, match=r"is not a local folder and not in the Hugging Face cache"):
        build(spec, for_loading=True)


@pytest.mark.parametrize(("family", "method", "inserted"), [
    ("vit", "adapter", ".mlp.fc2.branches.adapter: BottleneckAdapter"),
    ("swin", "lora", ".q_proj.branches.lora: LoRABranch")])
def test_inspect_shows_where_a_method_attaches_to_a_vision_model(family: str, method: str, inserted: str,
                                                                 vit_dir: Path, swin_dir: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "inspect", "--model", vit_dir if family == "vit" else swin_dir,
                             "--method", method)
    assert code == 0, err
    assert f"family {family} (encoder, vision)" in out and "a vision model: shown as an image classifier" in out
    added = [line for line in out.splitlines() if inserted in line]
    assert len(added) == 2  # one per block of the two-block model
    assert "classifier.weight" in out and "trainable params:" in out
