"""The node: its calls, admission (slots and a CPU ceiling), drain, and a plain snapshot of its state.

``Node.snapshot()`` is a dataclass of plain values (slots, free, draining, each call's state and since) so that
something else (issue 13: a Redis hash per node) can publish it without knowing the node's insides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sipbridge.node.calls import CALL_ID_RE, Call, CallPlan, RunFolderInUse, plan_call
from sipbridge.node.config import NODE_JANUS_SECRET_ENV, NodeSettings, read_janus_api_secret
from sipbridge.node.hostinfo import CLOCK_TICKS_PER_S, CpuSampler, ProcInfo, pss_bytes, scan_sessions
from sipbridge.supervise import process_states

log = logging.getLogger("sipbridge.node")

SAMPLE_INTERVAL_S = 1.0
MEMORY_SAMPLE_EVERY = 5  # PSS walks page tables: every 5th sample is often enough
ENDED_CALLS_KEPT = 100
RETRY_AFTER_S = 5


def running_leftovers(run_root: Path) -> list[Path]:
    """Call folders under ``run_root`` whose supervisord still answers."""
    return [d for d in sorted(run_root.iterdir()) if (d / "supervisor.sock").exists() and process_states(d)]


class Refused(Exception):
    """A call the node does not take now: ``status`` is the HTTP code (429 full, 503 draining)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass
class CallSnapshot:
    id: str
    state: str  # starting, running, stopping, ended
    since: float  # unix time of the last state change
    sip_state: str | None = None
    sip_code: int | None = None
    end_reason: str | None = None


