"""Offline audio-visual demo for LAVISH (``make demo-av``): written and spoken digits, one frozen DINOv2 ViT-S/14.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_av.py [--train-sequences 480] [--epochs 1] [--methods ...]

The task, built at run time, is AVE in miniature. A sequence has ``--segments`` 1-second segments; each segment is
an MNIST image (``leantune.assets.mnist``, upscaled to 42 x 42) and a digit spoken by eSpeak NG (the library and
data shipped by the PyPI package ``espeakng-loader``, called through ctypes) over 8 voices, 3 speeds and 3 pitches.
Like an AVE event, an "audio-visual digit" spans a random interval of segments in which the written and the
spoken digit are the same digit d; outside it the two differ. A segment's label is d inside the interval and
``background`` outside (11 classes), so no single modality gives it. Training, validation and test use disjoint
MNIST images (its own splits) and disjoint (voice, speed, pitch) combinations. The spoken digit becomes a
log-mel image (:func:`leantune.audio.spectrogram_image`: 40 mel bins, 20 ms shift, 1 s padded to 56 frames:
a 4 x 3 patch grid, where the frames have 3 x 3), so the audio stream also exercises the padded, masked path.

Compared, each with ``leantune.train`` (``Example.inputs`` with the segment's index and an ``input_processor``
that hands out the prepared frames and spectrograms; checkpoints selected on validation, scored on test):

- ``lavish``: LAVISH's AVE configuration (r=8, G=2, m=2, BatchNorm, both LayerNorms, gated audio adapters);
- ``lavish_no_cross``: the same adapters without latent tokens or cross-modal attention (``cross_modal=False``);
- ``frozen_late_fusion``: no adapters, the frozen backbone with the audio-visual head (``start_layer=12``);
- ``full``: every backbone weight trained with the same two-stream model and head.

Reported per method: test segment accuracy, trainable parameters (and %), the tensor peak of one training step
(``measure_memory``), training and wall seconds; JSON and PNG in ``benchmarks/results/demo_av.*``.

``OMP_WAIT_POLICY=PASSIVE`` is set unless the environment sets it: on a machine shared with other processes,
OpenMP threads that spin while waiting made small kernels (LAVISH's BatchNorms, LayerNorms) up to 1000x slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see the docstring)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import leantune  # noqa: E402
from leantune import assets  # noqa: E402
from leantune.audio import resample, spectrogram_image  # noqa: E402
from leantune.methods.lavish import LavishConfig  # noqa: E402
from leantune.tasks.core import Example, Task  # noqa: E402
from leantune.video import to_pixels  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en", "en-us", "en+f2", "en+f3", "en+m3", "en+m7", "en-us+f4", "en+klatt")
RATES = (130, 175, 220)  # words per minute
PITCHES = (25, 50, 75)  # 0-100
SAMPLE_RATE = 16000
IMAGE_SIZE = 42  # 3 x 3 patches of 14 pixels
AUDIO_FRAMES, MEL_BINS, SHIFT_MS = 56, 42, 20.0  # 4 x 3 patches
BACKGROUND = 10
METHODS = {
    "lavish": ({}, 1e-3),
    "lavish_no_cross": ({"cross_modal": False}, 1e-3),
    "frozen_late_fusion": ({"start_layer": 12}, 1e-3),
    "full": ({"start_layer": 12}, 5e-5),
}


class Speaker:
    """eSpeak NG through ctypes: ``speak(text, voice, rate, pitch)`` gives a float waveform at 16 kHz."""

    def __init__(self) -> None:
        import espeakng_loader

        self.library = ctypes.CDLL(espeakng_loader.get_library_path())
        self.rate = self.library.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # synchronous
        if self.rate <= 0:
            raise RuntimeError("eSpeak NG did not initialise")
        self.chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self.callback = callback_type(self._collect)  # kept alive as long as the speaker
        self.library.espeak_SetSynthCallback(self.callback)

    def _collect(self, samples, count: int, _events) -> int:
        if count > 0:
            self.chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        if self.library.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        self.library.espeak_SetParameter(1, rate, 0)  # espeakRATE
        self.library.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
        self.chunks = []
        encoded = text.encode()
        self.library.espeak_Synth(encoded, len(encoded) + 1, 0, 1, 0, 0, None, None)
        self.library.espeak_Synchronize()
        waveform = np.concatenate(self.chunks).astype(np.float32) / 32768.0
        return resample(waveform, self.rate, SAMPLE_RATE)


def spoken_digits(variants: list[tuple[str, int, int]]) -> torch.Tensor:
    """``(10, variants, 3, AUDIO_FRAMES, MEL_BINS)``: each digit in each (voice, rate, pitch), centred in 1 s."""
    speaker = Speaker()
    images = []
    for word in WORDS:
        row = []
        for voice, rate, pitch in variants:
            waveform = speaker.speak(word, voice, rate, pitch)[:SAMPLE_RATE]
            before = (SAMPLE_RATE - waveform.shape[0]) // 2
            padded = np.pad(waveform, (before, SAMPLE_RATE - waveform.shape[0] - before))
            row.append(spectrogram_image(padded, SAMPLE_RATE, AUDIO_FRAMES, MEL_BINS, frame_shift_ms=SHIFT_MS))
        images.append(torch.stack(row))
    return torch.stack(images)


@dataclass
class Bank:
    """The prepared inputs of every segment; examples carry an index into it."""

    pixels: list[torch.Tensor]
    audio: list[torch.Tensor]

    def add(self, pixels: torch.Tensor, audio: torch.Tensor) -> int:
        self.pixels.append(pixels)
        self.audio.append(audio)
        return len(self.pixels) - 1

    def __call__(self, name: str, values: list[int]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.pixels[i] for i in values]),
                "audio_values": torch.stack([self.audio[i] for i in values])}


def sequences(bank: Bank, images: np.ndarray, labels: np.ndarray, speech: torch.Tensor, count: int, segments: int,
              rng: np.random.Generator) -> list[Example]:
    """``count`` sequences of ``segments`` examples: an audio-visual digit on a random interval, mismatches around."""
    by_digit = [np.flatnonzero(labels == d) for d in range(10)]
    examples = []
    for _ in range(count):
        start = int(rng.integers(0, segments))
        end = int(rng.integers(start + 1, segments + 1))
        event = int(rng.integers(10))
        for t in range(segments):
            if start <= t < end:
                written = spoken = event
            else:
                written, spoken = (int(d) for d in rng.choice(10, size=2, replace=False))
            image = images[rng.choice(by_digit[written])]
            pixels = to_pixels([np.repeat(image[:, :, None], 3, axis=2)], IMAGE_SIZE)[0]
            audio = speech[spoken, rng.integers(speech.shape[1])]
            examples.append(Example(text=None, label=event if start <= t < end else BACKGROUND,
                                    inputs={"segment": bank.add(pixels, audio)}))
    return examples


def build_task(args: argparse.Namespace) -> tuple[Task, Bank, dict]:
    rng = np.random.default_rng(args.seed)
    variants = [(v, r, p) for v in VOICES for r in RATES for p in PITCHES]
    order = rng.permutation(len(variants))
    cut = [int(len(variants) * f) for f in (0.6, 0.8)]
    parts = {"train": order[:cut[0]], "validation": order[cut[0]:cut[1]], "test": order[cut[1]:]}
    start = time.perf_counter()
    speech = spoken_digits(variants)
    bank, splits = Bank([], []), {}
    counts = {"train": args.train_sequences, "validation": args.eval_sequences, "test": args.eval_sequences}
    for split, variant_ids in parts.items():
        images, labels = assets.mnist(split)
        splits[split] = sequences(bank, images, labels, speech[:, variant_ids], counts[split], args.segments, rng)
    task = Task("av_digits", splits, [*map(str, range(10)), "background"], metric="accuracy")
    info = {"variants": {s: len(v) for s, v in parts.items()}, "data_seconds": round(time.perf_counter() - start, 1),
            "segments": {s: len(e) for s, e in splits.items()},
            "background_fraction": {s: sum(e.label == BACKGROUND for e in x) / len(x) for s, x in splits.items()}}
    return task, bank, info


def backbone() -> torch.nn.Module:
    import transformers

    return transformers.Dinov2Model.from_pretrained(assets.dinov2_vit_s14())


def run_method(name: str, task: Task, bank: Bank, args: argparse.Namespace) -> dict:
    """Train one method with ``leantune.train``; its result without the evaluation history."""
    options, learning_rate = METHODS[name]
    torch.manual_seed(args.seed)
    model = leantune.wrap(backbone(), LavishConfig(num_labels=11, **options))
    if name == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    config = leantune.TrainConfig(learning_rate=learning_rate, batch_size=args.batch_size, eval_batch_size=64,
                                  epochs=args.epochs, warmup_ratio=0.1, seed=args.seed, measure_memory=True,
                                  progress=False)
    result = leantune.train(model, task, None, config, input_processor=bank).to_dict()
    kept = ("test_metric", "validation_metric", "best_step", "steps", "train_seconds", "seconds_per_step",
            "wall_seconds", "trainable_parameters", "total_parameters", "trainable_percent", "step_memory")
    return {"learning_rate": learning_rate, **{k: result[k] for k in kept}}


def plot(results: dict, background: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("test segment accuracy", [results[n]["test_metric"] for n in names]),
              ("training seconds", [results[n]["train_seconds"] for n in names]),
              ("peak step memory (MiB)", [_step_peak(results[n]) / 2**20 for n in names])]
    for axis, (title, values) in zip(axes, panels):
        bars = axis.bar(range(len(names)), values, color=["C0", "C1", "C2", "C3"][:len(names)])
        axis.set_xticks(range(len(names)), [f"{n}\n{results[n]['trainable_percent']:.2f}% trained" for n in names],
                        fontsize=7)
        axis.set_title(title)
        axis.bar_label(bars, fmt="%.3g", fontsize=7)
    axes[0].axhline(background, color="grey", linestyle="--", linewidth=1, label="always background")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("LAVISH on audio-visual digits, frozen DINOv2 ViT-S/14 (2 CPU threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _step_peak(result: dict) -> float:
    memory = result.get("step_memory") or {}
    return float(memory.get("peak_bytes", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-sequences", type=int, default=480, help="Training sequences (x segments examples).")
    parser.add_argument("--eval-sequences", type=int, default=60, help="Validation and test sequences, each.")
    parser.add_argument("--segments", type=int, default=4, help="Segments per sequence.")
    parser.add_argument("--epochs", type=int, default=1, help="Passes over the training set.")
    parser.add_argument("--batch-size", type=int, default=16, help="Segments per optimizer step.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="demo_av", help="Stem of the files in benchmarks/results.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    task, bank, info = build_task(args)
    print(f"data: {task.describe()} in {info['data_seconds']} s", flush=True)
    results = {}
    for name in args.methods.split(","):
        results[name] = run_method(name, task, bank, args)
        print(f"{name}: test accuracy {results[name]['test_metric']:.3f}, {results[name]['train_seconds']:.0f} s "
              f"training, {results[name]['trainable_percent']:.2f}% trained", flush=True)
    record = {"command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_av.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "name"),
              "task": info, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_count": os.cpu_count(), "threads": args.threads, "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(results, info["background_fraction"]["test"], RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.json and .png")


if __name__ == "__main__":
    main()
