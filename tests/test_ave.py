"""AVE: annotation and split-order parsing on hand-made files, per-segment labels, segment accuracy, the input
processor on tiny frames and WAV files; frame sampling from folders and video files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leantune.tasks.ave import (
    BACKGROUND,
    AveInputs,
    Segment,
    ave_task,
    class_names,
    read_annotations,
    read_order,
    segment_accuracy,
)
from leantune.tasks.core import DataError
from leantune.video import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VideoError,
    decode_video,
    folder_frames,
    list_frames,
    segment_frame_indices,
    video_frames,
)

ANNOTATIONS = """Category&VideoID&Quality&StartTime&EndTime
Church bell&RUhOCu3LNXM&good&0&10
Bark&aaa111&good&2&5
Acoustic guitar&bbb222&bad&7&10
Bark&ccc333&good&0&1
"""


@pytest.fixture
def ave_files(tmp_path):
    (tmp_path / "Annotations.txt").write_text(ANNOTATIONS)
    (tmp_path / "train_order.txt").write_text("1\n3\n")
    (tmp_path / "val_order.txt").write_text("0\n")
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "test_order.h5", "w") as handle:
        handle["order"] = np.array([2], dtype=np.int64)
    return tmp_path


def test_annotations_segment_labels_and_classes(ave_files) -> None:
    videos = read_annotations(ave_files / "Annotations.txt")
    assert [v.video_id for v in videos] == ["RUhOCu3LNXM", "aaa111", "bbb222", "ccc333"]
    names = class_names(videos)
    assert names == ["Acoustic guitar", "Bark", "Church bell", BACKGROUND]
    bark, background = names.index("Bark"), names.index(BACKGROUND)
    assert videos[1].segment_labels(names) == [background] * 2 + [bark] * 3 + [background] * 5
    assert videos[3].segment_labels(names) == [bark] + [background] * 9
    assert read_order(ave_files / "test_order.h5", 4) == [2]


def test_task_has_one_example_per_segment_in_each_split(ave_files) -> None:
    orders = {"train": ave_files / "train_order.txt", "validation": ave_files / "val_order.txt",
              "test": ave_files / "test_order.h5"}
    task = ave_task(ave_files / "Annotations.txt", orders)
    assert task.num_labels == 4 and task.metric == "accuracy"
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [20, 10, 10]
    first = task.splits["train"][0]
    assert first.text is None and first.inputs == {"segment": Segment("aaa111", 0)} and first.task == "ave"
    labels = [e.label for e in task.splits["test"]]
    assert labels == [task.label_names.index(BACKGROUND)] * 7 + [task.label_names.index("Acoustic guitar")] * 3


@pytest.mark.parametrize("content,message", [
    ("Bark&x&good&2\n", "line 1: expected 5 fields"),
    ("Bark&x&good&2&5\nBark&y&good&two&5\n", "line 2: StartSec and EndSec must be integers"),
    ("Bark&x&good&6&12\n", "line 1: the event \\[6, 12\\)"),
])
def test_malformed_annotations_name_the_line(tmp_path, content: str, message: str) -> None:
    (tmp_path / "a.txt").write_text(content)
    with pytest.raises(DataError, match=message):
        read_annotations(tmp_path / "a.txt")


def test_order_errors(tmp_path) -> None:
    (tmp_path / "o.txt").write_text("0\n7\n")
    with pytest.raises(DataError, match="outside the 4 annotated videos"):
        read_order(tmp_path / "o.txt", 4)
    with pytest.raises(DataError, match="does not exist"):
        read_order(tmp_path / "none.txt", 4)


def test_segment_accuracy() -> None:
    labels = [[0, 0, 1, 1], [2, 2, 2, 2]]
    assert segment_accuracy(labels, labels) == 1.0
    assert segment_accuracy([[0, 1, 1, 1], [2, 2, 0, 0]], labels) == pytest.approx(5 / 8)
    with pytest.raises(DataError, match="one shape"):
        segment_accuracy([[0, 1]], labels)


def _write_frames(folder, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):  # frame i is a flat grey of value 12 * i: its index can be read back from its pixels
        Image.fromarray(np.full((12, 16, 3), 12 * i, dtype=np.uint8)).save(folder / f"{i + 1}.jpg", quality=100)


def _grey_level(pixels: torch.Tensor) -> float:
    """The 0-255 grey value of a normalised frame."""
    return float((pixels[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).mean() * 255)


def test_frame_sampling_per_segment(tmp_path) -> None:
    assert segment_frame_indices(30, 10) == [[3 * s + 1] for s in range(10)]
    assert segment_frame_indices(10, 2, per_segment=2) == [[1, 3], [6, 8]]
    assert segment_frame_indices(3, 6) == [[0], [0], [1], [1], [2], [2]]
    _write_frames(tmp_path / "v", 12)
    assert [p.name for p in list_frames(tmp_path / "v")][:3] == ["1.jpg", "2.jpg", "3.jpg"]  # natural order
    frames = folder_frames(tmp_path / "v", segments=3, per_segment=2, size=8)
    assert frames.shape == (3, 2, 3, 8, 8)
    expected = [12 * i for row in segment_frame_indices(12, 3, 2) for i in row]
    assert [round(_grey_level(f)) for f in frames.reshape(6, 3, 8, 8)] == pytest.approx(expected, abs=2)
    with pytest.raises(VideoError, match="no such frame folder"):
        list_frames(tmp_path / "missing")


def test_video_decoding_with_pyav(tmp_path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert len(decode_video(path)) == 10
    frames = video_frames(path, segments=5, size=16)
    assert frames.shape == (5, 1, 3, 16, 16)
    assert [round(_grey_level(f[0]) / 20) for f in frames] == [1, 3, 5, 7, 9]
    with pytest.raises(VideoError, match="cannot decode"):
        decode_video(tmp_path / "missing.mp4")


def test_input_processor_builds_both_streams(ave_files) -> None:
    soundfile = pytest.importorskip("soundfile")
    _write_frames(ave_files / "frames" / "aaa111", 20)
    (ave_files / "audio").mkdir()
    rate = 16000
    clip = np.concatenate([np.zeros(2 * rate), 0.3 * np.sin(2 * np.pi * 1000 * np.arange(8 * rate) / rate)])
    soundfile.write(ave_files / "audio" / "aaa111.wav", clip.astype(np.float32), rate)
    processor = AveInputs(ave_files / "frames", ave_files / "audio", image_size=16, audio_frames=100, mel_bins=40)
    batch = processor("segment", [Segment("aaa111", 0), Segment("aaa111", 5)])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["audio_values"].shape == (2, 3, 100, 40)
    assert round(_grey_level(batch["pixel_values"][1]) / 12) == 11  # segment 5 of 20 frames: frame index 11
    silent, tone = batch["audio_values"][:, 0, :98]  # 98 frames in one second
    assert silent.max() < tone.max() - 1  # the first second is silent, the sixth holds the 1 kHz tone
    with pytest.raises(DataError, match="'segment'"):
        processor("image", [])
