"""The browser stage: a headless Chromium bot in a WebRTC room, bridged to the pipeline.

Python side of the page hook (js/hook.js): a local aiohttp WebSocket server the page connects to, the
Playwright session (launch, join recipe, watchdog, rejoin), and the translation between page messages and
protocol messages. See the package docstring for the overall picture.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import math
import os
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from playwright.async_api import Browser, BrowserContext, Page, Playwright, async_playwright

from protocol import (
    AudioFrame,
    EncodedPacket,
    EndOfStream,
    Event,
    EventType,
    KeyframeRequest,
    MediaHeader,
    Message,
    VideoFrame,
    i420_size,
)
from stages import codecs, memtrace
from stages.base import Stage, StageOptions, percentile, run_dir
from stages.browser import cdplink
from stages.browser.chromium import ChromiumUserError, launch_chromium
from stages.browser.diagnose import Diagnosis, PageWatch, diagnose
from stages.browser.early import Started
from stages.browser.procs import chromium_pids
from stages.browser.recipes import Recipe

JS_DIR = Path(__file__).resolve().parent / "js"
WS_PATH = "/sipbridge"
CDP_PATH = "/cdp"  # the kept Chromium's protocol, for Playwright's driver only (its own token)
# How long a session waits for the kept Chromium: supervisord starts its keeper again after Chromium died.
KEEPER_CONNECT_TIMEOUT_S = 30.0
MAX_WS_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BACKLOG_BYTES = 2 * 1024 * 1024
# The page stops sending media this stage has not read within this long (relay_worker.js): what waits in the
# socket's buffers between them is bounded in time, not only in bytes (a starved stage once held minutes there).
DEFAULT_MAX_PAGE_LAG_MS = 500
# How often the stage tells each page socket how many media messages it has read (only when that changed).
RX_ACK_INTERVAL_S = 0.05
IDENTIFY_TIMEOUT_S = 3.0
PAGE_STATS_INTERVAL_MS = 1000
WATCHDOG_INTERVAL_S = 1.0
# Being out of the call this long (recipe's joined check failing) counts as dropped from the room.
NOT_JOINED_GRACE_S = 1.0
DROPPED_REASON = "dropped from the room"
BROWSER_CLOSE_TIMEOUT_S = 5.0
SOCKET_CLOSE_TIMEOUT_S = 1.0
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW_S = 300.0
# Rejoin delays: none for a rejoin with no other in the last RESTART_BURST_S (a single fault, such as a crashed
# renderer, is recovered at once: the delay was 0.5 s of every such room gap, issue 15), then doubling from
# RESTART_BACKOFF_S up to MAX_RESTART_BACKOFF_S with each rejoin in that burst, so a page that keeps failing is not
# hammered. Giving up (max_restarts) counts over the longer restart window.
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 4.0
RESTART_BURST_S = 10.0
# CALL_STATE values (stages.janus.sip.CallState) that say a SIP call is up, and that it is over.
CALL_UP_STATES = frozenset({"accepted", "media_up"})
CALL_OVER_STATES = frozenset({"ended", "failed", "declined", "janus_disconnected"})
CALL_ENDED_REASON = "the SIP call ended"
# Injection: video frames the page has not yet written into its generator; more means the page is behind.
MAX_INJECT_IN_FLIGHT_FRAMES = 3
# Encoded injection: the page decodes asynchronously, so more packets are on their way to the camera at once (about
# half a second at 30 fps). A packet dropped here breaks its camera's chain of references: the camera's next
# packets are dropped here too until a keyframe, which is asked for upstream and let past the bound (it is the way
# out of a backlog, not more of it).
MAX_INJECT_IN_FLIGHT_PACKETS = 15
INJECT_KEYFRAME_REPEAT_S = 1.0
MAX_INJECT_QUEUE_MSGS = 64
MAX_PENDING_PER_TRACK_MSGS = 32
MAX_PENDING_TRACKS = 16
MAX_ENDED_KEYS = 256
LATENCY_WINDOW = 512
US_PER_S = 1_000_000
RTP_TIMESTAMP_MODULO = 1 << 32
# Control messages wait for a consumer at most this long: a pipeline without one must not stall the bot.
CONTROL_SEND_TIMEOUT_S = 0.5
# The bot's state is said again this often (a "repeat" STAGE_STATE, not logged): a stage that restarted, or joined
# the chain late, learns it. The janus stage places an outbound call only once the bot is in the room, so a
# restarted janus stage re-dials up to this long after it could (issue 15: at 2 s this was most of its media gap).
# A repeat is one small control message per stage per interval, and none while nobody consumes them.
STATE_REPEAT_INTERVAL_S = 0.5

# Taking over a page left in the room (kept Chromium): whether its hook can be pointed at a new socket, and doing it.
TAKE_OVER_CHECK = "() => !!(window.__sipbridgeHook && window.__sipbridgeHook.relink)"
RELINK = "(url) => window.__sipbridgeHook ? window.__sipbridgeHook.relink(url) : false"
# A page evaluation has no timeout of its own: a hung renderer must not hold a new stage's first session.
TAKE_OVER_EVAL_TIMEOUT_S = 5.0

HEADER_LENGTH = struct.Struct("<I")
CODEC_BY_MIME = {mime: info.codec for mime, info in codecs.BY_MIME.items()}  # lower-cased MIME types


class CaptureMode(enum.StrEnum):
    RAW = "raw"  # decoded I420 and s16 out of the page
    ENCODED = "encoded"  # frames as received from the room, for the decoder stage


class PageMessageError(ValueError):
    """A malformed message from the page (counted and dropped)."""


@dataclass
class BrowserConfig:
    recipe: Recipe
    mode: CaptureMode = CaptureMode.RAW
    # "hidden": the page's video elements are not displayed (nobody looks at a bot's page); capture is unchanged.
    page_video: str = "shown"
    # The SIP side's encoded video sent into the room as it came where the room takes its codec (js/hook.js).
    passthrough: bool = False
    ws_host: str = "127.0.0.1"
    ws_port: int = 0
    max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES
    max_page_lag_ms: int = DEFAULT_MAX_PAGE_LAG_MS  # 0: no time bound
    identify_timeout_s: float = IDENTIFY_TIMEOUT_S
    video_tracks: int = 1
    max_restarts: int = DEFAULT_MAX_RESTARTS
    restart_window_s: float = DEFAULT_RESTART_WINDOW_S
    chromium_args: list[str] = field(default_factory=list)
    # A kept Chromium's socket (keeper.py): connect to it instead of launching one, and take over the page a stage
    # before this one left in the room.
    chromium_socket: str | None = None
    join_on_call: bool = False
    routes: list[CallRoute] = field(default_factory=list)


@dataclass
class CallRoute:
    """Inbound calls from callers whose URI matches ``pattern`` join with these recipe variables."""

    pattern: re.Pattern[str]
    variables: dict[str, str]


@dataclass
class PageTrack:
    key: str
    kind: str
    participant: str
    stream_id: str
    attributes: dict[str, Any]
    rtp_last: int | None = None
    rtp_base: int = 0
    ended: bool = False


@dataclass(eq=False)
class PageConnection:
    ws: web.WebSocketResponse
    role: str = "unknown"
    top: bool = False
    camera_at: float = 0.0  # when this document last called getUserMedia
    # (data, (video seq, received ns) or None)
    queue: collections.deque[tuple[bytes | str, tuple[int, int] | None]] = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Injected video seq -> when the frame came off ZeroMQ (ns); the page acknowledges each written frame.
    in_flight: dict[int, int] = field(default_factory=dict)
    rx: int = 0  # media messages read from this socket
    rx_acked: int = 0  # the count last told to the page


def parse_page_message(data: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(data) < HEADER_LENGTH.size:
        raise PageMessageError("message shorter than its length prefix")
    (head_len,) = HEADER_LENGTH.unpack_from(data)
    if HEADER_LENGTH.size + head_len > len(data):
        raise PageMessageError("header length beyond the message")
    try:
        header = json.loads(data[HEADER_LENGTH.size : HEADER_LENGTH.size + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PageMessageError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise PageMessageError("header is not an object")
    return header, memoryview(data)[HEADER_LENGTH.size + head_len :]


def pack_page_message(header: dict[str, Any], payload: Any) -> bytes:
    """``payload`` is any buffer (bytes, memoryview, numpy array)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if (HEADER_LENGTH.size + len(head)) % 2:
        head += b" "  # the page views audio payloads as Int16Array: keep them 2-byte aligned
    return HEADER_LENGTH.pack(len(head)) + head + memoryview(payload).cast("B").tobytes()


