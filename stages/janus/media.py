"""Encoded media in and out of aiortc without re-encoding.

Out: ``PacketTrack`` is a MediaStreamTrack whose ``recv()`` returns ``av.Packet``s.
aiortc's RTCRtpSender then calls its codec's ``pack()`` (RTP packetisation only) instead
of ``encode()``: H.264 (Annex B) and VP8 as well as PCMU, PCMA, G.722 and Opus all have a
``pack()`` in aiortc 1.16, so nothing is transcoded on the way to Janus.

In: ``EncodedTap`` replaces a receiver's decoder queue. aiortc hands every frame its
jitter buffer re-assembled (already depayloaded: Annex B H.264, whole VP8 frames, raw
audio payloads) to that queue; the tap gives it to a callback instead of aiortc's
decoder thread. Why encoded: the pipeline already has a decoder stage (its own process,
core and keyframe-request logic), decoding here would cost this stage a core per call
and throw away the option of forwarding H.264 untouched, and PyAV in another process
decodes exactly the same bytes.

aiortc's private internals are reached only through ``aiortc_adapter`` (checked at start).

Keyframes: a PLI/FIR from Janus calls the sender's keyframe hook, which aiortc uses
to force its own encoder; ``watch_keyframe_requests`` redirects it to a callback so the
request travels up the pipeline to the real encoder. ``send_pli`` asks the SIP side for a
keyframe when our consumer (the decoder stage) lost its reference.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
from aiortc import MediaStreamTrack, RTCRtpReceiver, RTCRtpSender
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket, is_rtcp
from aiortc.utils import uint16_add

from protocol import Codec
from stages import codecs
from stages.janus import aiortc_adapter

log = logging.getLogger("sipbridge.janus.media")

# Drop the oldest queued packet beyond this: a sender that cannot keep up must not build latency.
PACKET_QUEUE_MAX = 64

# Our codec enum <-> RTP names (aiortc's mimeType subtype, upper-cased), for the codecs a SIP call can carry.
RTP_NAMES: dict[Codec, str] = {info.codec: info.rtp_name.upper() for info in codecs.CODECS if info.sip}
CODEC_BY_RTP_NAME = {name: codec for codec, name in RTP_NAMES.items()}


def is_keyframe(codec: Codec, data: bytes) -> bool:
    """Whether a received frame starts a decodable picture (every audio frame does)."""
    return codecs.is_keyframe_payload(codec, data) if codec.is_video else True


class PacketTrack(MediaStreamTrack):
    """A track that hands pre-encoded ``av.Packet``s to aiortc's sender."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue[av.Packet | None] = asyncio.Queue()
        self.dropped = 0
        self.sent = 0

    def push(self, packet: av.Packet) -> None:
        """Queue a packet (event loop thread)."""
        if self.readyState != "live":
            return
        if self._queue.qsize() >= PACKET_QUEUE_MAX:
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(packet)

    async def recv(self) -> av.Packet:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        packet = await self._queue.get()
        if packet is None:
            raise MediaStreamError
        self.sent += 1
        return packet

    def stop(self) -> None:
        if self.readyState == "live":
            self._queue.put_nowait(None)
        super().stop()


class SingleNalPacker:
    """RTP packetisation of H.264 for a packetization-mode 0 answer (RFC 6184 single NAL unit mode).

    aiortc's packer aggregates small NAL units (STAP-A), which a mode 0 receiver need not understand. Here
    each NAL unit that fits in one packet is one RTP payload. A larger one cannot travel in single NAL unit
    mode through Janus (its SIP side relays at most an MTU per packet), so it goes in FU-A fragments and is
    counted (``oversized_nal_units``): receivers commonly read FU-A whatever the mode, and an encoder that
    caps its slice size (x264 ``slice-max-size``) avoids them. Installed on a sender in place of aiortc's
    H.264 packer (``aiortc_adapter.replace_packer``) when the answered variant is mode 0.
    """

    def __init__(self) -> None:
        self.oversized_nal_units = 0

    def pack(self, packet: av.Packet) -> tuple[list[bytes], int]:
        payloads: list[bytes] = []
        for unit in split_annex_b(bytes(packet)):
            if len(unit) <= RTP_PAYLOAD_MAX:
                payloads.append(unit)
            else:
                self.oversized_nal_units += 1
                payloads.extend(fu_a_fragments(unit))
        assert packet.pts is not None and packet.time_base is not None
        timestamp = int(packet.pts * packet.time_base * H264_CLOCK_HZ)
        return payloads, timestamp


