"""Video frames for audio-visual models: frames sampled uniformly per segment, from a folder of pre-extracted images
(e.g. AVE's JPEGs) or decoded from a video file with PyAV (``av``), as normalised tensors for an image transformer.

:func:`segment_frame_indices` splits ``num_frames`` into ``segments`` equal spans (AVE: ten 1-second segments)
and takes ``per_segment`` indices at the centres of equal parts of each span; :func:`folder_frames` and
:func:`video_frames` return them as ``(segments, per_segment, 3, size, size)`` tensors, resized bicubically and
normalised with the ImageNet mean and standard deviation (as LAVISH's frames are).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from leantune.errors import LeantuneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


class VideoError(LeantuneError, ValueError):
    """A frame folder or video file is missing, empty or unreadable; the message names it."""


def segment_frame_indices(num_frames: int, segments: int, per_segment: int = 1) -> list[list[int]]:
    """``per_segment`` frame indices for each of ``segments`` equal spans of ``num_frames`` frames, at the centres of
    equal parts of each span (a span shorter than ``per_segment`` repeats frames)."""
    if num_frames < 1 or segments < 1 or per_segment < 1:
        raise VideoError(f"cannot sample {per_segment} frame(s) for each of {segments} segments from {num_frames} "
                         "frames")
    span = num_frames / segments
    return [[min(num_frames - 1, int((s + (j + 0.5) / per_segment) * span)) for j in range(per_segment)]
            for s in range(segments)]


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def list_frames(folder: str | os.PathLike) -> list[Path]:
    """The image files of a frame folder, in natural order (``2.jpg`` before ``10.jpg``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoError(f"{folder}: no such frame folder")
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
    if not frames:
        raise VideoError(f"{folder}: no frames ({', '.join(FRAME_SUFFIXES)} files)")
    return frames


def to_pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 images (height, width, 3) as a normalised ``(count, 3, size, size)`` float tensor (bicubic resize)."""
    from PIL import Image

    resized = [np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC))
               for image in images]
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def folder_frames(folder: str | os.PathLike, segments: int, per_segment: int = 1, size: int = 224) -> torch.Tensor:
    """Frames of a pre-extracted frame folder, ``(segments, per_segment, 3, size, size)``."""
    from PIL import Image, UnidentifiedImageError

    paths = list_frames(folder)
    chosen = [paths[i] for row in segment_frame_indices(len(paths), segments, per_segment) for i in row]
    images = []
    for path in chosen:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as err:
            raise VideoError(f"{path}: cannot read the frame ({err})") from None
    return to_pixels(images, size).view(segments, per_segment, 3, size, size)


def decode_video(path: str | os.PathLike) -> list[np.ndarray]:
    """Every frame of a video file's first video stream as RGB uint8 arrays (PyAV)."""
    import av

    try:
        with av.open(os.fspath(path)) as container:
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.FFmpegError, IndexError) as err:
        raise VideoError(f"{path}: cannot decode a video stream ({err})") from None


def video_frames(path: str | os.PathLike, segments: int, per_segment: int = 1, size: int = 224) -> torch.Tensor:
    """Frames of a video file, ``(segments, per_segment, 3, size, size)``."""
    decoded = decode_video(path)
    if not decoded:
        raise VideoError(f"{path}: the video has no frames")
    chosen = [decoded[i] for row in segment_frame_indices(len(decoded), segments, per_segment) for i in row]
    return to_pixels(chosen, size).view(segments, per_segment, 3, size, size)
