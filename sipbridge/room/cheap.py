"""Room publishers without a browser: aiortc peers that send media encoded once, ahead of time.

A Chromium participant costs ~0.2-0.3 core for its page, its encoder and its renderer; on a 2-core machine the
simulated room then weighs as much as the bridge it is meant to measure. A cheap publisher joins the local Janus
VideoRoom over the Janus WebSocket API (create session, attach ``janus.plugin.videoroom``, ``join`` as publisher with
a display name, ``publish`` with aiortc's JSEP offer) and sends packets from a loop encoded once per machine:

* video: the frames of static/synthetic.js (the same 16-column frame counter in the top eighth of the luma plane,
  the moving ramp below it and, with sync marks, the bottom eighth bright for the first MARK_MS of every
  SYNC_PERIOD_MS of wall-clock time), VP8 or H.264, one keyframe every ``keyframe_interval_s``;
* audio: the tone (and with sync marks the MARK_HZ burst at the same instants) in 20 ms Opus packets.

aiortc's RTCRtpSender sends an ``av.Packet`` a track returns as it is (``Encoder.pack``: payloading only, a public
behaviour of aiortc >= 1.4), so sending costs no encoding CPU; nothing of aiortc's internals is touched here.

The loop (``loop_s``, default 120 s, a whole number of sync periods) starts on a multiple of SYNC_PERIOD_MS of the
wall clock at or before the publisher's first frame, so loop frame j is sent at the wall-clock frame k = k0 + j and
its mark band agrees with the wall clock like synthetic.js's. **Counter wrap**: the counter a frame carries is its
index in the loop, so it starts between 0 and 2 * fps, increases by one per frame (skipping frames the process was
too late to send, as a camera would) and wraps to 0 after ``loop_s`` seconds (3600 at 30 fps for the default
120 s). A check over a longer stretch must allow the wrap or pass a longer ``--loop-s``. The tone's phase jumps at
the wrap unless tone_hz * loop_s is a whole number (it is for the tests' 440 and 660 Hz).

Keyframe requests (PLI/FIR) cannot be answered with a fresh keyframe: the loop's periodic keyframe (within
``keyframe_interval_s``) answers them. VP9 is not available: aiortc has no VP9 payloader.

Encoded loops are cached under ``$XDG_CACHE_HOME/sipbridge/room-loops`` (``~/.cache`` by default): encoding a
120 s loop takes ~9 CPU-seconds at 640x480@30 and ~2 s at 320x240@15, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import math
import os
import resource
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("sipbridge.room.cheap")

# ----- the picture and sound of static/synthetic.js (keep in step with it) -----------------------------------------
PATTERN_COLUMNS = 16
LUMA_ONE = 235
LUMA_ZERO = 16
CHROMA_NEUTRAL = 128
RAMP_BASE = 48
RAMP_SPAN = 160
TONE_GAIN = 0.5
SYNC_PERIOD_MS = 2000
MARK_MS = 100
MARK_HZ = 2500.0
SYNC_TONE_GAIN = 0.2
SYNC_MARK_GAIN = 0.2
AUDIO_RATE = 48000
AUDIO_PACKET_MS = 20
AUDIO_PACKET_SAMPLES = AUDIO_RATE * AUDIO_PACKET_MS // 1000

DEFAULT_LOOP_S = 120
DEFAULT_KEYFRAME_INTERVAL_S = 1.0
VIDEO_BITRATE_BPS = 800_000
AUDIO_BITRATE_BPS = 32_000
CACHE_FORMAT = 1
ENGINES = ("chromium", "aiortc")
CHEAP_CODECS = ("vp8", "h264")
# The room's codec list, preferred first, as static/room.js creates it (whoever joins first creates the room).
ROOM_VIDEO_CODECS = {"h264": "h264,vp8", "vp8": "vp8,h264", "vp9": "vp9,vp8,h264"}
ROOM_BITRATE_BPS = 1_500_000
ROOM_PUBLISHERS = 16
ROOM_FIR_FREQ_S = 5
ERROR_ROOM_EXISTS = 427
JOIN_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 20.0
USAGE_INTERVAL_S = 5.0
CHILD_STOP_TIMEOUT_S = 5.0
# One H.264 variant (field notes: offering two makes some peers answer one and send the other).
H264_PROFILE = "42e01f"


def emit_line(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def mark_frames(fps: int) -> int:
    """Frames a video mark lasts (synthetic.js: Math.round(MARK_MS * fps / 1000), at least 1)."""
    return max(1, math.floor(MARK_MS * fps / 1000 + 0.5))


def period_frames(fps: int) -> int:
    return SYNC_PERIOD_MS * fps // 1000


def draw_picture(width: int, height: int, counter: int, mark: bool | None) -> np.ndarray:
    """One I420 picture as synthetic.js draws it (``mark`` None: no mark band, the ramp fills the picture)."""
    out = np.empty(width * height * 3 // 2, dtype=np.uint8)
    y = out[: width * height].reshape(height, width)
    band = max(1, height // 8)
    cell = width // PATTERN_COLUMNS
    value = counter % 65536
    y[:band, :] = LUMA_ZERO
    for i in range(PATTERN_COLUMNS):
        if (value >> (PATTERN_COLUMNS - 1 - i)) & 1:
            y[:band, i * cell : (i + 1) * cell] = LUMA_ONE
    shift = counter % width
    # The page's ramp overflows a Uint8Array past 255 and wraps: the same here.
    ramp = ((RAMP_BASE + (np.arange(width) + shift) * RAMP_SPAN // width) % 256).astype(np.uint8)
    ramp_end = height if mark is None else height - band
    y[band:ramp_end, :] = ramp
    if mark is not None:
        y[ramp_end:, :] = LUMA_ONE if mark else LUMA_ZERO
    out[width * height :] = CHROMA_NEUTRAL
    return out


def loop_audio(tone_hz: float, loop_s: int, sync: bool) -> np.ndarray:
    """The loop's samples (float, full scale 1.0, mono): the tone, and a MARK_HZ burst at every sync period."""
    n = np.arange(loop_s * AUDIO_RATE)
    gain = SYNC_TONE_GAIN if sync else TONE_GAIN
    samples = gain * np.sin(2 * np.pi * tone_hz * n / AUDIO_RATE)
    if sync:
        burst = round(MARK_MS * AUDIO_RATE / 1000)
        period = SYNC_PERIOD_MS * AUDIO_RATE // 1000
        mark = SYNC_MARK_GAIN * np.sin(2 * np.pi * MARK_HZ * np.arange(burst) / AUDIO_RATE)
        for start in range(0, samples.size, period):
            samples[start : start + burst] += mark
    return samples.astype(np.float32)


