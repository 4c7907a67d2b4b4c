"""Audio front end for audio-visual models: WAV files, resampling, and Kaldi-compatible log-mel filterbanks shown to an
image transformer as 3-channel images (LAVISH).

- :func:`read_wav` (``soundfile``), :func:`resample` (``scipy.signal.resample_poly``), :func:`load_audio` (both,
  to mono at a target rate);
- :func:`fbank`: Kaldi's ``compute-fbank-feats`` as LAVISH calls it (torchaudio's ``kaldi.fbank`` with a Hanning
  window, dither 0, no energy term): frames of ``frame_length_ms`` every ``frame_shift_ms`` (edges snipped), each
  frame's mean removed, pre-emphasis 0.97, a Hanning window ``0.5 - 0.5 cos(2 pi n / (N - 1))``, zero-padding to a
  power of two, the power spectrum, triangular filters equally spaced on the mel scale ``1127 ln(1 + f / 700)``
  between ``low_freq`` and ``high_freq`` (0: Nyquist; negative: Nyquist minus it), and ``log(max(energy, eps))``.
  Written on ``torch.fft.rfft`` of the framed signal rather than ``torch.stft``, because Kaldi removes the DC offset
  and pre-emphasises each frame before the window, which ``torch.stft`` cannot do. Checked against the
  ``kaldi-native-fbank`` package (tests/test_audio.py);
- :func:`normalize` ``(x - mean) / (2 std)`` with dataset statistics, :func:`fit_length` (zero-pad or crop the time
  axis), :func:`spectrogram_image` (all of it, as a ``(3, frames, mel bins)`` tensor: rows are time, columns mel
  bins, the channel repeated), :func:`segment_windows` (``count`` windows of ``seconds`` spread over a clip).

Waveforms are float arrays in [-1, 1] (what ``soundfile`` and ``torchaudio.load`` return); the published LAVISH
statistics (:data:`AVE_VIT_STATS`, ...) are for that scale.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import torch

from leantune.errors import LeantuneError

# (mean, std) of the log-mel filterbanks in LAVISH's AVE configurations (research note, section 2).
AVE_VIT_STATS = (-4.1426, 3.2001)
AVE_SWIN_STATS = (-4.9848, 3.7080)


class AudioError(LeantuneError, ValueError):
    """An audio file cannot be read, or a waveform is too short or has the wrong shape; the message names it."""


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(waveform, sample_rate)``: the file's channels averaged to mono, float32 in [-1, 1]."""
    import soundfile

    try:
        data, sample_rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:  # soundfile.LibsndfileError derives from RuntimeError
        raise AudioError(f"{path}: cannot read audio ({err})") from None
    return data.mean(axis=1), int(sample_rate)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``waveform`` at ``to_rate`` Hz: polyphase filtering by the reduced ratio ``to_rate / from_rate``."""
    if from_rate == to_rate:
        return waveform
    from scipy.signal import resample_poly

    ratio = Fraction(to_rate, from_rate)
    return resample_poly(waveform, ratio.numerator, ratio.denominator).astype(waveform.dtype, copy=False)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """The file as a mono float32 waveform at ``sample_rate`` Hz."""
    waveform, rate = read_wav(path)
    return resample(waveform, rate, sample_rate)


def mel_scale(frequency: np.ndarray | float) -> np.ndarray | float:
    """Kaldi's mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(frequency) / 700.0)


