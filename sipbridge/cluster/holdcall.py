"""A hold call: one SIP dialog with a PCMU audio stream, no browser, no codecs.

It holds a node slot the way a bridged call does on the SIP side (signalling, RTP both ways, a BYE at the
end) for a few kB of memory, so placement across many nodes can be tested and measured on 2 cores.
``HoldUA`` is either side: ``answer()`` waits for the INVITE the node's front forwards to it; ``dial()``
calls a SIP URI. ``hangup()`` sends BYE along the dialog's route set (Record-Route), as a bridged call's
Janus handle would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import struct
import time
from typing import Any, cast

from sipbridge.cluster import sipmsg

log = logging.getLogger("sipbridge.cluster.holdcall")

T1_S = 0.5
T2_S = 4.0
TRANSACTION_TIMEOUT_S = 32.0  # 64*T1
RTP_PACKET_INTERVAL_S = 0.02
PCMU_SILENCE = b"\xff" * 160  # 20 ms at 8 kHz


class _Rtp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 12 and data[0] >> 6 == 2:
            self.received += 1


class HoldUA(asyncio.DatagramProtocol):
    def __init__(self, host: str, name: str = "sipbridge") -> None:
        self.host = host
        self.name = name
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.rtp = _Rtp()
        self.rtp_port = 0
        self.rtp_sent = 0
        self.state = "idle"  # idle, ringing, up, ended, failed
        self.reason = ""
        self.code: int | None = None
        self.ended = asyncio.Event()
        self.up = asyncio.Event()
        # Dialog state (RFC 3261 12).
        self.call_id = ""
        self.local_tag = sipmsg.new_tag()
        self.local_uri = ""
        self.remote_uri = ""  # the From/To value of the other side, with its tag
        self.remote_target = ""
        self.route_set: list[str] = []
        self.local_cseq = 1
        self._invite: sipmsg.SipMessage | None = None  # uas: the INVITE; uac: the one we sent
        self._ok: bytes | None = None  # uas: our 200, retransmitted until the ACK
        self._ack: bytes | None = None  # uac: our ACK, resent on a retransmitted 200
        self._responses: asyncio.Queue[sipmsg.SipMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._media_to: tuple[str, int] | None = None
        self._media_sdp = b""

    async def bind(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, 0))
        await loop.create_datagram_endpoint(lambda: self.rtp, local_addr=(self.host, 0))
        assert self.rtp.transport is not None
        self.rtp_port = self.rtp.transport.get_extra_info("sockname")[1]
        return self.host, self.port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    @property
    def contact(self) -> str:
        return f"<sip:{self.name}@{self.host}:{self.port}>"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def _finish(self, state: str, reason: str, code: int | None = None) -> None:
        if self.state in ("ended", "failed"):
            return
        self.state, self.reason, self.code = state, reason, code
        self.ended.set()
        # Linger for retransmissions (our 200 to a BYE), then close the sockets.
        loop = asyncio.get_running_loop()
        loop.call_later(T1_S * 4, self.close)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for transport in (self.transport, self.rtp.transport):
            if transport:
                transport.close()

    def stats(self) -> dict[str, Any]:
        return {"sip": f"{self.host}:{self.port}", "rtp_in": self.rtp.received, "rtp_out": self.rtp_sent,
                "code": self.code}

    # -- media ------------------------------------------------------------------------------------------
    async def _send_media(self) -> None:
        ssrc = random.getrandbits(32)
        seq, ts = random.getrandbits(16), random.getrandbits(32)
        next_s = time.monotonic()
        while self.state == "up" and self._media_to and self.rtp.transport:
            header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
            self.rtp.transport.sendto(header + PCMU_SILENCE, self._media_to)
            self.rtp_sent += 1
            seq, ts = seq + 1, ts + 160
            next_s += RTP_PACKET_INTERVAL_S
            await asyncio.sleep(max(0.0, next_s - time.monotonic()))

    def _media_up(self, sdp: bytes) -> None:
        self._media_to = sipmsg.sdp_audio_target(sdp)
        if self._media_to:
            self._spawn(self._send_media())

    # -- incoming ---------------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip():
            return
        try:
            msg = sipmsg.parse(data)
        except sipmsg.SipError as exc:
            log.debug("%s: dropped a malformed datagram: %s", self.call_id or "hold call", exc)
            return
        if msg.is_request:
            self._on_request(msg, addr)
        else:
            self._on_response(msg, addr)

    def _reply(self, req: sipmsg.SipMessage, status: int, reason: str = "", **kwargs: Any) -> bytes:
        data = sipmsg.response(req, status, reason, to_tag=self.local_tag, **kwargs).to_bytes()
        self._send(data, sipmsg.via_sent_by(req.top_via()))
        return data

    def _on_request(self, req: sipmsg.SipMessage, addr: tuple[str, int]) -> None:
        if req.method == "INVITE" and self._invite is None and self.state == "idle":
            self._invite = req
            self.call_id = req.call_id
            self.remote_uri = req.get("from") or ""
            self.local_uri = f"{req.get('to')};tag={self.local_tag}"
            self.remote_target = sipmsg.uri_of(req.get("contact") or "")
            self.route_set = req.get_all("record-route")  # UAS: in the order received
            self.state = "ringing"
            # Answered at once, with no 180 first: over UDP through a multi-process proxy a 180 sent just before
            # the 200 can be relayed after it, and a strict caller (sipp) then aborts the call on the late 180.
            answer = sipmsg.audio_sdp(self.host, self.rtp_port, random.getrandbits(31))
            self._ok = self._reply(req, 200, extra=[("contact", self.contact), ("content-type", "application/sdp")],
                                   body=answer)
            self._spawn(self._retransmit_ok(req))
            self._media_sdp = req.body
            return
        if req.method == "INVITE" and self._invite is not None and req.call_id == self.call_id:
            if self._ok and sipmsg.tag(req.get("to") or "") is None:
                self._send(self._ok, sipmsg.via_sent_by(req.top_via()))  # retransmitted INVITE
            else:
                self._reply(req, 200, extra=[("contact", self.contact)])  # re-INVITE: keep the call as it is
            return
        if req.call_id != self.call_id:
            self._reply(req, 481)
            return
        if req.method == "ACK":
            if self.state == "ringing":
                self.state = "up"
                self.up.set()
                self._media_up(self._media_sdp)
            return
        if req.method == "BYE":
            self._reply(req, 200)
            self._finish("ended", "BYE from the peer")
            return
        if req.method == "CANCEL" and self.state == "ringing" and self._invite is not None:
            self._reply(req, 200)
            self._reply(self._invite, 487)
            self._finish("ended", "cancelled by the caller", 487)
            return
        if req.method in ("OPTIONS", "INFO"):
            self._reply(req, 200)
            return
        self._reply(req, 405)

    async def _retransmit_ok(self, req: sipmsg.SipMessage) -> None:
        interval, deadline = T1_S, time.monotonic() + TRANSACTION_TIMEOUT_S
        while self.state == "ringing" and time.monotonic() < deadline:
            await asyncio.sleep(interval)
            if self.state == "ringing" and self._ok:
                self._send(self._ok, sipmsg.via_sent_by(req.top_via()))
            interval = min(interval * 2, T2_S)
        if self.state == "ringing":
            self._finish("failed", "no ACK for our 200 OK")

    def _on_response(self, resp: sipmsg.SipMessage, addr: tuple[str, int]) -> None:
        if resp.call_id != self.call_id:
            return
        if resp.cseq[1] == "INVITE" and resp.status == 200 and self._ack is not None:
            self._send(self._ack, self._next_hop())  # a retransmitted 200: the ACK got lost
            return
        self._responses.put_nowait(resp)

    # -- outgoing ---------------------------------------------------------------------------------------
    def _next_hop(self) -> tuple[str, int]:
        if self.route_set:
            return sipmsg.host_port(sipmsg.uri_of(self.route_set[0]))
        return sipmsg.host_port(self.remote_target)

    def _request(self, method: str, uri: str, cseq: int, branch: str, body: bytes = b"",
                 to: str | None = None, routes: list[str] | None = None) -> sipmsg.SipMessage:
        headers = [("via", f"SIP/2.0/UDP {self.host}:{self.port};branch={branch};rport"), ("max-forwards", "70"),
                   ("from", self.local_uri), ("to", to if to is not None else self.remote_uri),
                   ("call-id", self.call_id), ("cseq", f"{cseq} {method}")]
        headers += [("route", r) for r in (routes if routes is not None else self.route_set)]
        if method in ("INVITE", "ACK"):
            headers.append(("contact", self.contact))
        if body:
            headers.append(("content-type", "application/sdp"))
        return sipmsg.SipMessage(method=method, uri=uri, headers=headers, body=body)

    async def _transaction(self, data: bytes, addr: tuple[str, int], method: str, invite: bool = False,
                           timeout_s: float = TRANSACTION_TIMEOUT_S) -> sipmsg.SipMessage | None:
        """Send a request with UDP retransmissions (RFC 3261 17.1) and return its final response."""
        interval, deadline = T1_S, time.monotonic() + timeout_s
        provisional = False
        next_send = time.monotonic()
        while time.monotonic() < deadline:
            if not provisional and time.monotonic() >= next_send:
                self._send(data, addr)
                next_send = time.monotonic() + interval
                interval = interval * 2 if invite else min(interval * 2, T2_S)
            try:
                wait_s = max(0.01, min(next_send, deadline) - time.monotonic())
                resp = await asyncio.wait_for(self._responses.get(), wait_s)
            except TimeoutError:
                continue
            if resp.cseq[1] != method:
                continue
            if resp.status is not None and resp.status < 200:
                provisional = True
                continue
            return resp
        return None

    async def dial(self, uri: str, call_id: str) -> None:
        """Call ``uri``; returns when the call is up (``state`` "up") or failed (``state`` "failed")."""
        self.call_id = call_id
        self.local_uri = f"<sip:{self.name}@{self.host}>;tag={self.local_tag}"
        self.remote_uri = f"<{uri}>"
        self.remote_target = uri
        offer = sipmsg.audio_sdp(self.host, self.rtp_port, random.getrandbits(31))
        branch = sipmsg.new_branch()
        invite = self._request("INVITE", uri, 1, branch, offer, routes=[])
        self._invite = invite
        self.state = "ringing"
        resp = await self._transaction(invite.to_bytes(), sipmsg.host_port(uri), "INVITE", invite=True)
        if resp is None:
            self._finish("failed", "no answer to the INVITE (timeout)", 408)
            return
        assert resp.status is not None
        self.code = resp.status
        if resp.status >= 300:
            # The ACK of a failed INVITE is hop-by-hop: same branch, same next hop as the INVITE.
            ack = self._request("ACK", uri, 1, branch, to=resp.get("to"), routes=[])
            self._send(ack.to_bytes(), sipmsg.host_port(uri))
            self._finish("failed", f"{resp.status} {resp.reason}".strip(), resp.status)
            return
        self.remote_uri = resp.get("to") or self.remote_uri
        self.remote_target = sipmsg.uri_of(resp.get("contact") or uri)
        self.route_set = list(reversed(resp.get_all("record-route")))  # UAC: reversed (RFC 3261 12.1.2)
        ack = self._request("ACK", self.remote_target, 1, sipmsg.new_branch())
        self._ack = ack.to_bytes()
        self._send(self._ack, self._next_hop())
        self.state = "up"
        self.up.set()
        self._media_up(resp.body)

    async def hangup(self, reason: str = "hung up") -> None:
        """Send BYE and wait for its answer; a call that is not up just ends here."""
        if self.state != "up":
            self._finish("ended", reason)
            return
        self.local_cseq += 1
        bye = self._request("BYE", self.remote_target, self.local_cseq, sipmsg.new_branch())
        self.state = "hanging-up"
        resp = await self._transaction(bye.to_bytes(), self._next_hop(), "BYE", timeout_s=8.0)
        code = resp.status if resp else None
        self._finish("ended", reason if resp else f"{reason} (no answer to BYE)", code)

    async def hold(self, hold_s: float) -> None:
        """Keep an established call for ``hold_s`` (0: until it ends otherwise), then hang up."""
        if hold_s <= 0:
            await self.ended.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ended.wait(), hold_s)
        if not self.ended.is_set():
            await self.hangup("held for its time")

    def new_call_id(self, base: str) -> str:
        return f"{base}.{secrets.token_hex(4)}@{self.host}"
