"""Transformer stage: per-frame processing of raw media with numpy (and swscale/swresample via PyAV).

Transforms are given as specs, applied in order (``--video`` and ``--audio`` repeat to chain):

  identity                    pass through
  crop:X,Y,W,H                cut a rectangle (even coordinates and sizes)
  resize:WxH                  scale (bilinear, swscale)
  split:COLSxROWS             one composite in, COLS*ROWS streams out, named STREAM/tileN (row-major)
  compose:grid:WxH[:MAX[:IDS]] the room's cameras in a grid that follows who is there (up to MAX tiles,
                              names, letterbox, a slate when empty); IDS=a,b,c pins those streams in that order
  compose:COLSxROWS:WxH[:IDS] N streams in, one grid out; IDS=a,b,c fixes the slot order
  compose:active:WxH          grid sized to the streams currently sending (1, 2x1, 2x2, 3x2, 3x3, ...)
  compose:speaker:WxH         the active speaker's video (loudest audio of late, with hold and margin)
  mix[:RATE]                  every audio stream mixed into one (mono) stream
  resample:RATE[:CHANNELS]    swresample to RATE Hz
  plugin:MODULE:ATTR[:ARG]    a user transform: ATTR(ARG) returns an object with process()/flush()
  entry:NAME[:ARG]            same, from the ``sipbridge.transforms`` entry-point group
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import av
import click
import numpy as np

from protocol import AudioFrame, EncodedPacket, Event, EventType, KeyframeRequest, MediaHeader, Message, VideoFrame
from stages import codecs
from stages.base import Stage, StageOptions
from stages.bitmapfont import GLYPH_H, draw_text, fit_text, text_width
from stages.options import build_options, run, stage_options
from stages.pattern import i420_planes

# A composite's capture time is that of its newest tile not older than this: the picture that just changed. A
# viewer sees each person move when their new picture first shows, so that is the delay lip sync and the latency
# figures are about; the other tiles repeat a picture for their camera's frame interval, which is the sender's
# rate, not the bridge's delay. (Taking the oldest tile made the janus stage hold audio by that interval too: at
# 5-10 fps under load, audio left 100-200 ms late.) A tile not refreshed for this long is frozen, not counted.
STALE_STREAM_S = 1.0
# Compose: frame intervals are smoothed with this weight for the newest; the leading stream changes only
# to one whose frames come at least this much closer together.
FRAME_INTERVAL_SMOOTHING = 0.2
LEADER_SWITCH_RATIO = 0.8
LEADER_STALL_INTERVALS = 3.0
MIX_CHUNK_S = 0.02
# A mixer waits at most this long for a late stream before mixing it as silence.
MIX_MAX_WAIT_S = 0.06
MIX_MAX_SILENCE_BURST = 5  # chunks of silence sent at once after a stall, at most
# Live streams that all stopped sending without ending (a participant gone while the end is still on its way, a
# stalled camera page, a muted sender that sends nothing): after this long without any audio in, the mix goes on
# with silence on its clock's grid (mixing what is buffered) until audio comes again. Measured in a bridged call on a
# loaded machine: 45 s between the last of a departed participant's audio and her stream's end, with no RTP to SIP.
MIX_STALL_S = 0.5
BLACK_Y, NEUTRAL_UV = 16, 128
# Active speaker: quieter than this is silence; a new speaker must beat the current one by the margin for
# the hold time; levels are smoothed per 20 ms frame with this factor (about 200 ms to settle).
SPEAKER_MIN_DBFS = -50.0
SPEAKER_MARGIN_DB = 6.0
SPEAKER_HOLD_S = 0.6
SPEAKER_SMOOTHING = 0.9
# Room grid: a grid with nobody in it sends a slate at its frame rate, and one whose every camera has stalled this
# long repeats its last picture once per this long, so that the SIP side's video never stops (carriers hang up
# on RTP inactivity).
GRID_REPEAT_AFTER_S = 0.5
# Passthrough: while the shown camera's frames wait for a keyframe (a switch to it), ask upstream this often.
PASS_KEYFRAME_REPEAT_S = 1.0
# How often the stage lets slates, repeats and silence out (each paces itself).
TICK_INTERVAL_S = 0.01
# The longest a stage waits between ticks. Each tick is a hand-off to the codec thread (100 a second at
# TICK_INTERVAL_S, more than the media's own), so a transform that can say when it will next have something to send
# (``tick_wait_s``) is ticked then, within [TICK_INTERVAL_S, IDLE_TICK_INTERVAL_S]: while live media goes out
# that is the longest (a stall or an empty room is judged over half a second; media that ends one is seen at the
# next tick), a slate at 30 fps every 33 ms.
IDLE_TICK_INTERVAL_S = 0.05
CLOCK_EPSILON_S = 1e-6  # schedules add up periods in floating point
GRID_DEFAULT_FPS = 15.0
GRID_DEFAULT_MAX_TILES = 4
FITS = ("letterbox", "stretch")
# Names and slates: the luma of the text and of the darker box behind a name (chroma neutral: grey).
LABEL_TEXT_LUMA, LABEL_BOX_LUMA = 235, 40
SLATE_WAITING_TEXT = "waiting for participants"


# What compose, speaker and mix read the time from: time.monotonic in a stage, a driven clock in tests.
Clock = Callable[[], float]


class Transform(Protocol):
    """What a user transform implements. ``process`` returns the messages to pass on."""

    def process(self, msg: Message) -> Iterable[Message]: ...

    def flush(self, stream_id: str) -> Iterable[Message]: ...


class TransformSpecError(click.BadParameter):
    pass


def _ints(text: str, count: int, spec: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise TransformSpecError(f"{spec!r}: expected {count} integers") from None
    if len(values) != count or any(v <= 0 for v in values[2 if count == 4 else 0 :]):
        raise TransformSpecError(f"{spec!r}: expected {count} positive integers")
    return values


def even(value: int) -> int:
    return value - value % 2


def make_i420(width: int, height: int) -> np.ndarray:
    buf = np.empty(width * height * 3 // 2, dtype=np.uint8)
    y, u, v = i420_planes(buf, width, height)
    y[:] = BLACK_Y
    u[:] = NEUTRAL_UV
    v[:] = NEUTRAL_UV
    return buf


def crop_i420(frame: VideoFrame, x: int, y: int, w: int, h: int) -> np.ndarray:
    if x % 2 or y % 2 or w % 2 or h % 2:
        raise ValueError("crop rectangle must use even coordinates and sizes")
    if x + w > frame.width or y + h > frame.height:
        raise ValueError(f"crop {w}x{h}+{x}+{y} exceeds the {frame.width}x{frame.height} frame")
    sy, su, sv = i420_planes(frame.data, frame.width, frame.height)
    out = np.empty(w * h * 3 // 2, dtype=np.uint8)
    dy, du, dv = i420_planes(out, w, h)
    dy[:] = sy[y : y + h, x : x + w]
    du[:] = su[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2]
    dv[:] = sv[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2]
    return out


def resize_i420(data: Any, width: int, height: int, new_width: int, new_height: int) -> np.ndarray:
    if (width, height) == (new_width, new_height):
        return np.frombuffer(memoryview(data), dtype=np.uint8)
    arr = np.frombuffer(memoryview(data), dtype=np.uint8).reshape(height * 3 // 2, width)
    scaled = av.VideoFrame.from_ndarray(arr, format="yuv420p").reformat(
        width=new_width, height=new_height, interpolation="BILINEAR"
    )
    return np.ascontiguousarray(scaled.to_ndarray()).reshape(-1)


def _with_data(
    frame: VideoFrame, data: np.ndarray, width: int, height: int, stream_id: str | None = None, seq: int | None = None
) -> VideoFrame:
    h = frame.header
    header = MediaHeader(stream_id or h.stream_id, h.seq if seq is None else seq, h.pts, h.time_base, h.capture_time_ns)
    return VideoFrame(header, width, height, data)


class Identity:
    def process(self, msg: Message) -> Iterable[Message]:
        return (msg,)

    def flush(self, stream_id: str) -> Iterable[Message]:
        return ()


class Crop(Identity):
    def __init__(self, x: int, y: int, w: int, h: int) -> None:
        self.rect = (x, y, w, h)

    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, VideoFrame):
            return (msg,)
        x, y, w, h = self.rect
        return (_with_data(msg, crop_i420(msg, x, y, w, h), w, h),)


class Resize(Identity):
    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise TransformSpecError("resize needs even dimensions")
        self.size = (width, height)

    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, VideoFrame):
            return (msg,)
        w, h = self.size
        return (_with_data(msg, resize_i420(msg.data, msg.width, msg.height, w, h), w, h),)


class Split(Identity):
    """One composite in, one stream per grid cell out, named ``STREAM/tileN`` in row-major order."""

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows

    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, VideoFrame):
            return (msg,)
        tile_w, tile_h = even(msg.width // self.cols), even(msg.height // self.rows)
        if tile_w == 0 or tile_h == 0:
            raise ValueError(f"{msg.width}x{msg.height} is too small for a {self.cols}x{self.rows} split")
        out: list[Message] = []
        for r in range(self.rows):
            for c in range(self.cols):
                data = crop_i420(
                    msg, even(c * msg.width // self.cols), even(r * msg.height // self.rows), tile_w, tile_h
                )
                out.append(_with_data(msg, data, tile_w, tile_h, f"{msg.header.stream_id}/tile{r * self.cols + c}"))
        return out

    def flush(self, stream_id: str) -> Iterable[Message]:
        return ()


def grid_for(count: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / cols))
    return cols, rows


class _Pacer:
    """When a compose sends pictures of its own: a slate while nobody is there, at the grid's rate, and a repeat
    of the last picture once per GRID_REPEAT_AFTER_S while everyone's camera is stalled; none while live pictures
    go out. Output pts come from the clock (1/90000), continuous whatever stream a picture came from."""

    def __init__(self, fps: float, clock: Clock) -> None:
        if fps <= 0:
            raise TransformSpecError("the slate's fps must be positive")
        self.fps, self.clock = fps, clock
        self.start = clock()
        self.due: float | None = None  # when the next slate or repeat is due
        self.last_live = -math.inf
        self.was_present = False
        self.last_pts = -1
        self.slates = 0
        self.repeats = 0

    def pts(self, at: float) -> int:
        self.last_pts = max(self.last_pts + 1, round((at - self.start) * 90000))
        return self.last_pts

    def live(self, now: float) -> None:
        self.last_live = now

    def wait_s(self, now: float, present: bool) -> float:
        """Seconds until ``due_at`` may give a time (0: now)."""
        if present and now - self.last_live < GRID_REPEAT_AFTER_S:
            return self.last_live + GRID_REPEAT_AFTER_S - now
        if self.due is None or present != self.was_present:
            return 0.0
        return max(0.0, self.due - now)

    def due_at(self, now: float, present: bool) -> float | None:
        """When a picture of its own is due now: the time to stamp it with (on the schedule); else None."""
        if present and now - self.last_live < GRID_REPEAT_AFTER_S:
            self.due = None  # live pictures are going out
            return None
        if self.due is None or present != self.was_present:  # the room emptied (or filled): start over now
            self.due = now
        self.was_present = present
        if now < self.due - CLOCK_EPSILON_S:
            return None
        # A repeat of stalled cameras only keeps RTP flowing: no faster than once per GRID_REPEAT_AFTER_S, so a
        # starved machine is not handed full-rate work for frozen pictures.
        period = max(1.0 / self.fps, GRID_REPEAT_AFTER_S if present else 0.0)
        at = self.due
        self.due += period
        if self.due <= now:  # the clock jumped (a stalled process): go on from now, no burst
            self.due = now + period
        if present:
            self.repeats += 1
        else:
            self.slates += 1
        return at

    def figures(self) -> dict[str, Any]:
        return {"slates": self.slates, "repeats": self.repeats}


class _Keepalive:
    """compose:active and compose:speaker with a slate: their pictures restamped on the pacer's clock, the
    last one repeated while every camera stalls, the slate (waiting for participants, the title) while nobody
    with video is there. (compose:grid draws its own: it redraws its tiles instead of repeating.)"""

    def __init__(self, width: int, height: int, options: GridOptions, clock: Clock) -> None:
        self.size, self.options, self.clock = (width, height), options, clock
        self.pacer = _Pacer(options.fps, clock)
        self.last: VideoFrame | None = None
        self.seq = 0
        self._slate: np.ndarray | None = None

    def _frame(self, like: VideoFrame | None, at: float, data: Any, capture_ns: int, output_id: str) -> VideoFrame:
        self.seq += 1
        width, height = self.size
        header = MediaHeader(like.header.stream_id if like else output_id, self.seq, self.pacer.pts(at),
                             Fraction(1, 90000), capture_ns)
        return VideoFrame(header, width, height, data)

    def live(self, now: float, frame: VideoFrame) -> VideoFrame:
        self.pacer.live(now)
        self.last = self._frame(frame, now, frame.data, frame.header.capture_time_ns, frame.header.stream_id)
        return self.last

    def tick(self, present: bool, output_id: str) -> list[Message]:
        now = self.clock()
        present = present and self.last is not None
        at = self.pacer.due_at(now, present)
        if at is None:
            return []
        if present and self.last is not None:
            return [self._frame(self.last, at, self.last.data, time.time_ns(), output_id)]
        if self._slate is None:
            self._slate = slate_i420(*self.size, self.options.title)
        return [self._frame(None, at, self._slate.copy(), time.time_ns(), output_id)]


@dataclass
class _Slot:
    frame: VideoFrame | None = None
    tile: np.ndarray | None = None
    last_seen: float = 0.0
    ended: bool = False
    interval_s: float | None = None  # smoothed time between this stream's frames
    joined: int = 0  # room grid: order of arrival (a stream that ends and comes back arrives anew)
    tile_size: tuple[int, int] = (0, 0)  # room grid: the size ``tile`` was scaled to
    encoded: bool = False  # room grid with passthrough: this camera arrives encoded (no picture to draw)

    def arrived(self, now: float) -> None:
        if self.last_seen:
            gap = now - self.last_seen
            self.interval_s = gap if self.interval_s is None else (
                (1 - FRAME_INTERVAL_SMOOTHING) * self.interval_s + FRAME_INTERVAL_SMOOTHING * gap)
        self.last_seen = now


class Compose(Identity):
    """N streams in, one grid out. Emits a composite on every frame of the leading stream.

    The leader is the active stream with the highest frame rate, so the grid moves as smoothly as its
    smoothest camera (a slow one, a screen share at 5 fps, must not set the pace for everyone) and never
    waits for a late one; it changes only when another stream is clearly faster, so that two cameras at
    the same rate do not take turns. A slot shows black until its stream's first frame and after its end; a
    stream that stalls keeps its last picture.
    """

    def __init__(
        self,
        cols: int,
        rows: int,
        width: int,
        height: int,
        stream_ids: list[str] | None,
        active: bool,
        output_id: str,
        clock: Clock = time.monotonic,
        keepalive: GridOptions | None = None,
    ) -> None:
        if width % 2 or height % 2:
            raise TransformSpecError("compose needs even output dimensions")
        self.clock = clock
        # With keepalive: a slate while no stream is there, repeats while all stall, pts from the clock.
        self.keepalive = _Keepalive(width, height, keepalive, clock) if keepalive else None
        self.fixed_grid = (cols, rows)
        self.size = (width, height)
        self.order = list(stream_ids or [])
        self.fixed_order = bool(stream_ids)
        self.active_layout = active
        self.output_id = output_id
        self.slots: dict[str, _Slot] = {}
        self.seq = 0
        self.leader: str | None = None

    def _active(self, now: float) -> list[str]:
        return [
            sid
            for sid in self.order
            if (slot := self.slots.get(sid)) and not slot.ended and now - slot.last_seen < STALE_STREAM_S
        ]

    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, VideoFrame):
            return (msg,)
        sid = msg.header.stream_id
        if sid not in self.order:
            if self.fixed_order:
                return (msg,)  # not one of ours: pass through untouched
            self.order.append(sid)
        now = self.clock()
        slot = self.slots.setdefault(sid, _Slot())
        slot.arrived(now)
        slot.frame, slot.tile, slot.ended = msg, None, False
        active = self._active(now)
        if not active or self._lead(active, now) != sid:
            return ()
        composite = self._composite(active if self.active_layout else self.order, msg)
        return (self.keepalive.live(now, composite) if self.keepalive else composite,)

    def tick(self) -> list[Message]:
        if self.keepalive is None:
            return []
        return self.keepalive.tick(any(not slot.ended for slot in self.slots.values()), self.output_id)

    def _lead(self, active: list[str], now: float) -> str:
        def interval(sid: str) -> float:
            value = self.slots[sid].interval_s
            return value if value is not None else math.inf

        def stalled(sid: str) -> bool:
            # Several of its own frame intervals late: it stopped (left, froze). Do not wait a whole
            # STALE_STREAM_S with the grid frozen, nor hand it the lead again.
            return now - self.slots[sid].last_seen > LEADER_STALL_INTERVALS * interval(sid)

        leader = self.leader
        if leader is None or leader not in active:
            leader = self.leader = min(active, key=interval)
        others = [sid for sid in active if sid != leader and not stalled(sid)]
        if others:
            fastest = min(others, key=interval)
            if stalled(leader) or interval(fastest) < LEADER_SWITCH_RATIO * interval(leader):
                leader = self.leader = fastest
        return leader

    def _composite(self, shown: list[str], leader: VideoFrame) -> VideoFrame:
        cols, rows = grid_for(len(shown)) if self.active_layout else self.fixed_grid
        width, height = self.size
        tile_w, tile_h = even(width // cols), even(height // rows)
        canvas = make_i420(width, height)
        cy, cu, cv = i420_planes(canvas, width, height)
        now = self.clock()
        newest_capture = leader.header.capture_time_ns
        for index, sid in enumerate(shown[: cols * rows]):
            slot = self.slots.get(sid)
            # A stalled stream (a decoder waiting for a keyframe, a starved process) keeps its last picture: the
            # person is still in the call. Only the end of their stream frees the tile.
            if slot is None or slot.frame is None or slot.ended:
                continue
            frame = slot.frame
            if slot.tile is None:
                slot.tile = resize_i420(frame.data, frame.width, frame.height, tile_w, tile_h)
            ty, tu, tv = i420_planes(slot.tile, tile_w, tile_h)
            x, y = even((index % cols) * width // cols), even((index // cols) * height // rows)
            cy[y : y + tile_h, x : x + tile_w] = ty
            cu[y // 2 : (y + tile_h) // 2, x // 2 : (x + tile_w) // 2] = tu
            cv[y // 2 : (y + tile_h) // 2, x // 2 : (x + tile_w) // 2] = tv
            if now - slot.last_seen < STALE_STREAM_S:
                newest_capture = max(newest_capture, frame.header.capture_time_ns)
        h = leader.header
        self.seq += 1
        header = MediaHeader(self.output_id, self.seq, h.pts, h.time_base, newest_capture)
        return VideoFrame(header, width, height, canvas)

    def flush(self, stream_id: str) -> Iterable[Message]:
        for sid, slot in self.slots.items():
            if not stream_id or sid == stream_id:
                slot.ended = True
        return ()

    def figures(self) -> dict[str, Any]:
        """Each slot's stream, age of its newest frame and state: shows why a tile is black."""
        now = self.clock()
        return {
            "compose_slots": {
                sid: {"age_s": round(now - slot.last_seen, 3) if slot.frame else None, "ended": slot.ended,
                      "size": [slot.frame.width, slot.frame.height] if slot.frame else None}
                for sid in list(self.order)  # a copy: statistics run on the event loop, process on the codec thread
                if (slot := self.slots.get(sid)) is not None
            },
            "composites": self.seq,
            "compose_leader": self.leader,
            **(self.keepalive.pacer.figures() if self.keepalive else {}),
        }


