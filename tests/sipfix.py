"""Pytest fixtures and helpers for tests that need a private namespace, Janus or sipp.

Import the fixtures into a test module (pytest finds fixtures by name in the module)::

    from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)

    def test_x(netns, janus): ...

(The functions are named ``*_fixture`` and registered under the short names so the
test parameters do not shadow the imports.)

Fixtures:

* ``netns`` -> ``sipbridge.netns.NetNs``: a fresh namespace (lo up, veth sbv0/sbv1 inside,
  127.0.0.2/32 on lo and sbv0), *and the test's main thread is moved into it* for the
  duration of the test (setns(2) on the calling thread, undone afterwards). Everything
  the test body does from the main thread (sockets, asyncio loops created in the test,
  aiortc, Playwright, subprocesses such as sipp, Janus, Chromium or stage processes)
  therefore lives in the namespace, so fixed ports never clash between tests or helpers
  and nothing can leave the machine. Threads started before the test (e.g. an executor
  created at import time) stay outside: create loops/threads inside the test.
  The namespace is always deleted, and stale ``sb-<pid>-*`` namespaces of dead processes
  are removed first.
* ``janus`` -> ``sipbridge.janus_server.JanusServer``: Janus started with the project's
  configuration in that namespace (HTTP ``janus.http_url``, WebSocket ``janus.ws_url``,
  log ``janus.log_file``), stopped (SIGTERM) at the end. Its log tail is printed when the
  test fails (pytest shows captured output).

Helpers (all run in the caller's namespace):

* ``Sipp(scenario, work_dir, port, media_port, extra=[...], remote=None)``: a scenario from tests/sipp/;
  ``start()`` waits until sipp listens; ``wait()``, ``messages()`` (its -trace_msg), ``output()``, ``stop()``.
* ``StageProcess(work_dir, feed_endpoint, janus_url, args=[...])``: ``sipbridge stage janus`` as a child;
  ``await command({...})`` on its control socket, ``await wait_registered()``, ``log_text()``, ``stop()``.
* ``MediaFeeder(endpoint, video=Codec.H264, audio=Codec.PCMU)``: test-side upstream; encodes a 16-bit
  counter picture and a tone with PyAV, honours keyframe requests; ``await run(seconds)`` or
  ``run_in_thread(seconds)``; ``sent_ns[counter]`` for latency.
* ``MediaCollector(endpoint)``: test-side downstream; decodes and keeps ``counters``, ``counter_ns``,
  ``tone_hz()``, control ``events`` and ``states()``; ``stop_stage_and_collector(...)`` ends both in order.
* ``Capture(path, ports)``: tshark on ``lo``; ``rtp_payload_types(port)`` reads what went *to* a port.
* ``sip_listen_port()``: the SIP port Janus's only SIP handle bound; ``udp_ports()``, ``free_udp_port()``,
  ``wait_for(predicate, timeout_s)``, ``sipp_scenario(name)``, ``draw_counter`` / ``read_counter``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import zmq
import zmq.asyncio

import protocol
from protocol import Codec, EncodedPacket, EndOfStream, Event, EventType, KeyframeRequest, MediaHeader
from sipbridge import netns as netns_mod
from sipbridge.janus_server import JanusConfig, JanusServer
from sipbridge.testing.localcall import sipp_scenario, udp_ports
from stages.base import control_endpoint
from tests.stagehelp import SIPBRIDGE

SIPP_STOP_TIMEOUT_S = 5.0
SIPP_START_TIMEOUT_S = 5.0


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


@pytest.fixture(name="netns")
def netns_fixture() -> Iterator[netns_mod.NetNs]:
    need_root()
    netns_mod.cleanup_stale()
    ns = netns_mod.NetNs()
    ns.create()
    try:
        with ns.entered():
            yield ns
    finally:
        ns.delete()


@pytest.fixture(name="janus")
def janus_fixture(netns: netns_mod.NetNs, tmp_path: Path) -> Iterator[JanusServer]:
    if shutil.which("janus") is None:
        pytest.skip("janus is not installed")
    server = JanusServer(JanusConfig(), work_dir=tmp_path / "janus")
    server.start()
    try:
        yield server
    finally:
        print(f"--- Janus log tail ({server.log_file}) ---\n{server.tail_log(40)}")
        server.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Sipp:
    """One sipp process running a scenario from tests/sipp/ (in the caller's namespace).

    ``Sipp("uas_echo", port=5090, media_port=6000, extra=["-rtp_echo"])``; ``start()`` returns
    self; ``wait()`` returns the exit code (0 = every call succeeded); ``stop()`` ends it.
    The message trace goes to ``work_dir/<scenario>_messages.log`` (``-trace_msg``).
    """

    def __init__(self, scenario: str, work_dir: Path, port: int = 5090, media_port: int = 6000,
                 extra: Sequence[str] = (), remote: str | None = None, calls: int = 1,
                 ip: str = "127.0.0.1") -> None:
        self.scenario = sipp_scenario(scenario)
        self.work_dir = work_dir
        self.port = port
        self.media_port = media_port
        self.argv = ["sipp", "-sf", str(self.scenario), "-i", ip, "-p", str(port), "-mi", ip,
                     "-mp", str(media_port), "-m", str(calls), "-nostdin", "-trace_msg", "-trace_err",
                     *extra]
        if remote:
            self.argv.append(remote)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sipp:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.stdout = open(self.work_dir / f"{self.scenario.stem}.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, cwd=self.work_dir, stdin=subprocess.DEVNULL,
                                     stdout=self.stdout, stderr=subprocess.STDOUT, start_new_session=True)
        # A request sent before sipp listens gets ICMP back and the SIP stack answers 503 itself.
        wait_for(lambda: self.port in udp_ports() or not self.running(), SIPP_START_TIMEOUT_S, what="sipp to listen")
        if not self.running():
            raise AssertionError(f"sipp exited at start: {self.output()}")
        return self

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def messages(self) -> str:
        """The SIP messages sipp sent and received (its -trace_msg file)."""
        text = []
        for path in sorted(self.work_dir.glob(f"{self.scenario.stem}*_messages.log")):
            text.append(path.read_text(errors="replace"))
        return "\n".join(text)

    def output(self) -> str:
        path = self.work_dir / f"{self.scenario.stem}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(SIPP_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.stdout.close()
        return proc.returncode

    def __enter__(self) -> Sipp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----- the Janus stage as a real process, and a test-side pipeline around it -----------------------
COUNTER_BITS = 16
LUMA_ONE, LUMA_ZERO = 230, 20
TONE_AMPLITUDE = 0.3


def draw_counter(y_plane: np.ndarray, value: int) -> None:
    """16 cells across the top quarter of the picture, white for 1 and black for 0 (MSB first)."""
    height, width = y_plane.shape
    band = height // 4
    edges = np.linspace(0, width, COUNTER_BITS + 1).astype(int)
    for i in range(COUNTER_BITS):
        bit = (value >> (COUNTER_BITS - 1 - i)) & 1
        y_plane[:band, edges[i]:edges[i + 1]] = LUMA_ONE if bit else LUMA_ZERO


def read_counter(y_plane: np.ndarray) -> int | None:
    height, width = y_plane.shape
    band = height // 4
    edges = np.linspace(0, width, COUNTER_BITS + 1).astype(int)
    value = 0
    for i in range(COUNTER_BITS):
        x0, x1 = edges[i], edges[i + 1]
        qx = max(1, (x1 - x0) // 4)
        mean = float(y_plane[band // 4: band - band // 4, x0 + qx: x1 - qx].mean())
        if abs(mean - 128) < 40:
            return None
        value = (value << 1) | int(mean > 128)
    return value


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * sample_rate / len(samples))


AUDIO_CODEC_NAMES = {Codec.PCMU: "pcm_mulaw", Codec.PCMA: "pcm_alaw", Codec.G722: "g722", Codec.OPUS: "libopus"}
AUDIO_RATES = {Codec.PCMU: 8000, Codec.PCMA: 8000, Codec.G722: 16000, Codec.OPUS: 48000}
# RTP clock of each codec (G.722 runs its RTP clock at 8 kHz although it samples at 16 kHz).
RTP_CLOCKS = {Codec.PCMU: 8000, Codec.PCMA: 8000, Codec.G722: 8000, Codec.OPUS: 48000}
AUDIO_FRAME_MS = 20


class MediaFeeder:
    """Test-side upstream of the Janus stage: encodes a counter picture and a tone with PyAV
    and sends EncodedPackets on a bound PUSH socket (the stage connects its --in to it)."""

    def __init__(self, endpoint: str, video: Codec | None = Codec.H264, audio: Codec | None = Codec.PCMU,
                 width: int = 320, height: int = 240, fps: int = 15, tone_hz: float = 440.0) -> None:
        self.endpoint = endpoint
        self.video, self.audio = video, audio
        self.width, self.height, self.fps, self.tone_hz = width, height, fps, tone_hz
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 64)
        self.sock.bind(endpoint)
        self.control = self.ctx.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(control_endpoint(endpoint))
        self.keyframe_requests: list[KeyframeRequest] = []
        self.frames_sent = 0
        self.sent_ns: dict[int, int] = {}
        self._force_keyframe = False
        self.stopped = False  # set from anywhere to end run() early
        self._venc = self._make_video_encoder() if video else None
        self._aenc = self._make_audio_encoder() if audio else None

    def _make_video_encoder(self) -> Any:
        assert self.video is not None
        name = {Codec.H264: "libx264", Codec.VP8: "libvpx"}[self.video]
        enc: Any = av.CodecContext.create(name, "w")
        enc.width, enc.height, enc.pix_fmt = self.width, self.height, "yuv420p"
        enc.time_base = Fraction(1, 90000)
        enc.framerate = Fraction(self.fps, 1)
        enc.gop_size = self.fps * 2
        enc.bit_rate = 600_000
        enc.max_b_frames = 0
        if self.video is Codec.H264:
            enc.profile = "baseline"
            enc.options = {"preset": "ultrafast", "tune": "zerolatency", "repeat-headers": "1"}
        else:
            enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        return enc

    def _make_audio_encoder(self) -> Any:
        assert self.audio is not None
        enc: Any = av.CodecContext.create(AUDIO_CODEC_NAMES[self.audio], "w")
        enc.sample_rate = AUDIO_RATES[self.audio]
        enc.format = "s16"
        enc.layout = "mono" if self.audio is not Codec.OPUS else "stereo"
        enc.time_base = Fraction(1, enc.sample_rate)
        return enc

    def video_packets(self, index: int) -> list[EncodedPacket]:
        assert self._venc is not None and self.video is not None
        y = np.full((self.height, self.width), 100, np.uint8)
        y[self.height // 4:, :] = (np.arange(self.width) * 2 + index * 4) % 200 + 20  # moving gradient
        draw_counter(y, index)
        uv = np.full((self.height // 2, self.width // 2), 128, np.uint8)
        frame = av.VideoFrame.from_numpy_buffer(np.concatenate([y.ravel(), uv.ravel(), uv.ravel()])
                                                .reshape(self.height * 3 // 2, self.width), "yuv420p")
        frame.pts = index * 90000 // self.fps
        frame.time_base = Fraction(1, 90000)
        if self._force_keyframe:
            frame.pict_type = av.video.frame.PictureType.I
            self._force_keyframe = False
        now = time.time_ns()
        out = []
        for pkt in self._venc.encode(frame):
            header = MediaHeader("video0", index, int(pkt.pts or 0), Fraction(1, 90000), now)
            out.append(EncodedPacket(header, self.video, bool(pkt.is_keyframe), bytes(pkt), int(pkt.dts or 0)))
        # Sent = handed to the pipeline, after our own encoding (round trips exclude the test's encoder).
        self.sent_ns[index] = time.time_ns()
        return out

    def audio_packets(self, index: int) -> list[EncodedPacket]:
        assert self._aenc is not None and self.audio is not None
        rate = AUDIO_RATES[self.audio]
        n = rate * AUDIO_FRAME_MS // 1000
        t = (np.arange(n) + index * n) / rate
        samples = (np.sin(2 * np.pi * self.tone_hz * t) * TONE_AMPLITUDE * 32767).astype(np.int16)
        channels = 2 if self.audio is Codec.OPUS else 1
        frame = av.AudioFrame.from_ndarray(np.repeat(samples, channels).reshape(1, -1), format="s16",
                                           layout="stereo" if channels == 2 else "mono")
        frame.sample_rate = rate
        frame.pts = index * n
        frame.time_base = Fraction(1, rate)
        out = []
        clock = RTP_CLOCKS[self.audio]
        for pkt in self._aenc.encode(frame):
            pts = int(pkt.pts or 0) * clock // rate
            header = MediaHeader("audio0", index, pts, Fraction(1, clock), time.time_ns())
            out.append(EncodedPacket(header, self.audio, True, bytes(pkt)))
        return out

    async def run(self, seconds: float) -> None:
        """Send paced media for ``seconds`` (video at fps, audio every 20 ms)."""
        start = time.monotonic()
        vi = ai = 0
        while (elapsed := time.monotonic() - start) < seconds and not self.stopped:
            await self._drain_control()
            while self.video and vi <= elapsed * self.fps:
                for msg in self.video_packets(vi):
                    await self.sock.send_multipart(protocol.encode(msg))
                vi += 1
                self.frames_sent = vi
            while self.audio and ai <= elapsed * 1000 / AUDIO_FRAME_MS:
                for msg in self.audio_packets(ai):
                    await self.sock.send_multipart(protocol.encode(msg))
                ai += 1
            await asyncio.sleep(0.005)

    def run_in_thread(self, seconds: float) -> threading.Thread:
        """Like ``run(seconds)``, on a thread of its own, away from a busy test event loop.

        Uses blocking shadows of the same sockets (only this thread touches them meanwhile); PyAV
        releases the GIL while encoding, so pacing holds while the caller's loop decodes."""
        thread = threading.Thread(target=self._run_blocking, args=(seconds,), name="feeder", daemon=True)
        thread.start()
        return thread

    def _run_blocking(self, seconds: float) -> None:
        sock: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
        control: zmq.Socket[bytes] = zmq.Socket.shadow(self.control.underlying)
        start = time.monotonic()
        vi = ai = 0
        while (elapsed := time.monotonic() - start) < seconds and not self.stopped:
            while True:
                try:
                    msg = protocol.decode(control.recv_multipart(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(msg, KeyframeRequest):
                    self.keyframe_requests.append(msg)
                    self._force_keyframe = True
            while self.video and vi <= elapsed * self.fps:
                for out in self.video_packets(vi):
                    sock.send_multipart(protocol.encode(out))
                vi += 1
                self.frames_sent = vi
            while self.audio and ai <= elapsed * 1000 / AUDIO_FRAME_MS:
                for out in self.audio_packets(ai):
                    sock.send_multipart(protocol.encode(out))
                ai += 1
            time.sleep(0.003)

    async def _drain_control(self) -> None:
        while True:
            try:
                parts = await self.control.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = protocol.decode(parts)
            if isinstance(msg, KeyframeRequest):
                self.keyframe_requests.append(msg)
                self._force_keyframe = True

    def close(self) -> None:
        self.sock.close()
        self.control.close()
        self.ctx.term()


class MediaCollector:
    """Test-side downstream of the Janus stage: decodes what comes back and keeps the evidence."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.control = self.ctx.socket(zmq.PUSH)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(control_endpoint(endpoint))
        self.counters: list[int] = []
        self.counter_ns: dict[int, int] = {}
        self.unreadable = 0
        self.video_codecs: set[Codec] = set()
        self.audio_codecs: set[Codec] = set()
        self.audio: list[np.ndarray] = []
        self.audio_rate = 0
        self.events: list[Event] = []
        self.end_of_streams: list[str] = []
        self.decode_errors = 0
        self._vdec: dict[Codec, Any] = {}
        self._adec: dict[Codec, Any] = {}

    async def run(self) -> None:
        while True:
            msg = protocol.decode(await self.sock.recv_multipart())
            arrival = time.time_ns()
            if isinstance(msg, Event):
                self.events.append(msg)
            elif isinstance(msg, EndOfStream):
                self.end_of_streams.append(msg.stream_id)
                if not msg.stream_id:
                    # The stage is done; disconnecting lets it finish (it waits for its consumers to leave).
                    self.sock.close()
                    return
            elif isinstance(msg, EncodedPacket) and msg.codec.is_video:
                self.video_codecs.add(msg.codec)
                self._decode_video(msg, arrival)
            elif isinstance(msg, EncodedPacket):
                self.audio_codecs.add(msg.codec)
                self._decode_audio(msg)

    def _decode_video(self, msg: EncodedPacket, arrival_ns: int) -> None:
        dec: Any = self._vdec.get(msg.codec)
        if dec is None:
            dec = self._vdec[msg.codec] = av.CodecContext.create({Codec.H264: "h264", Codec.VP8: "vp8"}[msg.codec],
                                                                  "r")
            dec.thread_count = 1  # frame threading would hold pictures back and inflate measured latency
        try:
            frames = dec.decode(av.Packet(bytes(msg.data)))
        except av.FFmpegError:
            self.decode_errors += 1
            self.control.send_multipart(protocol.encode(KeyframeRequest(msg.header.stream_id, "test decode error")))
            return
        for frame in frames:
            y = frame.to_ndarray(format="gray")
            value = read_counter(y)
            if value is None:
                self.unreadable += 1
            else:
                self.counters.append(value)
                self.counter_ns.setdefault(value, arrival_ns)

    def _decode_audio(self, msg: EncodedPacket) -> None:
        dec: Any = self._adec.get(msg.codec)
        if dec is None:
            dec = self._adec[msg.codec] = av.CodecContext.create(AUDIO_CODEC_NAMES[msg.codec], "r")
            dec.sample_rate = AUDIO_RATES[msg.codec]
            dec.layout = "stereo" if msg.codec is Codec.OPUS else "mono"
        with contextlib.suppress(av.FFmpegError):
            for frame in dec.decode(av.Packet(bytes(msg.data))):
                arr = frame.to_ndarray()
                channels = len(frame.layout.channels)
                # Packed formats interleave channels in one row; planar ones give a row per channel.
                first = arr[0] if frame.format.is_planar else arr.reshape(-1)[::channels]
                self.audio.append(first.astype(np.float64))
                self.audio_rate = frame.sample_rate

    def tone_hz(self) -> float:
        if not self.audio:
            return 0.0
        samples = np.concatenate(self.audio).astype(np.float64)
        return dominant_frequency(samples[-self.audio_rate * 2:], self.audio_rate)

    def states(self) -> list[str]:
        return [e.attributes.get("state", "") for e in self.events if e.type is EventType.CALL_STATE]

    def close(self) -> None:
        self.sock.close()
        self.control.close()
        self.ctx.term()


async def stop_stage_and_collector(stage: StageProcess, collector: MediaCollector,
                                   collect: asyncio.Task[None]) -> int | None:
    """SIGTERM the stage while the collector still reads, so the stage's end of stream is consumed."""
    code = await asyncio.to_thread(stage.stop)
    if not collect.done():
        collect.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collect
    collector.close()
    return code


# The test reader is this (often busy) test process. The stage's default real-time policy would drop an
# encoded frame it cannot hand over and ask the SIP side for a keyframe, but an echoing sipp cannot make
# one, so the following pictures would decode wrong until the next periodic keyframe. Tests check the SIP
# leg, not their own speed: the stage's output edge loses nothing unless a test passes another policy.
LOSSLESS_OUTPUT = ("--video-policy", "all")


class StageProcess:
    """``sipbridge stage janus ...`` as a child process (it inherits the caller's namespace)."""

    def __init__(self, work_dir: Path, feed: str, janus_url: str = "ws://127.0.0.1:8188", name: str = "janus",
                 args: Sequence[str] = ()) -> None:
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.output = f"ipc://{work_dir}/{name}.sock"
        self.control = f"ipc://{work_dir}/{name}.control"
        self.stats = f"ipc://{work_dir}/{name}.stats"
        self.log_path = work_dir / f"{name}.log"
        self.argv = [*SIPBRIDGE, "stage", "janus", "--name", name, "--in", feed,
                     "--out", self.output, "--stats", self.stats, "--control", self.control,
                     "--janus-url", janus_url, *LOSSLESS_OUTPUT, *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctx = zmq.asyncio.Context()
        self._req: zmq.asyncio.Socket | None = None

    def start(self) -> StageProcess:
        env = dict(os.environ, SIPBRIDGE_RUN_DIR=str(self.work_dir), PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    async def command(self, request: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        if self._req is None:
            self._req = self.ctx.socket(zmq.REQ)
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self.control)
        await self._req.send(json.dumps(request).encode())
        try:
            reply = await asyncio.wait_for(self._req.recv(), timeout_s)
        except TimeoutError:
            self._req.close()
            self._req = None  # a REQ socket without its reply is stuck
            raise
        return json.loads(reply)  # type: ignore[no-any-return]

    async def wait_registered(self, timeout_s: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                status = await self.command({"cmd": "status"}, timeout_s=2.0)
                if status.get("registered"):
                    return status
            await asyncio.sleep(0.1)
        raise AssertionError(f"stage did not register within {timeout_s}s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self._req is not None:
            self._req.close()
            self._req = None
        self.ctx.term()
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()
        return proc.returncode


# How long the namespace may hold more than the handle's socket (an inbound stage's probe still running).
SIP_PORT_SETTLE_S = 30.0


def sip_listen_port(exclude: Sequence[int] = ()) -> int:
    """The SIP signalling port Janus's SIP plugin bound for its (only) handle in this namespace.

    Each handle binds sip:IP:* (a random UDP port). Call this before any call or sipp runs:
    the only UDP socket in a fresh test namespace is then that one, once an inbound stage's probe (a socket of
    its own for the moment it learns the handle's port, stages/janus/sipprobe.py) is over.
    """
    deadline = time.monotonic() + SIP_PORT_SETTLE_S
    while True:
        candidates = sorted(udp_ports() - set(exclude))
        if len(candidates) == 1:
            return candidates[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"cannot tell the SIP port from the UDP sockets {candidates}")
        time.sleep(0.1)


class Capture:
    """tshark on lo (inside the namespace) for UDP traffic on the given ports; RTP decoded per port."""

    def __init__(self, path: Path, ports: Sequence[int]) -> None:
        self.path = path
        self.ports = list(ports)
        port_filter = " or ".join(f"udp port {p}" for p in self.ports)
        self.argv = ["tshark", "-q", "-i", "lo", "-f", port_filter, "-w", str(path)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Capture:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        # tshark prints "Capturing on 'Loopback: lo'" once the capture runs.
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 15
        line = b""
        while time.monotonic() < deadline and b"Capturing on" not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError("tshark failed to start")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rtp_payload_types(self, port: int) -> collections.Counter[int]:
        """Payload types of the RTP packets sent *to* ``port`` (decoded as RTP)."""
        out = subprocess.run(["tshark", "-r", str(self.path), "-d", f"udp.port=={port},rtp", "-Y",
                              f"rtp && udp.dstport=={port}", "-T", "fields", "-e", "rtp.p_type"],
                             capture_output=True, text=True, check=True).stdout
        return collections.Counter(int(v) for v in out.split() if v.isdigit())
