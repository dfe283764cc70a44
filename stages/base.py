"""The stage runtime every sipbridge process is built on.

A stage reads messages from its input edges, does its work, and writes to one
output edge. The runtime owns the sockets; subclasses implement small hooks:

* ``setup()``: open codecs (runs on the stage's codec thread);
* ``process(msg)``: turn one media message into zero or more messages (codec thread);
* ``flush(stream_id)``: drain what is buffered when a stream ends ("" = all streams);
* ``on_keyframe_request(req)``: a consumer asked for a keyframe; return True when
  handled here, False to pass it further upstream;
* ``produce()``: for stages that create media themselves (sources, browser, Janus);
* ``close()``: release resources; idempotent.

Sockets (stable ends bind, dynamic ends connect):
* output data: PUSH, bound by this stage; control for it: PULL bound at ``control_endpoint(output)``;
* input data: PULL, connected to each upstream output; control: one PUSH per input,
  connected to ``control_endpoint(input)``, used for keyframe requests travelling upstream;
* statistics: PUB bound at ``--stats``, carrying Heartbeat and Stats messages.

Backpressure per edge (see ARCHITECTURE.md): bounded high-water marks on both
sides; raw video is sent without blocking and dropped (counted) when the consumer
is full, and a consumer that falls behind keeps only the newest raw frame of each
stream; encoded video that cannot be sent is dropped and the stage asks for a
keyframe so the consumer can resynchronise; audio and control messages wait for room.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, ItemsView, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.monitor

import protocol
from protocol import (
    AudioFrame,
    EncodedPacket,
    EndOfStream,
    ErrorReport,
    Event,
    EventType,
    Heartbeat,
    KeyframeRequest,
    Message,
    ProtocolError,
    Stats,
    VideoFrame,
)
from stages import memtrace

HEARTBEAT_INTERVAL_S = 1.0
STATS_INTERVAL_S = 1.0
LOG_STATS_INTERVAL_S = 5.0
DEFAULT_VIDEO_HWM_MSGS = 8
# pyzmq copies anything under this size anyway; zero-copy only pays off above it.
ZERO_COPY_THRESHOLD_BYTES = 64 * 1024
MAX_RECEIVE_BATCH_MSGS = 64
LINGER_ON_CLOSE_MS = 2000
# After its end of stream a producer waits this long for its consumer to read everything and hang up.
EOS_DRAIN_TIMEOUT_S = 10.0
LATENCY_WINDOW_SAMPLES = 512
ERROR_LOG_INTERVAL_S = 1.0
# How long real-time audio may wait for room downstream before it is dropped (counted).
AUDIO_SEND_WAIT_MS = 200
# Real-time audio found queued behind more than this much newer audio of the same stream (in one receive batch) is
# dropped (counted as stale_audio): a stage that stalled or fell behind catches up instead of carrying the backlog
# as latency for the rest of the call. The HWM alone bounds messages, not time: an edge whose producer has a
# backlog (the encoded edge from the browser holds 64 + 64 messages) stays full, and what the consumer reads is as
# old as that queue is long, for as long as the producer's backlog lasts.
MAX_AUDIO_BACKLOG_S = 0.2
# Per-stream statistics are bounded: stream ids come from untrusted input (a room, a SIP peer, a forged packet).
# A bridge has at most 16 tiles of audio + video, so this leaves room; a stream id over the bound is a counted drop.
MAX_TRACKED_STREAMS = 64
# A stream with no message in or out for this long is over: its figures are dropped and its codec state flushed.
STREAM_IDLE_EXPIRY_S = 60.0
# How long a probe waits for an ipc endpoint's owner to answer before the endpoint counts as free.
IPC_PROBE_TIMEOUT_S = 0.5
# A media thread (Stage.media_thread) wakes for a call from the event loop or a stop through its wake pipe; this only
# bounds a wait should a wake-up be missed, and how often a send blocked under VideoPolicy.ALL checks for a stop.
MEDIA_WAKE_TIMEOUT_MS = 500

# The one default run folder (sockets, logs, reports); SIPBRIDGE_RUN_DIR or --run-dir choose another.
DEFAULT_RUN_DIR = "/tmp/sipbridge"
RUN_DIR_MODE = 0o700
# Set to 1 in every program of a live bridge: end of stream then ends streams, never the stage.
LIVE_ENV = "SIPBRIDGE_LIVE"


def run_dir() -> str:
    return os.environ.get("SIPBRIDGE_RUN_DIR", DEFAULT_RUN_DIR)


def make_run_dir(path: str | os.PathLike[str]) -> None:
    """Create a run folder private to this user (0700); an existing one of ours is tightened to 0700."""
    os.makedirs(path, mode=RUN_DIR_MODE, exist_ok=True)
    info = os.stat(path)
    if info.st_uid == os.getuid() and info.st_mode & 0o777 != RUN_DIR_MODE:
        os.chmod(path, RUN_DIR_MODE)


class EndpointInUse(RuntimeError):
    """An ipc endpoint that a live process still owns: binding it would silently steal its socket."""


def ipc_owner_alive(path: str) -> bool:
    """Whether a process still accepts connections on the unix socket at ``path``."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(IPC_PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False  # refused or not a socket: a leftover from a process that is gone
    finally:
        probe.close()


def check_bind_free(endpoint: str) -> None:
    """Refuse an ipc endpoint whose owner is alive (ZeroMQ would unlink it and take the socket over)."""
    if endpoint.startswith("ipc://") and ipc_owner_alive(endpoint[len("ipc://") :]):
        raise EndpointInUse(f"{endpoint} is in use by a live process; stop it or choose another endpoint/run folder")


def live_from_env() -> bool:
    return os.environ.get(LIVE_ENV, "") == "1"


def default_endpoint(name: str, suffix: str = "sock") -> str:
    return f"ipc://{run_dir()}/{name}.{suffix}"


def control_endpoint(data_endpoint: str) -> str:
    """The control edge that travels against ``data_endpoint``'s direction.

    ipc://PATH gets ipc://PATH.ctl; tcp://HOST:PORT gets tcp://HOST:PORT+1.
    """
    if data_endpoint.startswith("ipc://"):
        return data_endpoint + ".ctl"
    if data_endpoint.startswith("tcp://"):
        host, _, port = data_endpoint[len("tcp://") :].rpartition(":")
        if not port.isdigit():
            raise ValueError(f"tcp endpoint needs an explicit port: {data_endpoint}")
        return f"tcp://{host}:{int(port) + 1}"
    raise ValueError(f"unsupported endpoint {data_endpoint!r} (use ipc:// or tcp://)")


class VideoPolicy(enum.StrEnum):
    """What an edge does when raw video arrives faster than it is consumed."""

    LATEST = "latest"  # real time: drop old frames (counted), never queue
    ALL = "all"  # offline and benchmarks: block the producer, lose nothing


