"""``leantune features``: a tiny random ViT (saved with a PIL image processor) over generated images with a corrupt
one; parity with the model run by hand, grid pooling, a run SIGKILLed mid-way and resumed equals an uninterrupted
run without redoing finished shards, and the feature store that reads the shards back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
from safetensors import safe_open
from tiny import save_tiny_vit

from leantune.cli import main
from leantune.vl.features import FeatureError, FeatureSettings, FeatureStore, extract_features, image_tokens

NUM_IMAGES = 7  # plus one corrupt file
SIZE = 28  # 4 x 4 patches of 7 pixels


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"), SIZE)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        pixels = rng.integers(0, 256, size=(20 + 3 * i, 30, 3), dtype=np.uint8)
        sub = path / "more" if i % 3 == 0 else path
        sub.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (path / "notes.txt").write_text("not an image")
    return path


def settings(vit_dir: Path, **changes) -> FeatureSettings:
    return FeatureSettings(model=str(vit_dir), shard_size=3, dtype="float32", **changes)


def shard_contents(folder: Path) -> dict[str, tuple[dict, dict]]:
    """Each shard's tensors and metadata."""
    contents = {}
    for path in sorted(folder.glob("features-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            contents[path.name] = ({k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata())
    return contents


def assert_same_shards(a: Path, b: Path) -> None:
    first, second = shard_contents(a), shard_contents(b)
    assert list(first) == list(second)
    for name, (tensors, metadata) in first.items():
        other_tensors, other_metadata = second[name]
        assert metadata == other_metadata, name
        assert list(tensors) == list(other_tensors), name
        for key, value in tensors.items():
            # the shards come from two processes, which may run torch with other thread counts: float sums can
            # then differ in the last bits
            torch.testing.assert_close(value, other_tensors[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_features_equal_the_model_run_by_hand_and_the_corrupt_image_is_skipped(vit_dir, image_dir, tmp_path):
    from PIL import Image

    index = extract_features(image_dir, tmp_path, settings(vit_dir), batch_size=2, progress=False)
    assert index["num_images"] == NUM_IMAGES and index["tokens"] == 16 and index["feature_dim"] == 32
    assert [Path(f["path"]).name for f in index["failed"]] == ["broken.jpg"]
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 3  # 8 files in shards of 3
    model = hf.ViTModel.from_pretrained(vit_dir).eval()
    processor = hf.AutoImageProcessor.from_pretrained(vit_dir)
    store = FeatureStore(tmp_path)
    for name in ("img0", "img5"):
        path = next(image_dir.rglob(f"{name}.*"))
        with torch.no_grad():
            pixels = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"]
            expected = model(pixel_values=pixels).last_hidden_state[0, 1:]
        torch.testing.assert_close(store.get(name), expected, rtol=1e-5, atol=1e-5)


def test_grid_pooling_takes_the_max_of_each_window(vit_dir, image_dir, tmp_path):
    extract_features(image_dir, tmp_path / "all", settings(vit_dir), progress=False)
    extract_features(image_dir, tmp_path / "grid", settings(vit_dir, grid=2), progress=False)
    patches = FeatureStore(tmp_path / "all").get("img3").reshape(4, 4, 32)
    pooled = FeatureStore(tmp_path / "grid").get("img3")
    assert pooled.shape == (4, 32)
    for r in range(2):
        for c in range(2):
            window = patches[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, 32)
            torch.testing.assert_close(pooled[2 * r + c], window.max(dim=0).values)


def test_a_cnn_map_of_7x7_becomes_36_tokens_by_overlapping_max_windows():
    cnn_map = torch.randn(2, 8, 7, 7)
    tokens = image_tokens(cnn_map, FeatureSettings(grid=6), leading_tokens=0)
    assert tokens.shape == (2, 36, 8)
    for r in range(6):
        for c in range(6):  # adaptive pooling 7 -> 6: windows [i, i + 2)
            expected = cnn_map[:, :, r:r + 2, c:c + 2].amax(dim=(2, 3))
            torch.testing.assert_close(tokens[:, 6 * r + c], expected)


KILLER = """
import os, signal, sys
import leantune.vl.features as features
original_write, original_save = features.write_shard, features.save_file
calls = {"shards": 0}
def write_shard(*args, **kwargs):
    calls["shards"] += 1
    original_write(*args, **kwargs)
def save_file(tensors, path, metadata=None):
    original_save(tensors, path, metadata=metadata)
    if calls["shards"] == 2:  # the second shard's temporary file is written, not yet renamed: die
        os.kill(os.getpid(), signal.SIGKILL)
features.write_shard, features.save_file = write_shard, save_file
from leantune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_without_redoing_finished_shards(vit_dir, image_dir, tmp_path, capsys):
    args = [str(image_dir), str(tmp_path / "resumed"), "--model", str(vit_dir), "--shard-size", "3",
            "--batch-size", "2", "--dtype", "float32", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run([sys.executable, "-c", KILLER, "features", *args], env=env, capture_output=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    out = tmp_path / "resumed"
    assert [p.name for p in out.glob("features-*.safetensors")] == ["features-00000.safetensors"]
    assert list(out.glob(".features-00001.safetensors.tmp*")), "the kill should leave a half-written shard"
    first = (out / "features-00000.safetensors").stat()
    assert main(["features", *args]) == 0
    printed = capsys.readouterr().out
    assert "broken.jpg" in printed and f"{NUM_IMAGES} images" in printed
    after = (out / "features-00000.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), "a finished shard was redone"
    assert not list(out.glob(".*tmp*"))
    main(["features", *args[:1], str(tmp_path / "clean"), *args[2:]])
    assert_same_shards(out, tmp_path / "clean")
    assert json.loads((out / "index.json").read_text())["images"] == json.loads(
        (tmp_path / "clean" / "index.json").read_text())["images"]


def test_an_injected_failure_mid_run_resumes_to_the_same_shards(vit_dir, image_dir, tmp_path, monkeypatch):
    import leantune.vl.features as features

    original = features.write_shard
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        original(path, *args, **kwargs)

    monkeypatch.setattr(features, "write_shard", failing)
    with pytest.raises(RuntimeError, match="injected"):
        extract_features(image_dir, tmp_path / "a", settings(vit_dir), progress=False)
    monkeypatch.setattr(features, "write_shard", original)
    extract_features(image_dir, tmp_path / "a", settings(vit_dir), progress=False)
    extract_features(image_dir, tmp_path / "b", settings(vit_dir), progress=False)
    assert_same_shards(tmp_path / "a", tmp_path / "b")


def test_other_settings_in_the_same_folder_and_bad_input_are_refused(vit_dir, image_dir, tmp_path, capsys):
    extract_features(image_dir, tmp_path, settings(vit_dir), progress=False)
    with pytest.raises(FeatureError, match="other settings"):
        extract_features(image_dir, tmp_path, settings(vit_dir, grid=2), progress=False)
    assert main(["features", str(tmp_path / "missing"), str(tmp_path / "out"), "--model", str(vit_dir)]) == 2
    assert "neither a folder of images nor a list file" in capsys.readouterr().err


def test_a_list_file_and_the_store_as_an_input_processor(vit_dir, image_dir, tmp_path):
    names = ["img1.png", "more/img3.png", "img2.jpg"]
    (image_dir.parent / "list.txt").write_text("\n".join(f"{image_dir.name}/{n}" for n in names) + "\n")
    index = extract_features(image_dir.parent / "list.txt", tmp_path, settings(vit_dir), progress=False)
    assert sorted(index["images"]) == ["img1", "img2", "img3"]
    store = FeatureStore(tmp_path)
    batch = store("visual_features", [("img1", "img2"), ("img3", "img1")])
    assert batch.shape == (2, 2, 16, 32)
    assert torch.equal(batch[1, 1], store.get("img1"))
    assert store("task", ["vqa"]) == ["vqa"]
    with pytest.raises(FeatureError, match="no features for image 'img4'"):
        store("visual_features", ["img4"])
    with pytest.raises(FeatureError, match="in both"):
        FeatureStore([tmp_path, tmp_path])
