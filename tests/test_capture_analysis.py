"""The capture analysis the media tests rely on: which part of a received recording is judged."""

from __future__ import annotations

import numpy as np

from sipbridge.testing.capture import sounding_tail
from stages.pattern import dominant_frequency

RATE_HZ = 8000


def tone(hz: float, seconds: float) -> np.ndarray:
    t = np.arange(int(RATE_HZ * seconds)) / RATE_HZ
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def test_trailing_silence_of_a_hang_up_is_not_judged() -> None:
    """Three seconds of silence after the tone (a slow hang-up) must not hide the tone."""
    samples = np.concatenate([np.zeros(RATE_HZ, np.int16), tone(1000.0, 4.0), np.full(RATE_HZ * 3, 8, np.int16)])
    tail = sounding_tail(samples, RATE_HZ, 2.0)
    assert tail.size == RATE_HZ * 2
    assert abs(dominant_frequency(tail, RATE_HZ) - 1000.0) < 5


def test_silence_alone_gives_nothing_to_judge() -> None:
    """A call that carried only silence yields an empty window, so a test's size check fails loudly."""
    assert sounding_tail(np.zeros(RATE_HZ * 5, np.int16), RATE_HZ, 2.0).size == 0
    assert sounding_tail(np.zeros(0, np.int16), RATE_HZ, 2.0).size == 0


def test_short_tone_gives_a_short_window() -> None:
    """Less tone than asked for: the window is shorter, never padded with the silence after it."""
    samples = np.concatenate([tone(440.0, 1.0), np.zeros(RATE_HZ * 2, np.int16)])
    assert sounding_tail(samples, RATE_HZ, 2.0).size == RATE_HZ