def participant_of(stream_id: str) -> str:
    """'alice/video' and 'alice/audio' belong to 'alice' (the browser stage's naming)."""
    return stream_id.rsplit("/", 1)[0]


class Speaker(Identity):
    """The active speaker's video, full frame: whoever has been loudest lately is shown.

    Audio passes through untouched (a mix may follow); it only feeds each participant's level, an
    exponentially smoothed RMS. A new speaker must stay the loudest, by a margin, for SPEAKER_HOLD_S before
    the picture switches, so that a cough or crosstalk does not make it flap; in silence the picture stays.
    Video of everyone else is consumed. Until anyone speaks, the first participant with video is shown.
    """

    def __init__(
        self, width: int, height: int, output_id: str, clock: Clock = time.monotonic,
        keepalive: GridOptions | None = None,
    ) -> None:
        if width % 2 or height % 2:
            raise TransformSpecError("compose:speaker needs even output dimensions")
        self.clock = clock
        self.keepalive = _Keepalive(width, height, keepalive, clock) if keepalive else None
        self.video_streams: set[str] = set()
        self.size = (width, height)
        self.output_id = output_id
        self.levels_db: dict[str, float] = {}
        self.level_at: dict[str, float] = {}
        self.last_video: dict[str, float] = {}
        self.speaker: str | None = None
        self.candidate: tuple[str, float] | None = None  # (participant, loudest since)
        self.switches = 0
        self.seq = 0

    def process(self, msg: Message) -> Iterable[Message]:
        now = self.clock()
        if isinstance(msg, AudioFrame):
            self._hear(participant_of(msg.header.stream_id), msg, now)
            return (msg,)
        if not isinstance(msg, VideoFrame):
            return (msg,)
        who = participant_of(msg.header.stream_id)
        self.last_video[who] = now
        self.video_streams.add(msg.header.stream_id)
        shown = self.speaker if self.speaker is not None and now - self.last_video.get(self.speaker, -1e9) < \
            STALE_STREAM_S else None
        if shown is None:
            # Nobody has spoken yet, or the speaker sends no video: show the first one who does.
            shown = next(p for p, t in self.last_video.items() if now - t < STALE_STREAM_S)
        if who != shown:
            return ()
        w, h = self.size
        self.seq += 1
        out = _with_data(msg, resize_i420(msg.data, msg.width, msg.height, w, h), w, h, self.output_id, self.seq)
        return (self.keepalive.live(now, out) if self.keepalive else out,)

    def flush(self, stream_id: str) -> Iterable[Message]:
        """A participant whose video ended is no longer there to be shown."""
        for sid in [sid for sid in self.video_streams if not stream_id or sid == stream_id]:
            self.video_streams.discard(sid)
            who = participant_of(sid)
            if not any(participant_of(other) == who for other in self.video_streams):
                self.last_video.pop(who, None)
        return ()

    def tick(self) -> list[Message]:
        return self.keepalive.tick(bool(self.last_video), self.output_id) if self.keepalive else []

    def _hear(self, who: str, msg: AudioFrame, now: float) -> None:
        level_db = frame_level_dbfs(msg)
        previous = self.levels_db.get(who)
        self.levels_db[who] = level_db if previous is None else (
            SPEAKER_SMOOTHING * previous + (1 - SPEAKER_SMOOTHING) * level_db)
        self.level_at[who] = now
        heard = {p: db for p, db in self.levels_db.items() if now - self.level_at[p] < STALE_STREAM_S}
        loudest = max(heard, key=heard.__getitem__)
        if heard[loudest] < SPEAKER_MIN_DBFS or loudest == self.speaker:
            self.candidate = None
            return
        current = heard.get(self.speaker, -math.inf) if self.speaker is not None else -math.inf
        if heard[loudest] < current + SPEAKER_MARGIN_DB:
            self.candidate = None
            return
        if self.candidate is None or self.candidate[0] != loudest:
            self.candidate = (loudest, now)
        elif now - self.candidate[1] >= SPEAKER_HOLD_S or self.speaker is None:
            self.speaker, self.candidate = loudest, None
            self.switches += 1

    def figures(self) -> dict[str, Any]:
        return {
            "speaker": self.speaker,
            "speaker_switches": self.switches,
            "levels_dbfs": {p: round(db, 1) for p, db in sorted(self.levels_db.items())},
            "composites": self.seq,
            **(self.keepalive.pacer.figures() if self.keepalive else {}),
        }


