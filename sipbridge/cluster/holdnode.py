"""A cluster node whose calls are hold calls: the cluster layer run for real without a browser.

``HoldRunner`` implements ``CallRunner`` with ``HoldUA``: an API-started call dials the bridge file's
``sip.call`` URI (the file is validated exactly like ``bridge.toml``), an inbound call answers the INVITE
the front forwards; each holds its slot with RTP both ways until the peer hangs up, ``hold_s`` passes,
or the call is stopped (BYE). ``run_node`` puts the front, the Redis agent and drain-on-SIGTERM together;
``sipbridge node`` (issue 12) does the same with its bridged calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipbridge.bridge import BridgeConfigError, parse_bridge
from sipbridge.cluster.agent import AgentOptions, NodeAgent
from sipbridge.cluster.front import SipFront
from sipbridge.cluster.holdcall import HoldUA
from sipbridge.cluster.runner import ENDED, FAILED, FINAL_STATES, STARTING, UP, CallRejected, CallStatus, NodeSnapshot

log = logging.getLogger("sipbridge.cluster.node")

INBOUND_INVITE_TIMEOUT_S = 10.0  # a reserved slot whose INVITE never arrives is given back
FORGET_ENDED_S = 300.0
INBOUND_MAX_S = 3600.0


@dataclass
class _Call:
    call_id: str
    kind: str  # "api" or "inbound"
    ua: HoldUA
    status: CallStatus = field(default_factory=lambda: CallStatus(STARTING, since_s=time.time()))
    task: asyncio.Task[None] | None = None


class EventLog:
    """JSON lines of what happened on this node (call_start/up/end, drain): what tests read."""

    def __init__(self, path: str | None, node_id: str) -> None:
        self.fh = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed in close()
        self.node_id = node_id

    def write(self, event: str, **fields: Any) -> None:
        if self.fh:
            self.fh.write(json.dumps({"t": time.time(), "node": self.node_id, "event": event, **fields}) + "\n")

    def close(self) -> None:
        if self.fh:
            self.fh.close()


class HoldRunner:
    def __init__(self, node_id: str, host: str, slots: int, hold_s: float = 0.0,
                 events: EventLog | None = None) -> None:
        self.node_id = node_id
        self.host = host
        self.slots = slots
        self.hold_s = hold_s
        self.draining = False
        self.calls: dict[str, _Call] = {}
        self.events = events or EventLog(None, node_id)

    def active(self) -> int:
        return sum(1 for c in self.calls.values() if c.status.state not in FINAL_STATES)

    def snapshot(self) -> NodeSnapshot:
        return NodeSnapshot(self.node_id, self.slots, self.active(), self.draining)

    def _admit(self, call_id: str) -> None:
        snap = self.snapshot()
        if snap.draining:
            raise CallRejected("node is draining")
        if snap.free <= 0:
            raise CallRejected(f"no free slot ({snap.slots} in use)")
        if call_id in self.calls and self.calls[call_id].status.state not in FINAL_STATES:
            raise CallRejected("call already running here", retry=False)

    async def start_call(self, call_id: str, config: dict[str, Any]) -> None:
        self._admit(call_id)
        try:
            target = parse_bridge(config).call
        except BridgeConfigError as exc:
            raise CallRejected(f"invalid bridge configuration: {exc}", retry=False) from None
        if not target:
            raise CallRejected("a hold call needs sip.call (the URI to dial)", retry=False)
        ua = HoldUA(self.host, name=self.node_id)
        await ua.bind()
        call = self.calls[call_id] = _Call(call_id, "api", ua)
        self.events.write("call_start", call=call_id, kind="api", target=target)
        call.task = asyncio.create_task(self._run_api(call, target))
        self._forget_later()

    async def _run_api(self, call: _Call, target: str) -> None:
        try:
            await call.ua.dial(target, call.ua.new_call_id(call.call_id))
            if call.ua.state == "up":
                self._set(call, UP)
                await call.ua.hold(self.hold_s)
            self._set(call, ENDED if call.ua.state == "ended" else FAILED, call.ua.reason)
        except asyncio.CancelledError:
            self._set(call, FAILED, "node stopped")
            raise
        except Exception as exc:
            log.exception("call %s failed", call.call_id)
            self._set(call, FAILED, str(exc))
        finally:
            call.ua.close()

    def screen(self, caller: str) -> CallRejected | None:
        return None  # a hold node takes any caller

    async def start_inbound(self, call_id: str, caller: str = "") -> tuple[str, int]:
        self._admit(call_id)
        ua = HoldUA(self.host, name=self.node_id)
        address = await ua.bind()
        call = self.calls[call_id] = _Call(call_id, "inbound", ua)
        self.events.write("call_start", call=call_id, kind="inbound")
        call.task = asyncio.create_task(self._run_inbound(call))
        self._forget_later()
        return address

    async def _run_inbound(self, call: _Call) -> None:
        try:
            try:
                await asyncio.wait_for(call.ua.up.wait(), INBOUND_INVITE_TIMEOUT_S)
            except TimeoutError:
                self._set(call, FAILED, call.ua.reason or "the INVITE never arrived or was not acknowledged")
                return
            self._set(call, UP)
            # The caller decides how long an inbound call lasts (its BYE); the bound only frees the slot of
            # a caller that vanished without one.
            await call.ua.hold(INBOUND_MAX_S)
            self._set(call, ENDED, call.ua.reason)
        except asyncio.CancelledError:
            self._set(call, FAILED, "node stopped")
            raise
        finally:
            call.ua.close()

    def _set(self, call: _Call, state: str, reason: str = "") -> None:
        if call.status.state == state or call.status.state in FINAL_STATES:
            return
        call.status = CallStatus(state, reason, time.time())
        self.events.write(f"call_{state}", call=call.call_id, kind=call.kind, reason=reason, **call.ua.stats())
        log.info("call %s (%s): %s%s", call.call_id, call.kind, state, f" ({reason})" if reason else "")

    def call_state(self, call_id: str) -> CallStatus | None:
        call = self.calls.get(call_id)
        if call is None:
            return None
        status = CallStatus(call.status.state, call.status.reason, call.status.since_s, call.ua.stats())
        return status

    async def stop_call(self, call_id: str) -> None:
        call = self.calls.get(call_id)
        if call is None or call.status.state in FINAL_STATES:
            return
        await call.ua.hangup("stopped by the node")
        if call.task:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(call.task), 5.0)

    async def drain(self, timeout_s: float) -> None:
        """Admit nothing more, let calls end for up to ``timeout_s``, then hang up the rest (BYE)."""
        self.draining = True
        self.events.write("drain", active=self.active())
        deadline = time.monotonic() + timeout_s
        while self.active() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        live = [cid for cid, c in self.calls.items() if c.status.state not in FINAL_STATES]
        await asyncio.gather(*(self.stop_call(cid) for cid in live), return_exceptions=True)

    def _forget_later(self) -> None:
        now = time.time()
        for cid, call in list(self.calls.items()):
            if call.status.state in FINAL_STATES and now - call.status.since_s > FORGET_ENDED_S:
                del self.calls[cid]


@dataclass
class NodeOptions:
    node_id: str
    sip_host: str
    sip_port: int = 5060
    slots: int = 2
    hold_s: float = 0.0
    redis_url: str | None = None
    prefix: str = "sb"
    stale_s: float = 6.0
    refresh_s: float = 1.0
    drain_timeout_s: float = 30.0
    events_path: str | None = None


async def run_node(opts: NodeOptions) -> int:
    events = EventLog(opts.events_path, opts.node_id)
    runner = HoldRunner(opts.node_id, opts.sip_host, opts.slots, opts.hold_s, events)
    front = SipFront(runner, opts.sip_host, opts.sip_port, on_event=events.write)
    await front.start()
    agent = None
    if opts.redis_url:
        agent = NodeAgent(runner, AgentOptions(
            redis_url=opts.redis_url, node_id=opts.node_id, prefix=opts.prefix, refresh_s=opts.refresh_s,
            stale_s=opts.stale_s, sip_address=f"sip:{opts.sip_host}:{front.port}"))
        agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    events.write("ready", sip=f"{opts.sip_host}:{front.port}", slots=opts.slots)
    log.info("node %s ready: SIP front sip:%s:%d, %d slots, redis %s", opts.node_id, opts.sip_host, front.port,
             opts.slots, opts.redis_url or "off")
    await stop.wait()
    log.info("node %s draining (up to %.0f s)", opts.node_id, opts.drain_timeout_s)
    await runner.drain(opts.drain_timeout_s)
    if agent:
        await agent.stop()
    front.close()
    events.write("exit", front=front.counters, agent=agent.counters if agent else {})
    events.close()
    return 0


def events_of(path: Path) -> list[dict[str, Any]]:
    """Read an event log (tests and benches)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out