def _audio_time_s(msg: Message) -> tuple[str, float] | None:
    """(stream id, media time in seconds) of a real-time audio message; None for anything else."""
    if isinstance(msg, AudioFrame) or (isinstance(msg, EncodedPacket) and not msg.codec.is_video):
        header = msg.header
        return header.stream_id, header.pts * header.time_base.numerator / header.time_base.denominator
    return None


def skip_queued_audio(messages: list[Message], max_backlog_s: float) -> tuple[list[Message], int]:
    """Drop audio that a batch holds behind more than ``max_backlog_s`` of newer audio of its stream.

    Judged by media time (pts), not by capture time: the backlog a stage sees in what was already waiting for it is
    its own delay, whatever the room or the machine added before. The newest message of a stream is the reference;
    a message whose pts is ahead of it (a producer that restarted its clock) is kept. Returns (kept, dropped).
    """
    if len(messages) < 2:
        return messages, 0  # the common real-time case, once per receive: nothing can be queued behind anything
    newest: dict[str, float] = {}
    for msg in messages:
        timed = _audio_time_s(msg)
        if timed is not None:
            newest[timed[0]] = timed[1]
    if not newest:
        return messages, 0
    kept: list[Message] = []
    for msg in messages:
        timed = _audio_time_s(msg)
        if timed is not None and newest[timed[0]] - timed[1] > max_backlog_s:
            continue
        kept.append(msg)
    return kept, len(messages) - len(kept)


@dataclass
class StageOptions:
    name: str
    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    stats: str | None = None
    video_policy: VideoPolicy = VideoPolicy.LATEST
    hwm: int = DEFAULT_VIDEO_HWM_MSGS
    #: Live (a bridge): an input's end of stream ends its streams, and the stage keeps running for the producer's
    #: restart; only SIGTERM stops it. Finite (tests, files, benchmarks): the stage ends when every input has ended.
    live: bool = field(default_factory=live_from_env)


class StreamFigures:
    """Counters of one stream inside one stage."""

    __slots__ = ("bytes_in", "bytes_out", "first_ns", "frames_in", "frames_out", "last_ns", "latency_ms", "seen_s")

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW_SAMPLES)
        self.first_ns = 0  # wall clock of the first and last input: the input frame rate
        self.last_ns = 0
        self.seen_s = time.monotonic()  # last message in or out: idle streams expire


class StreamTable:
    """Per-stream figures, at most ``limit`` streams; a stream idle for ``idle_s`` expires.

    Indexing creates a stream like a defaultdict while there is room; when the table is full of live streams
    a new id gets figures that are not kept (counted in ``refused``), so no input can grow it without bound.
    """

    def __init__(self, limit: int = MAX_TRACKED_STREAMS, idle_s: float = STREAM_IDLE_EXPIRY_S) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self._items: collections.OrderedDict[str, StreamFigures] = collections.OrderedDict()
        self.refused = 0
        self.expired = 0

    def admits(self, stream_id: str) -> bool:
        """Whether ``stream_id`` is tracked or can be (after expiring idle streams)."""
        if stream_id in self._items:
            return True
        if len(self._items) >= self.limit:
            self.expire()
        return len(self._items) < self.limit

    def __getitem__(self, stream_id: str) -> StreamFigures:
        figures = self._items.get(stream_id)
        if figures is None:
            figures = StreamFigures()
            if self.admits(stream_id):
                self._items[stream_id] = figures
            else:
                self.refused += 1
                return figures
        else:
            self._items.move_to_end(stream_id)  # least recently seen first: expiry stops at the first live one
            figures.seen_s = time.monotonic()
        return figures

    def expire(self, now_s: float | None = None) -> list[tuple[str, StreamFigures]]:
        """Remove and return the streams idle for ``idle_s`` or more."""
        now_s = time.monotonic() if now_s is None else now_s
        gone = []
        while self._items:
            stream_id, figures = next(iter(self._items.items()))
            if now_s - figures.seen_s < self.idle_s:
                break
            del self._items[stream_id]
            gone.append((stream_id, figures))
        self.expired += len(gone)
        return gone

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> ItemsView[str, StreamFigures]:
        return self._items.items()

    def get(self, stream_id: str) -> StreamFigures | None:
        return self._items.get(stream_id)


