"""Cached ladders: LST's frozen backbone computes each training example's ladders once; later epochs read them.

The backbone is frozen and runs under ``no_grad``; without backbone dropout an example's ladders are the same
every epoch. With ``TrainConfig.cache_ladders`` the trainer opens a :class:`LadderCache` (:func:`open_for_run`)
and wraps each training forward in ``cache.serving(task_index, example_ids)``. LST's encoder forward then takes
the batch's ladders from :meth:`LadderCache.ladders`: a batch whose examples are all stored skips the backbone;
any other batch runs it and stores the examples that were missing.

Files in the cache folder (``<output_dir>/ladder_cache/``):

``meta.json``    ladder order, width, dtype, and a fingerprint of the backbone weights, the data and the settings
``ladders.bin``  float16 rows of shape (ladders, width), one per real token (padding is not stored), examples
                 one after the other; read through ``numpy.memmap``
``index.bin``    int64 records ``(example key, first row, rows)``, each appended after the rows it describes

Disk: ``sum(real tokens) * ladders * width * 2`` bytes, plus 24 bytes per example and the small ``meta.json``.

Every forward that the cache serves reads fp16-rounded ladders, in the first epoch too, so a batch gives the
same numbers whether its ladders were just computed or read back. A resumed run keeps every complete record (its
rows all on disk) and drops a torn tail, so it ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from leantune.errors import ConfigError
from leantune.files import write_atomic_bytes, write_atomic_text
from leantune.methods.lst.config import DTYPES
from leantune.methods.lst.method import LadderSideTuning
from leantune.vl.model import VisionLanguageModel

if TYPE_CHECKING:
    from leantune.api import TunedModel
    from leantune.tasks.multitask import MultiTask

FOLDER = "ladder_cache"
META, ROWS, INDEX = "meta.json", "ladders.bin", "index.bin"
STORED_DTYPE = np.float16
RECORD_FIELDS = 3  # key, first row, rows
RECORD_BYTES = RECORD_FIELDS * 8

logger = logging.getLogger("leantune.lst")


class LadderCache:
    """The stored ladders of one run's training examples, keyed by ``task base + example index``.

    ``ladder_keys``: the ladders the side network reads, in storage order (-1 = the first block's input, then
    the kept blocks' outputs); ``dtype``/``device``: what the side network gets them as.
    """

    def __init__(self, folder: Path, ladder_keys: list[int], width: int, task_sizes: Sequence[int],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.folder = folder
        self.ladder_keys = list(ladder_keys)
        self.width = width
        self.task_bases = np.cumsum([0, *task_sizes[:-1]]).tolist()
        self.dtype, self.device = dtype, device
        self.first_row = np.full(sum(task_sizes), -1, dtype=np.int64)
        self.row_count = np.zeros(sum(task_sizes), dtype=np.int64)
        self.rows_on_disk = 0
        self._keys: list[int] | None = None
        self._map: np.memmap | None = None
        self._load_index()
        self._rows_file = open(folder / ROWS, "ab")  # noqa: SIM115 (open while the run lasts; closed by close())
        self._index_file = open(folder / INDEX, "ab")  # noqa: SIM115

    @property
    def row_shape(self) -> tuple[int, int]:
        return len(self.ladder_keys), self.width

    @property
    def row_bytes(self) -> int:
        return len(self.ladder_keys) * self.width * np.dtype(STORED_DTYPE).itemsize

    # --- which batch is served ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def serving(self, task_index: int, example_ids: Sequence[int]) -> Iterator[None]:
        """While active, LST's forward serves the batch of training examples ``example_ids`` of that task."""
        self._keys = [self.task_bases[task_index] + int(i) for i in example_ids]
        try:
            yield
        finally:
            self._keys = None

    @property
    def active(self) -> bool:
        return self._keys is not None

    def stored_examples(self) -> int:
        return int((self.first_row >= 0).sum())

    # --- serving a batch ---------------------------------------------------------------------------------------
    def ladders(self, attention_mask: torch.Tensor | None,
                run_backbone: Callable[[], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """The served batch's ladders, fp16-rounded: read back when every example is stored, else from
        ``run_backbone()`` (the examples that were missing are stored; stored ones are read back)."""
        assert self._keys is not None, "ladders() is called inside serving()"
        keys = self._keys
        stored = self.first_row[keys] >= 0
        if stored.all():
            length = attention_mask.shape[1] if attention_mask is not None else int(self.row_count[keys].max())
            rounded = torch.zeros(len(keys), length, *self.row_shape, dtype=torch.float16)
            real = self._real_tokens(attention_mask, len(keys), length)
        else:
            fresh = run_backbone()
            rounded = torch.stack([fresh[k] for k in self.ladder_keys], dim=2).to("cpu", torch.float16)
            if not torch.isfinite(rounded).all():
                raise ConfigError("TrainConfig.cache_ladders: a ladder value exceeds float16's range; train "
                                  "without cache_ladders")
            real = self._real_tokens(attention_mask, len(keys), rounded.shape[1])
            for position, key in enumerate(keys):
                if not stored[position]:
                    self._append(key, rounded[position][real[position]])
        for position, key in enumerate(keys):
            if stored[position]:
                rounded[position][real[position]] = self._read(key, int(real[position].sum()))
        by_ladder = rounded.to(self.device, self.dtype).permute(2, 0, 1, 3).contiguous()
        return dict(zip(self.ladder_keys, by_ladder.unbind(0)))

    @staticmethod
    def _real_tokens(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
        """(batch, length) boolean: the tokens that are not padding (every token of an input without a mask)."""
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool)
        return attention_mask.to("cpu").bool()

    def _append(self, key: int, rows: torch.Tensor) -> None:
        self._rows_file.write(rows.numpy().tobytes())
        self._rows_file.flush()
        record = np.array([key, self.rows_on_disk, rows.shape[0]], dtype=np.int64)
        self._index_file.write(record.tobytes())
        self._index_file.flush()
        self.first_row[key], self.row_count[key] = self.rows_on_disk, rows.shape[0]
        self.rows_on_disk += rows.shape[0]

    def _read(self, key: int, tokens: int) -> torch.Tensor:
        start, count = int(self.first_row[key]), int(self.row_count[key])
        if count != tokens:
            raise ConfigError(f"{self.folder}: example {key} has {tokens} real tokens now but {count} stored; the "
                              "data or the tokenisation changed since the cache was written; delete the folder")
        if self._map is None or self._map.shape[0] < start + count:
            self._map = np.memmap(self.folder / ROWS, dtype=STORED_DTYPE, mode="r",
                                  shape=(self.rows_on_disk, *self.row_shape))
        return torch.from_numpy(np.array(self._map[start:start + count]))

    # --- opening and closing -----------------------------------------------------------------------------------
    def _load_index(self) -> None:
        """Read ``index.bin``, keep the records whose rows are all on disk, and cut both files after the last one
        (a run killed while writing leaves a torn tail)."""
        index_path, rows_path = self.folder / INDEX, self.folder / ROWS
        raw = index_path.read_bytes() if index_path.is_file() else b""
        records = np.frombuffer(raw[:len(raw) - len(raw) % RECORD_BYTES], dtype=np.int64).reshape(-1, RECORD_FIELDS)
        rows_available = (rows_path.stat().st_size if rows_path.is_file() else 0) // self.row_bytes
        end = 0
        kept = []
        for key, first, count in records.tolist():
            if first != end or first + count > rows_available or not 0 <= key < len(self.first_row):
                break
            self.first_row[key], self.row_count[key] = first, count
            end = first + count
            kept.append((key, first, count))
        write_atomic_bytes(index_path, np.array(kept, dtype=np.int64).reshape(-1, RECORD_FIELDS).tobytes())
        with open(rows_path, "ab") as rows_file:
            rows_file.truncate(end * self.row_bytes)
        self.rows_on_disk = end

    def close(self) -> None:
        self._rows_file.close()
        self._index_file.close()
        self._map = None

    def disk_bytes(self) -> int:
        """Bytes of the cache's files."""
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())


# --- the trainer's entry points ------------------------------------------------------------------------------------
def refusal(model: TunedModel, world_size: int) -> str | None:
    """Why ``cache_ladders`` cannot serve this run, as one line, or ``None``."""
    method = model.method
    early = refusal_before_wrap(method.name, method.config, model.base_model)
    if early is not None:
        return early
    if method.backbone.arch.kind != "encoder":
        return (f"TrainConfig.cache_ladders supports LST on encoder classifiers; {method.backbone.family!r} is "
                f"{method.backbone.arch.kind}")
    if world_size > 1:
        return f"TrainConfig.cache_ladders runs in one process; this run has {world_size}"
    return None


def dropout_refusal(model: nn.Module, config: Any) -> str | None:
    """Why the ladders of ``model`` (a transformers model, wrapped or not) would change between epochs under LST
    ``config`` (its backbone's dropout active while training), as one line, or ``None``."""
    if not config.backbone_train_mode:
        return None
    active = next(((name, m.p) for name, m in model.base_model.named_modules()
                   if isinstance(m, nn.Dropout) and m.p > 0), None)
    if active is None:
        return None
    return (f"TrainConfig.cache_ladders needs the same ladders every epoch, but the backbone's dropout is active "
            f"while training (LSTConfig.backbone_train_mode=True, {active[0]} p={active[1]}); pass --set "
            "backbone_train_mode=false")


def refusal_before_wrap(method_name: str, config: Any, model: nn.Module) -> str | None:
    """The refusals :func:`refusal` can tell before the method is attached (so before LST's Fisher init runs)."""
    if method_name != LadderSideTuning.name:
        return (f"TrainConfig.cache_ladders stores the ladders of LST's frozen backbone; this run tunes with "
                f"{method_name!r}, whose backbone forward cannot be skipped")
    if isinstance(model, VisionLanguageModel):
        return "TrainConfig.cache_ladders supports LST on encoder classifiers, not on vision-language models"
    return dropout_refusal(model, config)


def open_for_run(model: TunedModel, tasks: MultiTask, folder: Path, resumed: bool) -> LadderCache:
    """The run's cache in ``folder``, attached to the model's LST method. A fresh run starts it empty; a resumed
    run keeps what is stored when the fingerprint matches, else rebuilds it (with a warning)."""
    method: LadderSideTuning = model.method  # type: ignore[assignment]
    stack = method.backbone.stacks[method.stack_names[0]]
    ladder_keys = [-1, *method.kept[stack.name]]
    meta = {"ladders": ladder_keys, "width": stack.hidden_size, "stored_dtype": "float16",
            "fingerprint": fingerprint(model, tasks)}
    existing = folder / META
    if folder.exists() and not (resumed and existing.is_file() and json.loads(existing.read_text()) == meta):
        if resumed:
            logger.warning("%s was written for other weights, data or settings; rebuilding it", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic_text(existing, json.dumps(meta, indent=1) + "\n")
    cache = LadderCache(folder, ladder_keys, stack.hidden_size, [len(t.splits["train"]) for t in tasks],
                        DTYPES[method.config.backbone_dtype], next(model.parameters()).device)
    method.ladder_cache = cache
    return cache


def close_for_run(model: TunedModel, cache: LadderCache) -> None:
    """Detach ``cache`` from the model's method and close its files (the folder stays)."""
    model.method.ladder_cache = None  # type: ignore[attr-defined]
    cache.close()


def fingerprint(model: TunedModel, tasks: MultiTask) -> str:
    """BLAKE2 of what the stored ladders depend on: the backbone's weights, the LST settings that shape the
    ladders, and every training example."""
    method: LadderSideTuning = model.method  # type: ignore[assignment]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((type(model.base_model).__name__, method.kept, method.ladder_norm,
                        method.config.backbone_dtype)).encode())
    for name, tensor in model.base_model.base_model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for task in tasks:
        for example in task.splits["train"]:
            digest.update(_example_bytes(example.text, example.text_pair, example.inputs))
    return digest.hexdigest()


def _example_bytes(text: str | None, text_pair: str | None, inputs: dict[str, Any]) -> bytes:
    parts = [repr((text, text_pair)).encode()]
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, torch.Tensor):
            parts.append(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            parts.append(repr((name, value)).encode())
    return b"".join(parts)