def frame_level_dbfs(msg: AudioFrame) -> float:
    """The frame's RMS level in dB of full scale (silence reads about -90)."""
    samples = np.frombuffer(memoryview(msg.data), dtype=np.int16).astype(np.float32)
    rms = float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0
    return 20 * math.log10(max(rms, 1.0) / 32768.0)


def grid_shape(count: int) -> tuple[int, int]:
    """The room grid's cells for ``count`` people: 1 full frame, 2 side by side, 3-4 in 2x2, 5-9 in 3x3, 10-16 4x4."""
    if count <= 1:
        return 1, 1
    if count == 2:
        return 2, 1
    side = math.ceil(math.sqrt(count))
    return side, side


Rect = tuple[int, int, int, int]  # x, y, width, height (even, for I420's half-size chroma)


def cell_rects(cols: int, rows: int, width: int, height: int) -> list[Rect]:
    """The cells of a grid, row-major, where ``split:COLSxROWS`` cuts them (the same arithmetic)."""
    tile_w, tile_h = even(width // cols), even(height // rows)
    return [
        (even(c * width // cols), even(r * height // rows), tile_w, tile_h) for r in range(rows) for c in range(cols)
    ]


def picture_rect(src_w: int, src_h: int, cell: Rect, fit: str) -> Rect:
    """Where a ``src_w`` x ``src_h`` picture goes in ``cell``: all of it (stretch), or as large as it fits with
    its own shape, centred, black bars on the sides left over (letterbox)."""
    x, y, w, h = cell
    if fit == "stretch" or src_w <= 0 or src_h <= 0:
        return cell
    scale = min(w / src_w, h / src_h)
    pw, ph = max(2, min(w, even(round(src_w * scale)))), max(2, min(h, even(round(src_h * scale))))
    return x + even((w - pw) // 2), y + even((h - ph) // 2), pw, ph


def label_scale(cell_h: int) -> int:
    return max(1, round(cell_h / 150))


def label_box(picture: Rect, cell: Rect, name: str) -> tuple[Rect, str, int] | None:
    """Where a tile's name is written: (box, the text as it fits, scale), or None when the tile is too small.

    In the letterbox bar under the picture when it has room; else over the picture's lower left, just above its
    bottom eighth. The picture's top eighth (where the test pattern's frame counter is) and bottom eighth (the
    lip-sync marks) stay untouched, so tests and the demo read them through a named grid.
    """
    scale = label_scale(cell[3])
    pad = 2 * scale
    box_h = even(GLYPH_H * scale + 2 * pad + 1)
    px, py, pw, ph = picture
    bar = cell[1] + cell[3] - (py + ph)
    if bar >= box_h:
        top = py + ph + even((bar - box_h) // 2)
    else:
        top = even(py + ph - ph // 8 - box_h - 1)
        if top < py + ph // 8 + 1:
            return None
    text = fit_text(name, pw - 2 * pad - 2, scale)
    if not text:
        return None
    return (px, top, min(pw, even(text_width(text, scale) + 2 * pad + 1)), box_h), text, scale


def _blit(planes: tuple[np.ndarray, ...], tile: np.ndarray, rect: Rect) -> None:
    x, y, w, h = rect
    cy, cu, cv = planes
    ty, tu, tv = i420_planes(tile, w, h)
    cy[y : y + h, x : x + w] = ty
    cu[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2] = tu
    cv[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2] = tv


def draw_label(planes: tuple[np.ndarray, ...], box: Rect, text: str, scale: int) -> None:
    x, y, w, h = box
    cy, cu, cv = planes
    cy[y : y + h, x : x + w] = LABEL_BOX_LUMA
    cu[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2] = NEUTRAL_UV
    cv[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2] = NEUTRAL_UV
    draw_text(cy[y : y + h, x : x + w], 2 * scale, 2 * scale, text, scale, LABEL_TEXT_LUMA)


def slate_i420(width: int, height: int, title: str) -> np.ndarray:
    """The picture of an empty room: black, "waiting for participants" and the room's name, centred, in a band
    from 0.38 to under 0.5 of the height (clear of the top eighth of a full frame or of a 2x1, 2x2 or 3x3 cell,
    where frame counters are read)."""
    canvas = make_i420(width, height)
    y_plane = i420_planes(canvas, width, height)[0]
    scale = max(1, height // 160)
    top = int(height * 0.38)
    for line in (SLATE_WAITING_TEXT, title):
        text = fit_text(line, width - 4 * scale, scale)
        draw_text(y_plane, (width - text_width(text, scale)) // 2, top, text, scale, LABEL_TEXT_LUMA)
        top += (GLYPH_H + 3) * scale
    return canvas


@dataclass
class GridOptions:
    """How a room grid looks: names on tiles, how pictures fit their cells, the slate's title, the rate of
    slates and repeats."""

    names: bool = True
    fit: str = "letterbox"
    title: str = ""
    fps: float = GRID_DEFAULT_FPS
    slate: bool = False  # compose:active and compose:speaker too send a slate and repeats (compose:grid always)
    # compose:grid with one tile: the shown camera's encoded frames go on as they came (the decoder passed them on
    # undecoded because the SIP side takes them): no drawing, no encoding; slates and decoded cameras as usual.
    passthrough: bool = False


class RoomGrid(Compose):
    """The room as the SIP side sees it: one tile for each camera in the call now, at most ``max_tiles``.

    A stream that ends (its EndOfStream: the browser stage sends one when a track ends) frees its tile at once; a
    newcomer takes a free tile (the others keep their places) or is added; the grid's shape follows the number of
    tiles (grid_shape), and each picture keeps its own shape (letterbox) unless told to stretch. With more
    cameras than tiles, the most recent speakers win (a participant's audio level above SPEAKER_MIN_DBFS for
    SPEAKER_HOLD_S, heard through the audio passing by), else the most recent arrivals. With ``stream_ids`` the
    grid is pinned instead: those streams, in that order, a black cell while one is away.

    Composites are emitted on the leading camera's frames (see Compose). With nobody in the grid, ``tick`` sends
    a slate at ``fps``; when every camera stalls, the last grid is repeated every GRID_REPEAT_AFTER_S, so the SIP
    side never goes without video. Output pts are the grid's own clock in 1/90000 (continuous whoever leads), and
    a composite's capture time is that of its newest live tile (see STALE_STREAM_S).
    """

    def __init__(
        self,
        width: int,
        height: int,
        max_tiles: int,
        stream_ids: list[str] | None,
        output_id: str,
        options: GridOptions | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(1, 1, width, height, stream_ids, False, output_id, clock)
        self.options = options or GridOptions()
        if not 1 <= max_tiles <= 16:
            raise TransformSpecError(f"compose:grid takes 1 to 16 tiles, not {max_tiles}")
        if self.options.fit not in FITS:
            raise TransformSpecError(f"fit must be one of {', '.join(FITS)}, not {self.options.fit!r}")
        self.pacer = _Pacer(self.options.fps, clock)
        self.max_tiles = max_tiles
        self.pinned = list(stream_ids or [])
        self.positions: list[str | None] = []
        self.layout = grid_shape(len(self.pinned))
        self.arrivals = 0
        self.levels_db: dict[str, float] = {}
        self.loud_since: dict[str, float] = {}
        self.spoke_at: dict[str, float] = {}
        self._slate: np.ndarray | None = None
        if self.options.passthrough and max_tiles != 1:
            raise TransformSpecError("passthrough needs compose:grid with one tile (the single layout)")
        # Passthrough: the camera whose encoded frames are going out now (its chain started at a keyframe), and the
        # offset from its pts (1/90000) to ours; the hook the stage sets to ask upstream for a keyframe.
        self.passing: str | None = None
        self.pass_offset = 0
        self.packets_passed = 0
        self.pass_awaiting_keyframe = 0
        self.keyframe_asked_at: dict[str, float] = {}
        self.request_keyframe: Callable[[str, str], None] | None = None

    # ----- who is shown where ----------------------------------------------------------------------------------
    def process(self, msg: Message) -> Iterable[Message]:
        now = self.clock()
        if isinstance(msg, AudioFrame):
            self._hear(participant_of(msg.header.stream_id), msg, now)
            return (msg,)
        if isinstance(msg, EncodedPacket) and msg.codec.is_video and self.options.passthrough:
            return self._pass(msg, now)
        if not isinstance(msg, VideoFrame):
            return (msg,)
        sid = msg.header.stream_id
        if self.pinned and self._pin(sid) is None:
            return (msg,)  # not one of ours: pass through untouched
        if msg.width % 2 or msg.height % 2:
            # Kept, it would fail every composite it is drawn into; refused, it is one counted drop.
            raise ValueError(f"{sid}: {msg.width}x{msg.height} is not an even size; the grid takes even sizes only")
        self._arrive(sid, now, msg)
        sending = [p for p in self.positions if p is not None and now - self.slots[p].last_seen < STALE_STREAM_S]
        if sid not in sending or self._lead(sending, now) != sid:
            return ()
        self.pacer.live(now)
        return (self._draw(now),)

    def _arrive(self, sid: str, now: float, frame: VideoFrame | None) -> None:
        """A camera's picture (or, passing through, its encoded frame: ``None``) arrived: a newcomer is arranged."""
        slot = self.slots.get(sid)
        if slot is None:
            self.arrivals += 1
            slot = self.slots[sid] = _Slot(joined=self.arrivals)
            new = True
        else:
            new = False
        slot.arrived(now)
        slot.frame, slot.tile, slot.encoded = frame, None, frame is None
        if new:
            self._arrange()

    def _pass(self, msg: EncodedPacket, now: float) -> tuple[Message, ...]:
        """Passthrough: a camera's encoded frame. It takes part in who is shown like a picture; the shown camera's
        frames go out as they came, renamed to the grid's output and restamped on its clock, from a keyframe on."""
        sid = msg.header.stream_id
        if self.pinned and self._pin(sid) is None:
            return ()  # not one of ours, and nothing downstream decodes it
        self._arrive(sid, now, None)
        if not self.positions or self.positions[0] != sid:
            return ()
        pts_90k = codecs.rescale(msg.header.pts, msg.header.time_base, codecs.VIDEO_TIME_BASE)
        if self.passing != sid:
            if not msg.keyframe:
                # A switch to this camera: its frames decode only from a keyframe on.
                self.pass_awaiting_keyframe += 1
                if now - self.keyframe_asked_at.get(sid, -math.inf) >= PASS_KEYFRAME_REPEAT_S:
                    self.keyframe_asked_at[sid] = now
                    if self.request_keyframe is not None:
                        self.request_keyframe(sid, "passthrough switched to this camera")
                return ()
            self.passing = sid
            # From here on the camera's own timing, anchored at our clock's now.
            self.pass_offset = round((now - self.pacer.start) * 90000) - pts_90k
        pts = max(self.pacer.last_pts + 1, pts_90k + self.pass_offset)
        self.pacer.last_pts = pts  # a slate or picture after this continues the same clock
        self.pacer.live(now)
        self.seq += 1
        self.packets_passed += 1
        h = msg.header
        return (EncodedPacket(MediaHeader(self.output_id, self.seq, pts, codecs.VIDEO_TIME_BASE, h.capture_time_ns),
                              msg.codec, msg.keyframe, msg.data, None),)

    def keyframe_source(self, stream_id: str) -> str | None:
        """Passthrough: the camera a keyframe request for our output must reach (None: we make our pictures)."""
        return self.passing if stream_id in (self.output_id, "") else None

    def _hear(self, who: str, msg: AudioFrame, now: float) -> None:
        level = frame_level_dbfs(msg)
        previous = self.levels_db.get(who)
        smoothed = self.levels_db[who] = level if previous is None else (
            SPEAKER_SMOOTHING * previous + (1 - SPEAKER_SMOOTHING) * level)
        if smoothed < SPEAKER_MIN_DBFS:
            self.loud_since.pop(who, None)
            return
        if now - self.loud_since.setdefault(who, now) < SPEAKER_HOLD_S:
            return
        self.spoke_at[who] = now
        if not self.pinned and any(
            participant_of(sid) == who and sid not in self.positions for sid in self.slots
        ):
            self._arrange()  # a speaker without a tile takes the least recent speaker's

    def _pin(self, sid: str) -> str | None:
        """The pinned place of a stream: its own id, or for 'alice/video2' (the browser stage's name for a second
        track of alice's while the first has not ended, as when a page renegotiates) alice/video's."""
        if sid in self.pinned:
            return sid
        base = sid.rstrip("0123456789")
        return base if base != sid and base in self.pinned else None

    def _arrange(self) -> None:
        if self.pinned:
            # Each place shows the newest stream that belongs there.
            newest: dict[str, str] = {}
            for sid, slot in self.slots.items():
                place = self._pin(sid)
                if place is not None and (place not in newest or slot.joined > self.slots[newest[place]].joined):
                    newest[place] = sid
            self.positions = [newest.get(place) for place in self.pinned]
            return
        present = list(self.slots.items())
        ranked = sorted(present, key=lambda item: (self.spoke_at.get(participant_of(item[0]), -math.inf),
                                                   item[1].joined), reverse=True)
        wanted = ranked[: self.max_tiles]
        wanted_ids = {sid for sid, _ in wanted}
        positions = [sid if sid in wanted_ids else None for sid in self.positions]
        for sid, _ in sorted(wanted, key=lambda item: item[1].joined):
            if sid in positions:
                continue
            if None in positions:
                positions[positions.index(None)] = sid  # a free tile: the newcomer takes it
            else:
                positions.append(sid)
        while positions and positions[-1] is None:
            positions.pop()
        cols, rows = grid_shape(len(wanted))
        if len(positions) > cols * rows:  # fewer people than the holes allow for: close the gaps
            positions = [sid for sid in positions if sid is not None]
        self.positions = positions
        self.layout = (cols, rows)

    def flush(self, stream_id: str) -> Iterable[Message]:
        for sid in [sid for sid in self.slots if not stream_id or sid == stream_id]:
            del self.slots[sid]  # gone: a stream that comes back arrives anew (and a long call does not pile up)
        self._arrange()
        return ()

    # ----- pictures ----------------------------------------------------------------------------------------------
    def _draw(self, now: float, at: float | None = None) -> VideoFrame:
        """The grid (or the slate) as it is ``now``, stamped ``at`` (default: now)."""
        width, height = self.size
        stamp = now if at is None else at
        if not any(self.positions):
            if self._slate is None:
                self._slate = slate_i420(width, height, self.options.title)
            return self._output(stamp, self._slate.copy(), time.time_ns())
        canvas = make_i420(width, height)
        planes = i420_planes(canvas, width, height)
        captures = []
        for cell, sid in zip(cell_rects(*self.layout, width, height), self.positions, strict=False):
            slot = self.slots.get(sid) if sid is not None else None
            if sid is None or slot is None or slot.frame is None:
                continue
            frame = slot.frame
            picture = picture_rect(frame.width, frame.height, cell, self.options.fit)
            if slot.tile is None or slot.tile_size != picture[2:]:
                slot.tile = resize_i420(frame.data, frame.width, frame.height, picture[2], picture[3])
                slot.tile_size = (picture[2], picture[3])
            _blit(planes, slot.tile, picture)
            if self.options.names and (label := label_box(picture, cell, participant_of(sid))) is not None:
                draw_label(planes, *label)
            if now - slot.last_seen < STALE_STREAM_S:
                captures.append(frame.header.capture_time_ns)
        return self._output(stamp, canvas, max(captures) if captures else time.time_ns())

    def _output(self, stamp: float, canvas: np.ndarray, capture_ns: int) -> VideoFrame:
        self.passing = None  # a picture of ours in between: passed-on frames resume only at a keyframe
        pts = self.pacer.pts(stamp)
        self.seq += 1
        width, height = self.size
        return VideoFrame(MediaHeader(self.output_id, self.seq, pts, Fraction(1, 90000), capture_ns), width, height,
                          canvas)

    def tick(self) -> list[Message]:
        """Called a few times per frame interval: the slate while nobody is shown, a repeat while every camera
        is stalled."""
        now = self.clock()
        if self._shows_encoded():
            return []  # the shown camera arrives encoded: no picture of ours to repeat (nor one to draw)
        at = self.pacer.due_at(now, any(self.positions))
        return [] if at is None else [self._draw(now, at)]

    def tick_wait_s(self) -> float | None:
        """Seconds until ``tick`` may make something (None: not while the shown camera passes through)."""
        if self._shows_encoded():
            return None
        return self.pacer.wait_s(self.clock(), any(self.positions))

    def _shows_encoded(self) -> bool:
        return any(sid is not None and (slot := self.slots.get(sid)) is not None and slot.encoded
                   for sid in self.positions)

    def figures(self) -> dict[str, Any]:
        now = self.clock()
        figures: dict[str, Any] = {
            "compose_slots": {
                sid: {"age_s": round(now - slot.last_seen, 3),
                      "size": [slot.frame.width, slot.frame.height] if slot.frame else None}
                for sid, slot in list(self.slots.items())  # a copy: statistics run on the event loop
            },
            "composites": self.seq,
            "compose_leader": self.leader,
        }
        figures["grid_layout"] = "{}x{}".format(*self.layout)
        if self.options.passthrough:
            figures.update(passthrough=self.passing, packets_passed=self.packets_passed,
                           pass_awaiting_keyframe=self.pass_awaiting_keyframe)
        figures["grid_tiles"] = [participant_of(sid) if sid else None for sid in list(self.positions)]
        figures.update(self.pacer.figures())
        return figures


class _MixInput:
    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.buffered = 0
        self.capture_ns: list[int] = []
        self.ended = False

    def take(self, count: int) -> tuple[np.ndarray, int | None]:
        out = np.zeros(count, dtype=np.int32)
        filled, capture = 0, (self.capture_ns[0] if self.capture_ns else None)
        while filled < count and self.chunks:
            head = self.chunks[0]
            n = min(count - filled, head.size)
            out[filled : filled + n] = head[:n]
            filled += n
            if n == head.size:
                self.chunks.pop(0)
                self.capture_ns.pop(0)
            else:
                self.chunks[0] = head[n:]
        self.buffered -= filled
        return out, capture


class Mix(Identity):
    """Every audio stream mixed into one mono stream, in 20 ms chunks, summed with saturation."""

    def __init__(self, sample_rate: int | None, output_id: str, clock: Clock = time.monotonic) -> None:
        self.rate = sample_rate
        self.output_id = output_id
        self.clock = clock
        self.inputs: dict[str, _MixInput] = {}
        self.samples_out = 0
        self.seq = 0
        self.silence_due: float | None = None  # when the next chunk of an empty or stalled room's silence is due
        self.silent_chunks = 0
        self.last_input_at: float | None = None  # the clock when audio last came in, from any stream

    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, AudioFrame):
            return (msg,)
        if self.rate is None:
            self.rate = msg.sample_rate
        if msg.sample_rate != self.rate:
            raise ValueError(f"mix runs at {self.rate} Hz; resample {msg.header.stream_id} first")
        mono = np.frombuffer(memoryview(msg.data), dtype=np.int16).reshape(-1, msg.channels)[:, 0]
        inp = self.inputs.setdefault(msg.header.stream_id, _MixInput())
        inp.chunks.append(mono)
        inp.capture_ns.append(msg.header.capture_time_ns)
        inp.buffered += mono.size
        inp.ended = False
        self.last_input_at = self.clock()
        self.silence_due = None
        return self._drain(final=False)

    def _drain(self, final: bool) -> list[Message]:
        assert self.rate is not None
        chunk = round(self.rate * MIX_CHUNK_S)
        max_wait = round(self.rate * MIX_MAX_WAIT_S)
        out: list[Message] = []
        while True:
            live = [i for i in self.inputs.values() if not i.ended or i.buffered]
            if not live:
                break
            ready = all(i.buffered >= chunk for i in live)
            overdue = any(i.buffered >= max_wait for i in live)
            if not (ready or overdue or (final and any(i.buffered for i in live))):
                break
            total = np.zeros(chunk, dtype=np.int32)
            captures = []
            for inp in live:
                samples, capture = inp.take(chunk)
                total += samples
                if capture is not None:
                    captures.append(capture)
            out.append(self._chunk(np.clip(total, -32768, 32767).astype(np.int16), min(captures) if captures else None))
        return out

    def _chunk(self, mixed: np.ndarray, capture_ns: int | None) -> AudioFrame:
        assert self.rate is not None
        header = MediaHeader(
            self.output_id, self.seq, self.samples_out, Fraction(1, self.rate),
            capture_ns if capture_ns is not None else time.time_ns(),
        )
        self.seq += 1
        self.samples_out += mixed.size
        return AudioFrame(header, self.rate, 1, mixed.size, mixed)

    def tick(self) -> list[Message]:
        """An empty room is not a silent line: with no stream to mix (none yet, or every one ended), or with live
        streams none of which sent anything for MIX_STALL_S, silence goes out on the 20 ms grid of the clock (with
        whatever was buffered mixed in), so the SIP side keeps receiving audio (carriers hang up on RTP
        inactivity). Needs the rate (``mix:RATE``) when no stream ever came."""
        if self.rate is None:
            return []
        now = self.clock()
        live = [i for i in self.inputs.values() if not i.ended or i.buffered]
        if live and self.last_input_at is not None and now - self.last_input_at < MIX_STALL_S:
            self.silence_due = None
            return []
        if self.silence_due is None:
            self.silence_due = now
        out: list[Message] = []
        chunk = round(self.rate * MIX_CHUNK_S)
        while now >= self.silence_due and len(out) < MIX_MAX_SILENCE_BURST:
            total = np.zeros(chunk, dtype=np.int32)
            for inp in live:
                total += inp.take(chunk)[0]
            out.append(self._chunk(np.clip(total, -32768, 32767).astype(np.int16), None))
            self.silence_due += MIX_CHUNK_S
            self.silent_chunks += 1
        if now >= self.silence_due:  # the clock jumped (a stalled process): do not make up for it in one burst
            self.silence_due = now + MIX_CHUNK_S
        return out

    def tick_wait_s(self) -> float | None:
        """Seconds until ``tick`` may make silence (None: without a rate it never does)."""
        if self.rate is None:
            return None
        now = self.clock()
        live = any(not i.ended or i.buffered for i in self.inputs.values())
        if live and self.last_input_at is not None and now - self.last_input_at < MIX_STALL_S:
            return self.last_input_at + MIX_STALL_S - now
        return 0.0 if self.silence_due is None else max(0.0, self.silence_due - now)

    def figures(self) -> dict[str, Any]:
        return {"mix_silent_chunks": self.silent_chunks}

    def flush(self, stream_id: str) -> Iterable[Message]:
        for sid, inp in self.inputs.items():
            if not stream_id or sid == stream_id:
                inp.ended = True
        return self._drain(final=True) if self.rate else ()


class Resample(Identity):
    """Each stream to one rate and channel count; one output frame per input frame, so that a 20 ms chunk cut
    downstream (a mix, an encoder) is complete when its last input frame has come (``codecs.PrimedResampler``)."""

    def __init__(self, rate: int, channels: int) -> None:
        self.rate, self.channels = rate, channels
        self.resamplers: dict[str, codecs.PrimedResampler] = {}
        self.next_pts: dict[str, int] = {}
        self.last_header: dict[str, MediaHeader] = {}

    def _emit(self, stream_id: str, frames: list[av.AudioFrame], capture_ns: int) -> list[Message]:
        if not frames:
            return []
        arrays = [np.ascontiguousarray(f.to_ndarray()).reshape(-1) for f in frames]
        # One frame per input but the first (primed with silence): no copy for the usual case.
        data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        samples = data.size // self.channels
        pts = self.next_pts.get(stream_id, 0)
        self.next_pts[stream_id] = pts + samples
        header = MediaHeader(stream_id, self.last_header[stream_id].seq, pts, Fraction(1, self.rate), capture_ns)
        return [AudioFrame(header, self.rate, self.channels, samples, data)]

    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, AudioFrame):
            return (msg,)
        sid = msg.header.stream_id
        if msg.sample_rate == self.rate and msg.channels == self.channels and sid not in self.resamplers:
            return (msg,)
        resampler = self.resamplers.get(sid)
        if resampler is None:
            resampler = self.resamplers[sid] = codecs.PrimedResampler(self.channels, self.rate)
            self.next_pts[sid] = round(msg.header.pts * msg.header.time_base * self.rate)
        self.last_header[sid] = msg.header
        return self._emit(sid, resampler.resample(codecs.s16_to_av(msg)), msg.header.capture_time_ns)

    def flush(self, stream_id: str) -> Iterable[Message]:
        out: list[Message] = []
        for sid, resampler in list(self.resamplers.items()):
            if stream_id and sid != stream_id:
                continue
            header = self.last_header[sid]
            out.extend(self._emit(sid, resampler.resample(None), header.capture_time_ns))
            del self.resamplers[sid]
        return out


def _load_plugin(target: str, arg: str | None) -> Transform:
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TransformSpecError(f"cannot load transform {target!r}: {exc}") from None
    return factory(arg) if arg is not None else factory()


def parse_transform(spec: str, output_id: str, grid: GridOptions | None = None) -> Transform:
    name, _, rest = spec.partition(":")
    if name == "identity":
        return Identity()
    if name == "crop":
        x, y, w, h = _ints(rest, 4, spec)
        return Crop(x, y, w, h)
    if name == "resize":
        w, h = _ints(rest, 2, spec)
        return Resize(w, h)
    if name == "split":
        cols, rows = _ints(rest, 2, spec)
        return Split(cols, rows)
    if name == "compose":
        fields = rest.split(":")
        if fields[0] == "speaker" and len(fields) == 2:
            w, h = _ints(fields[1], 2, spec)
            return Speaker(w, h, output_id, keepalive=grid if grid and grid.slate else None)
        if fields[0] == "grid" and 2 <= len(fields) <= 4:
            w, h = _ints(fields[1], 2, spec)
            max_tiles = _ints(fields[2], 1, spec)[0] if len(fields) > 2 and fields[2] else GRID_DEFAULT_MAX_TILES
            ids = fields[3].split(",") if len(fields) == 4 else None
            return RoomGrid(w, h, max_tiles, ids, output_id, grid)
        if fields[0] == "active" and len(fields) == 2:
            w, h = _ints(fields[1], 2, spec)
            return Compose(1, 1, w, h, None, True, output_id, keepalive=grid if grid and grid.slate else None)
        if len(fields) in (2, 3):
            cols, rows = _ints(fields[0], 2, spec)
            w, h = _ints(fields[1], 2, spec)
            ids = fields[2].split(",") if len(fields) == 3 else None
            return Compose(cols, rows, w, h, ids, False, output_id)
        raise TransformSpecError(f"{spec!r}: use compose:grid:WxH[:MAX[:IDS]], compose:COLSxROWS:WxH[:IDS], "
                                 "compose:active:WxH or compose:speaker:WxH")
    if name == "mix":
        return Mix(int(rest) if rest else None, output_id)
    if name == "resample":
        fields = rest.split(":")
        if not fields[0].isdigit():
            raise TransformSpecError(f"{spec!r}: use resample:RATE[:CHANNELS]")
        channels = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 1
        return Resample(int(fields[0]), channels)
    if name == "plugin":
        module, _, remainder = rest.partition(":")
        attr, _, arg = remainder.partition(":")
        return _load_plugin(f"{module}:{attr}", arg or None)
    if name == "entry":
        ep_name, _, arg = rest.partition(":")
        found = [ep for ep in importlib.metadata.entry_points(group="sipbridge.transforms") if ep.name == ep_name]
        if not found:
            raise TransformSpecError(f"no sipbridge.transforms entry point named {ep_name!r}")
        factory = found[0].load()
        return factory(arg) if arg else factory()
    raise TransformSpecError(f"unknown transform {spec!r}")


class TransformerStage(Stage):
    media_thread = True  # its media never touches the event loop (stages/base.py)

    def __init__(self, options: StageOptions, transforms: list[Transform], video_transforms: int = 0) -> None:
        """``video_transforms``: how many of the first ``transforms`` came from --video (their ticks make video)."""
        super().__init__(options)
        self.transforms = transforms
        self.video_transforms = video_transforms
        self.ticks = 0  # codec-thread hand-offs made for ticks (slates, silence, repeats)
        for transform in transforms:
            if hasattr(transform, "request_keyframe"):  # a passthrough's switch asks from the codec thread
                transform.request_keyframe = self.request_keyframe_threadsafe

    def on_keyframe_request(self, request: KeyframeRequest) -> bool:
        """A request for a passed-on camera's frames goes to that camera (renamed); anything else upstream as is."""
        for transform in self.transforms:
            source = getattr(transform, "keyframe_source", None)
            upstream = source(request.stream_id) if source is not None else None
            if upstream is not None:
                self.request_keyframe_threadsafe(upstream, request.reason)
                return True
        return False

    def process(self, msg: Message) -> Iterable[Message]:
        kind = "video" if isinstance(msg, VideoFrame) else "audio" if isinstance(msg, AudioFrame) else None
        if isinstance(msg, EncodedPacket):
            kind = "video" if msg.codec.is_video else "audio"
        if kind is not None and kind in self.refused_kinds:
            # The SIP peer refused this kind (an upstream CALL_STATE from the janus stage): compose nothing for it.
            self.drops["refused_by_peer"] += 1
            return ()
        batch: list[Message] = [msg]
        for transform in self.transforms:
            batch = [out for item in batch for out in transform.process(item)]
        return batch

    async def on_control(self, msg: Message) -> None:
        """A track-ended event ends its stream here too (a grid frees the tile at once), should the end of stream
        not have come first; ending a stream twice changes nothing."""
        if isinstance(msg, Event) and msg.type is EventType.TRACK_ENDED and msg.stream_id:
            for out in await self.run_codec(lambda: list(self.flush(msg.stream_id))):
                await self.emit(out)

    async def produce(self) -> None:
        """Transforms with a ``tick`` (a grid's slate, a mix's silence) make media without input: call them."""
        if not any(hasattr(t, "tick") for t in self.transforms):
            return
        wait_s = TICK_INTERVAL_S
        while True:
            await asyncio.sleep(wait_s)
            if self._consumers == 0:
                wait_s = TICK_INTERVAL_S
                continue  # nobody to send to yet: a slate now would only count as a dropped frame
            wait_s = await self.run_codec(self._tick_and_send)
            self.ticks += 1

    def _tick_and_send(self) -> float:
        """Codec thread: tick, send what the ticks made, and say how long to wait for the next."""
        produced, wait_s = self._tick_all()
        for out in produced:
            self._emit_now(out)
        return wait_s

    def _tick_all(self) -> tuple[list[Message], float]:
        """Every transform's tick, and how long to wait before the next (the soonest any transform may need)."""
        out: list[Message] = []
        wait_s = IDLE_TICK_INTERVAL_S
        refused = self.refused_kinds
        for index, transform in enumerate(self.transforms):
            tick = getattr(transform, "tick", None)
            if tick is None or ("video" if index < self.video_transforms else "audio") in refused:
                continue  # no slate or repeated grid for a peer that refused video (no silence if it refused audio)
            produced = list(tick())
            for later in self.transforms[index + 1 :]:
                produced = [o for item in produced for o in later.process(item)]
            out.extend(produced)
            hint = getattr(transform, "tick_wait_s", None)
            transform_wait = hint() if hint is not None else TICK_INTERVAL_S  # no hint: every TICK_INTERVAL_S
            if transform_wait is not None:
                wait_s = min(wait_s, transform_wait)
        return out, max(TICK_INTERVAL_S, wait_s)

    def extra_figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"ticks": self.ticks}
        for transform in self.transforms:
            if hasattr(transform, "figures"):
                figures.update(transform.figures())
        return figures

    def flush(self, stream_id: str) -> Iterable[Message]:
        out: list[Message] = []
        for index, transform in enumerate(self.transforms):
            produced = list(transform.flush(stream_id))
            for later in self.transforms[index + 1 :]:
                produced = [o for item in produced for o in later.process(item)]
            out.extend(produced)
        return out


@click.command("transformer")
@stage_options("transformer")
@click.option("--video", "video", multiple=True, default=("identity",), help="Video transform spec (chain).")
@click.option("--audio", "audio", multiple=True, default=("identity",), help="Audio transform spec (chain).")
@click.option("--compose-id", default="composite", help="Stream id of a compose output.")
@click.option("--mix-id", default="mix", help="Stream id of a mix output.")
@click.option("--tile-names/--no-tile-names", default=True, help="compose:grid writes each participant's name.")
@click.option("--fit", type=click.Choice(FITS), default="letterbox", help="compose:grid: how pictures fill tiles.")
@click.option("--slate-title", default="", help="compose:grid: the room's name on the empty room's slate.")
@click.option("--grid-fps", type=float, default=GRID_DEFAULT_FPS, help="compose:grid: rate of slates and repeats.")
@click.option("--slate/--no-slate", default=False,
              help="compose:active and compose:speaker: a slate while nobody sends video (compose:grid always).")
@click.option("--passthrough/--no-passthrough", default=False,
              help="compose:grid with one tile: the shown camera's encoded frames go on as they came.")
def command(
    video: tuple[str, ...],
    audio: tuple[str, ...],
    compose_id: str,
    mix_id: str,
    tile_names: bool,
    fit: str,
    slate_title: str,
    grid_fps: float,
    slate: bool,
    passthrough: bool,
    **params: Any,
) -> None:
    """Crop, resize, split, compose, mix, resample or a plugged-in transform."""
    grid = GridOptions(names=tile_names, fit=fit, title=slate_title, fps=grid_fps, slate=slate,
                       passthrough=passthrough)
    transforms = [parse_transform(s, compose_id, grid) for s in video if s != "identity"]
    if passthrough and not any(isinstance(t, RoomGrid) for t in transforms):
        raise click.UsageError("--passthrough works with --video compose:grid:WxH:1 only")
    video_transforms = len(transforms)
    transforms += [parse_transform(s, mix_id) for s in audio if s != "identity"]
    options = build_options(params)
    run(TransformerStage(options, transforms, video_transforms))
