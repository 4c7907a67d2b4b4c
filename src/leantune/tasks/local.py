"""Local CSV/TSV/JSONL classification or regression data.

Labels are inferred from the training file: if every label parses as a number and they are not all integers,
the task is regression; otherwise each distinct label (sorted) is a class. With only a training file, a
deterministic 80/10/10 split is made (shuffle seed 42); with a training and a validation file, the validation
file is halved into validation and test. A label column with a single class is refused; a class with fewer
examples than the splits need (3 when validation and test are split off the training file) is warned about.
Files are read as UTF-8 unless ``encoding`` says otherwise (a decoding error names the file and line).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from leantune.tasks.core import DataError, Example, Task

SPLIT_SEED = 42
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
SPLIT_OFF_NEEDS = 3
"""Examples a class needs to be able to appear in train, validation and test when both are split off."""

logger = logging.getLogger("leantune.data")


def decode_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of ``path``; a :class:`DataError` naming the file and line when it is not valid ``encoding``."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: byte 0x{data[err.start]:02x} is not valid {encoding} text; give the "
                        "file's encoding (encoding=, --encoding), e.g. latin-1") from None


def read_rows(path: Path, encoding: str = "utf-8", columns: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """``(line number, row)`` for each record of a CSV, TSV or JSONL file; a CSV/TSV header must hold ``columns``."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .csv, .tsv or .jsonl")
    handle = io.StringIO(decode_text(path, encoding), newline="")
    if kind == "jsonl":
        rows = _json_rows(path, handle)
    else:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if header and missing:
            raise DataError(f"{path} has no column {missing[0]!r} (header, line {reader.line_num}; columns: "
                            f"{', '.join(header)})")
        rows = [(reader.line_num, record) for record in reader]
    if not rows:
        raise DataError(f"data file {path} has no examples")
    return rows


def _json_rows(path: Path, handle: io.StringIO) -> list[tuple[int, dict]]:
    rows = []
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {line_number}: expected a JSON object, got {type(record).__name__}")
        rows.append((line_number, record))
    return rows


def column_value(path: Path, line: int, row: dict, column: str) -> object:
    """The value of ``column`` in ``row`` (line ``line`` of ``path``); a missing or empty one is a DataError."""
    if column not in row:
        raise DataError(f"{path} line {line}: no key {column!r} (keys: {', '.join(map(str, row))})")
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{path} line {line}: column {column!r} is empty")
    return value


def _parse_file(path: Path, text_column: str, pair_column: str | None, label_column: str,
                encoding: str = "utf-8") -> list[tuple]:
    """``(line, text, pair, raw label)`` per row, every named column checked."""
    parsed = []
    columns = [c for c in (text_column, pair_column, label_column) if c]
    for line, row in read_rows(path, encoding, columns):
        text = str(column_value(path, line, row, text_column))
        pair = str(column_value(path, line, row, pair_column)) if pair_column else None
        parsed.append((line, text, pair, column_value(path, line, row, label_column)))
    return parsed


def _as_number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def infer_labels(raw_labels: list[object]) -> list[str] | None:
    """Sorted class names, or ``None`` for regression (numeric labels that are not all integers)."""
    numbers = [_as_number(v) for v in raw_labels]
    if all(n is not None for n in numbers) and any(n != int(n) for n in numbers):  # type: ignore[arg-type]
        return None
    if all(n is not None for n in numbers):
        return [str(int(n)) for n in sorted({int(n) for n in numbers})]  # type: ignore[arg-type]
    return sorted({str(v).strip() for v in raw_labels})


def _label_key(value: object) -> str:
    number = _as_number(value)
    return str(int(number)) if number is not None and number == int(number) else str(value).strip()


