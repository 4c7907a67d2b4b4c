"""Local data files: a single class is refused, rare classes are warned about, a file in another encoding and a
missing column are reported with the file and the line at fault."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from leantune.tasks.core import DataError
from leantune.tasks.local import load_local


def _write_rows(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8") -> Path:
    path.write_bytes(("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows)).encode(encoding))
    return path


def test_a_label_column_with_one_class_is_refused(tmp_path: Path) -> None:
    data = _write_rows(tmp_path / "one.csv", [(f"text {i}", "spam") for i in range(20)])
    with pytest.raises(DataError) as raised:
        load_local(data)
    message = str(raised.value)
    assert str(data) in message and "'label'" in message and "'spam'" in message and "\n" not in message


def test_a_class_too_small_for_the_splits_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [(f"common {i}", "a") for i in range(30)] + [("rare one", "b"), ("rare two", "b")]
    data = _write_rows(tmp_path / "rare.csv", rows + [(f"enough {i}", "c") for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="leantune.data"):
        task = load_local(data)
    warned = [r.getMessage() for r in caplog.records if r.name == "leantune.data"]
    assert len(warned) == 1 and "'b' (2)" in warned[0] and "'a'" not in warned[0] and "'c'" not in warned[0]
    assert task.label_names == ["a", "b", "c"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="leantune.data"):  # with a validation file, train needs only 1
        load_local(data, validation=data)
    assert not [r for r in caplog.records if r.name == "leantune.data"]


def test_a_file_in_another_encoding_names_file_and_line_and_loads_with_its_encoding(tmp_path: Path) -> None:
    rows = [("plain words", "a"), ("more words", "b")] * 3 + [("café crème", "a")] + [("last", "b")] * 3
    data = _write_rows(tmp_path / "latin.csv", rows, encoding="latin-1")
    with pytest.raises(DataError) as raised:
        load_local(data)
    message = str(raised.value)
    accented_line = 1 + rows.index(("café crème", "a")) + 1
    assert message.startswith(f"{data} line {accented_line}:") and "0xe9" in message and "encoding" in message
    task = load_local(data, encoding="latin-1")
    texts = [e.text for split in task.splits.values() for e in split]
    assert "café crème" in texts and len(texts) == len(rows)
    assert task.source["encoding"] == "latin-1"
    with pytest.raises(DataError, match=re.escape(f"{data}: unknown encoding 'klingon'")):
        load_local(data, encoding="klingon")


def test_a_missing_column_is_reported_at_the_header_line(tmp_path: Path) -> None:
    data = _write_rows(tmp_path / "reviews.csv", [(f"review {i}", "good" if i % 2 else "bad") for i in range(20)])
    with pytest.raises(DataError) as raised:
        load_local(data, label_column="sentiment")
    assert str(raised.value) == f"{data} has no column 'sentiment' (header, line 1; columns: text, label)"
    pair = tmp_path / "pairs.tsv"
    pair.write_text("\n".join(["premise\thypothesis\tlabel"] + [f"p{i}\th{i}\t{i % 2}" for i in range(12)]) + "\n")
    with pytest.raises(DataError, match=r"pairs\.tsv has no column 'second' \(header, line 1;"):
        load_local(pair, text_column="premise", text_pair_column="second")


def test_text_and_image_tables_with_the_same_rows_are_split_alike(tmp_path: Path) -> None:
    """One split rule for every local data: the same rows give the same train/validation/test membership."""
    from PIL import Image

    from leantune.tasks.images import IMAGE_INPUT, load_images

    rows = [(f"row{i}", "abc"[i % 3]) for i in range(23)]
    for name, _ in rows:
        Image.new("RGB", (4, 4), (len(name), 0, 0)).save(tmp_path / f"{name}.png")
    table = tmp_path / "rows.csv"
    table.write_text("text,path,label\n" + "".join(f"{n},{n}.png,{label}\n" for n, label in rows))
    text, images = load_local(table), load_images(table, image_column="path")
    assert text.label_names == images.label_names == ["a", "b", "c"]
    for split in ("train", "validation", "test"):
        names = [e.text for e in text.splits[split]]
        assert names == [Path(e.inputs[IMAGE_INPUT]).stem for e in images.splits[split]]
        assert [e.label for e in text.splits[split]] == [e.label for e in images.splits[split]]
    assert [len(text.splits[s]) for s in ("train", "validation", "test")] == [19, 2, 2]
