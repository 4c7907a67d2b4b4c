"""Image classification (or regression) data: a folder with one sub-folder per class, or a CSV/TSV/JSONL file with
a column of image paths.

- **Folder**: every image under ``data/<class>/`` (searched recursively; extensions as ``leantune features``
  reads) is an example of ``<class>``; the classes are the sub-folder names, sorted. Files with other extensions
  and images directly in ``data/`` are ignored. ``validation``/``test`` folders use the training classes.
- **Table**: ``image_column`` holds each image's path, relative to the file's folder (or absolute); the labels
  are read and inferred as for text data (:mod:`leantune.tasks.local`).

Missing splits are made as for text data (80/10/10, or the validation data halved). Every image is decoded with
Pillow when the data is loaded: one that is missing, unreadable or corrupt is skipped, counted and named in one
warning line (all of them in ``Task.source["skipped_images"]``, which ``leantune train`` writes to ``run.json``);
data with no readable image left is refused. An example holds no text and its image path as
``Example.inputs["image"]``; :class:`ImageInputs` turns a batch of them into ``pixel_values`` with the model's
image processor.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leantune.tasks.core import DataError, Example, Task
from leantune.tasks.local import (
    SPLIT_OFF_NEEDS,
    check_classes,
    column_value,
    infer_labels,
    label_value,
    read_rows,
    split_examples,
)
from leantune.vl.features import IMAGE_EXTENSIONS, load_image

IMAGE_INPUT = "image"
"""The ``Example.inputs`` key of an image example: the image's path (or a PIL image)."""
IMAGE_KIND = "images"
"""``Task.source["kind"]`` of an image task."""
SHOWN_SKIPPED = 3
"""Skipped images named in the warning line (all of them are in the task's source)."""

logger = logging.getLogger("leantune.data")
_checked: dict[str, dict[int, str]] = {}
"""The unreadable images of each list of images checked, by position, keyed by a hash of the list's paths, sizes
and modification times: loading the same data again in one process (a run's baselines) decodes nothing again."""
_warned: set[str] = set()


def is_image_task(task: Task) -> bool:
    return task.source.get("kind") == IMAGE_KIND


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (None when Pillow decodes it)."""
    if not path.is_file():
        return "missing"
    try:
        load_image(path)
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for a damaged file; each one skips it
        message = str(err).replace(f"'{path}'", "").replace(str(path), "").strip()
        return f"{type(err).__name__}: {message.splitlines()[0]}" if message else type(err).__name__
    return None


def _listing_key(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        status = path.stat() if path.is_file() else None
        digest.update(f"{path}\0{status.st_size if status else -1}\0{status.st_mtime_ns if status else -1}\n".encode())
    return digest.hexdigest()


def readable(items: list[tuple[Path, Any]]) -> tuple[list[tuple[Path, Any]], list[str]]:
    """``(the (image path, label) items whose image decodes, "path (why not)" for each of the others)``."""
    key = _listing_key([path for path, _ in items])
    if key not in _checked:
        reasons = ((i, unreadable_reason(path)) for i, (path, _) in enumerate(items))
        _checked[key] = {i: reason for i, reason in reasons if reason is not None}
    failures = _checked[key]
    kept = [item for i, item in enumerate(items) if i not in failures]
    return kept, [f"{items[i][0]} ({reason})" for i, reason in failures.items()]


# --- a folder of class sub-folders ----------------------------------------------------------------------------
def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of an image folder, sorted by name; a :class:`DataError` when there are none."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no sub-folders: an image folder needs one sub-folder of images per class (a "
                        "VL-T5 annotation folder needs 'features')")
    return folders


def folder_images(root: Path) -> list[tuple[Path, str]]:
    """``(image path, class name)`` for every image under ``root``'s class sub-folders, sorted by path."""
    return [(path, folder.name) for folder in class_folders(root)
            for path in sorted(p for p in folder.rglob("*") if is_image_file(p))]


