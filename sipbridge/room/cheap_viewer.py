"""A receive-only room viewer without a browser: aiortc subscribers to every VideoRoom feed.

It does what static/probe.js does in a page, at a fraction of a Chromium's cost: joins the room as a participant
that never publishes, subscribes to every publisher (one subscriber handle and PeerConnection per feed, like
room.js), and reads from what aiortc decodes

* the frame counter (stages.pattern.read_counter: the 16 columns of the top eighth of the luma plane),
* the lip-sync marks (sync_marks): a video mark's onset is the arrival of the first frame whose bottom eighth is
  bright; an audio mark's onset is the start of the MARK_HZ burst, found by the same detector as probe.js's and
  sipbridge.testing.lipsync's (the signal shifted down by MARK_HZ, two moving averages of MARK_ENVELOPE_MS, the
  onset where the envelope reaches half its plateau less the averages' delay), at its chunk's arrival plus its
  place in the chunk;
* the tone (dominant frequency of the last second of audio).

Every REPORT_INTERVAL_S it prints one JSON line per source, the probe's ``received`` record: ``{"participant",
"event": "received", "from", "frames", "counters", "unreadable", "late", "tone_hz", "width", "height"[,
"marks_video", "marks_audio"]}``, a participant's n-th camera (n > 1) as ``"from": "name#n"``. Times are epoch ms
at the moment aiortc hands the frame over, after its jitter buffers and decoders (it holds ~3 audio packets and
~1 video frame, and does no A/V sync): offsets compare with the same viewer's (e.g. a participant received
directly), not with a browser's or a capture's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sipbridge.room.cheap import (
    CONNECT_TIMEOUT_S,
    JOIN_TIMEOUT_S,
    MARK_HZ,
    emit_line,
    join_room,
    plugin_data,
    wait_connected,
    wait_event,
)
from stages.pattern import dominant_frequency, read_counter

log = logging.getLogger("sipbridge.room.viewer")

REPORT_INTERVAL_S = 0.5
TONE_WINDOW_S = 1.0  # long enough that a 100 ms mark burst never outweighs the tone
MARK_BAND_FRACTION = 8
MARK_ENVELOPE_MS = 4.0
MARK_DETECT_LEVEL = 0.06  # envelope (full scale 1.0) that says "a burst": the burst is sent at 0.2
MARK_REFRACTORY_MS = 1000.0
CHUNK_TIMES_KEPT = 64
RESUBSCRIBE_DELAY_S = 1.0


def mark_band_bright(y: np.ndarray) -> bool:
    """The middle of the bottom eighth (its central half of rows, 80 % of the width) is bright."""
    h, w = y.shape
    band = max(1, h // MARK_BAND_FRACTION)
    top = h - band + band // 4
    region = y[top : max(top + 1, h - band // 4) : 2, w // 10 : w - w // 10 : 4]
    return bool(region.size and region.mean() >= 128)


def first_channel(frame: Any) -> np.ndarray:
    """An audio frame's first channel as floats (full scale 1.0), packed or planar, s16 or float."""
    pcm = frame.to_ndarray()
    mono = pcm[0] if frame.format.is_planar else pcm.reshape(-1)[:: len(frame.layout.channels)]
    return mono.astype(np.float64) / 32768.0 if mono.dtype == np.int16 else mono.astype(np.float64)