def check_classes(path: Path, label_column: str, label_names: list[str], labels: list[int], needed: int,
                  where: str | None = None) -> None:
    """Refuse a single class; warn about classes with fewer than ``needed`` examples. ``where`` names where the
    labels come from in messages (default: ``column 'label'``)."""
    where = where or f"column {label_column!r}"
    if len(label_names) < 2:
        raise DataError(f"{path}: {where} holds one class ({label_names[0]!r}); classification needs at least two")
    counts = Counter(labels)
    rare = [f"{name!r} ({counts[i]})" for i, name in enumerate(label_names) if counts[i] < needed]
    if rare:
        logger.warning("leantune: %s: %s has classes with fewer than %d examples, too few for every split: %s",
                       path, where, needed, ", ".join(rare))


def label_value(path: Path, line: int, raw: object, label_names: list[str] | None, label_column: str
                ) -> int | float:
    """The label of one row: a class index (``label_names``), or a number for regression."""
    if label_names is None:
        value = _as_number(raw)
        if value is None:
            raise DataError(f"{path} line {line}: label {raw!r} in column {label_column!r} is not a number")
        return value
    key = _label_key(raw)
    if key not in label_names:
        raise DataError(
            f"{path} line {line}: label {key!r} in column {label_column!r} does not occur in the "
            f"training data (labels: {', '.join(label_names)})"
        )
    return label_names.index(key)


def _examples(path: Path, parsed: list[tuple], label_names: list[str] | None, label_column: str) -> list[Example]:
    return [Example(text, label_value(path, line, raw, label_names, label_column), pair)
            for line, text, pair, raw in parsed]


def split_examples(examples: dict[str, list[Example]], files: dict[str, Path | None]) -> dict[str, list[Example]]:
    """Every split, the missing ones made as the module docstring says: 80/10/10 from the training data (seed 42)
    without validation data, the validation data halved without test data. ``files`` name the data in messages."""
    if "validation" not in examples:
        train = examples["train"]
        if len(train) < 3:
            raise DataError(f"{files['train']} has {len(train)} examples; a train/validation/test split needs 3")
        random.Random(SPLIT_SEED).shuffle(train)
        held_out = max(1, len(train) // 10)
        return {"train": train[2 * held_out:], "validation": train[:held_out], "test": train[held_out:2 * held_out]}
    if "test" not in examples:
        validation = examples["validation"]
        if len(validation) < 2:
            raise DataError(f"{files['validation']} has {len(validation)} example; halving it into validation "
                            "and test needs 2")
        random.Random(SPLIT_SEED).shuffle(validation)
        half = len(validation) // 2
        return {**examples, "validation": validation[:half], "test": validation[half:]}
    return examples


def load_local(
    data: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    validation: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    name: str | None = None,
    encoding: str = "utf-8",
) -> Task:
    """A task from local files; see the module docstring for how labels and missing splits are made.
    ``encoding`` is the text encoding of every file (any name Python's codecs know, e.g. ``latin-1``)."""
    if test is not None and validation is None:
        raise DataError("a --test file needs a --validation file too")
    files = {"train": Path(data), "validation": Path(validation) if validation else None,
             "test": Path(test) if test else None}
    parsed = {s: _parse_file(p, text_column, text_pair_column, label_column, encoding)
              for s, p in files.items() if p}
    label_names = infer_labels([raw for *_, raw in parsed["train"]])
    examples = {s: _examples(files[s], rows, label_names, label_column) for s, rows in parsed.items()}
    if label_names is not None:
        check_classes(files["train"], label_column, label_names, [int(e.label) for e in examples["train"]],
                      SPLIT_OFF_NEEDS if "validation" not in examples else 1)
    examples = split_examples(examples, files)
    return Task(
        name=name or Path(data).stem,
        splits=examples,
        label_names=label_names,
        metric="pearson_spearman" if label_names is None else "accuracy",
        input_names=(text_column, text_pair_column or ""),
        source={"data": str(data), "validation": str(validation) if validation else None,
                "test": str(test) if test else None, "text_column": text_column,
                "text_pair_column": text_pair_column, "label_column": label_column, "encoding": encoding},
    )