RTP_PAYLOAD_MAX = 1300  # aiortc's own limit, well inside a 1500-byte MTU with IP/UDP/RTP/SRTP overhead
H264_NAL_FU_A = 28


def fu_a_fragments(unit: bytes) -> list[bytes]:
    """RFC 6184 5.8: the NAL header's F/NRI bits and type 28, then start/end flags and the NAL type."""
    indicator = (unit[0] & 0xE0) | H264_NAL_FU_A
    nal_type = unit[0] & 0x1F
    body = unit[1:]
    step = RTP_PAYLOAD_MAX - 2
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    out = []
    for index, chunk in enumerate(chunks):
        flags = (0x80 if index == 0 else 0) | (0x40 if index == len(chunks) - 1 else 0)
        out.append(bytes([indicator, flags | nal_type]) + chunk)
    return out


H264_CLOCK_HZ = codecs.BY_CODEC[Codec.H264].clock_hz


def split_annex_b(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream, without their start codes (3 or 4 bytes)."""
    units = []
    starts = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i)
        i = data.find(b"\x00\x00\x01", i + 3)
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(data)
        unit = data[start + 3:end]
        if index + 1 < len(starts) and unit.endswith(b"\x00"):
            unit = unit[:-1]  # the leading zero of the next 4-byte start code
        if unit:
            units.append(unit)
    return units


def make_packet(data: bytes | memoryview, pts: int, time_base: fractions.Fraction, keyframe: bool) -> av.Packet:
    packet = av.Packet(bytes(data))
    packet.pts = pts
    packet.dts = pts
    packet.time_base = time_base
    packet.is_keyframe = keyframe
    return packet


@dataclass
class ReceivedFrame:
    codec: Codec
    clock_rate: int
    timestamp: int  # RTP timestamp of the frame, rebased to start near 0 by aiortc
    data: bytes
    keyframe: bool


class _TapQueue(queue.Queue):  # type: ignore[type-arg]
    """Stands in for aiortc's decoder queue: frames go to a callback, the end marker to the thread."""

    def __init__(self, callback: Callable[[ReceivedFrame], None]) -> None:
        super().__init__()
        self._callback = callback

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            super().put(None)  # lets aiortc's (idle) decoder thread end the remote track
            return
        codec_params, encoded_frame = item
        name = codec_params.mimeType.split("/")[1].upper()
        codec = CODEC_BY_RTP_NAME.get(name)
        if codec is None:
            log.debug("ignoring received frame of unsupported codec %s", name)
            return
        data = bytes(encoded_frame.data)
        self._callback(ReceivedFrame(codec, codec_params.clockRate, int(encoded_frame.timestamp), data,
                                     is_keyframe(codec, data)))


class LowLatencyJitterBuffer(JitterBuffer):
    """aiortc's jitter buffer, releasing frames as soon as they are complete.

    aiortc releases a video frame only when the first packet of the *next* frame arrives (one frame
    interval, 33 ms at 30 fps, of added latency) and holds four audio packets back (80 ms). Here a video
    frame goes out at its marker bit (RFC 6184/7741: set on the last packet of a frame) once every packet
    from the start of the buffer is there, and an audio packet goes out at once. Loss handling (reordering
    window, PLI on overflow) is aiortc's.
    """

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        origin = aiortc_adapter.buffer_origin(self)
        assert origin is not None
        if not self._is_video:
            # Each audio packet is a whole frame: release it now and skip any gap before it (a lost
            # 20 ms packet is concealed by the decoder; waiting for it would delay everything after it).
            packet = aiortc_adapter.buffer_packet(self, sequence_number)
            assert packet is not None
            return self._take([packet], packet.timestamp, uint16_add(sequence_number, -origin) + 1)
        packets = []
        timestamp = None
        for count in range(self.capacity):
            packet = aiortc_adapter.buffer_packet(self, origin + count)
            if packet is None:
                return None  # a gap: wait for the missing packet (or aiortc's overflow handling)
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                # The next frame started without a marker on this one: it is complete anyway.
                return self._take(packets, timestamp, count)
            packets.append(packet)
            if packet.marker:
                return self._take(packets, timestamp, count + 1)
        return None

    def _take(self, packets: list[Any], timestamp: int, count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(aiortc_adapter.packet_payload(p) for p in packets), timestamp=timestamp)
        self.remove(count)
        return frame


def tap_receiver(receiver: RTCRtpReceiver, callback: Callable[[ReceivedFrame], None], kind: str,
                 low_latency: bool = True) -> None:
    """Route ``receiver``'s re-assembled encoded frames to ``callback`` (event loop thread), released
    by a ``LowLatencyJitterBuffer``.

    Must run before the receiver starts (before the connection is established).
    """
    aiortc_adapter.replace_decoder_queue(receiver, _TapQueue(callback))
    if low_latency:
        capacity = aiortc_adapter.jitter_buffer(receiver).capacity
        aiortc_adapter.replace_jitter_buffer(receiver, LowLatencyJitterBuffer(capacity, is_video=kind == "video"))


def watch_keyframe_requests(sender: RTCRtpSender, callback: Callable[[], None]) -> None:
    """Call ``callback`` (event loop thread) for every PLI/FIR the remote side sends for ``sender``."""
    aiortc_adapter.on_keyframe_request(sender, callback)


async def send_pli(receiver: RTCRtpReceiver) -> bool:
    """Ask the remote sender of ``receiver`` for a keyframe; False when nothing was received yet."""
    sources = receiver.getSynchronizationSources()
    if not sources:
        return False
    for source in sources:
        await aiortc_adapter.send_pli(receiver, source.source)
    return True


class KeyframeThrottle:
    """At most one keyframe request per ``interval_s``, and none lost: a request inside the interval is held to its
    end, and every other request until then rides on that one. No I/O and no clock of its own: the caller passes
    the time, sends when told, and reports the held request sent (``fire``) or abandoned (``cancel``)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last_s = float("-inf")  # when the last request went out
        self.pending = False  # a request is held to the end of the interval

    def request(self, now_s: float) -> float | None:
        """0.0: send now; > 0: send after that many seconds, then call ``fire``; None: a held request covers it."""
        if self.pending:
            return None
        wait_s = self.last_s + self.interval_s - now_s
        if wait_s <= 0:
            self.last_s = now_s
            return 0.0
        self.pending = True
        return wait_s

    def fire(self, now_s: float) -> None:
        self.pending, self.last_s = False, now_s

    def cancel(self) -> None:
        self.pending = False


# ----- RFC 4733 (RFC 2833) telephone events received from the SIP side ----------------------------
TELEPHONE_EVENT_PT = 126  # a dynamic payload type aiortc never assigns (its video codecs use 97-102)
DTMF_EVENTS = "0123456789*#ABCD"
TELEPHONE_EVENT_CLOCK_HZ = 8000  # what the offer carries (telephone-event/8000)


class TelephoneEventTap:
    """Catches RFC 4733 packets on an audio receiver before aiortc drops them as an unknown codec.

    One callback per event (the first packet of each RTP timestamp), with the digit and, once the end
    bit arrives, nothing more: RFC 4733 repeats the end packet three times.
    """

    def __init__(self, receiver: RTCRtpReceiver, payload_type: int, callback: Callable[[str, int], None]) -> None:
        self.payload_type = payload_type
        self._callback = callback
        self._last_timestamp: int | None = None
        self._original = aiortc_adapter.intercept_rtp(receiver, self._handle)
        # aiortc's router only hands a receiver the payload types it negotiated.
        aiortc_adapter.route_payload_type(receiver, payload_type)

    async def _handle(self, packet: Any, arrival_time_ms: int) -> None:
        if packet.payload_type != self.payload_type:
            await self._original(packet, arrival_time_ms=arrival_time_ms)
            return
        payload = packet.payload
        if len(payload) < 4 or payload[0] >= len(DTMF_EVENTS):
            return
        if packet.timestamp == self._last_timestamp:
            return
        self._last_timestamp = packet.timestamp
        duration_samples = int.from_bytes(payload[2:4], "big")
        self._callback(DTMF_EVENTS[payload[0]], duration_samples // 8)


# ----- RFC 4733 (RFC 2833) telephone events sent to the SIP side ------------------------------------
EVENT_PACKET_INTERVAL_S = 0.05  # RFC 4733 suggests 50 ms between updates of a running event
EVENT_END_REPEATS = 3  # the end packet is sent three times: it is the one that must not be lost
EVENT_VOLUME_DBM0 = 10  # -10 dBm0, a usual DTMF level
MAX_EVENT_DURATION_MS = 5000  # the 16-bit duration field holds 8.2 s at 8 kHz


class TelephoneEventSender:
    """Sends RFC 4733 DTMF on an audio sender's SSRC and in its sequence space (aiortc has no DTMF sender).

    aiortc numbers the audio packets itself, in a local variable of its send loop. Event packets go out
    between them, so the transport's send is wrapped: audio packets of this SSRC are renumbered past the
    events sent so far (cheap: two header bytes), the events take the numbers in between, and the receiver
    sees one gapless sequence. RTCP and other SSRCs pass untouched.
    """

    def __init__(self, sender: RTCRtpSender, payload_type: int, clock_rate: int) -> None:
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.ssrc = aiortc_adapter.sender_ssrc(sender)
        self.transport = sender.transport
        self._send = aiortc_adapter.wrap_send_rtp(self.transport, self._relay)
        self._offset = 0
        self._last_seq: int | None = None
        self._last_timestamp: int | None = None
        self._last_sent_s = 0.0
        self._lock = asyncio.Lock()  # one digit at a time
        self.events_sent = 0

    async def _relay(self, data: bytes) -> None:
        if len(data) >= 12 and not is_rtcp(data) and int.from_bytes(data[8:12], "big") == self.ssrc:
            seq = (int.from_bytes(data[2:4], "big") + self._offset) & 0xFFFF
            if self._offset:
                data = data[:2] + seq.to_bytes(2, "big") + data[4:]
            self._last_seq = seq
            self._last_timestamp = int.from_bytes(data[4:8], "big")
            self._last_sent_s = time.monotonic()
        await self._send(data)

    async def send(self, digit: str, duration_ms: int) -> None:
        """One event: a first packet with the marker bit, updates every 50 ms, the end packet three times."""
        event = DTMF_EVENTS.index(digit.upper())
        async with self._lock:
            if self._last_timestamp is None:
                raise RuntimeError("no audio has been sent on this call yet: RFC 4733 events ride on its clock")
            elapsed = time.monotonic() - self._last_sent_s
            timestamp = (self._last_timestamp + round(elapsed * self.clock_rate)) & 0xFFFFFFFF
            total = round(min(duration_ms, MAX_EVENT_DURATION_MS) / 1000 * self.clock_rate)
            step = round(EVENT_PACKET_INTERVAL_S * self.clock_rate)
            durations = [*range(step, total, step), total]
            for index, duration in enumerate(durations):
                end = index == len(durations) - 1
                for _ in range(EVENT_END_REPEATS if end else 1):
                    await self._inject(event, duration, end, index == 0, timestamp)
                if not end:
                    await asyncio.sleep(EVENT_PACKET_INTERVAL_S)
            self.events_sent += 1

    async def _inject(self, event: int, duration: int, end: bool, first: bool, timestamp: int) -> None:
        seq = ((self._last_seq if self._last_seq is not None else 0) + 1) & 0xFFFF
        self._last_seq = seq
        self._offset += 1
        payload = bytes([event, (0x80 if end else 0) | EVENT_VOLUME_DBM0]) + duration.to_bytes(2, "big")
        packet = RtpPacket(payload_type=self.payload_type, marker=int(first), sequence_number=seq,
                           timestamp=timestamp, ssrc=self.ssrc, payload=payload)
        await self._send(packet.serialize())