_STREAM_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+-]+")


def _capture_ms(msg: VideoFrame | AudioFrame | EncodedPacket) -> float | None:
    """The frame's capture time in ms since the epoch (the page's clock for injected timestamps), if known."""
    return msg.header.capture_time_ns / 1e6 if msg.header.capture_time_ns else None


def rejoin_delay_s(recent_restarts: int) -> float:
    """How long to wait before a rejoin, given the restarts in the last RESTART_BURST_S, this one included."""
    if recent_restarts <= 1:
        return 0.0
    return min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** (recent_restarts - 2))


def stream_name(participant: str) -> str:
    return _STREAM_ID_UNSAFE.sub("_", participant).strip("_")[:100] or "participant"


def init_script(ws_url: str, recipe: Recipe, *, mode: CaptureMode = CaptureMode.RAW,
                max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES, identify_timeout_s: float = IDENTIFY_TIMEOUT_S,
                video_tracks: int = 1, max_page_lag_ms: int = DEFAULT_MAX_PAGE_LAG_MS,
                page_video: str = "shown", passthrough: bool = False) -> str:
    """The page hook (js/hook.js and its workers) as one init script, talking to the socket at ``ws_url``."""
    cfg = {
        "wsUrl": ws_url,
        "mode": mode.value,
        "pageVideo": page_video,
        "passthrough": passthrough,
        "maxBacklogBytes": max_backlog_bytes,
        "maxLagMs": max_page_lag_ms,
        "identifyTimeoutMs": int(identify_timeout_s * 1000),
        "participantAttribute": recipe.participant_attribute,
        "participantScript": recipe.participant_script,
        "videoTracks": video_tracks,
        "statsIntervalMs": PAGE_STATS_INTERVAL_MS,
    }
    worker = (JS_DIR / "capture_worker.js").read_text()
    relay = (JS_DIR / "relay_worker.js").read_text()
    hook = (JS_DIR / "hook.js").read_text()
    # One script (separate init scripts would not share names, field notes), wrapped in a function so the
    # page's own scripts cannot see the constants (the socket token among them).
    return (f"(function () {{\n\"use strict\";\nconst SB_CONFIG = {json.dumps(cfg)};\n"
            f"const SB_WORKER_SOURCE = {json.dumps(worker)};\nconst SB_RELAY_SOURCE = {json.dumps(relay)};\n"
            f"{hook}\n}})();\n")


