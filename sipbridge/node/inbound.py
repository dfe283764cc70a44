"""Inbound SIP calls on a node: one SIP identity, one call pipeline per INVITE.

The node's SIP front (sipbridge/cluster/front.py) receives every INVITE at the node's address. For each one
that the rules let through (``accept_from`` on the caller's URI: else 403, no slot spent) and the node admits
(else 503), ``InboundCalls.start``:

1. picks the room: the first ``[[sip.route]]`` whose ``match`` fits the caller's URI, its ``vars`` over
   ``room.vars`` (none fits: ``room.vars``). The call's bridge has no routes left, so its bot joins at once,
   while the SIP side is still being set up;
2. starts that bridge as a call of its own (its own supervisord, run folder, janus stage and so a fresh Janus
   SIP handle, registered as a guest with the node's identity);
3. waits for the janus stage to report its handle's SIP address (``registration.contact``: Janus binds a
   random port per handle; the stage learns it with a probe MESSAGE, stages/janus/sipprobe.py) and returns it;
   the front then forwards the INVITE there (a stateless proxy: its Via on top).

The call ends with its SIP call (the caller's BYE, a CANCEL, our hang-up), or after ``INVITE_ARRIVAL_TIMEOUT_S``
if the INVITE never reached its handle (the caller gave up while the call was starting).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
import time
from typing import Any

import zmq

from sipbridge.bridge import BridgeConfigError, parse_bridge
from sipbridge.node.calls import CONTROL_TIMEOUT_S, CallRequestError, control_request

log = logging.getLogger("sipbridge.node")

# From the call's start to its janus stage reporting the handle's SIP address: supervisord, the stage's imports
# (aiortc, PyAV), Janus attach and register, the probe, while the call's other stages and Chromium start too:
# 25 s measured at a load average of 50 on 2 cores, over 45 s at 60. The caller has had its 100 Trying and
# waits; the bound stays under Kamailio's fr_inv_timer (60 s in deploy/kamailio), so the caller gets our 500
# (and Kamailio tries the next node) rather than Kamailio's 408.
INBOUND_READY_TIMEOUT_S = 55.0  # the default of the node's inbound_ready_timeout_s
READY_POLL_S = 0.1
# A call whose INVITE never reached its handle (a CANCEL while it started) is stopped after this long.
INVITE_ARRIVAL_TIMEOUT_S = 30.0
# SIP states of the janus stage once an INVITE reached it.
_ARRIVED_STATES = {"incoming", "accepted", "media_up", "ended", "failed", "declined", "hangingup", "held", "holding",
                   "on_hold", "resumed"}


class InboundConfigError(ValueError):
    """The node's inbound bridge file cannot take calls; the message names the key."""


class CallerRefused(Exception):
    """The caller is not in accept_from."""


