"""Fixtures and helpers for the room-leg tests: the local room, synthetic participants, the bot, a collector.

Builds on the SIP leg's fixtures (tests/sipfix.py): ``netns`` moves the test's main thread into a fresh
namespace and ``janus`` runs Janus there, so every process started here (room server, participants' Chromium,
the browser stage) lives in that namespace, and fixed ports cannot clash with other tests.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import zmq

import protocol
from sipbridge.janus_server import JanusServer
from sipbridge.testing.localcall import wait_until
from stages.pattern import dominant_frequency, i420_planes, read_counter
from tests.stagehelp import SIPBRIDGE

ROOM_HTTP_PORT = 8480
START_TIMEOUT_S = 10.0
PROCESS_STOP_TIMEOUT_S = 8.0
PARTICIPANT_SIZE = "320x240"
PARTICIPANT_FPS = 15


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = PROCESS_STOP_TIMEOUT_S) -> int | None:
    """SIGTERM the process group (Chromium leaves children behind otherwise), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
    return proc.returncode


class JsonLines:
    """Reads a subprocess's stdout as JSON lines on a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError), self._lock:
                    self.records.append(json.loads(line))

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if predicate(r)]


@dataclass
class Room:
    janus: JanusServer
    http_port: int
    server: subprocess.Popen[bytes]
    run_dir: Path
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def spawn(self, argv: list[str], stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SIPBRIDGE_RUN_DIR": str(self.run_dir)}
        proc = subprocess.Popen(argv, stdout=stdout, env=env, start_new_session=True)
        self.children.append(proc)
        return proc

    def participants(self, room: int, names_tones: list[tuple[str, float]], *, probe: bool = False,
                     codec: str = "h264", engine: str = "chromium") -> tuple[subprocess.Popen[bytes], JsonLines]:
        """Synthetic participants: Chromium pages, or with ``engine="aiortc"`` browserless publishers (a loop
        encoded once; they receive nothing, so ``probe`` needs a ``viewer``)."""
        argv = [*SIPBRIDGE, "room", "participant", "--room-url", self.url, "--room", str(room), "--codec", codec,
                "--size", PARTICIPANT_SIZE, "--fps", str(PARTICIPANT_FPS), "--engine", engine]
        for name, tone in names_tones:
            argv += ["--name", name, "--tone", str(tone)]
        if probe:
            argv.append("--probe")
        proc = self.spawn(argv)
        return proc, JsonLines(proc)

    def viewer(self, room: int, *, engine: str = "aiortc", sync_marks: bool = False,
               name: str = "viewer") -> tuple[subprocess.Popen[bytes], JsonLines]:
        """A receive-only participant printing the probe's ``received`` records (counters, tone, marks) per source."""
        argv = [*SIPBRIDGE, "room", "viewer", "--engine", engine, "--room-url", self.url, "--room", str(room),
                "--name", name]
        proc = self.spawn(argv + (["--sync-marks"] if sync_marks else []))
        return proc, JsonLines(proc)

    def bot(self, room: int, out: str, *, mode: str = "raw", inputs: tuple[str, ...] = (), codec: str = "h264",
            extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        argv = [*SIPBRIDGE, "stage", "browser", "--name", f"browser-{mode}", "--out", out, "--mode", mode,
                "--display-name", "bot", "--var", f"room_url={self.url}", "--var", f"room={room}",
                "--var", f"codec={codec}", "--stats", f"ipc://{self.run_dir}/browser.stats", *extra]
        for endpoint in inputs:
            argv += ["--in", endpoint]
        return self.spawn(argv, stdout=None)

    def stop(self) -> None:
        for proc in reversed(self.children):
            stop_process(proc)
        stop_process(self.server)


@pytest.fixture(name="room")
def room_fixture(janus: JanusServer, tmp_path: Path) -> Iterator[Room]:
    """The local room server (and Janus) in the test's namespace."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([*SIPBRIDGE, "room", "serve", "--port", str(ROOM_HTTP_PORT), "--janus", janus.ws_url],
                              env=env, start_new_session=True)
    room = Room(janus, ROOM_HTTP_PORT, server, tmp_path)
    try:
        wait_until(lambda: _healthy(f"{room.url}healthz"), START_TIMEOUT_S, "room server")
        yield room
    finally:
        room.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# ----- what the bot emits ------------------------------------------------------------------------------------------
@dataclass
class StreamRecord:
    counters: list[tuple[float, int | None]] = field(default_factory=list)  # (arrival time, counter)
    audio: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 0
    codecs: set[str] = field(default_factory=set)
    keyframes: int = 0
    packets: int = 0
    # Encoded packets: (arrival, capture) wall clock ns, what a latency check needs.
    timing: list[tuple[int, int]] = field(default_factory=list)


class Collector:
    """A test-side PULL on the bot's output: decodes what it needs to check counters and tones."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.connect(endpoint)
        self.streams: dict[str, StreamRecord] = collections.defaultdict(StreamRecord)
        self.events: list[tuple[float, protocol.Event]] = []
        self._decoders: dict[str, Any] = {}
        self._last_seq: dict[str, int] = {}
        self._need_key: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors: queue.Queue[BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(100):
                    continue
                msg = protocol.decode(self.sock.recv_multipart())
                with self._lock:
                    self._take(msg)
        except BaseException as exc:  # surfaced by the test through .errors
            self.errors.put(exc)

    def _take(self, msg: protocol.Message) -> None:
        now = time.monotonic()
        if isinstance(msg, protocol.Event):
            self.events.append((now, msg))
        elif isinstance(msg, protocol.VideoFrame):
            y, _, _ = i420_planes(memoryview(msg.data), msg.width, msg.height)
            self.streams[msg.header.stream_id].counters.append((now, read_counter(y)))
        elif isinstance(msg, protocol.AudioFrame):
            record = self.streams[msg.header.stream_id]
            record.sample_rate = msg.sample_rate
            record.audio.append(np.frombuffer(memoryview(msg.data), np.int16)[:: msg.channels].copy())
        elif isinstance(msg, protocol.EncodedPacket):
            self._decode(msg, now)

    def _decode(self, msg: protocol.EncodedPacket, now: float) -> None:
        sid = msg.header.stream_id
        record = self.streams[sid]
        record.codecs.add(msg.codec.name)
        record.packets += 1
        record.timing.append((time.time_ns(), msg.header.capture_time_ns))
        record.keyframes += int(msg.keyframe)
        # Like a real decoder stage: after a lost packet (seq gap) wait for a keyframe instead of decoding garbage.
        last = self._last_seq.get(sid)
        self._last_seq[sid] = msg.header.seq
        if msg.codec.is_video and (last is None or msg.header.seq != last + 1):
            self._need_key.add(sid)
        if sid in self._need_key:
            if not msg.keyframe:
                return
            self._need_key.discard(sid)
        if sid not in self._decoders:
            name = {"H264": "h264", "VP8": "vp8", "OPUS": "opus"}[msg.codec.name]
            self._decoders[sid] = av.CodecContext.create(name, "r")
        packet = av.Packet(bytes(msg.data))
        try:
            frames = self._decoders[sid].decode(packet)
        except av.error.InvalidDataError:
            return
        for frame in frames:
            if isinstance(frame, av.VideoFrame):
                y = frame.to_ndarray(format="gray")
                record.counters.append((now, read_counter(y)))
            else:
                pcm = frame.to_ndarray()
                mono = pcm[0] if pcm.ndim == 2 else pcm
                if mono.dtype != np.int16:
                    mono = np.clip(mono * 32767, -32768, 32767).astype(np.int16)
                record.sample_rate = frame.sample_rate
                record.audio.append(mono.copy())

    # ----- queries for tests ------------------------------------------------------------------------------------
    def counters(self, stream_id: str) -> list[int | None]:
        with self._lock:
            return [c for _, c in self.streams[stream_id].counters] if stream_id in self.streams else []

    def tone(self, stream_id: str, seconds: float = 1.0) -> float | None:
        with self._lock:
            record = self.streams.get(stream_id)
            if record is None or not record.audio:
                return None
            samples = np.concatenate(record.audio)
            rate = record.sample_rate
        if len(samples) < rate * seconds:
            return None
        return dominant_frequency(samples[-int(rate * seconds) :], rate)

    def events_of(self, kind: protocol.EventType) -> list[protocol.Event]:
        with self._lock:
            return [e for _, e in self.events if e.type == kind]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


def in_order(counters: Sequence[int | None]) -> bool:
    """Readable counters strictly increase (frames may be skipped, never reordered or repeated)."""
    values = [c for c in counters if c is not None]
    return len(values) > 1 and all(b > a for a, b in itertools.pairwise(values))