class BrowserStage(Stage):
    """Joins a room with Chromium; emits every remote track; injects pipeline media as camera and microphone."""

    # The end of the direction that feeds it (see Stage.forwards_control).
    forwards_control = False
    process_on_loop = True  # process() packs a message for the page, which the loop sends: no codec work

    def __init__(self, options: StageOptions, config: BrowserConfig,
                 early: asyncio.Future[Started] | None = None) -> None:
        super().__init__(options)
        self.config = config
        # Playwright, Chromium and an empty page being started by the command while this module imported
        # (early.py); the first session uses them. The stage owns them once it has awaited this.
        self.early = early
        self._started: Started | None = None
        self.recipe = config.recipe
        self._token = secrets.token_urlsafe(16)
        self._ws_url = ""
        self._cdp_token = secrets.token_urlsafe(16)  # never in the page: whoever has it drives the browser
        self._cdp_url = ""
        self._take_over_tried = False
        self._cdp_sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[PageConnection] = set()
        self._tracks: dict[str, PageTrack] = {}
        # Media of tracks not announced yet (the worker's socket can overtake the page's), by track key.
        self._pending: dict[str, list[bytes]] = {}
        # Keys of tracks that ended (oldest first): their late media is dropped, not held as pending for ever.
        self._ended_keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seq: collections.Counter[str] = collections.Counter()
        self._active_stream_ids: set[str] = set()
        self._inject_slots: dict[str, int] = {}
        self._inject_seq = 0
        self._inject_packets: dict[int, int] = {}  # camera -> encoded packets injected (the page checks they follow)
        self._inject_broken: set[int] = set()  # cameras whose encoded chain a drop here broke: waiting for a keyframe
        self._inject_keyframe_asked: dict[int, float] = {}  # camera -> when a keyframe was last asked for (monotonic)
        self._background: set[asyncio.Task[None]] = set()
        self._page_inject_keyframe_requests = 0  # the page's decoders asked for keyframes (encoded injection)
        self._inject_latency_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._capture_latency_ms: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=LATENCY_WINDOW))
        self._session = 0
        self._session_failed: asyncio.Future[str] | None = None
        self._state = "starting"
        self._state_attributes: dict[str, Any] = {}  # the last STAGE_STATE event's, said again (_repeat_state)
        self._restarts: collections.deque[float] = collections.deque()
        self._joined_at_ns = 0
        self._pc_states: dict[Any, str] = {}
        self._participant_tracks: collections.Counter[str] = collections.Counter()
        self._browser: Browser | None = None
        self._page_keyframe_requests = 0  # keyframe requests the page handed to a room sender's receiver
        self._inject_audio_gaps: Any = None  # the page's last period: gaps between injected audio chunks (ms)
        self._inject_passed = 0  # passthrough: SIP-side frames the page sent into the room as they came
        self._send_codecs: dict[int, str] = {}  # camera -> the codec its sender encodes (passthrough)
        self._passing: dict[int, bool] = {}  # camera -> whether it carries the SIP side's frames (passthrough)
        # join_on_call: the SIP call the bot is in the room for ({call_id, peer, vars}), None between calls.
        self._call: dict[str, Any] | None = None
        self._call_changed = asyncio.Event()
        self._default_vars = dict(self.recipe.variables)
        # What the page showed when the last session failed (files in the run folder), for the state event.
        self._diagnosis: Diagnosis | None = None

    # ----- statistics --------------------------------------------------------------------------------------------
    def extra_figures(self) -> dict[str, Any]:
        capture = {
            sid: {"p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95)}
            for sid, lat in self._capture_latency_ms.items()
        }
        return {
            "mode": self.config.mode.value,
            "state": self._state,
            "session": self._session,
            "restarts": len(self._restarts),
            "tracks": {t.stream_id: t.attributes for t in self._tracks.values() if not t.ended},
            "capture_latency_ms": capture,
            "inject_latency_ms_p50": percentile(self._inject_latency_ms, 0.5),
            "inject_latency_ms_p95": percentile(self._inject_latency_ms, 0.95),
            "chromium_pids": chromium_pids(os.getpid()),
            "page_keyframe_requests": self._page_keyframe_requests,
            "page_inject_keyframe_requests": self._page_inject_keyframe_requests,
            "inject_packets": sum(list(self._inject_packets.values())),
            "inject_audio_gap_ms": self._inject_audio_gaps,
            "inject_passed_frames": self._inject_passed,
            "room_send_codecs": {str(k): v for k, v in self._send_codecs.items()},
            "passing": {str(k): v for k, v in self._passing.items()},
            "call": self._call,
        }

    async def _emit_control(self, msg: Message) -> None:
        try:
            await asyncio.wait_for(self.emit(msg), CONTROL_SEND_TIMEOUT_S)
        except TimeoutError:
            self.drops["control_no_consumer"] += 1

    # ----- page WebSocket ----------------------------------------------------------------------------------------
    async def _start_server(self) -> None:
        app = web.Application(client_max_size=MAX_WS_MESSAGE_BYTES)
        app.router.add_get(WS_PATH, self._ws_handler)
        if self.config.chromium_socket:
            app.router.add_get(CDP_PATH, self._cdp_handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.ws_host, self.config.ws_port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._ws_url = f"ws://{self.config.ws_host}:{port}{WS_PATH}?token={self._token}"
        self._cdp_url = f"ws://{self.config.ws_host}:{port}{CDP_PATH}?token={self._cdp_token}"
        self.log.info("page socket on %s:%d", self.config.ws_host, port)

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        if not secrets.compare_digest(request.query.get("token", ""), self._token):
            raise web.HTTPForbidden()
        # Compression off: deflating raw video costs far more than loopback bandwidth (field notes).
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_WS_MESSAGE_BYTES)
        await ws.prepare(request)
        conn = PageConnection(ws)
        self._connections.add(conn)
        sender = asyncio.create_task(self._sender(conn))
        acks = asyncio.create_task(self._rx_acks(conn))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self._on_page_media(msg.data)
                    conn.rx += 1
                elif msg.type == WSMsgType.TEXT:
                    try:
                        body = json.loads(msg.data)
                    except json.JSONDecodeError:
                        self.drops["page_bad_control"] += 1
                        continue
                    if isinstance(body, dict):
                        await self._on_page_control(conn, body)
        finally:
            sender.cancel()
            acks.cancel()
            self._connections.discard(conn)
        return ws

    async def _close_sockets(self) -> None:
        """Close the page's sockets and the driver's: a kept Chromium outlives this stage, and the server's cleanup
        would otherwise wait for them (aiohttp's shutdown timeout, a minute) before the stage could exit."""
        sockets = [conn.ws for conn in self._connections] + list(self._cdp_sockets)
        if sockets:
            await asyncio.wait([asyncio.ensure_future(ws.close(code=WSCloseCode.GOING_AWAY)) for ws in sockets],
                               timeout=SOCKET_CLOSE_TIMEOUT_S)

    async def _cdp_handler(self, request: web.Request) -> web.StreamResponse:
        """Playwright's driver to the kept Chromium (cdplink.py)."""
        if not secrets.compare_digest(request.query.get("token", ""), self._cdp_token):
            raise web.HTTPForbidden()
        assert self.config.chromium_socket is not None
        try:
            reader, writer = await cdplink.open_keeper(Path(self.config.chromium_socket), KEEPER_CONNECT_TIMEOUT_S)
        except cdplink.KeeperUnavailable as exc:
            # Playwright reports only the status; the reason belongs in this stage's log.
            self.log.warning("%s", exc)
            raise web.HTTPServiceUnavailable(text=str(exc)) from None
        ws = web.WebSocketResponse(compress=False, max_msg_size=cdplink.MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        self._cdp_sockets.add(ws)
        try:
            await cdplink.relay(ws, reader, writer)
        finally:
            self._cdp_sockets.discard(ws)
        return ws

    async def _rx_acks(self, conn: PageConnection) -> None:
        """Tell the page how much media this stage has read, so it can bound what waits unread (relay_worker.js).

        Written straight to the socket: an uncompressed frame goes into the transport whole, between the sender's
        frames, and waits behind nothing of this stage's own queue."""
        while not conn.ws.closed:
            await asyncio.sleep(RX_ACK_INTERVAL_S)
            if conn.rx != conn.rx_acked:
                conn.rx_acked = conn.rx
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await conn.ws.send_str(f'{{"t":"rx","n":{conn.rx}}}')

    async def _sender(self, conn: PageConnection) -> None:
        while True:
            await conn.wakeup.wait()
            conn.wakeup.clear()
            while conn.queue:
                data, video = conn.queue.popleft()
                if video is not None:
                    conn.in_flight[video[0]] = video[1]
                if isinstance(data, str):
                    await conn.ws.send_str(data)
                else:
                    await conn.ws.send_bytes(data)

    def _top_page(self) -> PageConnection | None:
        """The document that injection goes to: the last one that asked for a camera, else the top page."""
        pages = [c for c in self._connections if c.role == "page"]
        users = [c for c in pages if c.camera_at]
        if users:
            return max(users, key=lambda c: c.camera_at)
        for conn in pages:
            if conn.top:
                return conn
        return None

    # ----- page -> pipeline --------------------------------------------------------------------------------------
    async def _on_page_control(self, conn: PageConnection, body: dict[str, Any]) -> None:
        kind = body.get("t")
        if kind == "hello":
            conn.role = str(body.get("role", "unknown"))
            conn.top = bool(body.get("top", False))
        elif kind == "gum":
            conn.camera_at = time.monotonic()
        elif kind == "track":
            await self._track_added(body)
        elif kind == "ended":
            await self._track_ended(str(body.get("k")), str(body.get("reason", "ended")))
        elif kind == "drops":
            for reason, count in (body.get("drops") or {}).items():
                if isinstance(count, int) and count > 0:
                    self.drops[f"page_{reason}"] += count
            sent = body.get("kfreq")
            if isinstance(sent, int) and sent > 0:
                self._page_keyframe_requests += sent
        elif kind == "inject":
            if body.get("audio_gap_ms") is not None:
                self._inject_audio_gaps = body.get("audio_gap_ms")
            passed = body.get("passed")
            if isinstance(passed, int) and passed > 0:
                self._inject_passed += passed
        elif kind == "sendcodec":
            slot, mime = body.get("slot"), str(body.get("mime"))[:40]
            if isinstance(slot, int) and self._send_codecs.get(slot) != mime:
                self._send_codecs[slot] = mime
                self.log.info("camera %d: the room is sent %s", slot, mime)
        elif kind == "passing":
            slot, on = body.get("slot"), bool(body.get("on"))
            if isinstance(slot, int):
                self._passing[slot] = on
                self.log.info("camera %d: %s", slot, "the SIP side's frames go to the room as they came" if on
                              else "the page decodes the SIP side's frames (the room takes another codec)")
        elif kind == "injerr":
            message = (f"the page cannot decode {str(body.get('codec'))[:40]} ({str(body.get('error'))[:200]}): the "
                       "SIP side's video does not reach the room; set [room] inject = \"raw\" to decode it here")
            self.log.error("%s", message)
            self.report_error("inject_decoder_unavailable", message)
        elif kind == "injkf":
            # The page's decoder of an encoded camera lost its references (a gap, an error): the SIP side resends.
            slot = body.get("slot")
            self._page_inject_keyframe_requests += 1
            for stream_id, index in list(self._inject_slots.items()):
                if index == slot:
                    await self.request_keyframe_upstream(stream_id, "the page's decoder needs a keyframe")
        elif kind == "ack":
            seq = body.get("seq")
            sent = conn.in_flight.pop(seq, None) if isinstance(seq, int) else None
            if sent is not None:
                self._inject_latency_ms.append((time.time_ns() - sent) / 1e6)
        elif kind == "pc":
            self._pc_states[body.get("pc")] = str(body.get("state"))
            self.log.info("session %d: peer connection %s %s", self._session, body.get("pc"), body.get("state"))

    async def _track_added(self, body: dict[str, Any]) -> None:
        key = str(body.get("k"))
        kind = "video" if body.get("kind") == "video" else "audio"
        participant = str(body.get("participant") or key)
        base = f"{stream_name(participant)}/{kind}"
        stream_id, n = base, 1
        while stream_id in self._active_stream_ids:
            n += 1
            stream_id = f"{base}{n}"
        self._active_stream_ids.add(stream_id)
        attributes = {
            "participant": participant,
            "kind": kind,
            "mode": self.config.mode.value,
            "track_id": body.get("track_id"),
            "mid": body.get("mid"),
            "identified_by": body.get("identified_by"),
            "session": self._session,
        }
        track = PageTrack(key, kind, participant, stream_id, attributes)
        self._tracks[key] = track
        self.log.info("track added: %s (%s of %s, %s)", stream_id, kind, participant, body.get("identified_by"))
        self._participant_tracks[participant] += 1
        if self._participant_tracks[participant] == 1:
            await self._emit_control(Event(EventType.PARTICIPANT_JOINED, "", {"participant": participant,
                                                                               "session": self._session}))
        await self._emit_control(Event(EventType.TRACK_ADDED, stream_id, attributes))
        for data in self._pending.pop(key, []):
            await self._on_page_media(data)

    async def _track_ended(self, key: str, reason: str) -> None:
        track = self._tracks.pop(key, None)
        self._pending.pop(key, None)
        self._ended_keys[key] = None
        while len(self._ended_keys) > MAX_ENDED_KEYS:
            self._ended_keys.popitem(last=False)
        if track is None or track.ended:
            return
        track.ended = True
        self._active_stream_ids.discard(track.stream_id)
        self._capture_latency_ms.pop(track.stream_id, None)
        self.log.info("track ended: %s (%s)", track.stream_id, reason)
        await self._emit_control(EndOfStream(track.stream_id))
        await self._emit_control(Event(EventType.TRACK_ENDED, track.stream_id, {**track.attributes, "reason": reason}))
        self._participant_tracks[track.participant] -= 1
        if self._participant_tracks[track.participant] <= 0:
            del self._participant_tracks[track.participant]
            await self._emit_control(Event(EventType.PARTICIPANT_LEFT, "", {"participant": track.participant,
                                                                             "reason": reason,
                                                                             "session": self._session}))

    async def _on_page_media(self, data: bytes) -> None:
        try:
            header, payload = parse_page_message(data)
            key = str(header.get("k"))
            track = self._tracks.get(key)
            if track is None:
                # The worker's socket can overtake the page's track announcement: hold a few messages.
                if key in self._ended_keys:
                    self.drops["ended_track"] += 1
                    return
                pending = self._pending.get(key)
                if pending is None:
                    if len(self._pending) >= MAX_PENDING_TRACKS:
                        self.drops["unannounced_track"] += 1
                        return
                    pending = self._pending[key] = []
                if len(pending) < MAX_PENDING_PER_TRACK_MSGS:
                    pending.append(data)
                else:
                    self.drops["unannounced_track"] += 1
                return
            msg = self._to_protocol(track, header, payload)
        except (PageMessageError, ValueError, TypeError, KeyError) as exc:
            self.drops["page_malformed"] += 1
            self.report_error("page_malformed", str(exc))
            return
        if await self.emit(msg):
            assert isinstance(msg, (VideoFrame, AudioFrame, EncodedPacket))
            self._capture_latency_ms[track.stream_id].append((time.time_ns() - msg.header.capture_time_ns) / 1e6)

    def _header(self, track: PageTrack, pts: int, time_base: Fraction, capture_ms: Any) -> MediaHeader:
        seq = self._seq[track.stream_id]
        self._seq[track.stream_id] += 1
        return MediaHeader(track.stream_id, seq, pts, time_base, int(float(capture_ms) * 1e6))

    def _to_protocol(self, track: PageTrack, h: dict[str, Any], payload: memoryview) -> Message:
        kind = h.get("t")
        if kind == "v":
            width, height = int(h["w"]), int(h["h"])
            if len(payload) != i420_size(width, height):
                raise PageMessageError(f"video payload {len(payload)} bytes for {width}x{height}")
            return VideoFrame(self._header(track, int(h["ts"]), Fraction(1, US_PER_S), h["ct"]), width, height,
                              payload)
        if kind == "a":
            rate, channels, samples = int(h["sr"]), int(h["ch"]), int(h["n"])
            pts = round(int(h["ts"]) * rate / US_PER_S)
            return AudioFrame(self._header(track, pts, Fraction(1, rate), h["ct"]), rate, channels, samples, payload)
        if kind == "e":
            mime = str(h.get("codec") or "").lower()
            codec = CODEC_BY_MIME.get(mime)
            if codec is None:
                raise PageMessageError(f"unsupported codec {mime or 'unknown'} (payload type {h.get('pt')})")
            clock = codecs.RTP_CLOCK_HZ[codec]
            pts = self._unwrap_rtp(track, int(h["ts"]))
            return EncodedPacket(self._header(track, pts, Fraction(1, clock), h["ct"]), codec, bool(h.get("key")),
                                 payload)
        raise PageMessageError(f"unknown media message {kind!r}")

    @staticmethod
    def _unwrap_rtp(track: PageTrack, ts: int) -> int:
        """RTP timestamps wrap at 2**32; pts must keep growing."""
        if track.rtp_last is not None:
            delta = (ts - track.rtp_last) % RTP_TIMESTAMP_MODULO
            if delta > RTP_TIMESTAMP_MODULO // 2:  # reordered slightly backwards
                delta -= RTP_TIMESTAMP_MODULO
            track.rtp_base += delta
        else:
            track.rtp_base = ts
        track.rtp_last = ts
        return track.rtp_base

    # ----- pipeline -> page (injection) --------------------------------------------------------------------------
    def process(self, msg: Message) -> list[Message]:
        """Runs on the event loop (``process_on_loop``): pack the frame for the page and queue it there."""
        received_ns = time.time_ns()
        if isinstance(msg, VideoFrame):
            slot = self._inject_slot(msg.header.stream_id)
            if slot is None:
                return []
            self._inject_seq += 1
            header = {"t": "v", "slot": slot, "w": msg.width, "h": msg.height, "seq": self._inject_seq,
                      "ct": _capture_ms(msg)}
            self._inject(pack_page_message(header, msg.data), (self._inject_seq, received_ns))
        elif isinstance(msg, EncodedPacket) and codecs.BY_CODEC[msg.codec].webcodecs:
            # Encoded injection: the page decodes it (WebCodecs) into the camera; no raw picture crosses here.
            # ``n`` numbers each camera's packets, so the page sees any that were lost on the way (and waits for
            # a keyframe); ``seq`` is the acknowledgement's, shared with raw frames.
            slot = self._inject_slot(msg.header.stream_id)
            if slot is None:
                return []
            self._inject_seq += 1
            self._inject_packets[slot] = self._inject_packets.get(slot, 0) + 1
            header = {"t": "ve", "slot": slot, "codec": codecs.BY_CODEC[msg.codec].webcodecs, "key": msg.keyframe,
                      "n": self._inject_packets[slot], "seq": self._inject_seq, "ct": _capture_ms(msg)}
            self._inject_packet(pack_page_message(header, msg.data), (self._inject_seq, received_ns), slot,
                                msg.keyframe, msg.header.stream_id)
        elif isinstance(msg, AudioFrame):
            header = {"t": "a", "sr": msg.sample_rate, "ch": msg.channels, "n": msg.samples, "ct": _capture_ms(msg)}
            self._inject(pack_page_message(header, msg.data), None)
        else:
            self.drops["inject_unsupported"] += 1
        return []

    def _inject_slot(self, stream_id: str) -> int | None:
        """The camera a stream is injected as; None when every camera is taken (a counted drop)."""
        slot = self._inject_slots.get(stream_id)
        if slot is None:
            if len(self._inject_slots) >= self.config.video_tracks:
                self.drops["inject_no_slot"] += 1
                return None
            slot = len(self._inject_slots)
            self._inject_slots[stream_id] = slot
            self.log.info("injecting %s as camera %d", stream_id, slot)
        return slot

    def _inject(self, data: bytes, video: tuple[int, int] | None, limit: int = MAX_INJECT_IN_FLIGHT_FRAMES) -> bool:
        """Queue a message for the page (event loop); False when it was dropped (counted)."""
        conn = self._top_page()
        if conn is None:
            self.drops["inject_no_page"] += 1
            return False
        if video is not None:
            # Frames the page never acknowledged (it reloaded, or is far behind) must not block forever.
            now = time.time_ns()
            for seq, sent in list(conn.in_flight.items()):
                if now - sent > 1_000_000_000:
                    del conn.in_flight[seq]
            queued_video = sum(1 for _, s in conn.queue if s is not None)
            if len(conn.in_flight) + queued_video >= limit:
                self.drops["inject_backlog"] += 1
                return False
        if len(conn.queue) >= MAX_INJECT_QUEUE_MSGS:
            self.drops["inject_queue_full"] += 1
            return False
        conn.queue.append((data, video))
        conn.wakeup.set()
        return True

    def _inject_packet(self, data: bytes, video: tuple[int, int], slot: int, keyframe: bool, stream_id: str) -> None:
        """An encoded packet for the page (event loop): after a drop, the camera's packets wait for a keyframe."""
        if slot in self._inject_broken and not keyframe:
            self.drops["inject_await_keyframe"] += 1
            self._ask_inject_keyframe(slot, stream_id)
            return
        if self._inject(data, video, limit=10**6 if keyframe else MAX_INJECT_IN_FLIGHT_PACKETS):
            self._inject_broken.discard(slot)
        else:
            self._inject_broken.add(slot)
            self._ask_inject_keyframe(slot, stream_id)

    def _ask_inject_keyframe(self, slot: int, stream_id: str) -> None:
        now = time.monotonic()
        if now - self._inject_keyframe_asked.get(slot, -math.inf) < INJECT_KEYFRAME_REPEAT_S:
            return
        self._inject_keyframe_asked[slot] = now
        self._spawn_keyframe_request(stream_id)

    def _spawn_keyframe_request(self, stream_id: str) -> None:
        task = asyncio.ensure_future(self.request_keyframe_upstream(stream_id, "injection dropped a packet"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def on_keyframe_request(self, request: KeyframeRequest) -> bool:
        """A consumer of an encoded track lost sync: ask the room's sender for a keyframe via the page."""
        for track in list(self._tracks.values()):
            if track.stream_id == request.stream_id:
                if self.config.mode is CaptureMode.ENCODED and track.kind == "video" and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._send_keyframe_request, track.key)
                return True
        return True  # not ours to pass upstream: our inputs are the injection side

    def _send_keyframe_request(self, key: str) -> None:
        conn = self._top_page()
        if conn is not None:
            conn.queue.append((json.dumps({"t": "kf", "k": key}), None))
            conn.wakeup.set()

    # ----- the browser session -----------------------------------------------------------------------------------
    def _init_script(self) -> str:
        return init_script(self._ws_url, self.recipe, mode=self.config.mode,
                           max_backlog_bytes=self.config.max_backlog_bytes,
                           max_page_lag_ms=self.config.max_page_lag_ms,
                           identify_timeout_s=self.config.identify_timeout_s, video_tracks=self.config.video_tracks,
                           page_video=self.config.page_video, passthrough=self.config.passthrough)

    async def _set_state(self, state: str, **attributes: Any) -> None:
        self._state = state
        self._state_attributes = {"stage": self.name, "state": state, "session": self._session, **attributes}
        self.log.info("state %s %s", state, attributes or "")
        await self._emit_control(Event(EventType.STAGE_STATE, "", self._state_attributes))

    async def _repeat_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_REPEAT_INTERVAL_S)
            if self._state_attributes and self._consumers:
                await self._emit_control(Event(EventType.STAGE_STATE, "", {**self._state_attributes, "repeat": True}))

    # ----- joining for SIP calls (--join-on-call) ----------------------------------------------------------------
    async def on_control(self, msg: Message) -> None:
        """The janus stage's CALL_STATE events reach the bot through the SIP-to-room stages: join the call's room
        when a call is up, leave when it is over."""
        if not (self.config.join_on_call and isinstance(msg, Event) and msg.type is EventType.CALL_STATE):
            return
        state = msg.attributes.get("state")
        call_id = str(msg.attributes.get("call_id", ""))
        if state in CALL_UP_STATES and self._call is None:
            peer = str(msg.attributes.get("peer", ""))
            self._call = {"call_id": call_id, "peer": peer, "vars": self._route(peer)}
            self._call_changed.set()
        elif state in CALL_OVER_STATES and self._call is not None and call_id in ("", self._call["call_id"]):
            self.log.info("call %s: %s; leaving the room", call_id, state)
            self._call = None
            self._call_changed.set()
            if self._session_failed is not None and not self._session_failed.done():
                self._session_failed.set_result(CALL_ENDED_REASON)

    def _route(self, peer: str) -> dict[str, str]:
        for index, route in enumerate(self.config.routes):
            if route.pattern.search(peer):
                self.log.info("caller %s matches route %d (%s)", peer, index + 1, route.pattern.pattern)
                return dict(route.variables)
        self.log.info("caller %s matches no route: the room's default variables", peer)
        return {}

    async def _wait_for_call(self) -> None:
        if self._call is None:
            await self._set_state("waiting_for_call")
        while self._call is None:
            self._call_changed.clear()
            await self._call_changed.wait()
        self.recipe.variables = {**self._default_vars, **self._call["vars"]}
        self.log.info("call %s from %s: joining %s", self._call["call_id"], self._call["peer"],
                      self.recipe.start_url())

    async def produce(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Page messages and injected frames, tens to hundreds of kB each, fragmented the heap (memtrace.py).
        trimmer = asyncio.create_task(memtrace.keep_heap_small())
        await self._start_server()
        repeater = asyncio.create_task(self._repeat_state())
        pw: Playwright | None = None
        try:
            pw = await self._start_playwright()
            if self.config.join_on_call:
                # Launched ahead, so a call waits only for the join (a failed launch is retried per session).
                with contextlib.suppress(Exception):
                    await self._launch(pw)
            while True:
                if self.config.join_on_call:
                    await self._wait_for_call()
                self._session += 1
                reason = await self._run_session(pw)
                if self._browser is not None and not self._browser.is_connected():
                    self._browser = None
                if self.config.join_on_call and self._call is None:
                    continue  # the call is over: not a failure, wait for the next one
                now = time.monotonic()
                self._restarts.append(now)
                while self._restarts and now - self._restarts[0] > self.config.restart_window_s:
                    self._restarts.popleft()
                explained = {"diagnosis": self._diagnosis.attributes()} if self._diagnosis else {}
                self._diagnosis = None
                if len(self._restarts) > self.config.max_restarts:
                    await self._set_state("failed", reason=reason, **explained)
                    raise RuntimeError(f"giving up after {len(self._restarts)} restarts in "
                                       f"{self.config.restart_window_s:.0f} s; last: {reason}")
                await self._set_state("rejoining", reason=reason, **explained)
                await asyncio.sleep(rejoin_delay_s(sum(1 for t in self._restarts if now - t <= RESTART_BURST_S)))
        finally:
            trimmer.cancel()
            repeater.cancel()
            if pw is not None:  # first, as leaving `async with async_playwright()` did: it ends the browser too
                with contextlib.suppress(Exception):
                    await pw.stop()
            await self._drop_browser()
            if self._runner is not None:
                await self._close_sockets()
                await self._runner.cleanup()

    async def _start_playwright(self) -> Playwright:
        """Playwright's driver: the one started ahead with Chromium (early.py), else a new one."""
        if self.early is None:
            return await async_playwright().start()
        if not self.early.done():
            await self._set_state("launching")
        started = self._started = await self.early
        self.early = None
        if started.browser is not None:
            self._adopt(started.browser)
        elif started.error is not None:
            self.log.info("Chromium started ahead of the stage failed (%s): launching again", started.error)
        return started.playwright

    async def _launch(self, pw: Any) -> Browser:
        """The session's browser: the previous one while it is alive (a rejoin then costs no launch)."""
        if self._browser is not None and self._browser.is_connected():
            return self._browser
        if self._state != "launching":  # already said while the driver started (_start_playwright)
            await self._set_state("launching")
        if self.config.chromium_socket:
            return self._adopt(await pw.chromium.connect_over_cdp(self._cdp_url))
        return self._adopt(await launch_chromium(pw, self.config.chromium_args))

    async def _take_over(self, browser: Browser) -> Page | None:
        """The page a stage before this one left in the room (kept Chromium), pointed at this stage's socket; any
        other page left there is closed. Only once, at the first session: later ones are this stage's own."""
        if self._take_over_tried:
            return None
        self._take_over_tried = True
        left = [page for context in browser.contexts for page in context.pages]
        kept: Page | None = None
        for page in left:
            if kept is not None or self.config.join_on_call:
                break  # a bot joined for a call this stage has not heard of yet leaves; the call brings it back
            try:
                hooked = await asyncio.wait_for(page.evaluate(TAKE_OVER_CHECK), TAKE_OVER_EVAL_TIMEOUT_S)
                if hooked and await asyncio.wait_for(self.recipe.is_joined(page), TAKE_OVER_EVAL_TIMEOUT_S):
                    kept = page
            except Exception as exc:  # a page that cannot answer is not one to keep
                self.log.info("page %s left by the previous stage does not answer (%s): closing it", page.url, exc)
        for page in left:
            if page is not kept:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(page.close(), BROWSER_CLOSE_TIMEOUT_S)
        if kept is None:
            return None
        for frame in kept.frames:  # every document's hook: apps may run the call in a frame
            with contextlib.suppress(Exception):
                await asyncio.wait_for(frame.evaluate(RELINK, self._ws_url), TAKE_OVER_EVAL_TIMEOUT_S)
        self.log.info("took over the page left in the room (%s): not joining again", kept.url)
        return kept

    def _adopt(self, browser: Browser) -> Browser:
        def disconnected(_b: Browser) -> None:
            if self._session_failed is not None and not self._session_failed.done():
                self._session_failed.set_result("browser disconnected")

        browser.on("disconnected", disconnected)
        self._browser = browser
        return browser

    async def _run_session(self, pw: Any) -> str:
        """One browser context, one page, one join; returns why it ended."""
        if self.config.join_on_call and self._call is None:
            return CALL_ENDED_REASON  # over before the session began
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[str] = loop.create_future()
        self._session_failed = failed

        def fail(reason: str) -> None:
            if not failed.done():
                failed.set_result(reason)

        context: BrowserContext | None = None
        kept: Page | None = None
        try:
            browser = await self._launch(pw)
            ahead = self._started.take_page() if self._started is not None else None
            kept = await self._take_over(browser) if self.config.chromium_socket else None
            if kept is not None:
                page = kept
                # Its context is Playwright's stand-in for one this driver did not make: never closed, only the page.
                await page.context.add_init_script(script=self._init_script())  # for its next navigation
            elif ahead is not None and ahead[0].browser is browser:
                context, page = ahead  # still blank: the init script below applies to its first navigation
                await context.add_init_script(script=self._init_script())
            else:
                context = await browser.new_context(bypass_csp=self.recipe.bypass_csp)
                await context.add_init_script(script=self._init_script())
                page = await context.new_page()
            watch = PageWatch(page)
            page.on("crash", lambda _p: fail("page crashed"))
            page.on("close", lambda _p: fail("page closed"))
            if self.log.isEnabledFor(logging.DEBUG):  # every console line crosses the Playwright driver
                page.on("console", lambda m: self.log.debug("page: %s", m.text))
            if kept is None:
                await self._set_state("joining", url=self.recipe.start_url())
                join: asyncio.Future[None] = asyncio.ensure_future(self.recipe.join(page))
                waiters: list[asyncio.Future[Any]] = [join, failed]
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if failed in done:
                    join.cancel()
                    # The join may have failed too (its page went away): that error is this one, already reported.
                    join.add_done_callback(lambda f: f.cancelled() or f.exception())
                    return failed.result()
                try:
                    join.result()
                except Exception as exc:
                    return await self._explain(page, exc, watch, "join failed")
            self._joined_at_ns = time.time_ns()
            await self._set_state("joined", **({"taken_over": True} if kept is not None else {}))
            reason = await self._watch(page, failed)
            if reason == DROPPED_REASON:  # the page may say why (kicked, room closed, session expired)
                await self._explain(page, RuntimeError(reason), watch, "left the room")
            return reason
        except ChromiumUserError:
            raise  # no rejoin can fix a missing user: say so at once
        except Exception as exc:
            return failed.result() if failed.done() else f"{type(exc).__name__}: {exc}"
        finally:
            self._session_failed = None
            for track in list(self._tracks.values()):
                await self._track_ended(track.key, "session ended")
            self._pending.clear()
            # A browser already gone (Chromium dead, or our driver stopped with us at a group stop) cannot close
            # anything: Playwright would wait out each timeout.
            alive = self._browser is not None and self._browser.is_connected()
            if kept is not None and alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(kept.close(), BROWSER_CLOSE_TIMEOUT_S)
            if context is not None and alive:
                try:
                    await asyncio.wait_for(context.close(), BROWSER_CLOSE_TIMEOUT_S)
                except Exception:  # a browser that cannot close a context is not reused
                    await self._drop_browser()

    async def _explain(self, page: Page, error: BaseException, watch: PageWatch, headline: str) -> str:
        """Save what the page shows and said (run folder), log one line with the reason, fix and files."""
        diagnosis = await diagnose(page, self.recipe, error, Path(run_dir()),
                                   f"{stream_name(self.name)}-failure", watch, headline)
        self._diagnosis = diagnosis
        call_id = str(self._call["call_id"]) if self._call else ""
        self.report_error("join_failed" if headline == "join failed" else "left_room", diagnosis.line(),
                          call_id=call_id)
        return diagnosis.reason

    async def _drop_browser(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None and browser.is_connected():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(browser.close(), BROWSER_CLOSE_TIMEOUT_S)

    async def _watch(self, page: Page, failed: asyncio.Future[str]) -> str:
        not_joined_since: float | None = None
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(failed), WATCHDOG_INTERVAL_S)
            except TimeoutError:
                pass
            try:
                joined = await self.recipe.is_joined(page)
            except Exception as exc:
                return failed.result() if failed.done() else f"page unreachable: {exc}"
            if not any(c.role == "page" for c in self._connections):
                joined = False  # no document's hook is connected: no media can flow
            now = time.monotonic()
            if joined:
                not_joined_since = None
            elif not_joined_since is None:
                not_joined_since = now
            elif now - not_joined_since >= NOT_JOINED_GRACE_S:
                return DROPPED_REASON