class InboundCalls:
    def __init__(self, node: Any, config: dict[str, Any], source: str = "inbound",
                 ready_timeout_s: float = INBOUND_READY_TIMEOUT_S) -> None:
        self.node = node  # sipbridge.node.service.Node
        self.source = source
        self.ready_timeout_s = ready_timeout_s
        try:
            cfg = parse_bridge(config)
        except BridgeConfigError as exc:
            raise InboundConfigError(f"{source}: {exc}") from None
        if not cfg.inbound:
            raise InboundConfigError(f"{source}: sip.inbound must be true (the bridge each INVITE's call runs)")
        assert cfg.accept_from is not None  # parse_bridge requires it with inbound
        self.config = config
        self.accept_from = re.compile(cfg.accept_from)
        self.routes = [(re.compile(pattern), variables) for pattern, variables in cfg.routes]
        identity = re.sub(r"^sips?:", "", cfg.identity)
        self.user = identity.split("@", 1)[0] if "@" in identity else ""
        try:
            node.plan(self.config_for(""))  # what the node would refuse (janus.start, a missing secret), now
        except CallRequestError as exc:
            raise InboundConfigError(f"{source}: {exc}") from None
        self.front: tuple[str, int] | None = None  # the SIP front's address, once it listens
        self.sip_calls: dict[str, str] = {}  # SIP Call-ID -> node call id
        self._watchers: set[asyncio.Task[None]] = set()

    # ----- what callers see -------------------------------------------------------------------------
    def dial_uri(self) -> str | None:
        """The SIP URI to dial: the node's identity at its SIP front."""
        if self.front is None:
            return None
        host, port = self.front
        return f"sip:{self.user + '@' if self.user else ''}{host}:{port}"

    def screen(self, caller: str) -> str | None:
        """Why this caller is refused (not in accept_from), or None."""
        if self.accept_from.search(caller):
            return None
        return f"caller {caller or '(none)'} is not in accept_from ({self.accept_from.pattern})"

    def config_for(self, caller: str) -> dict[str, Any]:
        """The call's bridge: the route the caller matches folded into room.vars, no routes left (the bot joins
        at once: the call is this caller's from its start)."""
        config = copy.deepcopy(self.config)
        room = config.setdefault("room", {})
        variables = dict(room.get("vars", {}))
        for pattern, route_vars in self.routes:
            if caller and pattern.search(caller):
                variables.update(route_vars)
                break
        room["vars"] = variables
        config.get("sip", {}).pop("route", None)
        return config

    # ----- one INVITE -------------------------------------------------------------------------------
    async def start(self, sip_call_id: str, caller: str) -> tuple[str, int]:
        """Start the call for an admitted INVITE; the (host, port) of its Janus handle once it listens.

        Raises CallerRefused, the node's Refused (full, draining), or RuntimeError (the call could not start or
        its handle never reported an address; the call is stopped)."""
        refused = self.screen(caller)
        if refused is not None:
            raise CallerRefused(refused)
        plan = self.node.plan(self.config_for(caller))
        plan.one_call = True
        plan.summary["sip"] = f"inbound from {caller}"
        started = time.monotonic()
        call = await self.node.start_call(plan)
        for old in [sid for sid, cid in self.sip_calls.items() if cid not in self.node.calls]:
            del self.sip_calls[old]  # the node forgot those calls (it keeps the last ENDED_CALLS_KEPT)
        self.sip_calls[sip_call_id] = call.id
        try:
            contact = await self._wait_contact(call)
        except BaseException as exc:
            call.error = f"its SIP handle never listened: {exc}" if isinstance(exc, RuntimeError) else call.error
            # Stopped in the background: the caller gets its answer now, not after the stages have flushed.
            self._background(self.node.stop_call(call, "start_failed"), f"stop-{call.id}")
            raise
        host, port = _host_port(contact)
        ready_s = time.monotonic() - started
        plan.summary["handle_ready_s"] = round(ready_s, 2)  # INVITE in to its handle listening (GET /calls)
        log.info("call %s: INVITE %s from %s goes to its Janus handle at %s:%d (ready in %.1f s)", call.id,
                 sip_call_id, caller, host, port, ready_s)
        self._background(self._await_invite(call), f"invite-{call.id}")
        return host, port

    def _background(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _wait_contact(self, call: Any) -> str:
        endpoint = call.control_endpoint()
        if endpoint is None:
            raise RuntimeError("the call has no janus stage")
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if call.state not in ("starting", "running"):
                raise RuntimeError(f"the call ended while starting ({call.end_reason}: {call.error or '-'})")
            try:
                reply = await control_request(endpoint, {"cmd": "status"}, min(CONTROL_TIMEOUT_S, 2.0))
            except (TimeoutError, zmq.ZMQError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"  # the stage is not up yet
            else:
                registration = reply.get("registration") or {}
                contact = registration.get("contact")
                if isinstance(contact, str) and contact:
                    return contact
                last = f"registration {registration.get('state', '?')}"
            await asyncio.sleep(READY_POLL_S)
        raise RuntimeError(f"no SIP address from the janus stage within {self.ready_timeout_s:.0f} s ({last})")

    async def _await_invite(self, call: Any) -> None:
        """Stop a call whose INVITE never reached its handle (the caller cancelled while it started)."""
        deadline = time.monotonic() + INVITE_ARRIVAL_TIMEOUT_S
        while time.monotonic() < deadline and call.state == "running":
            if (call.sip() or {}).get("state") in _ARRIVED_STATES:
                return
            await asyncio.sleep(0.5)
        if call.state == "running" and (call.sip() or {}).get("state") not in _ARRIVED_STATES:
            log.warning("call %s: no INVITE reached its handle within %.0f s; stopping it", call.id,
                        INVITE_ARRIVAL_TIMEOUT_S)
            call.error = f"no INVITE reached its SIP handle within {INVITE_ARRIVAL_TIMEOUT_S:.0f} s"
            await self.node.stop_call(call, "no_invite")

    def node_call(self, sip_call_id: str) -> Any:
        call_id = self.sip_calls.get(sip_call_id)
        return self.node.calls.get(call_id) if call_id else None

    async def close(self) -> None:
        for task in list(self._watchers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _host_port(contact: str) -> tuple[str, int]:
    match = re.fullmatch(r"sips?:(?:[^@]*@)?(\[[^\]]+\]|[^:;>]+):(\d+)", contact)
    if match is None:
        raise RuntimeError(f"the janus stage reported an address without a port: {contact!r}")
    return match[1].strip("[]"), int(match[2])
