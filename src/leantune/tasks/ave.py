"""AVE, audio-visual event localisation (Tian et al., ECCV 2018): a label for each 1-second segment of 10-second
videos, 28 event classes plus background, scored by segment accuracy.

Files, as the dataset ships them:

- ``Annotations.txt``: a header, then one line per video ``Category&VideoID&Quality&StartSec&EndSec`` (the one event
  interval of the video); segment ``t`` (second ``[t, t + 1)``) is labelled with the category where
  ``StartSec <= t < EndSec``, background elsewhere;
- ``{train,val,test}_order.h5`` (dataset ``order``, needs ``h5py``) or a text file with one index per line: the rows
  of ``Annotations.txt`` (0 = the first line after the header) in each split (3,339 / 402 / 402 videos);
- pre-extracted frames ``<frames_root>/<VideoID>/*.jpg`` and audio ``<audio_root>/<VideoID>.wav``.

:func:`ave_task` makes a :class:`~leantune.tasks.core.Task` with one example per segment, as LAVISH trains: each
(frame, 1-second spectrogram) pair is an independent sample, so the task's accuracy is segment accuracy. Its
``validation`` split is AVE's val split and the trainer selects checkpoints on it only (the original code
selected on test). :class:`AveInputs` is the ``input_processor`` that turns a batch's segments into
``pixel_values`` and ``audio_values``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leantune.audio import AVE_VIT_STATS, load_audio, segment_windows, spectrogram_image
from leantune.tasks.core import DataError, Example, Task
from leantune.video import list_frames, segment_frame_indices, to_pixels

SEGMENTS = 10
BACKGROUND = "background"
ORDER_SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class AveVideo:
    """One annotated video: its event category and the seconds ``[start, end)`` the event spans."""

    video_id: str
    category: str
    quality: str
    start: int
    end: int

    def segment_labels(self, class_names: Sequence[str], segments: int = SEGMENTS) -> list[int]:
        """The class index of each 1-second segment (the category inside ``[start, end)``, background outside)."""
        event, background = class_names.index(self.category), class_names.index(BACKGROUND)
        return [event if self.start <= t < self.end else background for t in range(segments)]


@dataclass(frozen=True)
class Segment:
    """One 1-second segment of one video: the value an AVE example carries as its ``segment`` input."""

    video_id: str
    index: int


def read_annotations(path: str | os.PathLike, segments: int = SEGMENTS) -> list[AveVideo]:
    """The videos of an ``Annotations.txt`` (header line optional), in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"AVE annotations {path} do not exist")
    videos = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.strip().split("&")
        if not line.strip() or (line_number == 1 and fields[1:2] == ["VideoID"]):
            continue
        if len(fields) != 5:
            raise DataError(f"{path} line {line_number}: expected 5 fields Category&VideoID&Quality&StartSec&EndSec, "
                            f"got {len(fields)}")
        category, video_id, quality, start, end = fields
        try:
            start_second, end_second = int(start), int(end)
        except ValueError:
            raise DataError(f"{path} line {line_number}: StartSec and EndSec must be integers, got {start!r} and "
                            f"{end!r}") from None
        if not 0 <= start_second < end_second <= segments:
            raise DataError(f"{path} line {line_number}: the event [{start_second}, {end_second}) is not inside the "
                            f"video's {segments} seconds")
        videos.append(AveVideo(video_id, category, quality, start_second, end_second))
    if not videos:
        raise DataError(f"AVE annotations {path} list no video")
    return videos


