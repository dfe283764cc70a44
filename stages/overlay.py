"""A worked example of a transform: each participant's name and the clock, written on each of their pictures.

It is what ARCHITECTURE.md's "Add a transform" walks through, and tests/test_overlay.py runs it in a bridged call.
A bridge gets it from its bridge file only::

    [[transform]]
    at = "to_sip"                               # each participant's pictures, before the layout composes them
    video = "plugin:stages.overlay:NameClock"

so every tile the SIP side sees carries "ALICE 09:14:03": the participant (from the stream id, ``alice/video``)
and the UTC time the picture entered the bridge (its ``capture_time_ns``, so a picture that waited shows when it
was taken, not when it was drawn). The label sits at the right edge just under the picture's top eighth, clear of
the test pattern's frame counter (top eighth), the lip-sync marks (bottom eighth) and the grid's name labels
(lower left).

A transform is any object with ``process(msg)`` and ``flush(stream_id)``, each returning the messages to send on;
it runs on the transformer stage's codec thread, so it may take its time (within a frame interval) but never
blocks on I/O. Messages it does not handle pass through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from protocol import Message, VideoFrame
from stages.bitmapfont import GLYPH_H, draw_text, text_width
from stages.pattern import i420_planes

BOX_LUMA, TEXT_LUMA, NEUTRAL_CHROMA = 16, 235, 128  # white text on a black plate
PIXELS_PER_SCALE = 120  # text scale 1 per 120 rows of picture: 2 at 240 rows, 4 at 480
MARGIN_PX = 2


def label_text(stream_id: str, capture_time_ns: int) -> str:
    """``alice/video`` captured at 09:14:03 UTC -> ``ALICE 09:14:03``."""
    clock = time.strftime("%H:%M:%S", time.gmtime(capture_time_ns / 1e9))
    return f"{stream_id.rsplit('/', 1)[0].upper()} {clock}"


def label_geometry(width: int, height: int, text: str) -> tuple[int, int, int, int, int]:
    """Where the label of ``text`` goes on a ``width`` x ``height`` picture: x, y, box width, box height, scale
    (all even, so the chroma plane covers the box exactly)."""
    scale = max(1, height // PIXELS_PER_SCALE)
    pad = scale
    box_w = min(width, text_width(text, scale) + 2 * pad + 1) // 2 * 2
    box_h = (GLYPH_H * scale + 2 * pad + 1) // 2 * 2
    x = max(0, width - box_w - MARGIN_PX) // 2 * 2
    y = (height // 8 + MARGIN_PX + 1) // 2 * 2
    return x, y, box_w, box_h, scale


class NameClock:
    """Writes ``label_text`` on every video frame; audio and control messages pass through."""

    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, VideoFrame):
            return (msg,)
        width, height = msg.width, msg.height
        text = label_text(msg.header.stream_id, msg.header.capture_time_ns)
        x, y, box_w, box_h, scale = label_geometry(width, height, text)
        if text_width(text, scale) + 2 * scale > box_w or y + box_h > height - height // 8:
            return (msg,)  # too small a picture to write on whole without covering its marks
        data = np.frombuffer(msg.data, dtype=np.uint8).copy()  # the received buffer is read-only
        luma, u, v = i420_planes(data, width, height)
        luma[y : y + box_h, x : x + box_w] = BOX_LUMA
        u[y // 2 : (y + box_h) // 2, x // 2 : (x + box_w) // 2] = NEUTRAL_CHROMA
        v[y // 2 : (y + box_h) // 2, x // 2 : (x + box_w) // 2] = NEUTRAL_CHROMA
        draw_text(luma[y : y + box_h, x : x + box_w], scale, scale, text, scale, TEXT_LUMA)
        return (VideoFrame(msg.header, width, height, data),)

    def flush(self, stream_id: str) -> Iterable[Message]:
        return ()  # nothing held back