# ----- encoding the loop once -------------------------------------------------------------------------------------
@dataclass
class MediaLoop:
    """Pre-encoded packets in sending order (video: one per frame; audio: one per 20 ms)."""

    packets: list[bytes]
    keyframes: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.packets)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sipbridge" / "room-loops"


def _load(path: Path) -> MediaLoop | None:
    try:
        with np.load(path) as data:
            sizes = data["sizes"]
            blob = data["data"].tobytes()
            keys = data["keyframes"].tolist()
    except (OSError, KeyError, ValueError):
        return None
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] != len(blob):
        return None
    return MediaLoop([blob[offsets[i] : offsets[i + 1]] for i in range(len(sizes))], [bool(k) for k in keys])


def _store(path: Path, media: MediaLoop) -> None:
    """Atomically (another publisher process may write the same loop at the same time)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, sizes=np.array([len(p) for p in media.packets], dtype=np.int64),
                     data=np.frombuffer(b"".join(media.packets), dtype=np.uint8),
                     keyframes=np.array(media.keyframes or [False] * len(media), dtype=bool))
        os.replace(tmp, path)


def cached(name: str, make: Any, use_cache: bool = True) -> MediaLoop:
    path = cache_dir() / f"{name}-f{CACHE_FORMAT}.npz"
    if use_cache:
        found = _load(path)
        if found is not None:
            return found
    media: MediaLoop = make()
    if use_cache:
        _store(path, media)
    return media


def encode_video_loop(codec: str, width: int, height: int, fps: int, loop_s: int, keyframe_interval_s: float,
                      sync: bool, use_cache: bool = True) -> MediaLoop:
    if codec not in CHEAP_CODECS:
        raise ValueError(f"the aiortc engine sends {' or '.join(CHEAP_CODECS)}, not {codec} (aiortc has no VP9)")
    if width % 2 or height % 2:
        raise ValueError("the picture needs even dimensions")
    if (loop_s * 1000) % SYNC_PERIOD_MS:
        raise ValueError(f"the loop must last a whole number of {SYNC_PERIOD_MS} ms sync periods")
    gop = max(1, round(keyframe_interval_s * fps))
    frames = loop_s * fps
    name = f"{codec}-{width}x{height}-{fps}fps-{loop_s}s-gop{gop}-{'sync' if sync else 'plain'}"

    def make() -> MediaLoop:
        import av

        from stages import codecs

        enc: Any = av.CodecContext.create(codecs.BY_NAME[codec].encoder or "", "w")
        enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
        enc.time_base, enc.framerate = fractions.Fraction(1, fps), fractions.Fraction(fps, 1)
        enc.bit_rate, enc.max_b_frames, enc.gop_size = VIDEO_BITRATE_BPS, 0, gop
        # One thread: libvpx's automatic threads cost ~10x the CPU on these small pictures on a busy machine.
        enc.thread_count = 1
        if codec == "h264":
            # Constrained baseline (what the offer's 42e01f promises), no scene-cut keyframes: the keyframes are
            # exactly the forced ones, so frame 0 of the loop is one and the wrap decodes cleanly.
            enc.profile = "Baseline"
            enc.options = {"preset": "veryfast", "tune": "zerolatency", "x264-params": "scenecut=0"}
        else:
            enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        packets: list[bytes] = []
        keys: list[bool] = []
        started = time.process_time()
        for j in range(frames):
            mark = (j % period_frames(fps) < mark_frames(fps)) if sync else None
            buf = draw_picture(width, height, j, mark)
            frame = av.VideoFrame.from_numpy_buffer(buf.reshape(height * 3 // 2, width), "yuv420p")
            frame.pts = j
            if j % gop == 0:
                frame.pict_type = av.video.frame.PictureType.I
            out = [bytes(p) for p in enc.encode(frame)]
            if len(out) != 1:  # no lookahead is configured: one packet per frame, or the loop is unusable
                raise RuntimeError(f"{codec} encoder gave {len(out)} packets for frame {j}")
            packets.append(out[0])
            keys.append(j % gop == 0)
        log.info("encoded %s: %d frames in %.1f CPU-s, %.0f kbit/s", name, frames, time.process_time() - started,
                 sum(map(len, packets)) * 8 * fps / frames / 1000)
        return MediaLoop(packets, keys)

    return cached(name, make, use_cache)


def encode_audio_loop(tone_hz: float, loop_s: int, sync: bool, use_cache: bool = True) -> MediaLoop:
    name = f"opus-{tone_hz:g}hz-{loop_s}s-{'sync' if sync else 'plain'}"

    def make() -> MediaLoop:
        import av

        enc: Any = av.CodecContext.create("libopus", "w")
        enc.sample_rate, enc.layout, enc.format = AUDIO_RATE, "mono", "s16"
        enc.bit_rate = AUDIO_BITRATE_BPS
        enc.time_base = fractions.Fraction(1, AUDIO_RATE)
        pcm = np.clip(np.round(loop_audio(tone_hz, loop_s, sync) * 32767), -32768, 32767).astype(np.int16)
        count = pcm.size // AUDIO_PACKET_SAMPLES
        # Encoded twice over and the second pass kept: its first packet was encoded with the state the end of the
        # loop leaves, so the wrap sounds like any other packet boundary.
        packets: list[bytes] = []
        for i in range(2 * count):
            chunk = pcm[(i % count) * AUDIO_PACKET_SAMPLES : (i % count + 1) * AUDIO_PACKET_SAMPLES]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = AUDIO_RATE, i * AUDIO_PACKET_SAMPLES
            packets += [bytes(p) for p in enc.encode(frame)]
        packets += [bytes(p) for p in enc.encode(None)]
        if len(packets) < 2 * count:
            raise RuntimeError(f"opus encoder gave {len(packets)} packets for {2 * count} frames")
        # libopus emits one packet per 20 ms frame; its look-ahead delays output, not the packet count.
        return MediaLoop(packets[count : 2 * count])

    return cached(name, make, use_cache)


# ----- sending on the wall-clock grid -----------------------------------------------------------------------------
class MarkReporter:
    """Pairs the send times of a mark's first frame and of the packet that starts its burst (as synthetic.js's
    ``mark_sent`` records: n, nominal_ms, video_ms, audio_ms, epoch ms)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.marks: dict[int, dict[str, float]] = {}

    def sent(self, n: int, key: str, at_ms: float) -> None:
        entry = self.marks.setdefault(n, {"n": n, "nominal_ms": float(n * SYNC_PERIOD_MS)})
        entry[key] = at_ms
        if "video_ms" in entry and "audio_ms" in entry:
            del self.marks[n]
            emit_line({"participant": self.name, "event": "mark_sent", **entry})
        for old in [m for m in self.marks if m < n - 2]:  # one side never came (a stall)
            del self.marks[old]


