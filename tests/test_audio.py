"""The audio front end: WAV reading, resampling, the Kaldi filterbank against kaldi-native-fbank and by hand, and the
spectrogram image LAVISH feeds an image transformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leantune.audio import (
    AudioError,
    fbank,
    fit_length,
    load_audio,
    mel_scale,
    normalize,
    read_wav,
    resample,
    segment_windows,
    spectrogram_image,
)

RATE = 16000


def tone(frequency: float, seconds: float = 1.0, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def kaldi_native(waveform: np.ndarray, bins: int, shift_ms: float) -> np.ndarray:
    """kaldi-native-fbank with LAVISH's options: Hanning window, no dither, no energy."""
    knf = pytest.importorskip("kaldi_native_fbank")
    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.window_type = "hanning"
    options.frame_opts.samp_freq = RATE
    options.frame_opts.frame_shift_ms = shift_ms
    options.mel_opts.num_bins = bins
    options.mel_opts.high_freq = 0.0
    options.use_energy = False
    computer = knf.OnlineFbank(options)
    computer.accept_waveform(RATE, waveform.tolist())
    computer.input_finished()
    return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])


@pytest.mark.parametrize("bins,shift_ms", [(80, 10.0), (64, 5.2), (23, 10.0)])
def test_fbank_matches_kaldi_native_fbank(bins: int, shift_ms: float) -> None:
    noise = (np.random.default_rng(0).normal(size=RATE) * 0.1).astype(np.float32)
    t = np.arange(RATE) / RATE
    chirp = (0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t)).astype(np.float32)
    for waveform in (noise, chirp):
        expected = kaldi_native(waveform, bins, shift_ms)
        got = fbank(waveform, RATE, bins, frame_shift_ms=shift_ms).numpy()
        assert got.shape == expected.shape == (1 + (RATE - 400) // int(RATE * shift_ms / 1000), bins)
        # kaldi-native-fbank computes in float32: compare where the energy is above its rounding (within e^-10 of
        # the loudest bin; the chirp's far bins are float32 spectral leakage there)
        audible = expected > expected.max() - 10
        np.testing.assert_allclose(got[audible], expected[audible], atol=5e-4)


def test_pure_tone_peaks_in_the_mel_bin_centred_nearest_it() -> None:
    bins = 40
    delta = (mel_scale(RATE / 2) - mel_scale(20.0)) / (bins + 1)
    centres = mel_scale(20.0) + delta * np.arange(1, bins + 1)
    for frequency in (300.0, 1000.0, 3500.0):
        energies = fbank(tone(frequency), RATE, bins).mean(dim=0)
        assert int(energies.argmax()) == int(np.abs(centres - mel_scale(frequency)).argmin())
    silence_floor = fbank(np.zeros(RATE, dtype=np.float32), RATE, bins)
    assert torch.allclose(silence_floor, torch.tensor(np.log(np.finfo(np.float32).eps)))


def test_wav_reading_mono_and_resampling(tmp_path) -> None:
    soundfile = pytest.importorskip("soundfile")
    left, right = tone(440.0, rate=44100), tone(440.0, rate=44100, amplitude=0.1)
    path = tmp_path / "clip.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    waveform, rate = read_wav(path)
    assert rate == 44100 and waveform.shape == left.shape
    np.testing.assert_allclose(waveform, (left + right) / 2, atol=1e-4)  # 16-bit rounding
    at_16k = load_audio(path, RATE)
    assert at_16k.shape == (RATE,) and at_16k.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(at_16k))
    assert abs(np.argmax(spectrum) * RATE / len(at_16k) - 440.0) <= 1.0
    assert resample(at_16k, RATE, RATE) is at_16k
    with pytest.raises(AudioError, match="missing.wav"):
        read_wav(tmp_path / "missing.wav")


def test_spectrogram_image_pads_normalises_and_repeats() -> None:
    image = spectrogram_image(tone(1000.0), RATE, frames=102, num_mel_bins=40, stats=(-4.0, 3.0))
    direct = normalize(fit_length(fbank(tone(1000.0) - tone(1000.0).mean(), RATE, 40), 102), -4.0, 3.0)
    assert image.shape == (3, 102, 40) and torch.equal(image[0], image[2])
    torch.testing.assert_close(image[0], direct)
    assert torch.allclose(image[0, 98:], torch.tensor(4.0 / 6.0))  # 98 frames in 1 s; zero rows -> (0 + 4) / 6
    assert fit_length(torch.ones(5, 2), 3).shape == (3, 2)
    with pytest.raises(AudioError, match="no frame"):
        fbank(np.zeros(100, dtype=np.float32), RATE)


def test_segment_windows_cover_the_clip() -> None:
    clip = np.arange(10 * RATE, dtype=np.float32)
    windows = segment_windows(clip, RATE, count=10)
    assert [w[0] for w in windows] == [i * RATE for i in range(10)] and all(len(w) == RATE for w in windows)
    assert len(segment_windows(clip[:100], RATE, count=2)[1]) == RATE