class BurstDetector:
    """Streaming onsets of MARK_HZ bursts; ``push(samples, rate, arrived_ms)`` returns the onsets (epoch ms) it
    completed. Vectorised per chunk (a per-sample Python loop would cost more than the rest of the viewer)."""

    def __init__(self) -> None:
        self.rate = 0

    def _reset(self, rate: int) -> None:
        self.rate = rate
        self.length = max(1, round(rate * MARK_ENVELOPE_MS / 1000))
        self.index = 0  # samples seen
        self.tail1 = np.zeros(self.length - 1, complex)
        self.tail2 = np.zeros(self.length - 1, complex)
        self.env = np.zeros(0)
        self.env_base = 0  # sample index of env[0]
        self.scan = 0  # next sample index to examine
        self.pending = -1
        self.last_onset = -math.inf
        self.chunks: collections.deque[tuple[int, float]] = collections.deque(maxlen=CHUNK_TIMES_KEPT)

    def _average(self, tail: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Moving average of ``length`` over the stream (zeros before its start); the new tail."""
        joined = np.concatenate([tail, x])
        sums = np.concatenate([[0], np.cumsum(joined)])
        out = (sums[self.length :] - sums[: -self.length]) / self.length
        return out, joined[len(joined) - (self.length - 1) :]

    def _env_at(self, start: int, stop: int) -> np.ndarray:
        return self.env[max(0, start - self.env_base) : max(0, stop - self.env_base)]

    def _time_of(self, sample: int) -> float | None:
        for start, t in reversed(self.chunks):
            if start <= sample:
                return t + (sample - start) * 1000 / self.rate
        return None

    def push(self, samples: np.ndarray, rate: int, arrived_ms: float) -> list[float]:
        if rate != self.rate:
            self._reset(rate)
        length = self.length
        self.chunks.append((self.index, arrived_ms))
        n = self.index + np.arange(samples.size)
        shifted = samples * np.exp(-2j * np.pi * MARK_HZ * (n % rate) / rate)
        first, self.tail1 = self._average(self.tail1, shifted)
        second, self.tail2 = self._average(self.tail2, first)
        self.env = np.concatenate([self.env, 2 * np.abs(second)])
        self.index += samples.size
        end = self.index
        onsets: list[float] = []
        while True:
            if self.pending < 0:
                above = np.flatnonzero(self._env_at(self.scan, end) > MARK_DETECT_LEVEL) + max(self.scan, self.env_base)
                free = above[(above - self.last_onset) * 1000 / rate > MARK_REFRACTORY_MS]
                if free.size == 0:
                    self.scan = end
                    break
                self.pending = int(free[0])
                self.scan = self.pending + 1
            resolve_at = self.pending + 3 * length
            if resolve_at >= end:
                break
            plateau = float(self._env_at(self.pending, resolve_at + 1).max())
            low = max(0, self.pending - 2 * length, self.env_base)
            half = low + int(np.argmax(self._env_at(low, resolve_at + 1) >= plateau / 2))
            onset = half - (length - 1)
            t = self._time_of(onset)
            if t is not None:
                onsets.append(t)
            self.last_onset = onset
            self.pending = -1
            self.scan = resolve_at + 1
        # Keep what a pending burst may look back at (2 L before it), drop the rest.
        keep_from = min(self.scan, self.pending if self.pending >= 0 else self.scan) - 3 * length
        if keep_from > self.env_base:
            self.env = self.env[keep_from - self.env_base :]
            self.env_base = keep_from
        return onsets


@dataclass
class Source:
    """What the viewer received from one display name (or name#n for a further camera)."""

    counters: list[int] = field(default_factory=list)
    unreadable: int = 0
    late: int = 0  # frames older than one already read (not shown by a player, not read here)
    frames: int = 0
    width: int = 0
    height: int = 0
    audio: collections.deque[np.ndarray] = field(default_factory=collections.deque)
    audio_samples: int = 0
    sample_rate: int = 0
    marks_video: list[float] = field(default_factory=list)
    marks_audio: list[float] = field(default_factory=list)

    def keep_audio(self, mono: np.ndarray, rate: int) -> None:
        self.audio.append(mono)
        self.audio_samples += mono.size
        self.sample_rate = rate
        while self.audio and self.audio_samples - self.audio[0].size >= rate * TONE_WINDOW_S:
            self.audio_samples -= self.audio.popleft().size

    def tone_hz(self) -> float | None:
        if not self.sample_rate or self.audio_samples < self.sample_rate * TONE_WINDOW_S / 2:
            return None
        return round(dominant_frequency(np.concatenate(list(self.audio)), self.sample_rate), 1)


class CheapViewer:
    """Joins ``room`` as ``name`` without publishing and reads every feed it subscribes to."""

    def __init__(self, janus_url: str, room: int, name: str, *, codec: str = "h264", sync_marks: bool = False,
                 api_secret: str | None = None) -> None:
        self.janus_url, self.room, self.name, self.codec, self.sync_marks = janus_url, room, name, codec, sync_marks
        self.api_secret = api_secret
        self.client: Any = None
        self.handle: Any = None
        self.sources: dict[str, Source] = {}
        self.feeds: dict[int, tuple[Any, Any]] = {}  # feed id -> (handle, pc)
        self.tasks: set[asyncio.Task[Any]] = set()

    def _task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def source(self, display: str) -> Source:
        return self.sources.setdefault(display, Source())

    async def start(self) -> None:
        from stages.janus.client import JanusClient

        self.client = await JanusClient(self.janus_url, self.api_secret).connect()
        self.handle, joined = await join_room(self.client, self.room, self.name, self.codec)
        for publisher in joined.get("publishers", []):
            await self.subscribe(int(publisher["id"]), str(publisher.get("display") or publisher["id"]))
        self._task(self._room_events())
        self._task(self._report())

    async def _room_events(self) -> None:
        while True:
            event = await self.handle.events.get()
            if event.get("janus") == "disconnected":
                emit_line({"participant": self.name, "event": "status", "state": "error", "text": "Janus gone"})
                return
            data = plugin_data(event)
            for publisher in data.get("publishers", []) or []:
                self._task(self.subscribe(int(publisher["id"]), str(publisher.get("display") or publisher["id"])))
            for key in ("unpublished", "leaving"):
                gone = data.get(key)
                if isinstance(gone, int) and gone in self.feeds:
                    self._task(self.unsubscribe(gone))

    async def subscribe(self, feed: int, display: str) -> None:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        if feed in self.feeds:
            return
        # Claimed before the first await: the room repeats a publisher in later events (measured: a second
        # subscription to the same feed, whose frames then interleave with the first's under one name).
        self.feeds[feed] = (None, None)
        handle = await self.client.attach("janus.plugin.videoroom")
        if feed not in self.feeds:  # unpublished meanwhile
            await handle.detach()
            return
        pc = RTCPeerConnection()
        self.feeds[feed] = (handle, pc)
        videos = 0

        @pc.on("track")
        def on_track(track: Any) -> None:
            nonlocal videos
            if track.kind == "video":
                videos += 1
                self._task(self._read_video(display if videos == 1 else f"{display}#{videos}", track))
            else:
                self._task(self._read_audio(display, track))

        try:
            await handle.message({"request": "join", "room": self.room, "ptype": "subscriber",
                                  "streams": [{"feed": feed}]})
            offered = await wait_event(handle, lambda e: "jsep" in e, JOIN_TIMEOUT_S)
            await pc.setRemoteDescription(RTCSessionDescription(offered["jsep"]["sdp"], offered["jsep"]["type"]))
            await pc.setLocalDescription(await pc.createAnswer())
            await handle.message({"request": "start", "room": self.room},
                                 jsep={"type": "answer", "sdp": pc.localDescription.sdp})
            await wait_connected(pc, CONNECT_TIMEOUT_S)
        except (RuntimeError, ConnectionError, TimeoutError) as exc:
            log.warning("%s: cannot subscribe to %s (feed %d): %s", self.name, display, feed, exc)
            emit_line({"participant": self.name, "event": "subscribe_failed", "from": display, "error": str(exc)})
            await self.unsubscribe(feed)
            return

        @pc.on("connectionstatechange")
        def on_state() -> None:
            # Lost while the feed is still published (not unsubscribed, not stopping): subscribe again.
            if pc.connectionState == "failed" and self.feeds.get(feed, (None, None))[1] is pc and not self.stopping:
                emit_line({"participant": self.name, "event": "status", "state": "resubscribing", "from": display})
                self._task(self._resubscribe(feed, display))

    async def _resubscribe(self, feed: int, display: str) -> None:
        await self.unsubscribe(feed)
        await asyncio.sleep(RESUBSCRIBE_DELAY_S)
        if not self.stopping:
            await self.subscribe(feed, display)

    async def unsubscribe(self, feed: int) -> None:
        handle, pc = self.feeds.pop(feed, (None, None))
        if pc is not None:
            await pc.close()
        if handle is not None:
            await handle.detach()

    async def _read_video(self, display: str, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        entry = self.source(display)
        was_marked = True  # a stream that starts inside a mark has no onset to time
        last_onset = -math.inf
        last_pts: int | None = None
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                arrived = time.time() * 1000
                # After packet loss aiortc can hand over a frame that a retransmission completed late, after newer
                # ones, or the same frame twice (measured on a loaded machine: 139, 139, 137, 136, 144). A player
                # shows no picture older than the one on screen: neither is read, both are counted.
                if frame.pts is not None:
                    if last_pts is not None and frame.pts <= last_pts:
                        entry.late += 1
                        continue
                    last_pts = frame.pts
                plane = frame.planes[0]
                y = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
                counter = read_counter(y)
                if counter is None:
                    entry.unreadable += 1
                else:
                    entry.counters.append(counter)
                entry.frames += 1
                entry.width, entry.height = frame.width, frame.height
                if self.sync_marks:
                    marked = mark_band_bright(y)
                    if marked and not was_marked and arrived - last_onset > MARK_REFRACTORY_MS:
                        entry.marks_video.append(arrived)
                        last_onset = arrived
                    was_marked = marked

    async def _read_audio(self, display: str, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        entry = self.source(display)
        detector = BurstDetector() if self.sync_marks else None
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                arrived = time.time() * 1000
                mono = first_channel(frame)
                entry.keep_audio(mono, frame.sample_rate)
                if detector is not None:
                    entry.marks_audio += detector.push(mono, frame.sample_rate, arrived)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            for display, entry in list(self.sources.items()):
                record: dict[str, Any] = {
                    "participant": self.name, "event": "received", "from": display, "frames": entry.frames,
                    "counters": entry.counters, "unreadable": entry.unreadable, "late": entry.late,
                    "tone_hz": entry.tone_hz(),
                    "width": entry.width, "height": entry.height,
                }
                entry.counters = []
                if self.sync_marks:
                    record["marks_video"], entry.marks_video = entry.marks_video, []
                    record["marks_audio"], entry.marks_audio = entry.marks_audio, []
                emit_line(record)

    stopping = False

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        for feed in list(self.feeds):
            with contextlib.suppress(Exception):
                await self.unsubscribe(feed)
        if self.handle is not None:
            with contextlib.suppress(Exception):
                await self.handle.message({"request": "leave"}, timeout_s=2.0)
        if self.client is not None:
            await self.client.close()
