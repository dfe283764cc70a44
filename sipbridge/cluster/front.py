"""A node's SIP front: what Kamailio's dispatcher probes and sends INVITEs to.

Why a front of our own: the Janus SIP plugin (sofia-sip) answers OPTIONS itself, 200 whether or not the
node has a free slot, and each Janus handle listens on its own port. Kamailio needs one address per node
whose OPTIONS answer says "room for a call" (200) or "full or draining" (503). So each node runs this small
UDP listener on its SIP address (default port 5060):

* OPTIONS: 200 while the runner's snapshot admits a call, 503 (Retry-After) when full or draining.
* A new INVITE: a caller the node's rules refuse gets the runner's code (403); 503 when full or draining
  (Kamailio's failure_route then tries the next node); otherwise 100 Trying, the runner reserves a slot and
  names a fresh user agent for the call (a Janus handle, a hold call), and the front forwards the INVITE there
  as a stateless proxy (RFC 3261 16.11): its own Via on top, Max-Forwards less one. Responses come back
  through it by that Via. CANCEL and the ACK of a failed INVITE follow the INVITE. Through Kamailio,
  in-dialog requests (ACK of 200, BYE, re-INVITE, INFO) never pass here: they follow Kamailio's Record-Route
  and the user agent's Contact, which is on this node. A caller that dials the front directly and keeps
  sending there (sipp does) has its in-dialog requests forwarded the same way while the front knows the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from sipbridge.cluster import sipmsg
from sipbridge.cluster.runner import FINAL_STATES, CallRejected, CallRunner

log = logging.getLogger("sipbridge.cluster.front")

RETRY_AFTER_S = 5
# How long the front remembers an INVITE after its final answer, for retransmissions, CANCEL and ACK
# (64*T1, RFC 3261 17.2.1).
TRANSACTION_LINGER_S = 32.0
# An answered call is remembered (for a direct caller's in-dialog requests) until the runner says it ended,
# a BYE passed, or this long: a bound for a runner that forgets calls.
DIALOG_MAX_S = 4 * 3600.0
# A forwarded INVITE without a final answer is remembered this long (RFC 3261 Timer C, 16.6); one whose call is
# still starting, until the runner is done (it has its own bound) or this much longer.
INVITE_MAX_S = 180.0
PLACING_MAX_S = 600.0
SWEEP_INTERVAL_S = 5.0
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO"


@dataclass
class _Inbound:
    call_id: str
    branch: str  # our branch for the forwarded INVITE
    target: tuple[str, int] | None = None  # the user agent answering it, once known
    created_s: float = field(default_factory=time.monotonic)
    forwarded_s: float | None = None  # when the INVITE went to the user agent
    final_s: float | None = None
    answered: bool = False  # a 2xx to the INVITE passed: a dialog to remember
    bye_s: float | None = None  # when a BYE passed
    pending: list[bytes] = field(default_factory=list)  # the INVITE (and ACKs) until the target is known
    invite: tuple[sipmsg.SipMessage, tuple[str, int]] | None = None  # the INVITE and where it came from
    cancelled: bool = False  # CANCELled while the call was starting: answered here, the call let go
    branches: set[str] = field(default_factory=set)  # ours, of every request forwarded for this call


class SipFront(asyncio.DatagramProtocol):
    def __init__(self, runner: CallRunner, host: str, port: int = 5060,
                 on_event: Callable[..., None] | None = None) -> None:
        self.runner = runner
        self.on_event = on_event or (lambda event, **fields: None)
        self.host = host
        self.port = port
        self.salt = secrets.token_hex(4)
        self.transport: asyncio.DatagramTransport | None = None
        self.calls: dict[str, _Inbound] = {}
        self.counters: dict[str, int] = {
            "options_200": 0, "options_503": 0, "invites_accepted": 0, "invites_refused": 0,
            "responses_relayed": 0, "in_dialog_forwarded": 0, "malformed": 0, "unroutable": 0,
        }
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("SIP front listening on udp:%s:%d", self.host, self.port)

    def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for task in self._tasks:
            task.cancel()
        if self.transport:
            self.transport.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport:
            self.transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip():
            return  # CRLF keep-alive
        try:
            msg = sipmsg.parse(data)
            if msg.is_request:
                self._on_request(msg, addr)
            else:
                self._on_response(msg)
        except sipmsg.SipError as exc:
            self.counters["malformed"] += 1
            log.debug("dropped a malformed datagram from %s:%d: %s", *addr, exc)

    # -- requests ---------------------------------------------------------------------------------------
    def _reply(self, req: sipmsg.SipMessage, addr: tuple[str, int], status: int, reason: str = "",
               extra: list[tuple[str, str]] | None = None) -> None:
        # Requests we answer ourselves come from the previous hop; answer to its source (RFC 3581 rport).
        self._send(sipmsg.response(req, status, reason, to_tag=self.salt, extra=extra).to_bytes(), addr)

    def _on_request(self, req: sipmsg.SipMessage, addr: tuple[str, int]) -> None:
        method = req.method
        to_tag = sipmsg.tag(req.get("to") or "")
        if method == "OPTIONS":
            snap = self.runner.snapshot()
            extra = [("allow", ALLOW), ("x-sipbridge-slots", f"{snap.free}/{snap.slots}")]
            if snap.admitting:
                self.counters["options_200"] += 1
                self._reply(req, addr, 200, extra=extra)
            else:
                self.counters["options_503"] += 1
                why = "draining" if snap.draining else "full"
                self._reply(req, addr, 503, f"Service Unavailable ({why})",
                            extra=[*extra, ("retry-after", str(RETRY_AFTER_S))])
            return
        if method == "INVITE" and to_tag is None:
            self._on_invite(req, addr)
            return
        if method in ("CANCEL", "ACK"):
            entry = self.calls.get(req.call_id)
            if entry is None:
                if method == "CANCEL":
                    self._reply(req, addr, 481)
                return  # an ACK for something we do not know: nothing to answer (RFC 3261 17.2.3)
            if method == "CANCEL" and entry.target is None and entry.final_s is None and entry.invite is not None:
                # The caller (or Kamailio, its INVITE timer run out) gives up while the call is still starting:
                # answer here (200 to the CANCEL, 487 to the INVITE) and let the call go once it has started.
                entry.cancelled = True
                entry.final_s = time.monotonic()
                entry.pending.clear()
                self._reply(req, addr, 200)
                invite, source = entry.invite
                self._reply(invite, source, 487, "Request Terminated")
                log.info("call %s: CANCEL while the call was starting: 487", entry.call_id)
                return
            if entry.cancelled:
                return  # the ACK of our 487: hop by hop, ours
            self._forward_request(req, entry)
            return
        if to_tag is not None:
            entry = self.calls.get(req.call_id)
            if entry is not None and entry.target is not None and entry.answered:
                # A caller that sends its in-dialog requests to us (it dialled the front directly).
                self.counters["in_dialog_forwarded"] += 1
                if method == "BYE":
                    entry.bye_s = time.monotonic()
                self._forward_request(req, entry, own_branch=True)
                return
            self._reply(req, addr, 481)  # through Kamailio they go to the user agent's Contact, not here
            return
        self._reply(req, addr, 405, extra=[("allow", ALLOW)])

    def _on_invite(self, req: sipmsg.SipMessage, addr: tuple[str, int]) -> None:
        call_id = req.call_id
        entry = self.calls.get(call_id)
        if entry is not None:  # a retransmission: the user agent answers it (or will)
            self._forward_request(req, entry)
            return
        max_forwards = req.get("max-forwards")
        if max_forwards is not None and (not max_forwards.isdigit() or int(max_forwards) <= 1):
            self._reply(req, addr, 483)
            return
        caller = sipmsg.uri_of(req.get("from") or "")
        refused = self.runner.screen(caller)
        if refused is not None:
            # The node's rules refuse this caller (accept_from): a clear code, and no slot spent.
            self.counters["invites_refused"] += 1
            log.info("call %s: INVITE from %s refused with %d: %s", call_id, caller, refused.status, refused.reason)
            self.on_event("invite_refused", call=call_id, reason=refused.reason, source=f"{addr[0]}:{addr[1]}")
            self._reply(req, addr, refused.status, refused.sip_reason)
            return
        snap = self.runner.snapshot()
        if not snap.admitting:
            self.counters["invites_refused"] += 1
            why = "draining" if snap.draining else "full"
            log.info("call %s: INVITE refused with 503 (%s, %d/%d slots free)", call_id, why, snap.free, snap.slots)
            self.on_event("invite_refused", call=call_id, reason=why, source=f"{addr[0]}:{addr[1]}")
            self._reply(req, addr, 503, f"Service Unavailable ({why})", extra=[("retry-after", str(RETRY_AFTER_S))])
            return
        self._reply(req, addr, 100)
        entry = _Inbound(call_id, sipmsg.branch_for(sipmsg.param(req.top_via(), "branch") or call_id, self.salt))
        entry.branches.add(entry.branch)
        entry.invite = (req, addr)
        entry.pending.append(self._forwarded(req, entry))
        self.calls[call_id] = entry
        task = asyncio.create_task(self._place(req, addr, entry, caller))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _place(self, req: sipmsg.SipMessage, addr: tuple[str, int], entry: _Inbound, caller: str) -> None:
        try:
            target = await self.runner.start_inbound(entry.call_id, caller)
        except CallRejected as exc:
            self.counters["invites_refused"] += 1
            if entry.cancelled:
                return  # the caller has had its 487
            log.info("call %s: INVITE refused with %d: %s", entry.call_id, exc.status, exc.reason)
            self.on_event("invite_refused", call=entry.call_id, reason=exc.reason, source=f"{addr[0]}:{addr[1]}")
            self._reply(req, addr, exc.status, exc.sip_reason,
                        extra=[("retry-after", str(RETRY_AFTER_S))] if exc.status == 503 else None)
            entry.final_s = time.monotonic()
            return
        except Exception:
            log.exception("call %s: the runner failed to take the INVITE", entry.call_id)
            self._reply(req, addr, 500)
            entry.final_s = time.monotonic()
            return
        if entry.cancelled:
            log.info("call %s: started after its CANCEL; stopping it", entry.call_id)
            await self.runner.stop_call(entry.call_id)
            return
        self.counters["invites_accepted"] += 1
        self.on_event("invite_accepted", call=entry.call_id, source=f"{addr[0]}:{addr[1]}")
        entry.target = target
        entry.forwarded_s = time.monotonic()
        log.info("call %s: INVITE accepted, forwarded to the call's user agent at %s:%d", entry.call_id, *target)
        for data in entry.pending:
            self._send(data, target)
        entry.pending.clear()

    def _forwarded(self, req: sipmsg.SipMessage, entry: _Inbound, branch: str | None = None) -> bytes:
        out = sipmsg.SipMessage(method=req.method, uri=req.uri, headers=list(req.headers), body=req.body)
        max_forwards = req.get("max-forwards")
        if max_forwards is not None and max_forwards.isdigit():
            out.set("max-forwards", str(int(max_forwards) - 1))
        out.headers.insert(0, ("via", f"SIP/2.0/UDP {self.host}:{self.port};branch={branch or entry.branch};rport"))
        return out.to_bytes()

    def _forward_request(self, req: sipmsg.SipMessage, entry: _Inbound, own_branch: bool = False) -> None:
        branch = entry.branch
        if own_branch:  # a new transaction in the dialog (BYE, INFO, re-INVITE): a branch of its own
            branch = sipmsg.branch_for(sipmsg.param(req.top_via(), "branch") or f"{req.cseq}", self.salt)
            entry.branches.add(branch)
        data = self._forwarded(req, entry, branch)
        if entry.target is None:
            entry.pending.append(data)
        else:
            self._send(data, entry.target)

    # -- responses --------------------------------------------------------------------------------------
    def _on_response(self, resp: sipmsg.SipMessage) -> None:
        vias = resp.get_all("via")
        branch = sipmsg.param(vias[0], "branch") if vias else None
        entry = self.calls.get(resp.call_id)
        if entry is not None and entry.target is not None and vias and branch not in entry.branches:
            with contextlib.suppress(sipmsg.SipError):
                if sipmsg.via_sent_by(vias[0])[:2] == entry.target:
                    # A direct caller answering the user agent's own request (its BYE) to us, where it sends
                    # everything: the user agent is where that answer belongs.
                    self._send(resp.to_bytes(), entry.target)
                    self.counters["responses_relayed"] += 1
                    return
        if entry is None or branch not in entry.branches or len(vias) < 2:
            self.counters["unroutable"] += 1
            return
        # Drop our own Via (the first value, possibly inside a comma-separated header) and relay.
        out = sipmsg.SipMessage(status=resp.status, reason=resp.reason, body=resp.body)
        dropped = False
        for key, value in resp.headers:
            if key == "via" and not dropped:
                dropped = True
                rest = sipmsg.split_commas(value)[1:]
                if rest:
                    out.headers.append((key, ", ".join(rest)))
                continue
            out.headers.append((key, value))
        self._send(out.to_bytes(), sipmsg.via_sent_by(vias[1]))
        self.counters["responses_relayed"] += 1
        if resp.status is not None and resp.status >= 200 and resp.cseq[1] == "INVITE" and entry.final_s is None:
            entry.final_s = time.monotonic()
            entry.answered = resp.status < 300

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for call_id, entry in list(self.calls.items()):
                started = entry.final_s if entry.final_s is not None else entry.created_s
                if entry.answered:
                    # A dialog: kept while the call lives (a direct caller's BYE comes here), then lingers.
                    state = self.runner.call_state(call_id)
                    over = entry.bye_s is not None or state is None or state.state in FINAL_STATES
                    if over and entry.bye_s is None:
                        entry.bye_s = now
                    if not (over and now - (entry.bye_s or now) > TRANSACTION_LINGER_S) and \
                            now - started < DIALOG_MAX_S:
                        continue
                    del self.calls[call_id]
                elif entry.final_s is not None:
                    if now - entry.final_s > TRANSACTION_LINGER_S:
                        del self.calls[call_id]
                elif entry.forwarded_s is not None:
                    if now - entry.forwarded_s > INVITE_MAX_S:
                        del self.calls[call_id]
                elif now - entry.created_s > PLACING_MAX_S:
                    # Still starting the call: its answer must find this entry (a start can outlast 32 s).
                    del self.calls[call_id]


async def options_probe(host: str, port: int, timeout_s: float = 2.0) -> int | None:
    """Send one OPTIONS to host:port and return the status code (None on timeout): for tests and checks."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    class _Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            with contextlib.suppress(sipmsg.SipError):
                msg = sipmsg.parse(data)
                if msg.status and msg.status >= 200 and not done.done():
                    done.set_result(msg.status)

    transport, _ = await loop.create_datagram_endpoint(_Probe, remote_addr=(host, port))
    try:
        local = transport.get_extra_info("sockname")
        req = sipmsg.SipMessage(method="OPTIONS", uri=f"sip:{host}:{port}", headers=[
            ("via", f"SIP/2.0/UDP {local[0]}:{local[1]};branch={sipmsg.new_branch()};rport"),
            ("max-forwards", "70"), ("from", f"<sip:probe@{local[0]}>;tag={sipmsg.new_tag()}"),
            ("to", f"<sip:{host}:{port}>"), ("call-id", secrets.token_hex(8)), ("cseq", "1 OPTIONS"),
        ])
        transport.sendto(req.to_bytes())
        try:
            return await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            return None
    finally:
        transport.close()