def percentile(values: Iterable[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def payload_size(msg: Message) -> int:
    if isinstance(msg, (VideoFrame, AudioFrame, EncodedPacket)):
        return memoryview(msg.data).nbytes
    return 0


MEDIA_KINDS = ("audio", "video")


def refused_kinds_of(event: Event) -> frozenset[str] | None:
    """The media kinds a call's SIP peer refused, from a CALL_STATE event with ``media`` ({"audio": bool,
    "video": bool}, sent upstream by the janus stage), or None when the event says nothing about that."""
    media = event.attributes.get("media") if event.type is EventType.CALL_STATE else None
    if not isinstance(media, dict):
        return None
    return frozenset(kind for kind in MEDIA_KINDS if media.get(kind) is False)


class Stage:
    """Base class of every stage process. See the module docstring for the hooks."""

    #: Whether this stage's ``process`` wants raw video dropped when it falls behind.
    consumes_inputs = True
    #: Whether control messages from the inputs (events, errors) travel on downstream. The stages at the ends
    #: of a leg (browser, janus) end their input's direction: the bridge is a ring through them, and an event
    #: they passed on would circle the ring for the rest of the call.
    forwards_control = True
    #: Whether ``run`` installs this process's SIGTERM/SIGINT handlers. A fused process (stages/fused.py) runs
    #: several stages on one loop and stops them itself, upstream first.
    own_signals = True
    #: Whether the codec thread carries media end to end: it reads the inputs, processes and sends on the output
    #: itself, blocking, instead of the event loop handing each batch over and taking each result back. A hand-off
    #: is two thread wake-ups and a few asyncio futures per message: about a third of a light stage's CPU, whose
    #: own work is small (a passed packet, an audio frame). The event loop keeps control, statistics and what a
    #: subclass runs there; its run_codec calls reach the codec thread through a queue and a wake pipe, and its
    #: emits are sent by the codec thread, the one owner of the data sockets. Stages whose media comes from the
    #: event loop (produce(): browser, janus, sources) keep the loop's path.
    media_thread = False
    #: Whether ``process`` runs on the event loop: for a stage whose processing is no codec work and ends on the
    #: loop anyway (the janus stage wraps a packet and hands it to its peer connection), a trip to the codec thread
    #: and back is two wake-ups for nothing.
    process_on_loop = False

    def __init__(self, options: StageOptions) -> None:
        self.options = options
        self.name = options.name
        self.log = logging.LoggerAdapter(logging.getLogger("sipbridge"), {"stage": self.name})
        self._ctx = zmq.asyncio.Context()
        # One codec context per thread: every codec call of a stage runs on this one thread.
        self._codec_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-codec")
        self._out: zmq.asyncio.Socket | None = None
        self._out_control: zmq.asyncio.Socket | None = None
        self._ins: list[zmq.asyncio.Socket] = []
        # media_thread: the data sockets, plain (blocking) ones on the same ZeroMQ context, used by the codec thread
        # only; the calls the event loop makes on that thread while it carries media, and the pipe that wakes it.
        self._media_out: zmq.Socket[Any] | None = None
        self._media_ins: list[zmq.Socket[Any]] = []
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue())
        self._calls_lock = threading.Lock()
        self._media_running = False  # the codec thread is in _media_main: run_codec goes through _calls
        self._media_stop = False
        self._wake_r, self._wake_w = -1, -1
        self._in_controls: list[zmq.asyncio.Socket] = []
        self._stats_pub: zmq.asyncio.Socket | None = None
        self._out_monitor: zmq.asyncio.Socket | None = None
        self._consumers = 0
        self._last_batch = 0
        self._audio_send_stalled = False  # the last audio send found no room within AUDIO_SEND_WAIT_MS
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumers_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closed = False
        self._eos_inputs = 0
        self._disconnects = 0  # consumers that hung up on the output, ever
        self.streams = StreamTable()
        # Which streams came in on which input: a live stage ends exactly those when that input ends.
        self._input_streams: list[set[str]] = []
        self.drops: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.keyframe_requests_in = 0
        self.keyframe_requests_out = 0
        self.control_forwarded = 0  # downstream control messages passed on (events, errors)
        self.control_ended = 0  # downstream control messages this stage ends (forwards_control False)
        self.control_upstream = 0  # events that came upstream from a consumer (see _on_upstream_event)
        # Media kinds the SIP peer refused (an upstream CALL_STATE with "media"): a stage makes none of them
        # (compose, encode, decode) while it holds. Replaced whole, so the codec thread reads it safely.
        self.refused_kinds: frozenset[str] = frozenset()
        self._process_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW_SAMPLES)
        self._last_error_log = 0.0
        self._started_ns = time.time_ns()
        self._memtrace: memtrace.MemoryTrace | None = None  # SIPBRIDGE_TRACEMALLOC_S (stages/memtrace.py)
        self.exit_code = 0

    # ----- hooks ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Open codecs and other per-thread state (codec thread)."""

    def process(self, msg: Message) -> Iterable[Message]:
        """Default: pass the message through unchanged (codec thread)."""
        return (msg,)

    def flush(self, stream_id: str) -> Iterable[Message]:
        """Drain buffered output of ``stream_id``, or of every stream for "" (codec thread)."""
        return ()

    def on_keyframe_request(self, request: KeyframeRequest) -> bool:
        """Handle a consumer's keyframe request (codec thread). False passes it upstream."""
        return False

    async def on_control(self, msg: Message) -> None:
        """See a control message (event, error) from an input before it is passed on or ended (event loop)."""

    async def produce(self) -> None:
        """Create media for stages without inputs; return when the stream is over."""

    def extra_figures(self) -> dict[str, Any]:
        """Stage-specific figures added to the periodic statistics."""
        return {}

    def teardown(self) -> None:
        """Release codec-thread resources (codec thread)."""

    # ----- helpers for subclasses ------------------------------------------------------------
    async def run_codec(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the codec thread and return its result."""
        queued = self._call_on_media_thread(fn, *args)
        if queued is not None:
            return await asyncio.wrap_future(queued)
        return await asyncio.get_running_loop().run_in_executor(self._codec_thread, fn, *args)

    def _call_on_media_thread(self, fn: Any, *args: Any) -> concurrent.futures.Future[Any] | None:
        """Queue a call for the codec thread while it carries media (else None: the executor takes it)."""
        with self._calls_lock:
            if not self._media_running:
                return None
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._calls.put((fn, args, future))
        self._wake_media_thread()
        return future

    def _wake_media_thread(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe wakes it already; a closed one has nobody to wake
            os.write(self._wake_w, b"\0")

    def _run_calls(self) -> None:
        """Codec thread: the event loop's queued calls, in order."""
        while True:
            try:
                fn, args, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up (a cancelled task)
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting caller, as run_in_executor would
                future.set_exception(exc)

    def report_error(self, code: str, message: str, stream_id: str = "", call_id: str = "") -> None:
        """Count an error, log it (rate-limited) and publish it on the statistics socket."""
        self.errors[code] += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            self.log.error(
                "%s: %s (stream=%s call=%s, %d so far)",
                code,
                message,
                stream_id or "-",
                call_id or "-",
                self.errors[code],
            )
        self._publish(ErrorReport(self.name, code, message, stream_id, call_id))

    async def emit(self, msg: Message) -> bool:
        """Send one message downstream under the edge's backpressure policy.

        Returns False when the message was dropped. Nothing on this path ends the stage: a message that cannot
        be encoded (a transform that labelled its output wrongly) or sent is a counted drop and a log line.
        """
        if self.media_thread:
            return bool(await self.run_codec(self._emit_now, msg))
        try:
            return await self._emit(msg)
        except (asyncio.CancelledError, zmq.ContextTerminated):
            raise
        except Exception as exc:
            self._emit_failed(msg, exc)
            return False

    def _emit_failed(self, msg: Message, exc: Exception) -> None:
        self.drops["emit_error"] += 1
        stream_id = getattr(getattr(msg, "header", None), "stream_id", "") or getattr(msg, "stream_id", "")
        self.report_error("emit_failed", f"{type(msg).__name__} not sent: {type(exc).__name__}: {exc}", str(stream_id))

    def _send_plan(self, msg: Message) -> tuple[list[Any], bool, int | None]:
        """The edge's backpressure policy for one message: (parts, copy, how long it may wait for room in ms, None
        for as long as it takes).

        Under VideoPolicy.ALL everything waits. Real-time video never waits: the consumer keeps up or misses a frame
        (encoded video then asks for a keyframe, see _unsent). Audio may wait briefly for room, but a consumer that is
        gone or stalled must not stall this stage: once a wait ran out, further audio is dropped at once until a
        send goes through again. Waiting 200 ms per message would slow this stage to 5 messages a second, and its
        own producers would queue up behind it (a stalled decoder made the browser stage's page socket hold seconds
        of media). Events still wait.
        """
        parts = protocol.encode(msg)
        copy = payload_size(msg) < ZERO_COPY_THRESHOLD_BYTES
        if self.options.video_policy is VideoPolicy.ALL:
            return parts, copy, None
        if isinstance(msg, VideoFrame) or (isinstance(msg, EncodedPacket) and msg.codec.is_video):
            return parts, copy, 0
        stalled = self._audio_send_stalled and isinstance(msg, (AudioFrame, EncodedPacket))
        return parts, copy, 0 if stalled else AUDIO_SEND_WAIT_MS

    def _unsent(self, msg: Message) -> KeyframeRequest | None:
        """Count a message that found no room; for encoded video, the keyframe request that resynchronises the
        consumer, who will miss a reference frame (made here if this stage encodes, else asked upstream)."""
        if isinstance(msg, VideoFrame) or (isinstance(msg, EncodedPacket) and msg.codec.is_video):
            self.drops["send_full"] += 1
            return KeyframeRequest(msg.header.stream_id, "dropped on send") if isinstance(msg, EncodedPacket) else None
        self._audio_send_stalled = self._audio_send_stalled or isinstance(msg, (AudioFrame, EncodedPacket))
        self.drops["send_timeout"] += 1
        return None

    def _sent(self, msg: Message) -> None:
        if isinstance(msg, (VideoFrame, AudioFrame, EncodedPacket)):
            if _audio_time_s(msg) is not None:
                self._audio_send_stalled = False
            figures = self.streams[msg.header.stream_id]
            figures.frames_out += 1
            figures.bytes_out += payload_size(msg)

    async def _emit(self, msg: Message) -> bool:
        if self._out is None:
            return False
        parts, copy, wait_ms = self._send_plan(msg)
        if wait_ms is None:
            await self._out.send_multipart(parts, copy=copy)
        elif not await self._send_waiting(parts, copy, wait_ms):
            request = self._unsent(msg)
            if request is not None and not await self.run_codec(self.on_keyframe_request, request):
                await self.request_keyframe_upstream(request.stream_id, request.reason)
            return False
        self._sent(msg)
        return True

    def _emit_now(self, msg: Message) -> bool:
        """Codec thread, media_thread: ``emit`` on the blocking output socket."""
        if self._media_out is None:
            return False
        try:
            parts, copy, wait_ms = self._send_plan(msg)
            if not self._send_now(parts, copy, wait_ms):
                request = self._unsent(msg)
                if request is not None and not self.on_keyframe_request(request):
                    self.request_keyframe_threadsafe(request.stream_id, request.reason)
                return False
        except zmq.ContextTerminated:
            raise
        except Exception as exc:
            self._emit_failed(msg, exc)
            return False
        self._sent(msg)
        return True

    def _send_now(self, parts: list[Any], copy: bool, timeout_ms: int | None) -> bool:
        """Codec thread: send if there is room within ``timeout_ms`` (None: until there is, or until a stop while
        media runs, as the loop's send would be cancelled then)."""
        out = self._media_out
        assert out is not None
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            try:
                out.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
                return True
            except zmq.Again:
                pass
            if deadline is None:
                if self._media_running and self._media_stop:
                    return False
                wait_ms = MEDIA_WAKE_TIMEOUT_MS
            else:
                wait_ms = int((deadline - time.monotonic()) * 1000)
                if wait_ms <= 0:
                    return False
            out.poll(wait_ms, zmq.POLLOUT)

    async def _send_waiting(self, parts: list[Any], copy: bool, timeout_ms: int) -> bool:
        """Send now if there is room (the common case, no poller); else wait up to ``timeout_ms`` for room."""
        assert self._out is not None
        try:
            await self._out.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            pass
        if not await self._writable_within(timeout_ms):
            return False
        try:
            await self._out.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            return False

    async def _writable_within(self, timeout_ms: int) -> bool:
        assert self._out is not None
        events = await self._out.poll(timeout_ms, zmq.POLLOUT)  # type: ignore[call-arg]  # stub lacks flags
        return bool(events)

    async def _send_control(self, msg: Message, timeout_s: float = EOS_DRAIN_TIMEOUT_S) -> bool:
        """Send a downstream control message in order with media; give up if nobody takes it."""
        if self.media_thread:
            return bool(await self.run_codec(self._send_control_now, msg, timeout_s))
        parts = self._control_parts(msg) if self._out is not None else None
        if parts is None:
            return False
        if not await self._send_waiting(parts, True, int(timeout_s * 1000)):
            self.drops["control_timeout"] += 1
            return False
        return True

    def _send_control_now(self, msg: Message, timeout_s: float = EOS_DRAIN_TIMEOUT_S) -> bool:
        """Codec thread, media_thread: ``_send_control`` on the blocking output socket."""
        parts = self._control_parts(msg) if self._media_out is not None else None
        if parts is None:
            return False
        if not self._send_now(parts, True, int(timeout_s * 1000)):
            self.drops["control_timeout"] += 1
            return False
        return True

    def _control_parts(self, msg: Message) -> list[Any] | None:
        try:
            return protocol.encode(msg)
        except ProtocolError as exc:
            self.drops["emit_error"] += 1
            self.report_error("emit_failed", f"{type(msg).__name__} not sent: {exc}")
            return None

    def request_keyframe_threadsafe(self, stream_id: str, reason: str) -> None:
        """``request_keyframe_upstream`` from the codec thread (the control sockets belong to the event loop)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.request_keyframe_upstream(stream_id, reason), self._loop)

    async def request_keyframe_upstream(self, stream_id: str, reason: str) -> None:
        parts = protocol.encode(KeyframeRequest(stream_id, reason))
        for sock in self._in_controls:
            with contextlib.suppress(zmq.Again):
                await sock.send_multipart(parts, flags=zmq.NOBLOCK)
                self.keyframe_requests_out += 1

    async def send_upstream(self, msg: Message) -> None:
        """Send a control message to every producer of this stage's inputs, on their control sockets: it never
        waits behind media (a full socket drops it rather than block)."""
        parts = protocol.encode(msg)
        for sock in self._in_controls:
            with contextlib.suppress(zmq.Again):
                await sock.send_multipart(parts, flags=zmq.NOBLOCK)

    async def _on_upstream_event(self, event: Event) -> None:
        """An event a consumer sent upstream (the janus stage: the media kinds the SIP peer took): noted, then passed
        on hop by hop, except by the ends of a leg (the browser's inputs are the other direction of the ring)."""
        self.control_upstream += 1
        refused = refused_kinds_of(event)
        if refused is not None and refused != self.refused_kinds:
            self.refused_kinds = refused
            call_id = event.attributes.get("call_id", "-")
            if refused:
                self.log.info("call %s: the SIP peer refused %s: none is made here until a call takes it", call_id,
                              " and ".join(sorted(refused)))
            else:
                self.log.info("call %s: the SIP peer takes every media kind again", call_id)
        if self.forwards_control:
            await self.send_upstream(event)

    async def wait_for_consumers(self, timeout_s: float) -> bool:
        """Wait until at least one consumer is connected to the output; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._consumers == 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._consumers_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._consumers_changed.wait(), remaining)
        return True

    def request_stop(self) -> None:
        self._stopping.set()

    # ----- runtime --------------------------------------------------------------------------
    def _open_sockets(self) -> None:
        opts = self.options
        for endpoint in (opts.output, control_endpoint(opts.output) if opts.output else None, opts.stats):
            if endpoint:
                check_bind_free(endpoint)
        # media_thread: blocking data sockets on the same context (inproc and the monitor still reach them).
        plain: zmq.Context[Any] | None = zmq.Context.shadow(self._ctx.underlying) if self.media_thread else None
        if opts.output:
            out = self._socket(zmq.PUSH) if plain is None else self._plain_socket(plain, zmq.PUSH)
            out.setsockopt(zmq.SNDHWM, opts.hwm)
            # The monitor first: a consumer accepted between bind and monitor would never be counted, and at the
            # end this stage would find "no consumer" and skip the end of stream it is waiting for (seen under load).
            # The monitor's own end is the event loop's whoever owns the output.
            monitor_endpoint = f"inproc://monitor.{self.name}.{id(out)}"
            out.monitor(monitor_endpoint, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self._out_monitor = self._socket(zmq.PAIR)
            self._out_monitor.connect(monitor_endpoint)
            out.bind(opts.output)
            if plain is None:
                self._out = out  # type: ignore[assignment]  # made by the asyncio context
            else:
                self._media_out = out
            self._out_control = self._socket(zmq.PULL)
            self._out_control.bind(control_endpoint(opts.output))
        for endpoint in opts.inputs:
            sock = self._socket(zmq.PULL) if plain is None else self._plain_socket(plain, zmq.PULL)
            sock.setsockopt(zmq.RCVHWM, opts.hwm)
            sock.connect(endpoint)
            if plain is None:
                self._ins.append(sock)  # type: ignore[arg-type]  # made by the asyncio context
            else:
                self._media_ins.append(sock)
            self._input_streams.append(set())
            ctl = self._socket(zmq.PUSH)
            ctl.setsockopt(zmq.SNDHWM, 16)
            ctl.connect(control_endpoint(endpoint))
            self._in_controls.append(ctl)
        if opts.stats:
            self._stats_pub = self._socket(zmq.PUB)
            self._stats_pub.setsockopt(zmq.SNDHWM, 64)
            self._stats_pub.bind(opts.stats)

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, LINGER_ON_CLOSE_MS)
        return sock

    @staticmethod
    def _plain_socket(context: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, LINGER_ON_CLOSE_MS)
        return sock

    def _publish(self, msg: Message) -> None:
        if self._stats_pub is None:
            return
        if self._loop is not None and not self._on_loop_thread():
            # Sockets belong to the event loop's thread; codec-thread callers hand the message over.
            self._loop.call_soon_threadsafe(self._publish, msg)
            return
        with contextlib.suppress(zmq.Again):
            # PUB never blocks; the asyncio wrapper returns a done future here.
            self._stats_pub.send_multipart(protocol.encode(msg), flags=zmq.NOBLOCK)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def run(self) -> int:
        """Run until end of stream or SIGTERM/SIGINT; return the process exit code."""
        self._loop = asyncio.get_running_loop()
        for endpoint in [self.options.output, self.options.stats]:
            if endpoint and endpoint.startswith("ipc://"):
                make_run_dir(os.path.dirname(endpoint[len("ipc://") :]) or ".")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT) if self.own_signals else ():
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            trace_interval_s = memtrace.interval_from_env()
            self._open_sockets()
        except (EndpointInUse, ValueError) as refused:
            self.log.error("%s", refused)
            await self.close()
            return 2
        if trace_interval_s is not None:
            self._memtrace = memtrace.MemoryTrace(trace_interval_s, self.log)
        await self.run_codec(self.setup)
        self.log.info(
            "started: inputs=%s output=%s stats=%s policy=%s hwm=%d%s",
            self.options.inputs,
            self.options.output,
            self.options.stats,
            self.options.video_policy.value,
            self.options.hwm,
            " live" if self.options.live else "",
        )
        tasks = [asyncio.create_task(self._stats_loop(), name="stats")]
        if self._out_control is not None:
            tasks.append(asyncio.create_task(self._control_loop(), name="control"))
        if self._out_monitor is not None:
            tasks.append(asyncio.create_task(self._monitor_consumers(), name="monitor"))
        work: list[asyncio.Future[Any]] = []
        for index, sock in enumerate(self._ins):
            work.append(asyncio.create_task(self._input_loop(index, sock), name=f"input{index}"))
        media: asyncio.Future[None] | None = None
        if self._media_ins:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with self._calls_lock:
                self._media_running = True
            media = asyncio.wrap_future(self._codec_thread.submit(self._media_main))
            work.append(media)
        work.append(asyncio.create_task(self._produce_and_finish(), name="produce"))
        stop_wait = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([*work, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_wait and task.exception() is not None:
                exc = task.exception()
                self.log.error("stage failed: %r", exc, exc_info=exc)
                self.exit_code = 1
                self._stopping.set()
        if not self._stopping.is_set():
            await self._stopping.wait()
        if media is not None:
            # The codec thread ends its batch and returns; the loop's pending calls run on it first.
            self._media_stop = True
            self._wake_media_thread()
            await asyncio.wait([media])
        for task in [*work, stop_wait]:
            task.cancel()
        await asyncio.gather(*work, stop_wait, return_exceptions=True)
        # Hang up on the producers now: each of them waits for that before it exits.
        for sock in self._ins:
            sock.close(linger=0)
        for plain in self._media_ins:
            plain.close(linger=0)
        if self.exit_code == 0:
            await self._finish()
        else:
            # A crash is not an end: consumers keep their state and wait for this stage's restart.
            self.log.error("exiting %d without end of stream: consumers wait for the restart", self.exit_code)
            self._publish_stats()
        # The work is flushed and the end of stream sent: a late SIGTERM (supervisord signals every stage
        # at shutdown) must not turn a clean exit into "terminated by SIGTERM" once the loop is gone.
        for sig in (signal.SIGTERM, signal.SIGINT) if self.own_signals else ():
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.close()
        return self.exit_code

    def _on_signal(self, sig: int) -> None:
        self.log.info("received %s: flushing and sending end of stream", signal.Signals(sig).name)
        self._stopping.set()

    async def _produce_and_finish(self) -> None:
        await self.produce()
        if not self.options.inputs:
            self._stopping.set()
        else:
            await asyncio.Event().wait()  # inputs decide when the stage ends

    async def _finish(self) -> None:
        await self._flush_and_emit("")
        has_output = self._out is not None or self._media_out is not None
        if has_output and self._consumers == 0:
            self.log.info("no consumer connected: nobody to send the end of stream to")
        elif has_output:
            disconnects = self._disconnects
            if await self._send_control(EndOfStream("")):
                await self._wait_for_consumers_to_leave(disconnects)
            else:
                self.log.warning("no consumer took the end of stream within %.0f s", EOS_DRAIN_TIMEOUT_S)
        self._publish_stats()
        self.log.info("finished: %s", self._summary_line())

    async def _monitor_consumers(self) -> None:
        assert self._out_monitor is not None
        while True:
            event = await zmq.utils.monitor.recv_monitor_message(self._out_monitor)  # type: ignore[arg-type]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._consumers += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._consumers = max(0, self._consumers - 1)
                self._disconnects += 1
            self._consumers_changed.set()

    async def _wait_for_consumers_to_leave(self, disconnects_before: int) -> None:
        """Closing with messages still queued would lose them (ZeroMQ drops a pipe's backlog when its
        peer goes away), so wait until the consumer has read the end of stream and hung up. A live consumer
        hangs up and connects again at once (to this stage's restart): one hang-up since the end of stream
        is enough, as an edge has exactly one consumer."""
        deadline = time.monotonic() + EOS_DRAIN_TIMEOUT_S
        while self._consumers > 0 and self._disconnects == disconnects_before:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.log.warning(
                    "consumer still connected %.0f s after end of stream; closing anyway", EOS_DRAIN_TIMEOUT_S
                )
                return
            self._consumers_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._consumers_changed.wait(), remaining)

    async def _input_loop(self, index: int, sock: zmq.asyncio.Socket) -> None:
        while True:
            batch = [await sock.recv_multipart(copy=False)]
            # Drain what is already queued so a slow stage sees its backlog and can skip stale video.
            while len(batch) < MAX_RECEIVE_BATCH_MSGS and self._readable(sock):
                batch.append(await sock.recv_multipart(copy=False))
            for run in self._runs(batch):
                if isinstance(run, list):
                    await self._handle_media(run, index)
                elif isinstance(run, EndOfStream):
                    if await self._on_end_of_stream(run, index, sock):
                        return
                else:
                    await self._handle_control(run)

    def _runs(self, batch: list[list[zmq.Frame]]) -> Iterator[list[Message] | Message]:
        """The messages of one receive in order, as runs of media and single control messages: control keeps its
        place among the media (what came before it is handled first)."""
        media: list[Message] = []
        for msg in self._decode_batch(batch):
            if isinstance(msg, (VideoFrame, AudioFrame, EncodedPacket)):
                media.append(msg)
                continue
            if media:
                yield media
                media = []
            yield msg
        if media:
            yield media

    def _decode_batch(self, batch: list[list[zmq.Frame]]) -> list[Message]:
        """The messages of one receive, malformed ones counted and dropped, stale media skipped in real time."""
        self._last_batch = len(batch)
        messages: list[Message] = []
        for frames in batch:
            try:
                messages.append(protocol.decode([f.buffer for f in frames]))
            except ProtocolError as exc:
                self.drops["malformed"] += 1
                self.report_error("malformed_message", str(exc))
        if self.options.video_policy is VideoPolicy.LATEST:
            messages = self._skip_stale_video(messages)
            messages, stale_audio = skip_queued_audio(messages, MAX_AUDIO_BACKLOG_S)
            if stale_audio:
                self.drops["stale_audio"] += stale_audio
        return messages

    # ----- media_thread: the codec thread carries media ----------------------------------------
    def _media_main(self) -> None:
        """Codec thread: read every input, process, send, and run the event loop's calls in between, until a stop
        or (finite stages) the end of every input."""
        poller = zmq.Poller()
        for sock in self._media_ins:
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._media_stop:
                ready = dict(poller.poll(MEDIA_WAKE_TIMEOUT_MS))
                if self._wake_r in ready:
                    self._drain_wake()
                self._run_calls()
                for index, sock in enumerate(self._media_ins):
                    if sock in ready and not self._media_stop and self._media_input(index, sock):
                        return
        finally:
            with self._calls_lock:
                self._media_running = False
            self._run_calls()  # queued before the flag fell: their callers wait for them

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _media_input(self, index: int, sock: zmq.Socket[Any]) -> bool:
        """Codec thread: one receive of an input, handled in order; True when the stage is over (finite only)."""
        batch: list[list[zmq.Frame]] = []
        while len(batch) < MAX_RECEIVE_BATCH_MSGS:
            try:
                batch.append(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        for run in self._runs(batch):
            if isinstance(run, list):
                self._media_batch(run, index)
            elif isinstance(run, EndOfStream):
                if self._media_end_of_stream(run, index, sock):
                    return True
            else:
                self._wait_for_loop(self._handle_control(run))
        return False

    def _media_batch(self, batch: list[Message], index: int) -> None:
        """Codec thread: ``_handle_media`` without the hand-offs."""
        for msg in self._admit_batch(batch, index):
            outputs, elapsed_ms = self._process_one(msg)
            if isinstance(outputs, Exception):
                self._process_failed(msg, outputs)
                continue
            self._process_ms.append(elapsed_ms)
            for out in outputs:
                self._emit_now(out)

    def _media_end_of_stream(self, msg: EndOfStream, index: int, sock: zmq.Socket[Any]) -> bool:
        """Codec thread: ``_on_end_of_stream``."""
        if msg.stream_id:
            self._media_end_stream(msg.stream_id, index)
            return False
        if self.options.live:
            for stream_id in self._live_input_ended(index):
                self._media_end_stream(stream_id, index)
            self._reconnect(sock, index)
            return False
        if self._last_input_ended():
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._stopping.set)
            return True
        return False

    def _media_end_stream(self, stream_id: str, index: int) -> None:
        for out in self._flush_outputs(stream_id):
            self._emit_now(out)
        self._input_streams[index].discard(stream_id)
        if self.forwards_control:
            self._send_control_now(EndOfStream(stream_id))

    def _wait_for_loop(self, coro: Any) -> None:
        """Codec thread: run a coroutine on the event loop and wait for it, running the calls it makes here."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        future.add_done_callback(lambda _done: self._wake_media_thread())
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        while not future.done():
            if poller.poll(MEDIA_WAKE_TIMEOUT_MS):
                self._drain_wake()
            self._run_calls()
        future.result()

    @staticmethod
    def _readable(sock: zmq.asyncio.Socket) -> bool:
        try:
            return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)
        except zmq.ZMQError:
            return False

    def _skip_stale_video(self, messages: list[Message]) -> list[Message]:
        newest: dict[str, int] = {}
        for i, msg in enumerate(messages):
            if isinstance(msg, VideoFrame):
                newest[msg.header.stream_id] = i
        if len(newest) == sum(isinstance(m, VideoFrame) for m in messages):
            return messages
        kept = []
        for i, msg in enumerate(messages):
            if isinstance(msg, VideoFrame) and newest[msg.header.stream_id] != i:
                self.drops["stale_video"] += 1
                continue
            kept.append(msg)
        return kept

    def _flush_outputs(self, stream_id: str) -> list[Message]:
        """Codec thread: what ``flush`` gives; nothing, counted and reported, if it fails."""
        try:
            return list(self.flush(stream_id))
        except Exception as exc:
            self.drops["flush_error"] += 1
            self.report_error("flush_failed", f"{type(exc).__name__}: {exc}", stream_id)
            return []

    async def _flush_and_emit(self, stream_id: str) -> None:
        for out in await self.run_codec(self._flush_outputs, stream_id):
            await self.emit(out)

    async def _end_stream(self, stream_id: str, index: int | None) -> None:
        await self._flush_and_emit(stream_id)
        if index is not None:
            self._input_streams[index].discard(stream_id)
        if self.forwards_control:
            await self._send_control(EndOfStream(stream_id))

    async def _on_end_of_stream(self, msg: EndOfStream, index: int, sock: zmq.asyncio.Socket) -> bool:
        """End a stream, or everything an input sent; returns True when the stage is over (finite only)."""
        if msg.stream_id:
            await self._end_stream(msg.stream_id, index)
            return False
        if self.options.live:
            for stream_id in self._live_input_ended(index):
                await self._end_stream(stream_id, index)
            self._reconnect(sock, index)
            return False
        if self._last_input_ended():
            self._stopping.set()
            return True
        return False

    def _live_input_ended(self, index: int) -> list[str]:
        """The producer stopped (a restart, or the bridge stopping in order): its streams ended, the bridge did
        not. What came from it is flushed, then the stage hangs up and connects again (``_reconnect``)."""
        ended = sorted(self._input_streams[index])
        self.log.info("input %s ended (%s); staying up for its restart", self.options.inputs[index],
                      ", ".join(ended) or "no streams")
        return ended

    def _reconnect(self, sock: zmq.Socket[Any], index: int) -> None:
        """The hang-up tells the producer that everything was read; the new connection finds its restart."""
        endpoint = self.options.inputs[index]
        with contextlib.suppress(zmq.ZMQError):
            sock.disconnect(endpoint)
        sock.connect(endpoint)

    def _last_input_ended(self) -> bool:
        self._eos_inputs += 1
        if self._eos_inputs >= len(self.options.inputs):
            self.log.info("end of stream on every input")
            return True
        return False

    def _admit(self, msg: VideoFrame | AudioFrame | EncodedPacket, index: int | None, now: int) -> bool:
        """Count one media message in; False when it is dropped before any work (bounded state)."""
        stream_id = msg.header.stream_id
        if not self.streams.admits(stream_id):
            # Untrusted input must not grow this stage's per-stream state (figures, codec contexts) without
            # bound: a new stream waits until an idle one has expired.
            self.drops["too_many_streams"] += 1
            self.report_error("too_many_streams", f"more than {self.streams.limit} live streams", stream_id)
            return False
        if index is not None and len(self._input_streams[index]) < self.streams.limit:
            self._input_streams[index].add(stream_id)
        figures = self.streams[stream_id]
        figures.frames_in += 1
        figures.bytes_in += payload_size(msg)
        figures.last_ns = now
        if not figures.first_ns:
            figures.first_ns = now
        if msg.header.capture_time_ns:
            figures.latency_ms.append((now - msg.header.capture_time_ns) / 1e6)
        return True

    async def _handle_media(self, batch: list[Message], index: int | None = None) -> None:
        """Process media received together in one hand-off to the codec thread, audio first, and emit each
        message's outputs as soon as the codec thread is done with it.

        One hand-off per message cost a thread wake-up each, and on a loaded machine a wake-up waits for a time
        slice: the stage fell behind its producer on hand-offs, not on work. Audio goes first (stable within each
        kind; streams are independent) because it is cheap and late audio is heard, while video behind it only
        waits for as long as the audio takes. Results come back one by one while the thread goes on, so the first
        message's outputs do not wait for the rest of the batch.
        """
        admitted = self._admit_batch(batch, index)
        if self.process_on_loop:
            for msg in admitted:
                await self._deliver(msg, *self._process_one(msg))
            return
        if not admitted:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Queue[tuple[list[Message] | Exception, float] | None] = asyncio.Queue()

        def finished(result: tuple[list[Message] | Exception, float]) -> None:
            loop.call_soon_threadsafe(done.put_nowait, result)

        worker = asyncio.ensure_future(self.run_codec(self._process_batch, admitted, finished))
        # After the last result (the thread queued those before it returned); alone if the batch never ran.
        worker.add_done_callback(lambda _f: done.put_nowait(None))
        try:
            for msg in admitted:
                result = await done.get()
                if result is None:
                    break  # the codec thread refused the batch: `await worker` below raises why
                await self._deliver(msg, *result)
        finally:
            await worker

    async def _deliver(self, msg: Message, outputs: list[Message] | Exception, elapsed_ms: float) -> None:
        """Emit what processing ``msg`` gave, or count the exception that dropped it."""
        if isinstance(outputs, Exception):
            self._process_failed(msg, outputs)
            return
        self._process_ms.append(elapsed_ms)
        for out in outputs:
            await self.emit(out)

    def _admit_batch(self, batch: list[Message], index: int | None) -> list[Message]:
        """The media of one receive that is admitted, audio first (see ``_handle_media``)."""
        now = time.time_ns()
        admitted = [m for m in batch if self._admit(m, index, now)]  # type: ignore[arg-type]  # media only
        if len(admitted) > 1:
            admitted.sort(key=lambda m: _audio_time_s(m) is None)
        return admitted

    def _process_one(self, msg: Message) -> tuple[list[Message] | Exception, float]:
        """Codec thread: one message's outputs, or the exception that dropped it, and the milliseconds it took."""
        started = time.perf_counter()
        outputs: list[Message] | Exception
        try:
            outputs = list(self.process(msg))
        except Exception as exc:
            outputs = exc
        return outputs, (time.perf_counter() - started) * 1000

    def _process_failed(self, msg: Message, exc: Exception) -> None:
        self.drops["process_error"] += 1
        self.report_error("process_failed", f"{type(exc).__name__}: {exc}",
                          msg.header.stream_id)  # type: ignore[union-attr]  # media only

    async def _handle_control(self, msg: Message) -> None:
        try:
            await self.on_control(msg)
        except Exception as exc:
            self.report_error("control_failed", f"{type(exc).__name__}: {exc}")
        if self.forwards_control:
            # Control messages that travel downstream (events, errors) pass through.
            self.control_forwarded += 1
            await self._send_control(msg)
        else:
            self.control_ended += 1

    def _process_batch(self, batch: list[Message],
                       finished: Callable[[tuple[list[Message] | Exception, float]], None]) -> None:
        """Codec thread: each message's outputs, or the exception that dropped it (one bad message drops alone),
        with the milliseconds it took, handed to ``finished`` in order as each is done."""
        for msg in batch:
            finished(self._process_one(msg))

    async def _control_loop(self) -> None:
        assert self._out_control is not None
        while True:
            frames = await self._out_control.recv_multipart(copy=False)
            try:
                msg = protocol.decode([f.buffer for f in frames])
            except ProtocolError as exc:
                self.drops["malformed_control"] += 1
                self.report_error("malformed_control", str(exc))
                continue
            if isinstance(msg, KeyframeRequest):
                self.keyframe_requests_in += 1
                try:
                    handled = await self.run_codec(self.on_keyframe_request, msg)
                except Exception as exc:  # the control loop must outlive one bad request
                    self.report_error("keyframe_request_failed", f"{type(exc).__name__}: {exc}", msg.stream_id)
                    continue
                if not handled:
                    await self.request_keyframe_upstream(msg.stream_id, msg.reason)
            elif isinstance(msg, Event):
                try:
                    await self._on_upstream_event(msg)
                except Exception as exc:  # the control loop must outlive one bad event
                    self.report_error("upstream_event_failed", f"{type(exc).__name__}: {exc}")

    async def _stats_loop(self) -> None:
        next_log = time.monotonic() + LOG_STATS_INTERVAL_S
        while True:
            await asyncio.sleep(min(HEARTBEAT_INTERVAL_S, STATS_INTERVAL_S))
            self._publish(Heartbeat(self.name, time.time_ns(), os.getpid()))
            await self._expire_idle_streams()
            # media_thread: the codec thread changes the figures as it goes, so it reads them too.
            figures = await self.run_codec(self.figures) if self._media_running else self.figures()
            self._publish(Stats(self.name, time.time_ns(), figures))
            if time.monotonic() >= next_log:
                next_log += LOG_STATS_INTERVAL_S
                self.log.info("%s", await self.run_codec(self._summary_line) if self._media_running
                              else self._summary_line())
            if self._memtrace is not None and self._memtrace.due():
                self._memtrace.step()

    async def _expire_idle_streams(self) -> None:
        """An idle stream is over: forget its figures and flush its codec state (bounded memory)."""
        ended = await self.run_codec(self._expire_streams) if self._media_running else self._expire_streams()
        for stream_id in ended:
            self.log.info("stream %s idle for %.0f s: ended", stream_id, self.streams.idle_s)
            await self._flush_and_emit(stream_id)

    def _expire_streams(self) -> list[str]:
        """Forget idle streams; those that carried media, to flush."""
        ended = []
        for stream_id, figures in self.streams.expire():
            for streams in self._input_streams:
                streams.discard(stream_id)
            if figures.frames_in:
                ended.append(stream_id)
        return ended

    def figures(self) -> dict[str, Any]:
        now = time.time_ns()
        streams = {}
        for stream_id, f in self.streams.items():
            span_s = (f.last_ns - f.first_ns) / 1e9 if f.first_ns else 0.0
            streams[stream_id] = {
                "frames_in": f.frames_in,
                "frames_out": f.frames_out,
                "bytes_in": f.bytes_in,
                "bytes_out": f.bytes_out,
                # A stage that counts frames without their times (or one frame) has no rate to show.
                "fps_in": round((f.frames_in - 1) / span_s, 2) if f.frames_in > 1 and span_s > 0 else 0.0,
                "latency_ms_p50": percentile(f.latency_ms, 0.5),
                "latency_ms_p95": percentile(f.latency_ms, 0.95),
                "idle_s": round((now - f.last_ns) / 1e9, 3) if f.last_ns else None,
            }
        return {
            "pid": os.getpid(),
            "uptime_s": round((now - self._started_ns) / 1e9, 3),
            "streams": streams,
            "drops": dict(self.drops),
            "errors": dict(self.errors),
            "process_ms_p50": percentile(self._process_ms, 0.5),
            "process_ms_p95": percentile(self._process_ms, 0.95),
            # Messages found waiting at the last read. Never ask the sockets here: reading ZMQ_EVENTS from
            # another task would consume the edge-triggered wake-up a pending receive is waiting for.
            "input_backlog": self._last_batch,
            "codec_queue": self._codec_thread._work_queue.qsize() + self._calls.qsize(),
            "keyframe_requests_in": self.keyframe_requests_in,
            "keyframe_requests_out": self.keyframe_requests_out,
            "streams_refused": self.streams.refused,
            "streams_expired": self.streams.expired,
            "control_forwarded": self.control_forwarded,
            "control_ended": self.control_ended,
            "control_upstream": self.control_upstream,
            "refused_kinds": sorted(self.refused_kinds),
            # glibc's heap (in use / free inside it / mmapped): a soak tells a leak from fragmentation by it.
            "malloc": memtrace.malloc_figures(),
            **self.extra_figures(),
        }

    def _publish_stats(self) -> None:
        self._publish(Stats(self.name, time.time_ns(), self.figures()))

    def _summary_line(self) -> str:
        parts = []
        for stream_id, f in sorted(self.streams.items()):
            p50 = percentile(f.latency_ms, 0.5)
            lat = f" lat50={p50:.1f}ms" if p50 is not None else ""
            parts.append(f"{stream_id}: in={f.frames_in} out={f.frames_out}{lat}")
        drops = ",".join(f"{k}={v}" for k, v in sorted(self.drops.items())) or "0"
        return f"{'; '.join(parts) or 'no media yet'} | drops {drops}"

    async def close(self) -> None:
        """Release sockets and the codec thread; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.run_codec(self.teardown)
        self._codec_thread.shutdown(wait=True)
        for out in (self._out, self._media_out):
            if out is not None and self._out_monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    out.monitor(None, 0)  # type: ignore[arg-type]  # stub lacks None, which stops the monitor
        for sock in [self._out_monitor, self._out, self._media_out, self._out_control, *self._ins, *self._media_ins,
                     *self._in_controls, self._stats_pub]:
            if sock is not None and not sock.closed:
                sock.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        # destroy, not term: it also closes any socket still open (a subclass's own socket whose bind failed),
        # which would otherwise block term() forever and the stage would never exit.
        self._ctx.destroy(linger=LINGER_ON_CLOSE_MS)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(stage)s] %(message)s", defaults={"stage": "-"})
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


def run_stage(stage: Stage) -> int:
    """Run a stage to completion in a fresh event loop and return its exit code."""
    return asyncio.run(stage.run())
