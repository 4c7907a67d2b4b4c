"""Frozen image features for vision-language training: extraction into shards, and reading them back by image id.

:func:`extract_features` runs a folder of images (or a list file of image paths) through a frozen Hugging Face
vision model (CLIP's vision tower, ViT, DINOv2, a CNN: any image ``AutoModel``) with its transformers image
processor, and writes ``features-00000.safetensors``, ``features-00001.safetensors``, ... (one tensor per image,
keyed by the image id: the file name without extension) and ``index.json``.

Tokens per image (``tokens``): ``patches`` (a ViT's patch tokens, without the class and register tokens), ``all``
(every output token) or, for a CNN's ``(channels, height, width)`` map, its grid cells. ``grid=N`` max-pools (or
mean-pools) the grid to N x N: VL-Adapter's CLIP RN101 7 x 7 map pooled to 6 x 6 = 36 tokens.

Shards are fixed slices of the sorted image list, each written atomically once complete (:mod:`leantune.files`), so
a run killed at any point resumes where it stopped without redoing finished shards, and the result equals an
uninterrupted run's. An image that cannot be decoded is named, skipped and listed at the end (and in the index).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from leantune.config import check_choice, check_positive, option
from leantune.errors import ConfigError, LeantuneError
from leantune.files import write_atomic, write_atomic_text

INDEX_NAME = "index.json"
SETTINGS_NAME = "settings.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TOKEN_CHOICES = ("patches", "all")
POOLING = ("max", "mean")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class FeatureError(LeantuneError, ValueError):
    """Image or feature files that cannot be used; the message names the file."""


@dataclass
class FeatureSettings:
    """What decides the features: the model, the tokens kept, the pooling, the shard layout and the dtype."""

    model: str = option("", "Hugging Face model id or folder of an image model with its image processor.")
    tokens: str = option("patches", "patches = a ViT's patch tokens (no class/register tokens); all = every "
                                    "output token. A CNN's feature map always gives its grid cells.")
    grid: int | None = option(None, "Pool the token grid to grid x grid (VL-Adapter's RN101: 7x7 -> 6); "
                                    "None keeps every token.")
    pooling: str = option("max", "Grid pooling: max (VL-Adapter) or mean.")
    shard_size: int = option(1000, "Images per shard file.")
    dtype: str = option("float16", "Stored dtype: float16, bfloat16 or float32.")

    def validate(self) -> None:
        check_choice(self, "tokens", TOKEN_CHOICES)
        check_choice(self, "pooling", POOLING)
        check_choice(self, "dtype", tuple(DTYPES))
        check_positive(self, "shard_size")
        if self.grid is not None:
            check_positive(self, "grid")


def shard_name(index: int) -> str:
    return f"features-{index:05d}.safetensors"


# --- listing images ---------------------------------------------------------------------------------------------
def list_images(source: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(image id, path)`` sorted by id, from a folder (searched recursively) or a list file (one path per line,
    relative to the file's folder). Two images with one id are refused."""
    source = Path(source)
    if source.is_dir():
        paths = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    elif source.is_file():
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        paths = [Path(line) if Path(line).is_absolute() else source.parent / line for line in lines if line]
    else:
        raise FeatureError(f"{source} is neither a folder of images nor a list file")
    by_id: dict[str, Path] = {}
    for path in paths:
        if path.stem in by_id:
            raise FeatureError(f"two images have the id {path.stem!r}: {by_id[path.stem]} and {path}; image ids are "
                               "file names without extension and must be unique")
        by_id[path.stem] = path
    if not by_id:
        raise FeatureError(f"{source}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(by_id.items())


def load_image(path: Path) -> Any:
    """The image as RGB, decoded now (a corrupt file fails here, not later)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


# --- turning model outputs into tokens ------------------------------------------------------------------------
def image_tokens(hidden: torch.Tensor, settings: FeatureSettings, leading_tokens: int) -> torch.Tensor:
    """(batch, tokens, dim) from a vision model's last hidden state: a CNN map (batch, dim, h, w) or a token
    sequence (batch, n, dim) whose first ``leading_tokens`` are the class and register tokens."""
    if hidden.dim() == 4:
        grid = hidden
    else:
        if settings.tokens == "all":
            if settings.grid is not None:
                raise ConfigError("FeatureSettings.grid pools patch tokens; it cannot be combined with tokens='all'")
            return hidden
        patches = hidden[:, leading_tokens:]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            if settings.grid is not None:
                raise ConfigError(f"{patches.shape[1]} patch tokens do not form a square grid; grid pooling needs one")
            return patches
        grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
    if settings.grid is not None:
        pool = F.adaptive_max_pool2d if settings.pooling == "max" else F.adaptive_avg_pool2d
        grid = pool(grid.float(), settings.grid)
    return grid.flatten(2).transpose(1, 2)


def leading_token_count(config: Any) -> int:
    """Class and register tokens before the patches (ViT, CLIP: 1; DINOv2 with registers: 1 + registers)."""
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


class FrozenImageEncoder:
    """A vision model and its image processor, run under ``no_grad``: PIL images -> (batch, tokens, dim)."""

    def __init__(self, settings: FeatureSettings, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.processor = AutoImageProcessor.from_pretrained(settings.model)
            model = AutoModel.from_pretrained(settings.model)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the image model {settings.model!r}: {err}") from None
        self.model = getattr(model, "vision_model", model).to(device).eval()  # CLIP: its vision tower
        self.settings = settings
        self.device = torch.device(device)
        self.leading = leading_token_count(self.model.config)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        hidden = self.model(pixel_values=pixels).last_hidden_state
        return image_tokens(hidden, self.settings, self.leading).to(DTYPES[self.settings.dtype]).cpu()


# --- extraction -------------------------------------------------------------------------------------------------
def extract_features(
    images: str | os.PathLike,
    output: str | os.PathLike,
    settings: FeatureSettings,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Extract features of every image into ``output`` (resuming a stopped run there); return the index."""
    from tqdm import tqdm

    settings.validate()
    check_positive_int(batch_size, "batch_size")
    listed = list_images(images)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _check_settings(output, settings, listed)
    _remove_stale_temporaries(output)
    shards = [listed[i:i + settings.shard_size] for i in range(0, len(listed), settings.shard_size)]
    done = {k for k in range(len(shards)) if (output / shard_name(k)).is_file()}
    encode: FrozenImageEncoder | None = None  # loaded only if a shard is left to do
    with tqdm(total=len(listed), initial=sum(len(shards[k]) for k in done), unit="image", desc="features",
              disable=not progress, dynamic_ncols=True) as bar:
        for k, shard in enumerate(shards):
            if k not in done:
                encode = encode or FrozenImageEncoder(settings, device)
                write_shard(output / shard_name(k), shard, encode, batch_size, bar)
    return build_index(output, settings, len(shards))


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_settings(output: Path, settings: FeatureSettings, listed: list[tuple[str, Path]]) -> None:
    """Record the settings and the image list in ``output``; a folder made with others is refused."""
    names = [[image_id, path.name] for image_id, path in listed]  # not the full paths: resumable from another cwd
    record = {"settings": asdict(settings), "images_sha256": hashlib.sha256(json.dumps(names).encode()).hexdigest(),
              "num_images": len(listed)}
    path = output / SETTINGS_NAME
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != record:
            differing = [k for k in record if saved.get(k) != record[k]]
            raise FeatureError(f"{output} holds features made with other settings or images ({', '.join(differing)} "
                               "differ); resume with the same ones or use another output folder")
        return
    write_atomic_text(path, json.dumps(record, indent=2) + "\n")


def _remove_stale_temporaries(output: Path) -> None:
    """Half-written shards of a killed run (the atomic writer's temporary files)."""
    for stale in output.glob(".features-*.safetensors.tmp*"):
        stale.unlink()


def write_shard(path: Path, shard: list[tuple[str, Path]], encode: Callable[[Sequence[Any]], torch.Tensor],
                batch_size: int, bar: Any) -> None:
    """Decode, encode and write one shard atomically; undecodable images go into the shard's metadata."""
    tensors: dict[str, torch.Tensor] = {}
    failed: list[dict[str, str]] = []
    for start in range(0, len(shard), batch_size):
        chunk = shard[start:start + batch_size]
        ids, images = [], []
        for image_id, image_path in chunk:
            try:
                images.append(load_image(image_path))
                ids.append(image_id)
            except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, ValueError, ...)
                failed.append({"path": str(image_path), "error": f"{type(err).__name__}: {err}"})
                bar.write(f"skipped {image_path}: cannot decode it ({type(err).__name__})")
        if images:
            features = encode(images)
            tensors.update({image_id: features[i].contiguous() for i, image_id in enumerate(ids)})
        bar.update(len(chunk))
    metadata = {"failed": json.dumps(failed), "images": str(len(shard))}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def build_index(output: Path, settings: FeatureSettings, num_shards: int) -> dict[str, Any]:
    """The index of the shards in ``output``: image id -> shard, the token shape, and the skipped images."""
    images: dict[str, str] = {}
    failed: list[dict[str, str]] = []
    shape: list[int] | None = None
    for k in range(num_shards):
        name = shard_name(k)
        try:
            with safe_open(str(output / name), framework="pt") as handle:
                failed += json.loads((handle.metadata() or {}).get("failed", "[]"))
                for image_id in handle.keys():
                    images[image_id] = name
                    shape = shape or list(handle.get_slice(image_id).get_shape())
        except (SafetensorError, OSError) as err:
            raise FeatureError(f"{output / name} cannot be read ({err}); delete it and run again") from None
    index = {"settings": asdict(settings), "tokens": shape[0] if shape else 0, "feature_dim": shape[1] if shape else 0,
             "num_images": len(images), "images": images, "failed": failed}
    write_atomic_text(output / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    return index


# --- reading ----------------------------------------------------------------------------------------------------
class FeatureStore:
    """Features by image id from one or more folders written by :func:`extract_features`.

    As a trainer ``input_processor`` it turns the examples' ``visual_features`` values (an image id, or a tuple
    of ids for two-image examples) into a (batch, [images,] tokens, dim) float tensor; other inputs pass through.
    """

    def __init__(self, folders: str | os.PathLike | Iterable[str | os.PathLike]) -> None:
        folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
        self.location: dict[str, Path] = {}
        dims = set()
        for folder in map(Path, folders):
            index = _read_index(folder)
            dims.add(index["feature_dim"])
            for image_id, shard in index["images"].items():
                if image_id in self.location:
                    raise FeatureError(f"image id {image_id!r} is in both {self.location[image_id].parent} and "
                                       f"{folder}; give each image set its own ids")
                self.location[image_id] = folder / shard
        if len(dims) > 1:
            raise FeatureError(f"the feature folders hold features of different widths {sorted(dims)}")
        self.feature_dim = dims.pop() if dims else 0
        self._handles: dict[Path, Any] = {}
        self.shift: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.location

    def get(self, image_id: str) -> torch.Tensor:
        """The (tokens, dim) features of one image."""
        path = self.location.get(image_id)
        if path is None:
            raise FeatureError(f"no features for image {image_id!r} (not extracted, or skipped as corrupt)")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt")
        features = handle.get_tensor(image_id)
        if self.shift is None:
            return features
        return (features.float() - self.shift) / self.scale

    def standardize(self, image_ids: Iterable[str], eps: float = 1e-3) -> None:
        """From now on, give every feature minus the per-dimension mean of ``image_ids``' tokens (the training
        images), divided by their standard deviation (+ ``eps``). Raw image features share a large common part
        (DINOv2: a few outlier dimensions) that a freshly initialised projection passes on to every visual token;
        centred, the images differ from the first step."""
        self.shift = self.scale = None
        tokens = torch.cat([self.get(i).float().reshape(-1, self.feature_dim) for i in image_ids])
        if len(tokens) < 2:
            raise FeatureError("standardizing the features needs at least two feature tokens")
        self.shift, self.scale = tokens.mean(dim=0), tokens.std(dim=0) + eps

    def __call__(self, name: str, values: list[Any]) -> Any:
        if name != "visual_features":
            return values
        rows = [torch.stack([self.get(i) for i in v]) if isinstance(v, (tuple, list)) else self.get(v)
                for v in values]
        return torch.stack(rows).float()


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise FeatureError(f"{path} is missing: extract features into {folder} with `leantune features` first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FeatureError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(index.get("images"), dict):
        raise FeatureError(f"{path} has no 'images' table")
    return index
