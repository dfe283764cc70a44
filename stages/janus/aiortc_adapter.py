"""Every use of aiortc's private internals, in one place, checked at start.

aiortc has no public API for what the Janus stage needs: sending pre-encoded packets is public (a track
whose ``recv()`` returns ``av.Packet``), but taking frames before its decoder, releasing them at the
marker bit, forwarding keyframe requests, slipping RFC 4733 events into the audio's RTP sequence and
reading the negotiated codecs all reach into private attributes. Those attributes change between
releases, so the project pins aiortc exactly (pyproject.toml) and ``check()`` runs when the stage starts:
a different aiortc fails at once with a message naming the version this was written for, instead of a
call that connects and then carries no media.

Nothing else in the project touches an aiortc name that starts with an underscore.
"""

from __future__ import annotations

import inspect
import queue
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.jitterbuffer import JitterBuffer

AIORTC_VERSION = "1.16.0"  # the version tested; pinned in pyproject.toml

_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_ENCODER = "_RTCRtpSender__encoder"

# (owner, attribute, where it is set): class attributes are looked up, instance attributes are found in
# the constructor's source (an object cannot be built without a live transport).
_HOOKS: list[tuple[type, str, str]] = [
    (RTCRtpReceiver, "__decoder_queue", "init"),
    (RTCRtpReceiver, "__jitter_buffer", "init"),
    (RTCRtpReceiver, "_handle_rtp_packet", "class"),
    (RTCRtpReceiver, "_send_rtcp_pli", "class"),
    (RTCRtpSender, "_send_keyframe", "class"),
    (RTCRtpSender, "__encoder", "init"),
    (RTCRtpSender, "_ssrc", "init"),
    (RTCRtpTransceiver, "_codecs", "init"),
    (RTCDtlsTransport, "_rtp_router", "init"),
    (RTCDtlsTransport, "_send_rtp", "class"),
    (JitterBuffer, "_remove_frame", "class"),
    (JitterBuffer, "_origin", "init"),
    (JitterBuffer, "_packets", "init"),
    (JitterBuffer, "remove", "class"),
]


class AiortcMismatch(RuntimeError):
    """The installed aiortc is not the one whose internals this module uses."""


def installed_version() -> str:
    try:
        return metadata.version("aiortc")
    except metadata.PackageNotFoundError:
        return "unknown"


def check() -> None:
    """Raise AiortcMismatch naming the needed version when aiortc differs or lacks a hook used here."""
    version = installed_version()
    missing = []
    for owner, name, where in _HOOKS:
        if where == "class":
            if not callable(getattr(owner, name, None)):
                missing.append(f"{owner.__name__}.{name}")
        else:
            try:
                source = inspect.getsource(owner.__init__)  # type: ignore[misc]
            except (OSError, TypeError):
                source = ""
            if f"self.{name}" not in source:
                missing.append(f"{owner.__name__}.{name}")
    if version != AIORTC_VERSION or missing:
        detail = f"; missing: {', '.join(missing)}" if missing else ""
        raise AiortcMismatch(f"the janus stage needs aiortc=={AIORTC_VERSION} (installed: {version}{detail}); "
                             f"install it with: pip install 'aiortc=={AIORTC_VERSION}'")


# ----- receiving ---------------------------------------------------------------------------------------------
def replace_decoder_queue(receiver: RTCRtpReceiver, replacement: queue.Queue) -> None:  # type: ignore[type-arg]
    """Frames the jitter buffer completes go to ``replacement.put((codec, frame))`` instead of aiortc's decoder
    thread (``None`` at the end). Must run before the receiver starts."""
    if not hasattr(receiver, _DECODER_QUEUE):
        raise AiortcMismatch(f"RTCRtpReceiver has no decoder queue (needs aiortc=={AIORTC_VERSION})")
    setattr(receiver, _DECODER_QUEUE, replacement)


def jitter_buffer(receiver: RTCRtpReceiver) -> JitterBuffer:
    buffer = getattr(receiver, _JITTER_BUFFER, None)
    if not isinstance(buffer, JitterBuffer):
        raise AiortcMismatch(f"RTCRtpReceiver has no jitter buffer (needs aiortc=={AIORTC_VERSION})")
    return buffer


def replace_jitter_buffer(receiver: RTCRtpReceiver, replacement: JitterBuffer) -> None:
    jitter_buffer(receiver)
    setattr(receiver, _JITTER_BUFFER, replacement)


def buffer_origin(buffer: JitterBuffer) -> int | None:
    return buffer._origin  # type: ignore[no-any-return]


def buffer_packet(buffer: JitterBuffer, index: int) -> Any:
    """The packet in slot ``index % capacity`` of a jitter buffer (None for a gap)."""
    return buffer._packets[index % buffer.capacity]


def packet_payload(packet: Any) -> bytes:
    """The depayloaded bytes aiortc stored on a jitter-buffer packet."""
    return packet._data  # type: ignore[no-any-return]


def intercept_rtp(receiver: RTCRtpReceiver,
                  handler: Callable[[Any, int], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Every RTP packet for ``receiver`` goes to ``handler(packet, arrival_time_ms)``; returns aiortc's own
    handler (call it with ``arrival_time_ms=`` for the packets it should see)."""
    original = receiver._handle_rtp_packet
    receiver._handle_rtp_packet = handler  # type: ignore[method-assign,assignment]
    return original


def route_payload_type(receiver: RTCRtpReceiver, payload_type: int) -> None:
    """Let packets of a payload type aiortc did not negotiate (telephone-event) reach ``receiver``."""
    router = receiver.transport._rtp_router
    router.payload_type_table.setdefault(payload_type, set()).add(receiver)


async def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    await receiver._send_rtcp_pli(media_ssrc)


# ----- sending -----------------------------------------------------------------------------------------------
def on_keyframe_request(sender: RTCRtpSender, callback: Callable[[], None]) -> None:
    """A PLI/FIR from the remote side calls ``callback`` (aiortc would force its own encoder, which we do not use)."""
    sender._send_keyframe = callback  # type: ignore[method-assign]


def replace_packer(sender: RTCRtpSender, packer: Any) -> None:
    """``sender`` packetises each pre-encoded frame with ``packer.pack(packet) -> (payloads, timestamp)``
    instead of the packer aiortc picks for the negotiated codec. Must run before the sender starts."""
    if not hasattr(sender, _ENCODER):
        raise AiortcMismatch(f"RTCRtpSender has no encoder slot (needs aiortc=={AIORTC_VERSION})")
    setattr(sender, _ENCODER, packer)


def sender_ssrc(sender: RTCRtpSender) -> int:
    return sender._ssrc  # type: ignore[no-any-return]


def wrap_send_rtp(transport: RTCDtlsTransport,
                  wrapper: Callable[[bytes], Awaitable[None]]) -> Callable[[bytes], Awaitable[None]]:
    """Every RTP/RTCP packet ``transport`` sends goes through ``wrapper``; returns the original send."""
    original = transport._send_rtp
    transport._send_rtp = wrapper  # type: ignore[method-assign,assignment]
    return original


# ----- negotiation -------------------------------------------------------------------------------------------
def negotiated_codecs(transceiver: RTCRtpTransceiver) -> list[Any]:
    """The codecs negotiated for ``transceiver`` (RTCRtpCodecParameters), the one it sends with first."""
    return list(getattr(transceiver, "_codecs", None) or [])


def sending_payload_type(transceiver: RTCRtpTransceiver) -> int | None:
    codecs = negotiated_codecs(transceiver)
    return int(codecs[0].payloadType) if codecs else None
