"""Measuring audio: what the sandbox's reports, the demo and the tests say about a recording."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from legato.audio.source import CHANNELS, SAMPLE_RATE


def pcm_to_mono(pcm: bytes, channels: int = CHANNELS) -> npt.NDArray[np.float64]:
    """Interleaved s16 PCM to a mono float array in [-1, 1]."""
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % (2 * channels)], dtype="<i2")
    mono: npt.NDArray[np.float64] = samples.reshape(-1, channels).astype(np.float64).mean(axis=1)
    return mono / 32768.0


def dominant_frequency(mono: npt.NDArray[np.float64], rate: int = SAMPLE_RATE) -> float:
    """The strongest frequency in Hz, refined between FFT bins by parabolic interpolation.

    A Hann window keeps leakage low; the interpolation gives well under 1 Hz of error for a
    steady tone of a second or more, which the 2 Hz tolerances in the tests rely on.
    """
    if mono.size < 64:
        return 0.0
    windowed = (mono - mono.mean()) * np.hanning(mono.size)
    spectrum = np.abs(np.fft.rfft(windowed))
    spectrum[0] = 0.0
    k = int(np.argmax(spectrum))
    if 0 < k < spectrum.size - 1:
        a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
        denom = a - 2 * b + c
        offset = 0.5 * (a - c) / denom if denom != 0 else 0.0
    else:
        offset = 0.0
    return float((k + offset) * rate / mono.size)


def rms(mono: npt.NDArray[np.float64]) -> float:
    """Root mean square level (a full-scale sine is about 0.707)."""
    return float(np.sqrt(np.mean(np.square(mono)))) if mono.size else 0.0