def _folder_split(root: Path, label_names: list[str], skipped: list[str]) -> list[Example]:
    items = folder_images(root)
    unknown = sorted({name for _, name in items if name not in label_names})
    if unknown:
        raise DataError(f"{root / unknown[0]}: class {unknown[0]!r} does not occur in the training data (classes: "
                        f"{', '.join(label_names)})")
    kept, unreadable = readable(items)
    skipped += unreadable
    return _image_examples(root, kept, label_names.index, unreadable)


def _image_examples(source: Path, items: list[tuple[Path, Any]], label_of: Any, skipped: list[str]) -> list[Example]:
    """Examples of the readable ``items`` of one split; none left is a :class:`DataError` naming the first of the
    split's ``skipped`` images."""
    if not items and skipped:
        raise DataError(f"{source}: no image can be read (first: {skipped[0]}; {len(skipped)} skipped in all)")
    if not items:
        raise DataError(f"{source} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return [Example(None, label_of(label), inputs={IMAGE_INPUT: str(path)}) for path, label in items]


def load_image_folder(data: str | os.PathLike, validation: str | os.PathLike | None = None,
                      test: str | os.PathLike | None = None, name: str | None = None) -> Task:
    """A classification task from image folders (one sub-folder per class; see the module docstring)."""
    if test is not None and validation is None:
        raise DataError("a --test folder needs a --validation folder too")
    files = {"train": Path(data), "validation": Path(validation) if validation else None,
             "test": Path(test) if test else None}
    label_names = [folder.name for folder in class_folders(files["train"])]
    skipped: list[str] = []
    examples = {split: _folder_split(path, label_names, skipped) for split, path in files.items() if path}
    check_classes(files["train"], "", label_names, [int(e.label) for e in examples["train"]],
                  SPLIT_OFF_NEEDS if "validation" not in examples else 1, where="the folder")
    source = {"data": str(data), "validation": str(validation) if validation else None,
              "test": str(test) if test else None}
    return _image_task(name or Path(data).stem, split_examples(examples, files), label_names, source, skipped)


# --- a table of image paths -----------------------------------------------------------------------------------
def image_path(table: Path, value: object) -> Path:
    """An image path from a table: absolute, or relative to the table's folder."""
    path = Path(str(value).strip())
    return path if path.is_absolute() else table.parent / path


def table_rows(path: Path, image_column: str, label_column: str, encoding: str) -> list[tuple[int, Path, object]]:
    """``(line, image path, raw label)`` per row of a table of image paths, both columns checked."""
    return [(line, image_path(path, column_value(path, line, row, image_column)),
             column_value(path, line, row, label_column))
            for line, row in read_rows(path, encoding, (image_column, label_column))]


def load_image_table(data: str | os.PathLike, image_column: str, label_column: str = "label",
                     validation: str | os.PathLike | None = None, test: str | os.PathLike | None = None,
                     name: str | None = None, encoding: str = "utf-8") -> Task:
    """A task from CSV/TSV/JSONL files with a column of image paths (see the module docstring)."""
    if test is not None and validation is None:
        raise DataError("a --test file needs a --validation file too")
    files = {"train": Path(data), "validation": Path(validation) if validation else None,
             "test": Path(test) if test else None}
    rows = {split: table_rows(path, image_column, label_column, encoding) for split, path in files.items() if path}
    label_names = infer_labels([raw for *_, raw in rows["train"]])
    skipped: list[str] = []
    examples = {}
    for split, split_rows in rows.items():
        table = files[split]
        assert table is not None
        labelled = [(image, label_value(table, line, raw, label_names, label_column))
                    for line, image, raw in split_rows]
        kept, unreadable = readable(labelled)
        skipped += unreadable
        examples[split] = _image_examples(table, kept, lambda label: label, unreadable)
    if label_names is not None:
        check_classes(files["train"], label_column, label_names, [int(e.label) for e in examples["train"]],
                      SPLIT_OFF_NEEDS if "validation" not in examples else 1)
    source = {"data": str(data), "validation": str(validation) if validation else None,
              "test": str(test) if test else None, "image_column": image_column, "label_column": label_column,
              "encoding": encoding}
    return _image_task(name or Path(data).stem, split_examples(examples, files), label_names, source, skipped)


def _image_task(name: str, splits: dict[str, list[Example]], label_names: list[str] | None, source: dict[str, Any],
                skipped: list[str]) -> Task:
    shown = "; ".join(skipped[:SHOWN_SKIPPED]) + (f"; ... {len(skipped) - SHOWN_SKIPPED} more"
                                                 if len(skipped) > SHOWN_SKIPPED else "")
    warning = (f"leantune: task {name!r}: skipped {len(skipped)} unreadable image(s) (all listed in the task's "
               f"source['skipped_images'], and in run.json by leantune train): {shown}")
    if skipped and warning not in _warned:  # once per process: loading the same data again says it once
        _warned.add(warning)
        logger.warning(warning)
    return Task(name=name, splits=splits, label_names=label_names,
                metric="pearson_spearman" if label_names is None else "accuracy",
                source={**source, "kind": IMAGE_KIND, "skipped_images": skipped})


def load_images(data: str | os.PathLike, image_column: str | None = None, label_column: str = "label",
                validation: str | os.PathLike | None = None, test: str | os.PathLike | None = None,
                name: str | None = None, encoding: str = "utf-8") -> Task:
    """An image task: from a folder of class sub-folders when ``data`` is a folder, else from a table whose
    ``image_column`` holds the image paths."""
    if Path(data).is_dir():
        return load_image_folder(data, validation, test, name)
    if image_column is None:
        raise DataError(f"{data} is not a folder: an image task from a table needs its image column "
                        "(image_column=, --image-column)")
    return load_image_table(data, image_column, label_column, validation, test, name, encoding)


def stand_in_images(num_classes: int = 2, per_class: int = 4, size: int = 32, seed: int = 0) -> Task:
    """A task of random RGB images held in memory, for showing where a method attaches to a vision model when no
    data is given (``leantune inspect``); its labels mean nothing."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    examples = [Example(None, label, inputs={IMAGE_INPUT: Image.fromarray(
        rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))})
        for _ in range(per_class) for label in range(num_classes)]
    return Task(name="random-images", splits={"train": examples, "validation": examples[:num_classes],
                                              "test": examples[:num_classes]},
                label_names=[f"class{i}" for i in range(num_classes)], source={"kind": IMAGE_KIND})


# --- batching and hashing -------------------------------------------------------------------------------------
class ImageInputs:
    """The input processor of image tasks: ``Example.inputs["image"]`` values (paths or PIL images) of one batch,
    decoded as RGB and run through the model's image processor, become ``{"pixel_values": tensor}``."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, name: str, values: Sequence[Any]) -> dict[str, Any]:
        if name != IMAGE_INPUT:
            raise DataError(f"an image task's examples carry the input {name!r}; expected {IMAGE_INPUT!r}")
        images = []
        for value in values:
            if isinstance(value, (str, os.PathLike)):
                try:
                    images.append(load_image(Path(value)))
                except Exception as err:  # noqa: BLE001 - a file that changed since the data was loaded
                    raise DataError(f"image {value} cannot be read any more ({type(err).__name__}: {err})") from None
            else:
                images.append(value.convert("RGB"))
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}


def images_sha256(paths: Sequence[Path], root: Path) -> str:
    """One SHA-256 over images: each one's path relative to ``root`` and its content's SHA-256 (``missing`` for a
    file that does not exist), in sorted path order; a renamed, added, removed or edited image changes it."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        content = hashlib.sha256()
        if path.is_file():
            with path.open("rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    content.update(chunk)
        relative = Path(os.path.relpath(path, root)).as_posix()
        digest.update(f"{relative}\0{content.hexdigest() if path.is_file() else 'missing'}\n".encode())
    return digest.hexdigest()


def folder_sha256(root: Path) -> str | None:
    """The hash of the images an image folder holds (:func:`images_sha256`), None when it cannot be listed."""
    try:
        return images_sha256([path for path, _ in folder_images(root)], root)
    except DataError:
        return None


def table_images_sha256(table: Path, image_column: str, label_column: str, encoding: str) -> str | None:
    """The hash of the images a table names (:func:`images_sha256`), None when the table cannot be read."""
    try:
        rows = table_rows(table, image_column, label_column, encoding)
    except DataError:
        return None
    return images_sha256(sorted({image for _, image, _ in rows}), table.parent)
