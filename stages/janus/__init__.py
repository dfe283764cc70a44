"""The Janus stage: the pipeline's SIP leg.

Input: encoded packets (H.264/VP8 video, PCMU/PCMA/G.722/Opus audio) to send to the SIP
peer, without re-encoding. Output: what the SIP peer sends, as encoded packets on the
streams ``--video-stream`` / ``--audio-stream`` (the decoder stage decodes them), plus
Event(CALL_STATE) and Event(DTMF) control messages.

Janus is the SIP user agent (SIP plugin), aiortc is Janus's WebRTC peer. One stage
process holds one Janus session and one SIP plugin handle, so one call at a time (the SIP
plugin allows one call per handle); several calls are several stage processes.

Call control: ``--call URI`` dials at start; ``--inbound`` accepts incoming calls whose
caller matches ``--accept-from`` (others get ``--decline-code``). A ZeroMQ ROUTER socket
(``--control``, JSON; a REQ client works) takes ``{"cmd": "call", "uri": ..., "wait": true}``, ``hangup``,
``dtmf`` (``digits``, ``duration_ms``), ``hold``, ``unhold`` and ``status``, each validated
(``callcontrol.parse_command``) and answered ``{"ok": ...}``, an optional ``id`` echoed; requests run
concurrently, so a call that waits does not hold up a hangup.

Keyframes: a PLI/FIR from the SIP side becomes a KeyframeRequest sent upstream (to the
encoder); a KeyframeRequest from downstream (the decoder lost its reference) becomes a
PLI to the SIP side; aiortc also sends PLIs itself on packet loss.

Janus going away (crash, restart) ends the current call with state ``janus_disconnected``;
the stage reconnects, registers again and takes the next call without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import click
import zmq

from protocol import (
    AudioFrame,
    Codec,
    EncodedPacket,
    EndOfStream,
    Event,
    EventType,
    KeyframeRequest,
    MediaHeader,
    Message,
    VideoFrame,
)
from stages import codecs, memtrace
from stages.base import Stage, StageOptions, check_bind_free, default_endpoint
from stages.janus import aiortc_adapter
from stages.janus.avsync import AudioHold
from stages.janus.callcontrol import (
    ACTIVE_STATES,
    DTMF_DIGITS,
    DTMF_DURATION_MS,
    REQUEST_MAX_BYTES,
    ROOM_WAIT_MAX_S,
    Accept,
    Action,
    CallState,
    CallView,
    Command,
    CommandError,
    Decline,
    DtmfReceived,
    EndCall,
    InboundRules,
    KeepWaiting,
    MarkAccepted,
    MarkMediaUp,
    Note,
    NotPlaced,
    PeerHold,
    Publish,
    RedialPolicy,
    Registered,
    ReportError,
    RequestKeyframe,
    RoomGate,
    SetAnswer,
    SetSipCallId,
    error_reply,
    on_janus_event,
    parse_command,
    plugin_data,
    request_id_of,
)
from stages.janus.client import JanusClient, JanusDisconnected, JanusError, JanusHandle
from stages.janus.media import CODEC_BY_RTP_NAME, KeyframeThrottle, PacketTrack, ReceivedFrame, make_packet
from stages.janus.sip import CallInfo, SipCall
from stages.janus.sipprobe import ProbeError, learn_sip_address
from stages.options import build_options, run, stage_options

SIP_PLUGIN = "janus.plugin.sip"
HANDLE_SWITCHED = {"janus": "sipbridge_handle_switched"}  # our own marker in a retired handle's event queue
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
REGISTER_TIMEOUT_S = 10.0
REGISTER_RETRY_S = 30.0
REDIAL_POLL_S = 0.5  # a pending re-dial looks again this often whether the stage is registered
# Control requests carried out at once; more are answered "busy" (a client cannot pile up tasks without bound).
CONTROL_MAX_IN_FLIGHT = 32
CONTROL_MAX_FRAMES = 4  # client id, delimiter, request; a DEALER may skip the delimiter
STOP_HANGUP_TIMEOUT_S = 2.0
OUTBOX_FLUSH_TIMEOUT_S = 2.0
# The Janus loop's own clean-up at a stop (the BYE, closing the peer connection and the Janus session): bounded, so
# that a stop ends in time whatever hangs there.
STOP_CLEANUP_TIMEOUT_S = 5.0
# A SIP peer that vanished (crashed, unplugged, NAT binding gone) sends no BYE: without media from it for this
# long the call is hung up. Long enough for silence suppression on an audio-only call; 0 turns it off.
DEFAULT_MEDIA_TIMEOUT_S = 30.0
MEDIA_WATCHDOG_INTERVAL_S = 1.0
DTMF_GAP_S = 0.1
# One keyframe request per this interval is plenty: an encoder takes a frame or two to react.
KEYFRAME_REQUEST_MIN_INTERVAL_S = 0.25
# While a call is up, what the peer took is said upstream again this often: a restarted encoder or transformer
# learns it (they stop composing and encoding a kind the peer refused).
MEDIA_ANNOUNCE_INTERVAL_S = 5.0


@dataclass
class SipSettings:
    janus_url: str = "ws://127.0.0.1:8188"
    api_secret: str | None = None
    identity: str = "sip:bridge@127.0.0.1"
    display_name: str | None = None
    register: str = "guest"  # guest: no REGISTER sent; digest: REGISTER with authuser/secret at proxy
    proxy: str | None = None
    authuser: str | None = None
    secret: str | None = None
    call_uri: str | None = None
    redial_s: float = 0.0  # > 0: call call_uri again this long after a call ends or fails
    # A call that Janus took down with it (crash, restart) is dialled again once reconnected and registered.
    redial_after_janus_restart: bool = True
    redial_backoff_s: float = 1.0  # failed re-dials in a row wait this long, doubling ...
    redial_backoff_max_s: float = 30.0  # ... up to this
    redial_max_tries: int = 0  # failed re-dials in a row before giving up; 0 = no limit
    inbound: bool = False
    accept_from: str = ".*"
    decline_code: int = 486
    audio_codecs: list[Codec] = field(default_factory=lambda: [Codec.PCMU])
    video_codec: Codec | None = Codec.H264
    video_stream: str = "sip-video"
    audio_stream: str = "sip-audio"
    control: str | None = None
    low_latency_jitter_buffer: bool = True
    # auto: RFC 4733 events in the audio when the peer took telephone-event, else SIP INFO.
    dtmf_method: str = "auto"
    media_timeout_s: float = DEFAULT_MEDIA_TIMEOUT_S
    # > 0: an outbound call is placed only once the room's bot reports it joined, waiting at most this long.
    wait_for_room_s: float = 0.0
    # Inbound: where the stage listens for the probe MESSAGE that tells it its handle's SIP port (sipprobe.py);
    # None: the Janus URL's host (Janus on this host), "" never probes.
    sip_probe_host: str | None = None


class JanusStage(Stage):
    # The end of the direction that feeds it (see Stage.forwards_control).
    forwards_control = False
    process_on_loop = True  # process() wraps a packet for aiortc, on the loop where it is sent

    def __init__(self, options: StageOptions, settings: SipSettings) -> None:
        super().__init__(options)
        self.settings = settings
        self._rules = InboundRules(settings.inbound, re.compile(settings.accept_from), settings.decline_code)
        self.client: JanusClient | None = None
        self.handle: JanusHandle | None = None
        self.call: SipCall | None = None
        self.registered = False
        self.registration: dict[str, Any] = {"state": CallState.IDLE}
        self.last_call: CallInfo | None = None
        self.counters: dict[str, int] = {"calls_started": 0, "calls_connected": 0, "calls_failed": 0,
                                         "calls_declined": 0, "janus_reconnects": 0, "dtmf_sent": 0,
                                         "dtmf_received": 0, "plis_from_sip": 0, "plis_to_sip": 0, "media_timeouts": 0,
                                         "control_requests": 0, "control_rejected": 0, "sip_handles": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._seq: dict[str, int] = {}
        self._media_streams_seen: set[str] = set()
        self._upstream_video: str = ""
        self._kf_throttle = KeyframeThrottle(KEYFRAME_REQUEST_MIN_INTERVAL_S)
        self._state_changed = asyncio.Event()
        self._first_packet_sent_ns: int | None = None
        self._last_media_rx_s = 0.0  # monotonic time of the last frame from the SIP side (or of media up)
        self._peer_on_hold = False  # the peer's last re-offer was sendonly or inactive
        self._video_keyframe_sent = False
        # Audio waits for the video's delay through the bridge (lip sync at SIP peers that play on arrival).
        self.audio_hold = AudioHold()
        self._held_audio: collections.deque[tuple[float, PacketTrack, Any]] = collections.deque()
        self._held_timer: asyncio.TimerHandle | None = None
        self._dialled_at_start = False
        self._handle_used = False  # the current SIP handle had a call (see _fresh_handle)
        self._helpers: list[JanusHandle] = []  # inbound: helper handles of self.handle (see _add_helper)
        self._master_id: int | None = None
        self.redial = RedialPolicy(settings.redial_after_janus_restart, settings.redial_s, settings.redial_backoff_s,
                                   settings.redial_backoff_max_s, settings.redial_max_tries)
        self._redial_task: asyncio.Task[None] | None = None
        self.room = RoomGate(settings.wait_for_room_s)
        self._room_changed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        """Run a coroutine in the background, keeping a reference and logging its failure."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.report_error("background_task_failed", repr(t.exception()))

        task.add_done_callback(done)

    # ----- statistics -----------------------------------------------------------------------
    def extra_figures(self) -> dict[str, Any]:
        call = self.call.info if self.call is not None else self.last_call
        figures: dict[str, Any] = {"registration": dict(self.registration), **self.counters}
        if self.room.wait_s > 0:
            figures["bot"] = self.room.state or "unknown"
        if call is not None:
            figures["call"] = {k: v for k, v in asdict(call).items() if v is not None}
        if self.call is not None:
            for kind, track in (("audio", self.call.audio_track), ("video", self.call.video_track)):
                if track is not None:
                    figures[f"{kind}_packets_sent"] = track.sent
                    figures[f"{kind}_packets_dropped"] = track.dropped
        video_delay = self.audio_hold.video_delay_s(time.monotonic())
        figures["lipsync"] = {"audio_held": self.audio_hold.held, "audio_hold_capped": self.audio_hold.capped,
                              "video_delay_ms": None if video_delay is None else round(video_delay * 1000, 1)}
        return figures

    # ----- input: packets to send to the SIP peer (codec thread) -----------------------------------
    def process(self, msg: Message) -> Iterable[Message]:
        """Runs on the event loop (``process_on_loop``): wrap the packet and hand it to the call's track."""
        if isinstance(msg, (VideoFrame, AudioFrame)):
            self.drops["raw_frame_not_sendable"] += 1
            return ()
        if not isinstance(msg, EncodedPacket):
            return ()
        packet = make_packet(bytes(msg.data), msg.header.pts, msg.header.time_base, msg.keyframe)
        self._send_packet(msg.codec, msg.header.stream_id, packet, msg.header.capture_time_ns)
        return ()

    def _send_packet(self, codec: Codec, stream_id: str, packet: Any, capture_ns: int) -> None:
        call = self.call
        if call is None or call.info.state not in (CallState.ACCEPTED, CallState.MEDIA_UP, CallState.RESUMED,
                                                   CallState.HOLDING, CallState.ON_HOLD):
            self.drops["no_call"] += 1
            return
        kind = "video" if codec.is_video else "audio"
        track = call.video_track if codec.is_video else call.audio_track
        negotiated = call.negotiated(kind)
        if track is None or negotiated is None:
            self.drops[f"{kind}_not_negotiated"] += 1
            return
        if CODEC_BY_RTP_NAME.get(negotiated) is not codec:
            self.drops["codec_mismatch"] += 1
            self.report_error("codec_mismatch", f"{stream_id} carries {codec.name} but the call negotiated "
                              f"{negotiated}", stream_id, call.info.call_id)
            return
        if codec.is_video:
            self._upstream_video = stream_id
            if not self._video_keyframe_sent:
                if not packet.is_keyframe:
                    # The peer cannot decode anything before the first keyframe of the call.
                    self.drops["video_waiting_keyframe"] += 1
                    self._request_keyframe("call needs a keyframe")
                    return
                self._video_keyframe_sent = True
        now_ns = time.time_ns()
        if self._first_packet_sent_ns is None:
            self._first_packet_sent_ns = now_ns
        age_s = (now_ns - capture_ns) / 1e9
        if codec.is_video:
            self.audio_hold.video_sent(time.monotonic(), age_s)
            track.push(packet)
            return
        self._hold_audio(track, packet, age_s)

    # ----- lip sync: audio waits for the video's delay (avsync.py) ------------------------------------
    def _hold_audio(self, track: PacketTrack, packet: Any, age_s: float) -> None:
        now = time.monotonic()
        release = self.audio_hold.release_at(now, age_s)
        if release <= now and not self._held_audio:
            track.push(packet)
            return
        self._held_audio.append((release, track, packet))
        if self._held_timer is None:
            self._arm_held_timer()

    def _arm_held_timer(self) -> None:
        assert self._loop is not None
        first = self._held_audio[0][0]
        self._held_timer = self._loop.call_at(self._loop.time() + max(0.0, first - time.monotonic()),
                                              self._release_held_audio)

    def _release_held_audio(self) -> None:
        self._held_timer = None
        now = time.monotonic()
        while self._held_audio and self._held_audio[0][0] <= now:
            _, track, packet = self._held_audio.popleft()
            track.push(packet)  # a track of a call that ended meanwhile ignores it
        if self._held_audio:
            self._arm_held_timer()

    def _drop_held_audio(self) -> None:
        self._held_audio.clear()
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None

    # ----- keyframes ------------------------------------------------------------------------
    def on_keyframe_request(self, request: KeyframeRequest) -> bool:
        """Downstream (our decoder) lost its reference: ask the SIP peer for a keyframe."""
        if request.stream_id and request.stream_id != self.settings.video_stream:
            return True  # nothing upstream of us produces the SIP side's media
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._spawn(self._pli_to_sip(request.reason)))
        return True

    async def _pli_to_sip(self, reason: str) -> None:
        if self.call is not None and await self.call.request_keyframe_from_peer():
            self.counters["plis_to_sip"] += 1
            self.log.info("call %s: asked the SIP peer for a keyframe (%s)", self.call.info.call_id, reason)

    def _keyframe_requested_by_sip(self) -> None:
        self.counters["plis_from_sip"] += 1
        self._request_keyframe("PLI/FIR from the SIP peer")

    def _request_keyframe(self, reason: str) -> None:
        """Ask the encoder for a keyframe, at most once per KEYFRAME_REQUEST_MIN_INTERVAL_S; a request inside the
        interval is sent at its end (KeyframeThrottle)."""
        wait_s = self._kf_throttle.request(time.monotonic())
        if wait_s == 0.0:
            self._spawn(self.request_keyframe_upstream(self._upstream_video, reason))
        elif wait_s is not None:
            self._spawn(self._request_keyframe_later(wait_s, reason))

    async def _request_keyframe_later(self, wait_s: float, reason: str) -> None:
        try:
            await asyncio.sleep(wait_s)
        except asyncio.CancelledError:
            self._kf_throttle.cancel()
            raise
        self._kf_throttle.fire(time.monotonic())
        await self.request_keyframe_upstream(self._upstream_video, reason)

    # ----- the room's bot ------------------------------------------------------------------------
    async def on_control(self, msg: Message) -> None:
        """The bot's STAGE_STATE events come in-band through the room-to-SIP stages: a waiting call looks again."""
        if not (isinstance(msg, Event) and msg.type is EventType.STAGE_STATE):
            return
        was_in = self.room.in_room
        if self.room.observe(msg.attributes):
            if self.room.in_room != was_in and self.room.wait_s > 0:
                self.log.info("the room's bot is %s", "in the room" if self.room.in_room else
                              f"out of the room ({self.room.describe()})")
            self._room_changed.set()

    # ----- output: what the SIP peer sends --------------------------------------------------------
    def _on_received(self, kind: str, frame: ReceivedFrame) -> None:
        self._last_media_rx_s = time.monotonic()
        stream_id = self.settings.video_stream if kind == "video" else self.settings.audio_stream
        seq = self._seq.get(stream_id, 0)
        self._seq[stream_id] = seq + 1
        self._media_streams_seen.add(stream_id)
        now_ns = time.time_ns()
        header = MediaHeader(stream_id, seq, frame.timestamp, Fraction(1, frame.clock_rate), now_ns)
        figures = self.streams[stream_id]
        figures.frames_in += 1
        figures.bytes_in += len(frame.data)
        # Media enters the bridge here (no input message does it): the receive times give the row its frame rate.
        figures.last_ns = now_ns
        if not figures.first_ns:
            figures.first_ns = now_ns
        self._outbox.put_nowait(EncodedPacket(header, frame.codec, frame.keyframe, frame.data))

    async def _drain_outbox(self) -> None:
        while True:
            msg = await self._outbox.get()
            await self.emit(msg)

    # ----- call state ---------------------------------------------------------------------------
    def _publish_state(self, info: CallInfo | None, state: str, **extra: Any) -> None:
        attributes: dict[str, Any] = {"state": state, **extra}
        if info is not None:
            info.state = state
            attributes.update({k: v for k, v in asdict(info).items() if v is not None and k != "state"})
        shown = dict(extra)
        if info is not None:
            # The SIP code and reason, the peer and the negotiated codecs belong in the log line too.
            for key in ("direction", "peer", "code", "reason", "audio_codec", "video_codec"):
                value = getattr(info, key)
                if value not in (None, "") and key not in shown and (key in ("code", "reason") or state in (
                        CallState.CALLING, CallState.INCOMING, CallState.ACCEPTED)):
                    shown[key] = value
        self.log.info("call %s: %s%s", attributes.get("call_id", "-"), state,
                      "".join(f" {k}={v}" for k, v in shown.items()))
        self._outbox.put_nowait(Event(EventType.CALL_STATE, "", attributes))
        self._state_changed.set()
        if info is not None and state == CallState.ACCEPTED:
            self._spawn(self._announce_media(info))

    async def _announce_media(self, info: CallInfo | None) -> None:
        """Tell the stages upstream (encoder, transformer, decoder) which media kinds the SIP peer took, on their
        control sockets (never behind media): a kind it refused (a video line answered with port 0) is then not
        composed, encoded or decoded for nothing. ``None``: no call, every kind is made again."""
        media = {"audio": True, "video": True}
        call_id = ""
        if info is not None:
            media = {"audio": info.audio_codec is not None, "video": info.video_codec is not None}
            call_id = info.call_id
        await self.send_upstream(Event(EventType.CALL_STATE, "", {"state": info.state if info else CallState.IDLE,
                                                                  "call_id": call_id, "media": media}))

    async def _media_announcer(self) -> None:
        while True:
            await asyncio.sleep(MEDIA_ANNOUNCE_INTERVAL_S)
            call = self.call
            if call is not None and call.info.accepted_ns is not None:
                await self._announce_media(call.info)

    async def _end_call(self, state: str, code: int | None = None, reason: str = "") -> None:
        call, self.call = self.call, None
        if call is None:
            return
        self._drop_held_audio()
        info = call.info
        info.code = code if code is not None else info.code
        info.reason = reason or info.reason
        info.ended_ns = time.time_ns()
        self.last_call = info
        if state == CallState.FAILED or (state == CallState.DISCONNECTED and info.accepted_ns is None):
            self.counters["calls_failed"] += 1
        self._publish_state(info, state)
        if state in (CallState.FAILED, CallState.DISCONNECTED):
            self.report_error("call_failed" if state == CallState.FAILED else "janus_disconnected",
                              f"SIP {info.code} {info.reason}".strip() if info.code else info.reason or state,
                              call_id=info.call_id)
        await call.close()
        # A call that was never placed (it waited for the room) has no handle to reset.
        handle = None if call.waiting_for_room else self._handle_of(call)
        if handle is not None and state != CallState.DISCONNECTED:
            # Janus keeps the handle's ICE/DTLS state after a failed or ended call; reset it so that
            # the same handle (and its registration) takes the next call.
            with contextlib.suppress(JanusDisconnected):
                await handle.hangup_webrtc()
            if handle in self._helpers:
                # A helper that had a call may stay busy ending it (a BYE to a vanished peer: 32 s): the next
                # caller gets a new helper, and this one goes.
                self._spawn(self._replace_helper(handle))
        self._schedule_redial(call, state)
        if info.accepted_ns is not None:
            await self._announce_media(None)  # between calls every kind is made again, ready for the next
        for stream_id in sorted(self._media_streams_seen):
            self._outbox.put_nowait(EndOfStream(stream_id))
        self._media_streams_seen.clear()

    def _control_endpoint(self) -> str:
        return self.settings.control or default_endpoint(self.name, "control")

    def _open_sockets(self) -> None:
        # The control socket too: ZeroMQ would unlink a live stage's socket file and bind in its place, so a second
        # stage for the same run folder (a second `sipbridge up`) would take over the first one's call control.
        # EndpointInUse ends this stage at start, with the endpoint named, before anything is bound.
        check_bind_free(self._control_endpoint())
        super()._open_sockets()

    # ----- Janus connection and registration -------------------------------------------------------
    async def produce(self) -> None:
        self._loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(self._drain_outbox(), name="outbox")]
        control = self._control_endpoint()
        tasks.append(asyncio.create_task(self._command_loop(control), name="control"))
        tasks.append(asyncio.create_task(self._media_announcer(), name="media-announcer"))
        if self.settings.media_timeout_s > 0:
            tasks.append(asyncio.create_task(self._media_watchdog(), name="media-watchdog"))
        janus = asyncio.create_task(self._janus_loop(), name="janus")
        # Frames of every size through aiortc fragmented the heap: +0.04 MB/min of free heap in a soak (memtrace.py).
        heap = asyncio.create_task(memtrace.keep_heap_small(), name="heap")
        try:
            # A helper that ends (its socket failed to bind, a bug) would leave a stage that looks alive with no
            # call control or no events: end the stage instead, so it is restarted and the failure is in its log.
            await asyncio.wait([janus, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done():
                    failure = None if task.cancelled() else task.exception()
                    raise RuntimeError(f"the {task.get_name()} task ended: {failure!r}") from failure
            await janus
        finally:
            # A stop cancels this coroutine: the Janus loop's own clean-up (the BYE of a stop) runs to its end first.
            heap.cancel()
            janus.cancel()
            cleanup = asyncio.gather(janus, heap, return_exceptions=True)
            try:
                await asyncio.wait_for(asyncio.shield(cleanup), STOP_CLEANUP_TIMEOUT_S)
            except TimeoutError:
                # A stop must end within supervisord's stopwaitsecs; say where the clean-up hung (seen once in CI
                # after a Janus restart: the stage was killed 10 s after its SIGTERM) and go on without it.
                where = io.StringIO()
                janus.print_stack(file=where)
                self.log.warning("Janus clean-up not done %.0f s after the stop; leaving it. It waits at:\n%s",
                                 STOP_CLEANUP_TIMEOUT_S, where.getvalue())
                janus.cancel()
            tasks[0].cancel()
            # Deliver the last call-state events before the end of stream goes out.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._flush_outbox(), OUTBOX_FLUSH_TIMEOUT_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _media_watchdog(self) -> None:
        while True:
            await asyncio.sleep(MEDIA_WATCHDOG_INTERVAL_S)
            call = self.call
            if self._peer_on_hold or call is None or call.info.media_up_ns is None or call.info.state not in (
                    CallState.MEDIA_UP, CallState.RESUMED, CallState.ACCEPTED):
                continue  # not up yet, on hold (a held peer may send nothing), or ending
            silent_s = time.monotonic() - self._last_media_rx_s
            if silent_s < self.settings.media_timeout_s:
                continue
            reason = f"no media from the SIP peer for {silent_s:.0f} s"
            self.log.warning("call %s: %s; hanging up", call.info.call_id, reason)
            self.report_error("media_timeout", reason, call_id=call.info.call_id)
            self.counters["media_timeouts"] += 1
            call.hangup_reason = reason
            handle = self._handle_of(call)
            if handle is not None:
                # A vanished peer will not answer the BYE: end the call here rather than after the SIP timeout.
                with contextlib.suppress(JanusError, JanusDisconnected, asyncio.TimeoutError):
                    await asyncio.wait_for(handle.message({"request": "hangup"}), STOP_HANGUP_TIMEOUT_S)
            if self.call is call:
                await self._end_call(CallState.ENDED, reason=reason)

    async def _flush_outbox(self) -> None:
        while not self._outbox.empty():
            await self.emit(self._outbox.get_nowait())

    async def _hangup_for_stop(self) -> None:
        """The stage is stopping: end the call with a BYE rather than leaving the peer hanging."""
        if self.call is None:
            return
        if self.call.waiting_for_room:  # no INVITE went out, no BYE is owed
            self.call.info.not_placed = True
            await self._end_call(CallState.ENDED, reason="not placed: the bridge stopped while the bot was not in "
                                 f"the room ({self.room.describe()})")
            return
        handle = self._handle_of(self.call)
        if handle is not None and self.client is not None and not self.client.closed.is_set():
            with contextlib.suppress(JanusError, JanusDisconnected, asyncio.TimeoutError):
                await asyncio.wait_for(handle.message({"request": "hangup"}), STOP_HANGUP_TIMEOUT_S)
        await self._end_call(CallState.ENDED, reason="hung up: the bridge is stopping")

    async def _janus_loop(self) -> None:
        backoff = RECONNECT_MIN_S
        first = True
        while not self._stopping.is_set():
            try:
                self.client = await JanusClient(self.settings.janus_url, self.settings.api_secret).connect()
            except (TimeoutError, JanusDisconnected, JanusError) as exc:
                if first:
                    self.log.warning("Janus not reachable at %s yet: %s", self.settings.janus_url, exc)
                    first = False
                await asyncio.sleep(backoff)
                backoff = min(RECONNECT_MAX_S, backoff * 2)
                continue
            if not first or self.counters["janus_reconnects"]:
                self.log.info("reconnected to Janus")
            backoff = RECONNECT_MIN_S
            try:
                await self._session()
            except (TimeoutError, JanusDisconnected, JanusError) as exc:
                self.log.warning("Janus session lost: %s", exc)
            finally:
                if self._stopping.is_set():
                    # A stop is a clean hang-up (BYE to the peer), not a lost connection.
                    await self._hangup_for_stop()
                self.registered = False
                self.handle = None
                self._helpers = []
                if self.call is not None:
                    await self._end_call(CallState.DISCONNECTED, reason="Janus connection lost")
                if self.registration.get("state") != CallState.REGISTRATION_FAILED:
                    self.registration = {"state": CallState.IDLE}
                client, self.client = self.client, None
                if client is not None:
                    await client.close()
            if not self._stopping.is_set():
                self.counters["janus_reconnects"] += 1
                self._publish_state(None, CallState.DISCONNECTED, reason="Janus connection lost; reconnecting")
                await asyncio.sleep(RECONNECT_MIN_S)

    async def _session(self) -> None:
        assert self.client is not None
        self.handle = await self.client.attach(SIP_PLUGIN)
        self._handle_used = False
        self.counters["sip_handles"] += 1
        await self._register(self.handle)
        if self.settings.inbound:
            await self._add_helper()
        if self.settings.call_uri and not self._dialled_at_start:
            self._dialled_at_start = True  # later dials are the re-dial policy's (see _schedule_redial)
            self._spawn(self._place_call(self.settings.call_uri))
        while True:
            event = await self.handle.events.get()
            if self.log.isEnabledFor(logging.DEBUG):  # how tests/janus_sip_events.json was recorded
                self.log.debug("Janus message: %s", json.dumps(event))
            if event.get("janus") == "disconnected":
                raise JanusDisconnected("Janus connection closed")
            if event is HANDLE_SWITCHED or event.get("janus") == HANDLE_SWITCHED["janus"]:
                continue
            sender = event.get("sender")
            if isinstance(sender, int) and sender != self.handle.id and sender not in {h.id for h in self._helpers}:
                # A retired handle (see _fresh_handle) still ending its old call: not this call's business.
                self.log.info("ignoring %s from retired SIP handle %d", event.get("janus"), sender)
                continue
            try:
                await self._on_event(event)
            except JanusDisconnected:
                raise
            except Exception as exc:  # one bad call (an SDP aiortc refuses, a timeout) must not stop the stage
                call_id = self.call.info.call_id if self.call is not None else ""
                self.report_error("call_setup_failed", f"{type(exc).__name__}: {exc}", call_id=call_id)
                handle = self._handle_of(self.call) if self.call is not None else None
                if self.call is not None and handle is not None:
                    with contextlib.suppress(JanusError, JanusDisconnected, asyncio.TimeoutError):
                        await handle.message({"request": "hangup"})
                if self.call is not None:
                    await self._end_call(CallState.FAILED, reason=f"{type(exc).__name__}: {exc}")

    def _handle_of(self, call: SipCall) -> JanusHandle | None:
        """The SIP handle a call runs on (an inbound call may be on a helper), else the main one."""
        handle = call.handle
        if isinstance(handle, JanusHandle) and (handle is self.handle or handle in self._helpers):
            return handle
        return self.handle

    async def _add_helper(self) -> None:
        """Attach a helper handle of the registered one (Janus's way to take a call while a handle is busy).

        An inbound handle cannot be replaced like an outbound one (its SIP port is where callers reach it),
        and after a call it can stay busy for a while: ending the media, or 32 s of BYE retransmissions to a
        peer that vanished. An INVITE that finds it busy goes to a free helper on the same SIP stack instead of
        getting 486. Its events come on the same queue as the main handle's (told apart by sender).
        """
        assert self.client is not None and self.handle is not None
        if self._master_id is None:
            self.log.warning("Janus gave no master_id for the SIP handle: no helper handle for a second caller")
            return
        helper = await self.client.attach(SIP_PLUGIN)
        helper.events = self.handle.events
        await helper.message({"request": "register", "type": "helper", "username": self.settings.identity,
                              "master_id": self._master_id})
        self._helpers.append(helper)
        self.counters["sip_handles"] += 1

    async def _replace_helper(self, helper: JanusHandle) -> None:
        if helper in self._helpers:
            self._helpers.remove(helper)
        await helper.detach()
        if self.client is not None and self.handle is not None and not self._stopping.is_set():
            await self._add_helper()

    def _register_request(self) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"request": "register", "username": s.identity}
        if s.display_name:
            body["display_name"] = s.display_name
        if s.register == "guest":
            body["type"] = "guest"
        else:
            if s.secret is not None:
                body["secret"] = s.secret
            if s.authuser:
                body["authuser"] = s.authuser
            if s.proxy:
                body["proxy"] = s.proxy
        return body

    async def _register(self, handle: JanusHandle, announce: bool = True) -> None:
        self.registration = {"state": CallState.REGISTERING, "mode": self.settings.register}
        await handle.message(self._register_request())
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                event = await asyncio.wait_for(handle.events.get(), deadline - time.monotonic())
            except TimeoutError:
                break
            if event.get("janus") == "disconnected":
                raise JanusDisconnected("Janus connection closed while registering")
            data = plugin_data(event)
            result = data.get("result", {}) if data else {}
            name = result.get("event")
            if name == "registered":
                self.registered = True
                master_id = result.get("master_id")  # what a helper of this handle names (see _add_helper)
                self._master_id = master_id if isinstance(master_id, int) else None
                self.registration = {"state": CallState.REGISTERED, "mode": self.settings.register,
                                     "username": result.get("username"), "register_sent": result.get("register_sent")}
                if not announce:
                    return
                contact = await self._learn_contact(handle) if self.settings.inbound else None
                self._publish_state(None, CallState.REGISTERED, identity=self.settings.identity,
                                    register_sent=bool(result.get("register_sent")),
                                    **({"contact": contact} if contact else {}))
                return
            if name == "registration_failed" or (data and "error_code" in data):
                code = result.get("code", data.get("error_code"))
                reason = result.get("reason", data.get("error", ""))
                self.registration = {"state": CallState.REGISTRATION_FAILED, "code": code, "reason": reason}
                self._publish_state(None, CallState.REGISTRATION_FAILED, code=code, reason=reason)
                self.report_error("registration_failed", f"SIP {code} {reason}")
                # Wrong credentials will not fix themselves: wait long before trying again.
                await asyncio.sleep(REGISTER_RETRY_S)
                raise JanusError(int(code or 0), f"registration failed: {reason}")
            if name != "registering":
                await self._on_event(event)
        self.registration = {"state": CallState.REGISTRATION_FAILED, "reason": "timeout"}
        self._publish_state(None, CallState.REGISTRATION_FAILED, reason="no answer to REGISTER")
        self.report_error("registration_failed", "no answer to REGISTER")
        raise TimeoutError("registration timed out")

    async def _learn_contact(self, handle: JanusHandle) -> str | None:
        """Inbound: the SIP URI callers reach this handle at (its own random port; see sipprobe.py), also put in
        the registration figures (``contact``) for `sipbridge status` and the node. None when it cannot be told."""
        host = self.settings.sip_probe_host
        if host is None:
            host = urlsplit(self.settings.janus_url).hostname or ""
            host = "127.0.0.1" if host == "localhost" else host
        if not host:
            return None

        async def send_message(uri: str, token: str) -> object:
            return await handle.message({"request": "message", "uri": uri, "content": token,
                                         "content_type": "text/plain"})
        try:
            sip_host, sip_port = await learn_sip_address(send_message, host)
        except (ProbeError, JanusError) as exc:
            self.log.warning("inbound: cannot tell which SIP port the Janus handle listens on: %s", exc)
            self.report_error("sip_probe_failed", str(exc))
            return None
        user = re.sub(r"^sips?:", "", self.settings.identity).split("@", 1)[0] if "@" in self.settings.identity \
            else ""
        shown_host = f"[{sip_host}]" if ":" in sip_host else sip_host
        contact = f"sip:{user + '@' if user else ''}{shown_host}:{sip_port}"
        self.registration["contact"] = contact
        self.log.info("inbound: callers reach this bridge at %s (its Janus SIP handle's own port)", contact)
        return contact

    # ----- calls -------------------------------------------------------------------------------
    def _new_call(self, direction: str, peer: str, call_id: str | None = None) -> SipCall:
        info = CallInfo(call_id=call_id or SipCall.new_call_id(), direction=direction, peer=peer)
        self._first_packet_sent_ns = None
        self._video_keyframe_sent = False
        self._peer_on_hold = False
        self._drop_held_audio()
        self.audio_hold.reset()
        return SipCall(info, self.settings.audio_codecs, self.settings.video_codec, self._on_received,
                       self._keyframe_requested_by_sip, self._on_rfc2833, self.settings.low_latency_jitter_buffer)

    async def _place_call(self, uri: str) -> CallInfo:
        if self.handle is None or not self.registered:
            raise RuntimeError("not registered with Janus yet")
        if self.call is not None:
            raise RuntimeError(f"a call is already active ({self.call.info.call_id})")
        call = self._new_call("outbound", uri)
        self.call = call
        self.counters["calls_started"] += 1
        if isinstance(self.room.decide(0.0), KeepWaiting):
            # No INVITE while the bot is not in the room: the peer would answer into silence (issues 12, 14).
            call.waiting_for_room = True
            call.info.reason = (f"waiting up to {self.room.wait_s:g} s for the bot to be in the room "
                                f"({self.room.describe()})")
            self._publish_state(call.info, CallState.WAITING_FOR_ROOM)
            self._spawn(self._dial_when_in_room(call, uri))
            return call.info
        await self._dial(call, uri)
        return call.info

    async def _dial_when_in_room(self, call: SipCall, uri: str) -> None:
        """Place a waiting call once the bot is in the room; end it unplaced, with the bot's reason, past the bound."""
        started = time.monotonic()
        while self.call is call:  # a hangup, a stop or a lost Janus ends the waiting call meanwhile
            self._room_changed.clear()  # before deciding: a change from now on wakes the wait below
            decision = self.room.decide(time.monotonic() - started)
            if isinstance(decision, NotPlaced):
                call.info.not_placed = True
                self.log.warning("call %s: %s", call.info.call_id, decision.reason)
                await self._end_call(CallState.FAILED, reason=decision.reason)
                return
            if not isinstance(decision, KeepWaiting):
                if self.handle is None or not self.registered:
                    return  # Janus went away meanwhile: the call ended with it (see _janus_loop)
                self.log.info("call %s: the bot is in the room after %.1f s: dialling %s", call.info.call_id,
                              time.monotonic() - started, uri)
                await self._dial(call, uri)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._room_changed.wait(), decision.remaining_s)

    async def _dial(self, call: SipCall, uri: str) -> None:
        """Send the INVITE of an outbound call (through Janus, on a fresh handle when the last one had a call)."""
        call.waiting_for_room = False
        call.info.reason = ""
        self._publish_state(call.info, CallState.CALLING)
        try:
            if self._handle_used and not self.settings.inbound:
                await self._fresh_handle()
            self._handle_used = True
            handle = self.handle
            if handle is None:  # Janus went away while the call waited for the room
                await self._end_call(CallState.DISCONNECTED, reason="Janus connection lost")
                return
            call.handle = handle
            offer = await call.create_offer()
            # Our own Call-ID: logs of sipbridge, Janus and the SIP peer then share one id.
            await handle.message({"request": "call", "uri": uri, "call_id": call.info.call_id,
                                  "autoaccept_reinvites": True}, jsep=offer)
        except (JanusError, ValueError, TimeoutError) as exc:
            await self._end_call(CallState.FAILED, reason=str(exc))

    async def _fresh_handle(self) -> None:
        """Give the next outbound call a new SIP plugin handle, registered like the first.

        A handle that had a call can stay busy ending it inside Janus: a BYE to a peer that vanished is
        retransmitted for 32 s, and the handle answers every new call with 447 until then. An inbound stage
        keeps its handle, because its SIP port (where callers reach it) belongs to the handle.
        """
        assert self.client is not None
        old = self.handle
        new = await self.client.attach(SIP_PLUGIN)
        try:
            await self._register(new, announce=False)
        except BaseException:
            self._spawn(new.detach())
            raise
        self.handle = new
        self.counters["sip_handles"] += 1
        if old is not None:
            old.events.put_nowait(dict(HANDLE_SWITCHED))  # wakes the event loop, which moves to the new handle
            self._spawn(old.detach())

    def _end_reason(self, call: SipCall, state: str) -> str:
        """Why an outbound call ended, in the words of RedialPolicy.after_end."""
        if self._stopping.is_set():
            return "stopping"
        if state == CallState.DISCONNECTED:
            return "janus_restart"
        if call.hung_up_by_user:
            return "hangup"
        return "failed" if state == CallState.FAILED else "ended"

    def _schedule_redial(self, call: SipCall, state: str) -> None:
        info = call.info
        if info.direction != "outbound":
            return
        reason = self._end_reason(call, state)
        # Interval re-dials are for the --call target; after a Janus restart any outbound call is placed again.
        if reason != "janus_restart" and info.peer != self.settings.call_uri:
            return
        delay = self.redial.after_end(reason, answered=info.accepted_ns is not None)
        if delay is None:
            if reason in ("janus_restart", "failed") and self.redial.max_tries and \
                    self.redial.failures > self.redial.max_tries:
                self.log.warning("call %s: not dialling %s again: %d attempts in a row failed", info.call_id,
                                 info.peer, self.redial.failures - 1)
            return
        self._cancel_redial()
        self.log.info("call %s: dialling %s again in %.1f s (%s)", info.call_id, info.peer, delay,
                      "after the Janus restart" if reason == "janus_restart" else f"call {reason}")
        self._redial_task = asyncio.ensure_future(self._redial(info.peer, delay))

    def _cancel_redial(self) -> None:
        task, self._redial_task = self._redial_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _redial(self, uri: str, delay_s: float) -> None:
        """Place the call again after ``delay_s``, once registered (Janus may still be coming back)."""
        await asyncio.sleep(delay_s)
        while not self._stopping.is_set():
            if self.call is not None:
                return  # someone placed a call meanwhile: that one wins
            if self.registered and self.handle is not None:
                self.log.info("redialling %s", uri)
                self._redial_task = None
                try:
                    await self._place_call(uri)
                except (RuntimeError, JanusError, JanusDisconnected) as exc:
                    self.log.warning("redialling %s failed: %s", uri, exc)
                return
            self._state_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), REDIAL_POLL_S)

    async def _on_event(self, event: dict[str, Any]) -> None:
        """Run the call-control machine on one Janus message and carry out what it returns."""
        call = self.call
        sender = event.get("sender")
        if call is not None:
            handle = self._handle_of(call)
            if isinstance(sender, int) and handle is not None and sender != handle.id:
                # Another handle's message (a helper taking a caller, a handle ending an old call): this call
                # only matters to decide whether a new caller finds us busy.
                result = plugin_data(event).get("result")
                if not (isinstance(result, dict) and result.get("event") == "incomingcall"):
                    call = None
        view = None if call is None else CallView(call.info.call_id, call.info.direction, call.info.state,
                                                  call.info.accepted_ns is not None, call.hangup_reason,
                                                  call.info.sip_call_id, call.info.media_up_ns is not None)
        for action in on_janus_event(event, view, self._rules):
            await self._run_action(action, call, sender if isinstance(sender, int) else None)

    async def _run_action(self, action: Action, call: SipCall | None, sender: int | None) -> None:
        call_id = call.info.call_id if call is not None else "-"
        if isinstance(action, Accept | Decline):
            await self._on_incoming(action, sender)
        elif call is None or call is not self.call:
            # Every other action concerns the call the message was about; that one has ended meanwhile.
            if isinstance(action, Note):
                self.log.info("%s", action.text)
            elif isinstance(action, Registered):
                self.registered = True
            elif isinstance(action, DtmfReceived):
                self._dtmf_received(action.digit, action.duration_ms, action.method)
            elif isinstance(action, ReportError):
                self.report_error(action.code, action.message)
        elif isinstance(action, Publish):
            self._publish_state(call.info, action.state)
        elif isinstance(action, SetAnswer):
            if call.pc.signalingState == "have-local-offer":
                await call.set_answer(action.jsep)
        elif isinstance(action, MarkAccepted):
            call.info.accepted_ns = time.time_ns()
            self.counters["calls_connected"] += 1
            self.redial.connected()
        elif isinstance(action, MarkMediaUp):
            call.info.media_up_ns = time.time_ns()
            self._last_media_rx_s = time.monotonic()
        elif isinstance(action, RequestKeyframe):
            self._request_keyframe(action.reason)
        elif isinstance(action, PeerHold):
            # A peer that holds us (sendonly/inactive) may send no media at all: not a vanished peer.
            self._peer_on_hold = action.on
            self._last_media_rx_s = time.monotonic()
        elif isinstance(action, EndCall):
            await self._end_call(action.state, action.code, action.reason)
        elif isinstance(action, SetSipCallId):
            call.info.sip_call_id = action.value
        elif isinstance(action, DtmfReceived):
            self._dtmf_received(action.digit, action.duration_ms, action.method)
        elif isinstance(action, ReportError):
            self.report_error(action.code, action.message, call_id=call.info.call_id)
        elif isinstance(action, Registered):
            self.registered = True
        elif isinstance(action, Note):
            self.log.info("call %s: %s", call_id, action.text)

    async def _on_incoming(self, action: Accept | Decline, sender: int | None) -> None:
        handle = next((h for h in [self.handle, *self._helpers] if h is not None and h.id == sender), self.handle)
        assert handle is not None
        call = self._new_call("inbound", action.caller, call_id=action.sip_call_id or None)
        call.info.sip_call_id = action.sip_call_id
        call.handle = handle
        if isinstance(action, Accept) and self.call is not None:
            action = Decline(action.caller, action.sip_call_id, self.settings.decline_code,
                             f"busy with call {self.call.info.call_id}")
        if isinstance(action, Decline):
            self.counters["calls_declined"] += 1
            await handle.message({"request": "decline", "code": action.code})
            call.info.code, call.info.reason = action.code, action.reason
            self._publish_state(call.info, CallState.DECLINED)
            await call.close()
            return
        self.call = call
        self.counters["calls_started"] += 1
        self._publish_state(call.info, CallState.INCOMING)
        try:
            answer = await call.answer(action.jsep)
            await handle.message({"request": "accept", "autoaccept_reinvites": True}, jsep=answer)
        except (JanusError, ValueError) as exc:
            await self._end_call(CallState.FAILED, reason=f"cannot accept: {exc}")

    def _on_rfc2833(self, digit: str, duration_ms: int) -> None:
        self._dtmf_received(digit, duration_ms, "rfc2833")

    def _dtmf_received(self, digit: str, duration_ms: int | None, method: str) -> None:
        self.counters["dtmf_received"] += 1
        call_id = self.call.info.call_id if self.call else ""
        self.log.info("call %s: DTMF %s received (%s)", call_id or "-", digit, method)
        self._outbox.put_nowait(Event(EventType.DTMF, self.settings.audio_stream,
                                      {"digit": digit.upper(), "duration_ms": duration_ms, "method": method,
                                       "direction": "received", "call_id": call_id}))

    async def hangup(self) -> None:
        if self.handle is None or self.call is None:
            raise RuntimeError("no active call")
        self._cancel_redial()
        self.call.hung_up_by_user = True
        if self.call.waiting_for_room:  # nothing went to Janus, nothing to hang up there
            self.call.info.not_placed = True
            await self._end_call(CallState.ENDED, reason="hung up before it was placed (the bot was not in the room)")
            return
        self._publish_state(self.call.info, CallState.HANGINGUP)
        handle = self._handle_of(self.call)
        assert handle is not None
        await handle.message({"request": "hangup"})

    async def send_dtmf(self, digits: str, duration_ms: int = DTMF_DURATION_MS) -> None:
        call = self.call
        if self.handle is None or call is None:
            raise RuntimeError("no active call")
        bad = set(digits) - DTMF_DIGITS
        if bad:
            raise ValueError(f"not DTMF digits: {''.join(sorted(bad))}")
        events = call.telephone_event_sender
        method = self.settings.dtmf_method
        if method == "rfc2833" and events is None:
            raise RuntimeError("the SIP peer did not take telephone-event (RFC 4733) with an 8 kHz audio codec")
        use_events = events is not None and method != "info"
        for digit in digits:
            if self.call is not call:
                raise RuntimeError(f"call {call.info.call_id} ended while its DTMF was being sent")
            if use_events:
                assert events is not None
                await events.send(digit, duration_ms)
            else:
                handle = self._handle_of(call)
                assert handle is not None
                await handle.message({"request": "dtmf_info", "digit": digit, "duration": duration_ms})
            self.counters["dtmf_sent"] += 1
            self.log.info("call %s: DTMF %s sent (%s)", call.info.call_id, digit,
                          "RFC 4733" if use_events else "SIP INFO")
            await asyncio.sleep(DTMF_GAP_S)

    async def hold(self, on: bool) -> None:
        if self.handle is None or self.call is None:
            raise RuntimeError("no active call")
        handle = self._handle_of(self.call)
        assert handle is not None
        if on:
            self._publish_state(self.call.info, CallState.HOLDING)
            await handle.message({"request": "hold", "direction": "sendonly"})
        else:
            await handle.message({"request": "unhold"})

    async def _wait_call_settled(self, info: CallInfo, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while info.state not in (CallState.ACCEPTED, CallState.MEDIA_UP, CallState.ENDED, CallState.FAILED,
                                 CallState.DISCONNECTED) and time.monotonic() < deadline:
            self._state_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), max(0.0, deadline - time.monotonic()))

    # ----- control socket --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        call = self.call.info if self.call is not None else self.last_call
        return {"registered": self.registered, "registration": self.registration,
                "call": asdict(call) if call is not None else None,
                "active": self.call is not None and self.call.info.state in ACTIVE_STATES,
                "counters": dict(self.counters), "drops": dict(self.drops), "errors": dict(self.errors),
                "first_packet_sent_ns": self._first_packet_sent_ns}

    async def command(self, command: Command) -> dict[str, Any]:
        """Carry out one validated control request; raises for a request that cannot be carried out now."""
        if command.cmd == "status":
            return {"ok": True, **self.status()}
        if command.cmd == "call":
            deadline = time.monotonic() + command.timeout_s
            while not self.registered and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            info = await self._place_call(command.uri)
            if command.wait:
                await self._wait_call_settled(info, max(0.0, deadline - time.monotonic()))
            return {"ok": info.state not in (CallState.FAILED, CallState.DISCONNECTED), "call": asdict(info)}
        if command.cmd == "hangup":
            await self.hangup()
            return {"ok": True}
        if command.cmd == "dtmf":
            await self.send_dtmf(command.digits, command.duration_ms)
            return {"ok": True}
        if command.cmd in ("hold", "unhold"):
            await self.hold(command.cmd == "hold")
            return {"ok": True}
        raise CommandError(f"unknown command {command.cmd!r}")  # parse_command lets none through

    async def _command_loop(self, endpoint: str) -> None:
        """The control socket: a ROUTER, so each request runs in its own task and a call that waits for an
        answer does not hold up hangup or status; REQ and DEALER clients both work. Every request gets one
        reply; a bad one gets an error reply and is counted, and nothing a client sends ends this loop."""
        sock = self._socket(zmq.ROUTER)
        # A bigger message is refused by ZeroMQ itself (it drops that client's connection) before it is read.
        sock.setsockopt(zmq.MAXMSGSIZE, REQUEST_MAX_BYTES)
        sock.bind(endpoint)
        self.log.info("control socket on %s", endpoint)
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                frames = await sock.recv_multipart()
                # [client id, (empty delimiter from REQ), request]; the reply goes back with the same envelope.
                envelope, raw = frames[:-1], frames[-1]
                if not envelope or len(frames) > CONTROL_MAX_FRAMES:
                    self.counters["control_rejected"] += 1
                    if envelope:
                        await self._reply(sock, [envelope[0]], error_reply("a request is one frame of JSON"))
                    continue
                if len(pending) >= CONTROL_MAX_IN_FLIGHT:
                    self.counters["control_rejected"] += 1
                    await self._reply(sock, envelope, error_reply("busy: too many requests in flight",
                                                                  request_id_of(raw)))
                    continue
                task = asyncio.create_task(self._answer(sock, envelope, raw))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for task in list(pending):
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            sock.close(linger=0)

    async def _answer(self, sock: Any, envelope: list[bytes], raw: bytes) -> None:
        try:
            command = parse_command(raw)
        except CommandError as exc:
            self.counters["control_rejected"] += 1
            await self._reply(sock, envelope, error_reply(str(exc), request_id_of(raw)))
            return
        self.counters["control_requests"] += 1
        try:
            reply = await self.command(command)
        except asyncio.CancelledError:
            raise
        except (TimeoutError, CommandError, ValueError, RuntimeError, JanusError, JanusDisconnected) as exc:
            reply = error_reply(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug in one command is that request's error, never the control socket's end
            self.log.exception("control request %s failed", command.cmd)
            self.report_error("control_failed", f"{command.cmd}: {type(exc).__name__}: {exc}")
            reply = error_reply(f"internal error: {type(exc).__name__}: {exc}")
        if command.request_id is not None:
            reply["id"] = command.request_id
        await self._reply(sock, envelope, reply)

    async def _reply(self, sock: Any, envelope: list[bytes], reply: dict[str, Any]) -> None:
        # A client that went away is not an error: ROUTER drops a reply it cannot route.
        with contextlib.suppress(zmq.ZMQError):
            await sock.send_multipart([*envelope, json.dumps(reply, default=str).encode()])


CODEC_CHOICES = {info.name: info.codec for info in codecs.CODECS if info.sip}


@click.command("janus")
@stage_options("janus")
@click.option("--janus-url", default="ws://127.0.0.1:8188", help="Janus WebSocket API.")
@click.option("--api-secret", default=None, envvar=["SIPBRIDGE_JANUS_API_SECRET", "SIPBRIDGE_STAGE_JANUS_API_SECRET"],
              help="Janus API secret (prefer the environment).")
@click.option("--identity", default="sip:bridge@127.0.0.1", help="Our SIP URI (From / registered AOR).")
@click.option("--display-name", default=None)
@click.option("--register", "register_mode", type=click.Choice(["guest", "digest"]), default="guest",
              help="guest: no REGISTER; digest: REGISTER at --proxy with --authuser/--secret.")
@click.option("--proxy", default=None, help="Registrar/proxy URI, e.g. sip:127.0.0.1:5070.")
@click.option("--authuser", default=None)
@click.option("--secret", default=None, envvar=["SIPBRIDGE_SIP_SECRET", "SIPBRIDGE_STAGE_JANUS_SECRET"],
              help="SIP password (prefer the environment: SIPBRIDGE_SIP_SECRET).")
@click.option("--call", "call_uri", default=None, help="Call this SIP URI once registered.")
@click.option("--redial-s", type=click.FloatRange(0), default=0.0,
              help="With --call: call again this many seconds after a call ends or fails (0 = once).")
@click.option("--redial-after-janus-restart/--no-redial-after-janus-restart", default=True, show_default=True,
              help="Dial an outbound call again that Janus took down with it, once reconnected and registered.")
@click.option("--redial-backoff-s", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Re-dials that keep failing wait this long, doubling each time ...")
@click.option("--redial-backoff-max-s", type=click.FloatRange(0), default=30.0, show_default=True,
              help="... up to this long.")
@click.option("--redial-max-tries", type=click.IntRange(0), default=0, show_default=True,
              help="Give up re-dialling after this many failures in a row (0 = never).")
@click.option("--inbound/--no-inbound", default=False, help="Accept incoming calls.")
@click.option("--accept-from", default=".*", help="Regex on the caller URI for calls to accept.")
@click.option("--decline-code", type=int, default=486, help="SIP code for declined calls.")
@click.option("--sip-probe-host", default=None,
              help="Inbound: address to learn the Janus handle's SIP port on [the --janus-url host; '' = never].")
@click.option("--media-timeout-s", type=click.FloatRange(0), default=DEFAULT_MEDIA_TIMEOUT_S, show_default=True,
              help="Hang up after this long without media from the SIP peer (a peer gone without BYE); 0 = never.")
@click.option("--wait-for-room-s", type=click.FloatRange(0, ROOM_WAIT_MAX_S), default=0.0, show_default=True,
              help="Place an outbound call only once the room's bot reports it joined, waiting at most this long "
                   "(past it the call is not placed); 0 = do not wait (no bot in the pipeline).")
@click.option("--dtmf-method", type=click.Choice(["auto", "rfc2833", "info"]), default="auto", show_default=True,
              help="How DTMF is sent: RFC 4733 events in the audio (auto: when the peer takes them) or SIP INFO.")
@click.option("--audio-codec", "audio_codecs", multiple=True, type=click.Choice(sorted(c for c in CODEC_CHOICES
              if not CODEC_CHOICES[c].is_video)), default=("pcmu",), help="Audio codecs to offer, in order.")
@click.option("--video-codec", type=click.Choice([*codecs.names(video=True, sip=True), "none"]), default="h264")
@click.option("--video-stream", default="sip-video", help="Stream id of the video received from SIP.")
@click.option("--audio-stream", default="sip-audio", help="Stream id of the audio received from SIP.")
@click.option("--control", default=None, help="Control REP endpoint [ipc://RUN_DIR/NAME.control].")
@click.option("--jitter-buffer", type=click.Choice(["low-latency", "aiortc"]), default="low-latency",
              help="low-latency: release frames at the marker bit; aiortc: its stock buffer (benchmark baseline).")
def command(**params: Any) -> None:
    """Send encoded media to a SIP peer through Janus and emit what it sends back."""
    try:
        aiortc_adapter.check()  # before any call: a mismatched aiortc would connect calls that carry nothing
    except aiortc_adapter.AiortcMismatch as exc:
        raise click.ClickException(str(exc)) from None
    options = build_options(params)
    settings = SipSettings(
        janus_url=params["janus_url"], api_secret=params["api_secret"], identity=params["identity"],
        display_name=params["display_name"], register=params["register_mode"], proxy=params["proxy"],
        authuser=params["authuser"], secret=params["secret"], call_uri=params["call_uri"], redial_s=params["redial_s"],
        inbound=params["inbound"], accept_from=params["accept_from"], decline_code=params["decline_code"],
        audio_codecs=[CODEC_CHOICES[c] for c in params["audio_codecs"]],
        video_codec=None if params["video_codec"] == "none" else CODEC_CHOICES[params["video_codec"]],
        video_stream=params["video_stream"], audio_stream=params["audio_stream"], control=params["control"],
        low_latency_jitter_buffer=params["jitter_buffer"] == "low-latency",
        dtmf_method=params["dtmf_method"], media_timeout_s=params["media_timeout_s"],
        wait_for_room_s=params["wait_for_room_s"],
        sip_probe_host=params["sip_probe_host"],
        redial_after_janus_restart=params["redial_after_janus_restart"], redial_backoff_s=params["redial_backoff_s"],
        redial_backoff_max_s=params["redial_backoff_max_s"], redial_max_tries=params["redial_max_tries"])
    run(JanusStage(options, settings))
