"""The synthetic test media every test, demo and benchmark uses, and how to read it back.

Video: a moving diagonal triangle-wave gradient (smooth, so it survives scaling and lossy codecs) with a
16-bit frame counter drawn into the top band of the luma plane: rows [0, H/8), 16 equal-width cells,
cell i carries bit (15 - i), 235 for one and 16 for zero. Any stage of any language can read it back
by averaging the centre of each cell and thresholding at 128.

Audio: a sine tone at a known frequency per stream, 0.3 of full scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from protocol.wire import Payload

COUNTER_BITS = 16
COUNTER_BAND_FRACTION = 8  # the band is the top 1/8 of the picture
LUMA_ONE = 235
LUMA_ZERO = 16
# A cell whose mean is this close to mid-grey cannot be read reliably (e.g. a blurred keyframe).
COUNTER_AMBIGUITY_LEVELS = 40
TONE_AMPLITUDE = 0.3
GRADIENT_PERIOD = 440  # luma triangle wave period, in pixel-diagonal units
MOTION_PER_FRAME_PX = 4


def i420_planes(buf: Payload, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Views of the Y, U and V planes of an I420 buffer (no copies)."""
    flat = buf.reshape(-1) if isinstance(buf, np.ndarray) else np.frombuffer(memoryview(buf), dtype=np.uint8)
    cw, ch = (width + 1) // 2, (height + 1) // 2
    y = flat[: width * height].reshape(height, width)
    u = flat[width * height : width * height + cw * ch].reshape(ch, cw)
    v = flat[width * height + cw * ch : width * height + 2 * cw * ch].reshape(ch, cw)
    return y, u, v


def _cell_edges(width: int) -> np.ndarray:
    return np.linspace(0, width, COUNTER_BITS + 1).astype(int)


def draw_counter(y_plane: np.ndarray, value: int) -> None:
    height, width = y_plane.shape
    band = max(1, height // COUNTER_BAND_FRACTION)
    edges = _cell_edges(width)
    for i in range(COUNTER_BITS):
        bit = (value >> (COUNTER_BITS - 1 - i)) & 1
        y_plane[:band, edges[i] : edges[i + 1]] = LUMA_ONE if bit else LUMA_ZERO


def read_counter(y_plane: np.ndarray) -> int | None:
    """The counter drawn by ``draw_counter``, or None when a cell is unreadable."""
    height, width = y_plane.shape
    band = max(1, height // COUNTER_BAND_FRACTION)
    edges = _cell_edges(width)
    value = 0
    for i in range(COUNTER_BITS):
        x0, x1 = edges[i], edges[i + 1]
        # Read the middle half of the cell, away from edges that scaling and codecs smear.
        qx, qy = max(1, (x1 - x0) // 4), max(1, band // 4)
        cell = y_plane[qy : max(qy + 1, band - qy), x0 + qx : max(x0 + qx + 1, x1 - qx)]
        mean = float(cell.mean())
        if abs(mean - 128) < COUNTER_AMBIGUITY_LEVELS:
            return None
        value = (value << 1) | int(mean > 128)
    return value


class PatternGenerator:
    """Makes frame ``index`` of stream ``seed`` as one contiguous I420 buffer."""

    def __init__(self, width: int, height: int, seed: int = 0) -> None:
        if width % 2 or height % 2:
            raise ValueError("test pattern needs even dimensions")
        self.width, self.height, self.seed = width, height, seed
        yy, xx = np.mgrid[0:height, 0:width]
        self._diagonal = ((xx + yy + seed * 37) % GRADIENT_PERIOD).astype(np.int32)
        ramp = np.arange(GRADIENT_PERIOD)
        self._lut = (16 + np.minimum(ramp, GRADIENT_PERIOD - ramp) * 219 // (GRADIENT_PERIOD // 2)).astype(np.uint8)
        cw, ch = width // 2, height // 2
        cy, cx = np.mgrid[0:ch, 0:cw]
        self._u = (80 + cx * 96 // max(1, cw - 1)).astype(np.uint8)
        self._v = (80 + ((seed * 53) % 48) + cy * 48 // max(1, ch - 1)).astype(np.uint8)

    def frame(self, index: int) -> np.ndarray:
        out = np.empty(self.width * self.height * 3 // 2, dtype=np.uint8)
        y, u, v = i420_planes(out, self.width, self.height)
        np.take(self._lut, (self._diagonal + index * MOTION_PER_FRAME_PX) % GRADIENT_PERIOD, out=y)
        u[:] = self._u
        v[:] = self._v
        draw_counter(y, index % (1 << COUNTER_BITS))
        return out


def tone(frequency_hz: float, sample_rate: int, first_sample: int, samples: int, channels: int = 1) -> np.ndarray:
    """Interleaved s16 samples of a continuous sine, starting at absolute sample ``first_sample``."""
    t = (np.arange(samples) + first_sample) / sample_rate
    mono = np.round(np.sin(2 * np.pi * frequency_hz * t) * TONE_AMPLITUDE * 32767).astype(np.int16)
    return np.repeat(mono, channels) if channels > 1 else mono


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    """Frequency of the strongest spectral peak, refined by parabolic interpolation."""
    x = samples.astype(np.float64)
    if x.size < 16:
        return 0.0
    x -= x.mean()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    k = int(np.argmax(spectrum[1:])) + 1
    if 1 <= k < spectrum.size - 1:
        a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
        denom = a - 2 * b + c
        k_refined = k + (0.5 * (a - c) / denom if denom else 0.0)
    else:
        k_refined = float(k)
    return float(k_refined * sample_rate / x.size)


def rms_dbfs(samples: np.ndarray) -> float:
    x = samples.astype(np.float64) / 32768.0
    rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    return 20 * np.log10(rms) if rms > 0 else -120.0
