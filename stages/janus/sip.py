"""One SIP call through the Janus SIP plugin, with aiortc as Janus's WebRTC peer.

``SipCall`` owns the RTCPeerConnection of one call: the sending tracks
(``PacketTrack``), codec preferences (audio first, then one video codec; for H.264 the
single profile 42e01f, packetization-mode=1, see the field notes), the receive taps,
and the JSEP exchange with Janus. Call control (register, events, state) lives in the
stage (``stages/janus/__init__.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtpCodecCapability

from protocol import Codec
from stages import codecs as codec_registry
from stages.janus import aiortc_adapter, sdp
from stages.janus.callcontrol import CallState
from stages.janus.media import (
    RTP_NAMES,
    TELEPHONE_EVENT_CLOCK_HZ,
    TELEPHONE_EVENT_PT,
    PacketTrack,
    ReceivedFrame,
    SingleNalPacker,
    TelephoneEventSender,
    TelephoneEventTap,
    send_pli,
    tap_receiver,
    watch_keyframe_requests,
)

log = logging.getLogger("sipbridge.janus.sip")

def codec_capabilities(kind: str, codecs: list[Codec]) -> list[RTCRtpCodecCapability]:
    """aiortc capabilities for exactly ``codecs``, in that order (no rtx; where the codec registry gives an fmtp,
    the capability with exactly those parameters: one H.264 profile)."""
    available = RTCRtpSender.getCapabilities(kind).codecs
    chosen = []
    for codec in codecs:
        name = RTP_NAMES[codec]
        fmtp = codec_registry.BY_CODEC[codec].fmtp
        for cap in available:
            if cap.mimeType.split("/")[1].upper() != name:
                continue
            if fmtp is not None and {k: str(v) for k, v in cap.parameters.items()} != sdp.parse_fmtp(fmtp):
                continue
            chosen.append(cap)
            break
        else:
            raise ValueError(f"aiortc cannot send {codec.name} over RTP")
    return chosen


@dataclass
class CallInfo:
    call_id: str
    direction: str  # "outbound" or "inbound"
    peer: str
    state: str = CallState.IDLE
    code: int | None = None
    reason: str = ""
    requested_ns: int = field(default_factory=time.time_ns)
    accepted_ns: int | None = None
    media_up_ns: int | None = None
    ended_ns: int | None = None
    audio_codec: str | None = None
    video_codec: str | None = None
    sip_call_id: str = ""
    # An outbound call that ended without an INVITE: the room's bot was not in the room within the bound.
    not_placed: bool = False


class SipCall:
    """The WebRTC side of one call: tracks, codecs, taps, offer/answer."""

    def __init__(self, info: CallInfo, audio_codecs: list[Codec], video_codec: Codec | None,
                 on_frame: Callable[[str, ReceivedFrame], None], on_keyframe_request: Callable[[], None],
                 on_dtmf: Callable[[str, int], None] | None = None, low_latency: bool = True) -> None:
        self.info = info
        self.audio_codecs = audio_codecs
        self.video_codec = video_codec
        self.pc = RTCPeerConnection()
        self.audio_track = PacketTrack("audio") if audio_codecs else None
        self.video_track = PacketTrack("video") if video_codec is not None else None
        self._on_frame = on_frame
        self._on_keyframe_request = on_keyframe_request
        self._on_dtmf = on_dtmf
        self._low_latency = low_latency
        self.telephone_events: TelephoneEventTap | None = None
        self.telephone_event_sender: TelephoneEventSender | None = None
        self.hangup_reason: str | None = None  # set when we end the call for a reason of our own
        self.hung_up_by_user = False  # a hangup request: the call is not dialled again
        self.waiting_for_room = False  # an outbound call not placed yet: no INVITE, no handle (RoomGate)
        self.handle: Any = None  # the Janus SIP handle the call runs on (set by the stage)
        self.audio: RTCRtpTransceiver | None = None
        self.video: RTCRtpTransceiver | None = None
        self.closed = False
        self.chosen: dict[str, sdp.Codec] = {}  # inbound: the offered codec answered per kind

    @staticmethod
    def new_call_id() -> str:
        return uuid.uuid4().hex[:12]

    def _prepare(self, transceiver: RTCRtpTransceiver) -> None:
        kind = transceiver.kind
        if kind == "audio" and self.audio_track is not None:
            transceiver.setCodecPreferences(codec_capabilities("audio", self.audio_codecs))
            self.audio = transceiver
        elif kind == "video" and self.video_track is not None and self.video_codec is not None:
            transceiver.setCodecPreferences(codec_capabilities("video", [self.video_codec]))
            self.video = transceiver
            watch_keyframe_requests(transceiver.sender, self._on_keyframe_request)
        else:
            return
        tap_receiver(transceiver.receiver, functools.partial(self._on_frame, kind), kind, self._low_latency)

    async def create_offer(self) -> dict[str, str]:
        # Audio first: when video comes before audio and the SIP peer rejects video, Janus
        # produces an answer aiortc cannot take (field notes).
        if self.audio_track is not None:
            self._prepare(self.pc.addTransceiver(self.audio_track, direction="sendrecv"))
        if self.video_track is not None:
            self._prepare(self.pc.addTransceiver(self.video_track, direction="sendrecv"))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        text = self.pc.localDescription.sdp
        if self.audio is not None and self._on_dtmf is not None:
            text = sdp.add_telephone_event(text, TELEPHONE_EVENT_PT)  # lets the SIP peer send RFC 4733 DTMF
        return {"type": "offer", "sdp": text}

    async def set_answer(self, jsep: dict[str, Any]) -> None:
        offer = self.pc.localDescription.sdp
        text, rejected = sdp.repair_rejected_sections(jsep["sdp"], offer)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type=jsep["type"]))
        self._note_codecs()
        for kind in rejected:
            log.info("call %s: the SIP peer rejected %s", self.info.call_id, kind)
            setattr(self.info, f"{kind}_codec", None)
        self._tap_telephone_events(jsep["sdp"])

    def _tap_telephone_events(self, remote_sdp: str) -> None:
        payload_type = sdp.telephone_event_pt(remote_sdp)
        if payload_type is None or self.audio is None or self._on_dtmf is None or self.telephone_events:
            return
        self.telephone_events = TelephoneEventTap(self.audio.receiver, payload_type, self._on_dtmf)
        codecs = aiortc_adapter.negotiated_codecs(self.audio)
        # telephone-event/8000 shares the audio's RTP clock only with the 8 kHz-clocked codecs (not Opus).
        if codecs and codecs[0].clockRate == TELEPHONE_EVENT_CLOCK_HZ and self.audio.sender.transport is not None:
            self.telephone_event_sender = TelephoneEventSender(self.audio.sender, payload_type,
                                                               TELEPHONE_EVENT_CLOCK_HZ)

    async def answer(self, offer: dict[str, Any]) -> dict[str, str]:
        """Answer Janus's offer for an incoming call (the SIP caller's offer, passed through).

        A phone may offer several variants of one codec (H.264 packetization-mode 0 under one payload type,
        mode 1 under another) and codecs we do not send. aiortc would answer several of them and send with
        whichever came first, under fmtp of its own. So the offer is reduced first, through the SDP model, to
        one codec per section: ours, in the variant Janus will keep (``sdp.choose_codec``), with its own payload
        type; the answer then carries that payload type with the offer's fmtp, and the sender uses it (in
        single NAL unit packets for a packetization-mode 0 variant).
        """
        description = sdp.SessionDescription.parse(str(offer["sdp"]))
        wanted = {"audio": [RTP_NAMES[c] for c in self.audio_codecs],
                  "video": [RTP_NAMES[self.video_codec]] if self.video_codec is not None else []}
        self.chosen = sdp.restrict_offer(description, wanted)
        for kind, codec in self.chosen.items():
            log.info("call %s: answering %s with %s/%d (payload type %d%s)", self.info.call_id, kind, codec.name,
                     codec.clock_rate, codec.payload_type, f", {sdp.fmtp_text(codec.fmtp)}" if codec.fmtp else "")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp.as_aiortc_offer(description, self.chosen),
                                                                 type="offer"))
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "audio" and self.audio_track is not None and self.audio is None:
                transceiver.sender.replaceTrack(self.audio_track)
                transceiver.direction = "sendrecv"
                self._prepare(transceiver)
            elif transceiver.kind == "video" and self.video_track is not None and self.video is None:
                transceiver.sender.replaceTrack(self.video_track)
                transceiver.direction = "sendrecv"
                self._prepare(transceiver)
            else:
                transceiver.direction = "inactive"
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._note_codecs()
        video = self.chosen.get("video")
        if video is not None and video.name == sdp.H264 and video.packetization_mode == 0 and self.video is not None:
            aiortc_adapter.replace_packer(self.video.sender, SingleNalPacker())
        answer = sdp.SessionDescription.parse(self.pc.localDescription.sdp)
        sdp.answer_with_offered_fmtp(answer, self.chosen)
        text = str(answer)
        payload_type = sdp.telephone_event_pt(str(offer["sdp"]))
        if payload_type is not None and self.audio is not None and self._on_dtmf is not None:
            text = sdp.add_telephone_event(text, payload_type)
            self._tap_telephone_events(str(offer["sdp"]))
        return {"type": "answer", "sdp": text}

    def _note_codecs(self) -> None:
        for transceiver, attr in ((self.audio, "audio_codec"), (self.video, "video_codec")):
            codecs = aiortc_adapter.negotiated_codecs(transceiver) if transceiver is not None else None
            if codecs:
                setattr(self.info, attr, codecs[0].mimeType.split("/")[1].upper())

    def negotiated(self, kind: str) -> str | None:
        return self.info.audio_codec if kind == "audio" else self.info.video_codec

    async def request_keyframe_from_peer(self) -> bool:
        if self.video is None or self.closed:
            return False
        return await send_pli(self.video.receiver)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for track in (self.audio_track, self.video_track):
            if track is not None:
                track.stop()
        try:
            await asyncio.wait_for(self.pc.close(), 5.0)
        except (TimeoutError, Exception) as exc:
            log.warning("call %s: closing the PeerConnection failed: %r", self.info.call_id, exc)