def _tracks(media_video: MediaLoop, media_audio: MediaLoop, fps: int, marks: MarkReporter | None) -> tuple[Any, Any]:
    """Two aiortc tracks that hand out the loops' packets at their wall-clock instants."""
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    frame_ms = 1000.0 / fps
    video_base = fractions.Fraction(1, fps)
    audio_base = fractions.Fraction(1, AUDIO_RATE)
    period = period_frames(fps)
    packets_per_period = SYNC_PERIOD_MS // AUDIO_PACKET_MS

    class LoopVideoTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.k: int | None = None  # next frame index on the wall-clock grid (frame k at k / fps s)
            self.k0 = 0  # wall-clock frame of loop frame 0
            self.first = 0

        async def recv(self) -> Any:
            if self.readyState != "live":
                raise MediaStreamError
            now = time.time() * 1000
            if self.k is None:
                self.k = math.ceil(now / frame_ms)
                self.k0 = self.k // period * period  # the loop starts on a sync period of the wall clock
                # The first frame sent is a keyframe (at most a keyframe interval away): receivers decode from it.
                while media_video.keyframes and not media_video.keyframes[(self.k - self.k0) % len(media_video)]:
                    self.k += 1
                self.first = self.k
            elif now - self.k * frame_ms > frame_ms:  # stalled: skip frames, as a camera would
                self.k = math.floor(now / frame_ms)
            await asyncio.sleep(max(0.0, (self.k * frame_ms - time.time() * 1000) / 1000))
            j = (self.k - self.k0) % len(media_video)
            packet = av.Packet(media_video.packets[j])
            packet.pts, packet.time_base = self.k - self.first, video_base
            if marks is not None and self.k % period == 0:
                marks.sent(self.k // period, "video_ms", time.time() * 1000)
            self.k += 1
            return packet

    class LoopAudioTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.p: int | None = None  # next packet on the wall-clock grid (packet p at p * 20 ms)
            self.p0 = 0
            self.first = 0

        async def recv(self) -> Any:
            if self.readyState != "live":
                raise MediaStreamError
            now = time.time() * 1000
            if self.p is None:
                self.p = math.ceil(now / AUDIO_PACKET_MS)
                self.p0 = self.p // packets_per_period * packets_per_period
                self.first = self.p
            elif now - self.p * AUDIO_PACKET_MS > AUDIO_PACKET_MS * 10:  # stalled > 200 ms: skip, not burst
                self.p = math.floor(now / AUDIO_PACKET_MS)
            await asyncio.sleep(max(0.0, (self.p * AUDIO_PACKET_MS - time.time() * 1000) / 1000))
            q = (self.p - self.p0) % len(media_audio)
            packet = av.Packet(media_audio.packets[q])
            packet.pts, packet.time_base = (self.p - self.first) * AUDIO_PACKET_SAMPLES, audio_base
            if marks is not None and self.p % packets_per_period == 0:
                marks.sent(self.p // packets_per_period, "audio_ms", time.time() * 1000)
            self.p += 1
            return packet

    return LoopVideoTrack(), LoopAudioTrack()


# ----- the one adapter around aiortc's/aioice's internals ---------------------------------------------------------
# aioice checks consent (RFC 7675) every ~5 s with a single request that must be answered within 0.5 s, and closes
# the connection after 6 misses in a row. On a loaded machine Janus answers a subscriber connection's consent
# requests later than that (measured here: responses arriving after the 0.5 s timeout, 6 times running, so the
# viewer's media stopped ~32 s into a call while every answer did arrive). The adapter gives those requests
# retransmissions (answers up to ~7.5 s late count), so consent expires only when Janus really stopped answering.
# Touches aioice's StunProtocol.request; applied only to the aioice versions it was checked against.
CONSENT_RETRANSMISSIONS = 3
AIOICE_CHECKED = ("0.13.",)


def tolerate_slow_consent() -> bool:
    """Patch aioice (once per process); False when this aioice version is not one the patch was checked against."""
    import aioice
    from aioice import ice

    request = ice.StunProtocol.request
    if getattr(request, "sipbridge_patched", False):
        return True
    if not str(getattr(aioice, "__version__", "")).startswith(AIOICE_CHECKED):
        log.warning("aioice %s: consent checks left as they are (the adapter knows %s)",
                    getattr(aioice, "__version__", "?"), AIOICE_CHECKED)
        return False

    async def patched(self: Any, message: Any, addr: tuple[str, int], integrity_key: bytes | None = None,
                      retransmissions: int | None = None) -> Any:
        # retransmissions=0 is aioice's consent check and nothing else (aioice 0.13).
        if retransmissions == 0:
            retransmissions = CONSENT_RETRANSMISSIONS
        return await request(self, message, addr, integrity_key=integrity_key, retransmissions=retransmissions)

    patched.sipbridge_patched = True  # type: ignore[attr-defined]
    ice.StunProtocol.request = patched  # type: ignore[method-assign,assignment]
    return True


# ----- the Janus VideoRoom side -----------------------------------------------------------------------------------
def janus_url_of(room_url: str, janus: str | None) -> str:
    """The Janus WebSocket URL: given, or the one the room server tells its pages (``/config.json``)."""
    if janus:
        return janus
    with urllib.request.urlopen(room_url.rstrip("/") + "/config.json", timeout=5) as response:
        return str(json.loads(response.read())["janus"])


def janus_secret_of(room_url: str) -> str | None:
    """The Janus API secret the room server hands its pages (``/config.json``), when that Janus has one."""
    with urllib.request.urlopen(room_url.rstrip("/") + "/config.json", timeout=5) as response:
        secret = json.loads(response.read()).get("apisecret")
    return secret if isinstance(secret, str) and secret else None


def plugin_data(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("plugindata", {}).get("data", {})
    return data if isinstance(data, dict) else {}


async def wait_event(handle: Any, want: Any, timeout_s: float) -> dict[str, Any]:
    """The next event of ``handle`` for which ``want(event)`` holds; a plugin error raises."""
    deadline = time.monotonic() + timeout_s
    while True:
        event = await asyncio.wait_for(handle.events.get(), max(0.01, deadline - time.monotonic()))
        data = plugin_data(event)
        if data.get("error_code"):
            raise RuntimeError(f"videoroom error {data['error_code']}: {data.get('error')}")
        if event.get("janus") == "disconnected":
            raise ConnectionError("Janus connection closed")
        if want(event):
            return event


async def ensure_room(handle: Any, room: int, codec: str) -> None:
    create = {"request": "create", "room": room, "publishers": ROOM_PUBLISHERS, "bitrate": ROOM_BITRATE_BPS,
              "videocodec": ROOM_VIDEO_CODECS.get(codec, ROOM_VIDEO_CODECS["h264"]), "audiocodec": "opus",
              "fir_freq": ROOM_FIR_FREQ_S}
    reply = await handle.message(create)
    data = plugin_data(reply)
    if data.get("error_code") and data["error_code"] != ERROR_ROOM_EXISTS:
        raise RuntimeError(f"cannot create room {room}: {data.get('error')}")


async def join_room(client: Any, room: int, display: str, codec: str) -> tuple[Any, dict[str, Any]]:
    """Attach a VideoRoom handle and join as a publisher (possibly one that never publishes); the joined event."""
    handle = await client.attach("janus.plugin.videoroom")
    await ensure_room(handle, room, codec)
    await handle.message({"request": "join", "room": room, "ptype": "publisher", "display": display})
    joined = await wait_event(handle, lambda e: plugin_data(e).get("videoroom") == "joined", JOIN_TIMEOUT_S)
    return handle, plugin_data(joined)


async def wait_connected(pc: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline:
            raise ConnectionError(f"peer connection {pc.connectionState}")
        await asyncio.sleep(0.05)


def prefer_codec(transceiver: Any, mime: str) -> None:
    """Offer one codec (and its retransmissions): the loop is encoded in it."""
    from aiortc import RTCRtpSender

    codecs = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    chosen = [c for c in codecs if c.mimeType.lower() == mime.lower()
              and (mime.lower() != "video/h264" or c.parameters.get("profile-level-id") == H264_PROFILE)]
    if not chosen:
        raise RuntimeError(f"aiortc offers no {mime}")
    rtx = [c for c in codecs if c.mimeType.lower() == "video/rtx"]
    transceiver.setCodecPreferences(chosen + rtx)


@dataclass
class PublisherSpec:
    name: str
    tone_hz: float


class CheapPublisher:
    """One publisher: a Janus session with a VideoRoom handle and an aiortc PeerConnection sending the loops."""

    def __init__(self, janus_url: str, room: int, spec: PublisherSpec, codec: str, fps: int, video: MediaLoop,
                 audio: MediaLoop, sync_marks: bool, api_secret: str | None = None) -> None:
        self.janus_url, self.room, self.spec, self.codec, self.fps = janus_url, room, spec, codec, fps
        self.api_secret = api_secret
        self.video, self.audio, self.sync_marks = video, audio, sync_marks
        self.client: Any = None
        self.handle: Any = None
        self.pc: Any = None

    async def start(self) -> None:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        from stages.janus.client import JanusClient

        self.client = await JanusClient(self.janus_url, self.api_secret).connect()
        self.handle, _ = await join_room(self.client, self.room, self.spec.name, self.codec)
        self.pc = RTCPeerConnection()
        marks = MarkReporter(self.spec.name) if self.sync_marks else None
        video, audio = _tracks(self.video, self.audio, self.fps, marks)
        # Audio first (field notes: Janus and aiortc are fragile with video first).
        prefer_codec(self.pc.addTransceiver(audio, direction="sendonly"), "audio/opus")
        prefer_codec(self.pc.addTransceiver(video, direction="sendonly"), f"video/{self.codec.upper()}")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"type": "offer", "sdp": self.pc.localDescription.sdp}
        await self.handle.message({"request": "publish", "audio": True, "video": True}, jsep=offer)
        answered = await wait_event(self.handle, lambda e: "jsep" in e, JOIN_TIMEOUT_S)
        await self.pc.setRemoteDescription(RTCSessionDescription(answered["jsep"]["sdp"], answered["jsep"]["type"]))
        await wait_connected(self.pc, CONNECT_TIMEOUT_S)
        pc, name = self.pc, self.spec.name

        @pc.on("connectionstatechange")
        def on_state() -> None:
            # A publisher that lost its connection sends nothing more: say so where the harness reads.
            if pc.connectionState in ("failed", "closed") and not self.stopping:
                emit_line({"participant": name, "event": "status", "state": "error",
                           "text": f"publisher connection {pc.connectionState}"})

    stopping = False

    async def stop(self) -> None:
        self.stopping = True
        if self.handle is not None:
            with contextlib.suppress(Exception):
                await self.handle.message({"request": "leave"}, timeout_s=2.0)
        if self.pc is not None:
            await self.pc.close()
        if self.client is not None:
            await self.client.close()


def usage_record(started_wall: float, started_cpu: float, **extra: Any) -> dict[str, Any]:
    """This process's own CPU (cores over the wall time since ``started_wall``) and PSS."""
    from stages.browser.procs import pss_kb

    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - started_cpu
    wall = time.monotonic() - started_wall
    return {"event": "usage", "engine": "aiortc", "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "cores": round(cpu / wall, 4) if wall > 0 else None, "pss_kb": pss_kb(os.getpid()), **extra}


async def run_cheap(room_url: str, room: int, publishers: list[PublisherSpec], viewers: list[str], *,
                    janus: str | None, codec: str, width: int, height: int, fps: int, duration_s: float | None,
                    sync_marks: bool = False, loop_s: int = DEFAULT_LOOP_S,
                    keyframe_interval_s: float = DEFAULT_KEYFRAME_INTERVAL_S, use_cache: bool = True) -> int:
    """Publishers and receive-only viewers in one asyncio process; JSON lines like the Chromium runner's."""
    from sipbridge.room.cheap_viewer import CheapViewer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = janus_url_of(room_url, janus)
    secret = janus_secret_of(room_url)
    tolerate_slow_consent()
    video = None
    if publishers:
        video = await loop.run_in_executor(None, encode_video_loop, codec, width, height, fps, loop_s,
                                           keyframe_interval_s, sync_marks, use_cache)
    # The generator's own cost is measured from here: encoding the loop is a one-off, not the steady state.
    ru = resource.getrusage(resource.RUSAGE_SELF)
    started_cpu, started_wall = ru.ru_utime + ru.ru_stime, time.monotonic()
    running: list[Any] = []
    children: list[asyncio.subprocess.Process] = []
    counts = {"publishers": len(publishers), "viewers": len(viewers) if not publishers else 0}

    async def report_usage() -> None:
        while True:
            await asyncio.sleep(USAGE_INTERVAL_S)
            emit_line(usage_record(started_wall, started_cpu, **counts))

    reporter = asyncio.create_task(report_usage())
    try:
        for spec in publishers:
            assert video is not None
            audio = await loop.run_in_executor(None, encode_audio_loop, spec.tone_hz, loop_s, sync_marks, use_cache)
            publisher = CheapPublisher(url, room, spec, codec, fps, video, audio, sync_marks, secret)
            running.append(publisher)
            await publisher.start()
            emit_line({"participant": spec.name, "event": "joined", "engine": "aiortc", "time_ns": time.time_ns()})
        if publishers and viewers:
            # Viewers beside publishers run as child processes (same stdout, same process group): in one process
            # the viewer's aiortc handed over frames whose pictures went back in time (counters 319, 316, 317,
            # 316), measured on a loaded machine; in a process of its own it read them in order.
            for name in viewers:
                argv = [sys.executable, "-m", "sipbridge", "room", "viewer", "--engine", "aiortc", "--room-url",
                        room_url, "--room", str(room), "--name", name, "--janus", url, "--codec", codec]
                argv += (["--sync-marks"] if sync_marks else []) + (["--duration", str(duration_s)] if duration_s
                                                                     else [])
                children.append(await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL))
        else:
            for name in viewers:
                viewer = CheapViewer(url, room, name, codec=codec, sync_marks=sync_marks, api_secret=secret)
                running.append(viewer)
                await viewer.start()
                emit_line({"participant": name, "event": "joined", "engine": "aiortc", "time_ns": time.time_ns()})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration_s)
    finally:
        reporter.cancel()
        for child in children:
            if child.returncode is None:
                child.terminate()
                try:
                    await asyncio.wait_for(child.wait(), CHILD_STOP_TIMEOUT_S)
                except TimeoutError:
                    child.kill()
        emit_line(usage_record(started_wall, started_cpu, **counts))
        for member in reversed(running):
            with contextlib.suppress(Exception):
                await member.stop()
            emit_line({"participant": getattr(member, "name", None) or member.spec.name, "event": "left",
                       "time_ns": time.time_ns()})
    return 0
