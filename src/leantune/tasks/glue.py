"""GLUE with the LST paper's splits, from the Hugging Face hub (``datasets``) or from GLUE's own TSV files.

Splits (Sung et al. 2022, inherited from Compacter; shuffle seed 42 through ``torch.randperm``):

- under 10k training examples (CoLA, MRPC, STS-B, RTE): the original validation set is shuffled and halved,
  first half validation, second half test;
- QQP, QNLI, SST-2: 1,000 shuffled training examples become the validation set, the original validation set
  is the test set;
- MNLI: validation-mismatched is the validation set, validation-matched the test set.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from leantune.tasks.core import DataError, Example, Task

SHUFFLE_SEED = 42
HELD_OUT_TRAIN = 1000


@dataclass(frozen=True)
class GlueSpec:
    """One GLUE task: its columns in the hub and TSV forms, label words, metric and split rule."""

    name: str
    folder: str
    columns: tuple[str, ...]
    tsv_columns: tuple[str, ...]
    tsv_label: str
    label_names: tuple[str, ...] | None
    metric: str
    split_rule: str  # "halve_validation" | "hold_out_train" | "mnli"
    tsv_header: bool = True


GLUE_TASKS: dict[str, GlueSpec] = {
    spec.name: spec
    for spec in (
        # CoLA's TSV files have no header: source, label, original label, sentence.
        GlueSpec("cola", "CoLA", ("sentence",), ("3",), "1", ("unacceptable", "acceptable"),
                 "matthews_correlation", "halve_validation", tsv_header=False),
        GlueSpec("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"),
                 "accuracy", "hold_out_train"),
        GlueSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                 ("not_equivalent", "equivalent"), "f1_accuracy", "halve_validation"),
        GlueSpec("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                 ("not_duplicate", "duplicate"), "f1_accuracy", "hold_out_train"),
        GlueSpec("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
                 "pearson_spearman", "halve_validation"),
        GlueSpec("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                 ("entailment", "neutral", "contradiction"), "accuracy", "mnli"),
        GlueSpec("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                 ("entailment", "not_entailment"), "accuracy", "hold_out_train"),
        GlueSpec("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("entailment", "not_entailment"), "accuracy", "halve_validation"),
    )
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


def glue_spec(name: str) -> GlueSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {name!r}; GLUE tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def shuffled(examples: list[Example], seed: int = SHUFFLE_SEED) -> list[Example]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order]


def lst_splits(spec: GlueSpec, original: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """The LST paper's train/validation/test from GLUE's train and validation splits."""
    if spec.split_rule == "mnli":
        return {"train": original["train"], "validation": original["validation_mismatched"],
                "test": original["validation_matched"]}
    if spec.split_rule == "hold_out_train":
        train = shuffled(original["train"])
        return {"train": train[HELD_OUT_TRAIN:], "validation": train[:HELD_OUT_TRAIN],
                "test": original["validation"]}
    validation = shuffled(original["validation"])
    half = len(validation) // 2
    return {"train": original["train"], "validation": validation[:half], "test": validation[half:]}


def load_glue(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """GLUE task ``name`` with the LST splits: from ``data_dir`` (GLUE's TSV files) if given, else the hub."""
    spec = glue_spec(name)
    original = _read_tsv_folder(spec, Path(data_dir)) if data_dir is not None else _read_hub(spec)
    return Task(
        name=spec.name,
        splits=lst_splits(spec, original),
        label_names=list(spec.label_names) if spec.label_names else None,
        metric=spec.metric,
        prefix=spec.name,
        input_names=(spec.columns + ("",))[:2],
        source={"glue": spec.name, "data_dir": str(data_dir) if data_dir is not None else None},
    )


def _original_split_names(spec: GlueSpec) -> dict[str, str]:
    """Split name -> TSV file stem."""
    if spec.split_rule == "mnli":
        return {"train": "train", "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"}
    return {"train": "train", "validation": "dev"}


def _read_tsv_folder(spec: GlueSpec, data_dir: Path) -> dict[str, list[Example]]:
    folder = data_dir / spec.folder if (data_dir / spec.folder).is_dir() else data_dir
    if not folder.is_dir():
        raise DataError(f"GLUE data folder {data_dir} does not exist")
    return {split: _read_tsv(spec, folder / f"{stem}.tsv") for split, stem in _original_split_names(spec).items()}


def _read_tsv(spec: GlueSpec, path: Path) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path} is missing (GLUE {spec.name} needs {', '.join(_original_split_names(spec).values())}"
                        " .tsv files)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.tsv_header:
        if not rows:
            raise DataError(f"{path} is empty")
        header, rows = rows[0], rows[1:]
        missing = [c for c in (*spec.tsv_columns, spec.tsv_label) if c not in header]
        if missing:
            raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
        positions = [header.index(c) for c in spec.tsv_columns]
        label_position = header.index(spec.tsv_label)
    else:
        positions, label_position = [int(c) for c in spec.tsv_columns], int(spec.tsv_label)
    examples = []
    for line, row in enumerate(rows, start=2 if spec.tsv_header else 1):
        if len(row) <= max(*positions, label_position):
            raise DataError(f"{path} line {line}: expected at least {max(*positions, label_position) + 1} "
                            f"tab-separated fields, got {len(row)}")
        texts = [row[p] for p in positions]
        examples.append(Example(texts[0], _tsv_label(spec, row[label_position], path, line),
                                texts[1] if len(texts) > 1 else None))
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


def _tsv_label(spec: GlueSpec, value: str, path: Path, line: int) -> int | float:
    """GLUE's TSV labels: numbers for most tasks, words for MNLI and QNLI/RTE."""
    value = value.strip()
    try:
        if spec.label_names is None:
            return float(value)
        if value in spec.label_names:
            return spec.label_names.index(value)
        index = int(value)
        if not 0 <= index < len(spec.label_names):
            raise ValueError
        return index
    except ValueError:
        choices = "a number" if spec.label_names is None else " / ".join(spec.label_names)
        raise DataError(f"{path} line {line}: label {value!r} is not {choices}") from None


def _read_hub(spec: GlueSpec) -> dict[str, list[Example]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"loading GLUE {spec.name} from the hub needs the 'datasets' package (pip install 'leantune[glue]'); "
            "offline, pass the folder of GLUE's TSV files with --glue-dir"
        ) from None
    try:
        dataset = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as err:  # noqa: BLE001 - hub errors vary (offline, connection, missing config)
        raise DataError(
            f"cannot load GLUE {spec.name} from the hub ({type(err).__name__}: {err}); "
            "offline, pass the folder of GLUE's TSV files with --glue-dir"
        ) from None
    original = {}
    for split in _original_split_names(spec):
        columns = [dataset[split][c] for c in spec.columns]
        labels = dataset[split]["label"]
        original[split] = [
            Example(texts[0], float(label) if spec.label_names is None else int(label),
                    texts[1] if len(texts) > 1 else None)
            for *texts, label in zip(*columns, labels)
        ]
    return original