def read_order(path: str | os.PathLike, count: int) -> list[int]:
    """Row indices into the annotations (``count`` rows) from an ``*_order.h5`` (dataset ``order``) or text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"AVE split order file {path} does not exist")
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as handle:
            if "order" not in handle:
                raise DataError(f"{path} has no dataset 'order' (datasets: {', '.join(handle)})")
            values = np.asarray(handle["order"]).reshape(-1).tolist()
    else:
        try:
            values = [int(line) for line in path.read_text(encoding="utf-8").split()]
        except ValueError as err:
            raise DataError(f"{path}: every entry must be an integer row index ({err})") from None
    wrong = [v for v in values if not 0 <= int(v) < count]
    if wrong:
        raise DataError(f"{path}: row indices {wrong[:5]} are outside the {count} annotated videos")
    return [int(v) for v in values]


def class_names(videos: Sequence[AveVideo]) -> list[str]:
    """The event categories, sorted, then ``background`` (AVE: 28 + 1 = 29 classes)."""
    return sorted({v.category for v in videos}) + [BACKGROUND]


def segment_accuracy(predictions: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> float:
    """Segment accuracy: the fraction of all (video, segment) predictions equal to their label."""
    predicted, expected = np.asarray(predictions), np.asarray(labels)
    if predicted.shape != expected.shape or predicted.ndim != 2:
        raise DataError(f"segment accuracy needs (videos, segments) predictions and labels of one shape, got "
                        f"{predicted.shape} and {expected.shape}")
    return float((predicted == expected).mean())


def ave_task(annotations: str | os.PathLike, orders: dict[str, str | os.PathLike], name: str = "ave",
             segments: int = SEGMENTS) -> Task:
    """AVE as a task with one example per segment; ``orders`` maps ``train``/``validation``/``test`` to order files."""
    videos = read_annotations(annotations, segments)
    names = class_names(videos)
    missing = sorted(set(ORDER_SPLITS) - set(orders))
    if missing:
        raise DataError(f"AVE needs an order file for the splits {', '.join(missing)}")
    splits = {}
    for split in ORDER_SPLITS:
        chosen = [videos[i] for i in read_order(orders[split], len(videos))]
        splits[split] = [Example(text=None, label=label, task=name, inputs={"segment": Segment(v.video_id, t)})
                         for v in chosen for t, label in enumerate(v.segment_labels(names, segments))]
    return Task(name, splits, names, metric="accuracy", source={"annotations": str(annotations)})


@dataclass
class AveInputs:
    """``input_processor`` for AVE examples: each segment's frame (``pixel_values``, the frame at the segment's
    centre, resized to ``image_size``) and its 1-second spectrogram image (``audio_values``, ``audio_frames`` x
    ``mel_bins``, normalised with ``stats``)."""

    frames_root: str | os.PathLike
    audio_root: str | os.PathLike
    image_size: int = 224
    audio_frames: int = 102
    mel_bins: int = 128
    stats: tuple[float, float] = AVE_VIT_STATS
    sample_rate: int = 16000
    segments: int = SEGMENTS

    def __call__(self, name: str, values: list[Segment]) -> dict[str, torch.Tensor]:
        if name != "segment":
            raise DataError(f"AVE examples carry one input, 'segment'; got {name!r}")
        pixels = torch.cat([self.frame(v) for v in values])
        audio = torch.stack([self.spectrogram(v) for v in values])
        return {"pixel_values": pixels, "audio_values": audio}

    def frame(self, segment: Segment) -> torch.Tensor:
        from PIL import Image

        paths = list_frames(Path(self.frames_root) / segment.video_id)
        path = paths[segment_frame_indices(len(paths), self.segments)[segment.index][0]]
        with Image.open(path) as image:
            return to_pixels([np.asarray(image.convert("RGB"))], self.image_size)

    def spectrogram(self, segment: Segment) -> torch.Tensor:
        waveform = _cached_audio(str(Path(self.audio_root) / f"{segment.video_id}.wav"), self.sample_rate)
        window = segment_windows(waveform, self.sample_rate, self.segments)[segment.index]
        return spectrogram_image(window, self.sample_rate, self.audio_frames, self.mel_bins, self.stats)


@functools.lru_cache(maxsize=64)
def _cached_audio(path: str, sample_rate: int) -> np.ndarray:
    return load_audio(path, sample_rate)