def mel_filterbank(num_mel_bins: int, fft_size: int, sample_rate: int, low_freq: float = 20.0,
                   high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters, ``(num_mel_bins, fft_size // 2 + 1)``; the Nyquist column stays 0."""
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise AudioError(f"mel filterbank: need 0 <= low_freq < high_freq <= {nyquist:g} Hz, got {low_freq:g} and "
                         f"{high:g}")
    low_mel, high_mel = mel_scale(low_freq), mel_scale(high)
    delta = (high_mel - low_mel) / (num_mel_bins + 1)
    bins = mel_scale(np.arange(fft_size // 2) * sample_rate / fft_size)
    left = low_mel + np.arange(num_mel_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    rising, falling = (bins - left) / (center - left), (right - bins) / (right - center)
    weights = np.where(bins <= center, rising, falling) * ((bins > left) & (bins < right))
    return np.pad(weights, ((0, 0), (0, 1)))


def fbank(waveform: np.ndarray | torch.Tensor, sample_rate: int, num_mel_bins: int = 128,
          frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, low_freq: float = 20.0,
          high_freq: float = 0.0, preemphasis: float = 0.97) -> torch.Tensor:
    """Kaldi log-mel filterbank energies of a mono waveform, ``(frames, num_mel_bins)`` float32 (module docstring)."""
    signal = torch.as_tensor(np.asarray(waveform), dtype=torch.float64)
    if signal.dim() != 1:
        raise AudioError(f"fbank needs a mono waveform (one dimension), got shape {tuple(signal.shape)}")
    length = int(sample_rate * 0.001 * frame_length_ms)
    shift = int(sample_rate * 0.001 * frame_shift_ms)
    if length < 2 or shift < 1 or signal.numel() < length:
        raise AudioError(f"fbank: a waveform of {signal.numel()} samples holds no frame of {length} samples "
                         f"({frame_length_ms:g} ms at {sample_rate} Hz)")
    frames = signal.unfold(0, length, shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = torch.cat([frames[:, :1] * (1 - preemphasis), frames[:, 1:] - preemphasis * frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(length, periodic=False, dtype=torch.float64)
    fft_size = 2 ** math.ceil(math.log2(length))
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)
    filters = torch.from_numpy(mel_filterbank(num_mel_bins, fft_size, sample_rate, low_freq, high_freq))
    energies = power @ filters.T
    return energies.clamp_min(torch.finfo(torch.float32).eps).log().float()


def normalize(features: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(features - mean) / (2 std)``, LAVISH's normalisation with dataset statistics."""
    return (features - mean) / (2 * std)


def fit_length(features: torch.Tensor, frames: int) -> torch.Tensor:
    """The first ``frames`` rows of ``features`` (time x bins), zero rows appended where it is shorter."""
    if features.shape[0] >= frames:
        return features[:frames]
    return torch.cat([features, features.new_zeros(frames - features.shape[0], *features.shape[1:])])


def spectrogram_image(waveform: np.ndarray | torch.Tensor, sample_rate: int, frames: int, num_mel_bins: int = 128,
                      stats: tuple[float, float] = AVE_VIT_STATS, frame_shift_ms: float = 10.0) -> torch.Tensor:
    """A waveform as an image for a frozen image transformer: its mean removed, :func:`fbank`, padded or cropped to
    ``frames`` (zero-padded before normalising, as the LAVISH code does), normalised with ``stats``, the one channel
    repeated 3 times: ``(3, frames, num_mel_bins)``."""
    signal = torch.as_tensor(np.asarray(waveform), dtype=torch.float64)
    features = fbank(signal - signal.mean(), sample_rate, num_mel_bins, frame_shift_ms=frame_shift_ms)
    return normalize(fit_length(features, frames), *stats).expand(3, -1, -1).contiguous()


def segment_windows(waveform: np.ndarray, sample_rate: int, count: int, seconds: float = 1.0) -> list[np.ndarray]:
    """``count`` windows of ``seconds`` whose starts are spread evenly from the clip's start to its last full window
    (a clip shorter than one window is zero-padded)."""
    size = int(round(seconds * sample_rate))
    if waveform.shape[0] < size:
        waveform = np.pad(waveform, (0, size - waveform.shape[0]))
    starts = np.linspace(0, waveform.shape[0] - size, count).astype(int)
    return [waveform[start:start + size] for start in starts]