@dataclass
class NodeSnapshot:
    """The node's state in plain values. sipbridge.cluster (issue 13) publishes it: keep the field names."""

    name: str
    slots: int
    free: int
    draining: bool
    cpu_busy: float  # host CPU, 0..1 of all cores
    cpu_ceiling: float
    admitting: bool
    time: float
    calls: list[CallSnapshot] = field(default_factory=list)
    sip_uri: str | None = None  # inbound: the SIP URI callers dial (the node's identity at its SIP front)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Node:
    def __init__(self, settings: NodeSettings, environ: dict[str, str] | None = None,
                 cpu: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.name = settings.name or socket.gethostname()
        # What the calls' processes inherit: the node's environment less the API token.
        env = dict(os.environ if environ is None else environ)
        if settings.token_env:
            env.pop(settings.token_env, None)
        if settings.janus_api_secret_file is not None:
            env[NODE_JANUS_SECRET_ENV] = read_janus_api_secret(settings.janus_api_secret_file)
        self.environ = env
        self.calls: OrderedDict[str, Call] = OrderedDict()
        self.draining = False
        self.started = Counter[str]()
        self.ended = Counter[str]()
        self.rejected = Counter[str]()
        self._sampler = CpuSampler()
        self._cpu_override = cpu  # tests give a fixed host CPU
        self.cpu_busy = 0.0
        self._samples = 0
        self._task: asyncio.Task[None] | None = None
        self._last_cpu_ticks: dict[str, tuple[int, float]] = {}
        self._followers: set[asyncio.Task[None]] = set()
        self.inbound: Any = None  # sipbridge.node.inbound.InboundCalls, with an inbound bridge configured

    # ----- background sampling -------------------------------------------------------------------
    async def start(self) -> None:
        self.settings.run_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in await asyncio.to_thread(running_leftovers, self.settings.run_root):
            # A call of a node that died without draining: not ours to stop or wipe, but it takes CPU (which
            # admission sees) and whoever runs the host should know.
            log.warning("run folder %s: its supervisord still answers (a call left by an earlier node); "
                        "left alone", leftover)
        self._task = asyncio.create_task(self._sample_loop(), name="node-sampler")

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            try:
                await self.sample()
            except OSError as exc:  # /proc read races with exiting processes; the next sample will do
                log.debug("sample failed: %s", exc)

    async def sample(self) -> None:
        """Host CPU, and each live call's processes, CPU (cores) and memory (PSS)."""
        self._samples += 1
        with_memory = self._samples % MEMORY_SAMPLE_EVERY == 1
        live = {c.session: c for c in self.calls.values() if c.state != "ended" and c.session}
        # PSS of every call every few samples, and at once for a call whose processes changed since it was
        # weighed (a call starting, a stage restarted): its figure would otherwise be stale until the next round.
        weighed = {sid: c.weighed_pids for sid, c in live.items()}
        busy, found, memory = await asyncio.to_thread(self._measure, set(live), weighed, with_memory)
        self.cpu_busy = busy
        now = time.monotonic()
        for sid, call in live.items():
            procs = found.get(sid, [])
            call.processes = procs
            ticks = sum(p.cpu_ticks for p in procs)
            last = self._last_cpu_ticks.get(call.id)
            if last is not None and now > last[1]:
                call.cpu_cores = max(0.0, (ticks - last[0]) / CLOCK_TICKS_PER_S / (now - last[1]))
            self._last_cpu_ticks[call.id] = (ticks, now)
            if sid in memory:
                call.memory_bytes = memory[sid]
                call.weighed_pids = frozenset(p.pid for p in procs)

    def _measure(self, sessions: set[int], weighed: dict[int, frozenset[int]], weigh_all: bool
                 ) -> tuple[float, dict[int, list[ProcInfo]], dict[int, int]]:
        busy = self._cpu_override() if self._cpu_override else self._sampler.sample()
        found = scan_sessions(sessions)
        memory = {sid: sum(pss_bytes(p.pid) for p in procs) for sid, procs in found.items()
                  if weigh_all or frozenset(p.pid for p in procs) != weighed.get(sid)}
        return busy, found, memory

    # ----- admission ---------------------------------------------------------------------------
    def active(self) -> list[Call]:
        return [c for c in self.calls.values() if c.state != "ended"]

    def free_slots(self) -> int:
        return max(0, self.settings.slots - len(self.active()))

    def refusal(self) -> Refused | None:
        """Why a new call would be refused now, or None."""
        if self.draining:
            return Refused(503, "draining", "node is draining: no new calls")
        in_use = len(self.active())
        if in_use >= self.settings.slots:
            return Refused(429, "full", f"no free slot ({in_use} of {self.settings.slots} in use)")
        if self.settings.cpu_ceiling < 1.0 and self.cpu_busy > self.settings.cpu_ceiling:
            return Refused(429, "cpu", f"host CPU at {self.cpu_busy:.2f} of all cores, above the ceiling "
                                       f"{self.settings.cpu_ceiling:.2f}")
        return None

    def plan(self, data: Any) -> CallPlan:
        return plan_call(data, self.settings.allow_pipelines, self.environ)

    async def start_call(self, plan: CallPlan, call_id: str | None = None) -> Call:
        """Admit and start a call (Refused when over capacity); the call is running when this returns."""
        refused = self.refusal()
        if refused is not None:
            self.rejected[refused.reason] += 1
            raise refused
        if call_id is None:
            call_id = secrets.token_hex(6)
        elif not CALL_ID_RE.fullmatch(call_id):
            raise ValueError(f"call id must be lower-case letters, digits and - (at most 32), not {call_id!r}")
        if call_id in self.calls:
            raise RunFolderInUse(f"call {call_id} exists on this node")
        call = Call(call_id, plan, self.settings.run_root, self.environ)
        # Taken before the first await: two requests at once cannot both get the last slot.
        self.calls[call_id] = call
        self.started[plan.kind] += 1
        try:
            await call.start()
        except RunFolderInUse:
            del self.calls[call_id]  # nothing of ours was created: the folder is someone else's
            self.started[plan.kind] -= 1
            raise
        except Exception as exc:
            call.error = f"could not start: {exc}"
            await call.stop("start_failed")
            self._ended(call)
            raise
        follow = asyncio.create_task(self._follow(call), name=f"follow-{call_id}")
        self._followers.add(follow)
        follow.add_done_callback(self._followers.discard)
        return call

    async def _follow(self, call: Call) -> None:
        await call.ended.wait()
        self._ended(call)

    def _ended(self, call: Call) -> None:
        self.ended[call.end_reason or "unknown"] += 1
        self._last_cpu_ticks.pop(call.id, None)
        # Keep the last ended calls for GET /calls/{id}; drop older ones with their run folders.
        ended = [c for c in self.calls.values() if c.state == "ended"]
        for old in ended[: max(0, len(ended) - ENDED_CALLS_KEPT)]:
            del self.calls[old.id]
            shutil.rmtree(old.run_dir, ignore_errors=True)

    async def stop_call(self, call: Call, reason: str = "deleted") -> None:
        await call.stop(reason)

    async def dtmf(self, call: Call, digits: str, duration_ms: int) -> dict[str, Any]:
        from sipbridge.node.calls import control_request

        endpoint = call.control_endpoint()
        if endpoint is None:
            raise LookupError("this call has no SIP stage")
        return await control_request(endpoint, {"cmd": "dtmf", "digits": digits, "duration_ms": duration_ms})

    # ----- drain -------------------------------------------------------------------------------
    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting; wait up to ``timeout_s`` for calls to end; hang up and stop the rest."""
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        self.draining = True
        active = self.active()
        log.info("draining: %d call(s) running, waiting up to %.0f s for them to end", len(active), timeout_s)
        if active and timeout_s > 0:
            waiters = [asyncio.create_task(c.ended.wait()) for c in active]
            await asyncio.wait(waiters, timeout=timeout_s)
            for waiter in waiters:
                waiter.cancel()
        rest = self.active()
        if rest:
            log.info("drain limit reached: hanging up %d call(s)", len(rest))
            await asyncio.gather(*(c.stop("drained") for c in rest))
        log.info("drained")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ----- state -------------------------------------------------------------------------------
    def snapshot(self) -> NodeSnapshot:
        calls = []
        for call in self.calls.values():
            sip = call.sip() or {}
            calls.append(CallSnapshot(call.id, call.state, call.since, sip.get("state"), sip.get("code"),
                                      call.end_reason))
        refused = self.refusal()
        return NodeSnapshot(self.name, self.settings.slots, self.free_slots(), self.draining, round(self.cpu_busy, 3),
                            self.settings.cpu_ceiling, refused is None, time.time(), calls,
                            self.inbound.dial_uri() if self.inbound is not None else None)
