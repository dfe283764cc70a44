"""A node's member of the cluster: reads calls from the stream while it has room, keeps them fresh, reaps.

Runs beside the node's own work on its event loop and only talks to the node through ``CallRunner``.
Redis going away (restart, network) never touches running calls: every Redis step is retried with
back-off, and what happened meanwhile (a call that ended) waits in an outbox until Redis is back. The
reaper waits ``stale_s`` after each (re)connection before it takes anything over, so that every live node
has refreshed its calls after an outage and only a node that really stopped loses its calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sipbridge.cluster.runner import FINAL_STATES, UP, CallRejected, CallRunner
from sipbridge.cluster.streams import DEFAULT_PREFIX, CallStore, Claimed

log = logging.getLogger("sipbridge.cluster.agent")

READ_BLOCK_MS = 1000
IDLE_POLL_S = 0.2  # how often a node with no free slot looks again
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0  # well under stale_s: a node is back well before its calls would be reaped
SOCKET_TIMEOUT_S = 5.0  # above READ_BLOCK_MS
# A node that stopped heart-beating stays listed (with its last-seen age) this long.
NODE_TTL_S = 60
RELEASE = "release"  # an outbox action: give the call back to the group


@dataclass
class AgentOptions:
    redis_url: str
    node_id: str
    prefix: str = DEFAULT_PREFIX
    refresh_s: float = 1.0
    stale_s: float = 6.0
    sip_address: str = ""
    api_address: str = ""


@dataclass
class _Owned:
    claimed: Claimed
    recorded: str = "starting"
    final: tuple[str, str] | None = None  # (state, reason) waiting for Redis
    since_s: float = field(default_factory=time.time)


class NodeAgent:
    def __init__(self, runner: CallRunner, options: AgentOptions) -> None:
        self.runner = runner
        self.opts = options
        self.client = aioredis.from_url(options.redis_url, socket_timeout=SOCKET_TIMEOUT_S,
                                        socket_connect_timeout=1.0, health_check_interval=0)
        self.store = CallStore(self.client, options.prefix)
        self.owned: dict[str, _Owned] = {}
        self.connected_since: float | None = None
        self.counters: dict[str, int] = {"started": 0, "released": 0, "lost": 0, "reaped": 0, "expired": 0,
                                         "redis_errors": 0}
        self._tasks: list[asyncio.Task[Any]] = []
        self._backoff_s = BACKOFF_MIN_S
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name="cluster-worker"),
                       asyncio.create_task(self._upkeep(), name="cluster-upkeep")]

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Stop reading; try to record what ended (the outbox) before closing the connection."""
        self._stopping = True
        if self._tasks:
            self._tasks[0].cancel()  # the reader; upkeep keeps recording what ends
        deadline = time.monotonic() + flush_timeout_s
        while time.monotonic() < deadline and any(o.final or self._final_now(cid) for cid, o in self.owned.items()):
            with contextlib.suppress(RedisError, OSError):
                await self._settle()
            await asyncio.sleep(0.1)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    def _final_now(self, call_id: str) -> bool:
        status = self.runner.call_state(call_id)
        return status is None or status.state in FINAL_STATES

    async def _down(self, exc: BaseException) -> None:
        if self.connected_since is not None:
            log.warning("redis unreachable (%s); running calls go on, retrying with back-off", exc)
        self.connected_since = None
        self.counters["redis_errors"] += 1
        await asyncio.sleep(self._backoff_s * random.uniform(0.8, 1.2))
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)

    def _up(self) -> None:
        if self.connected_since is None:
            self.connected_since = time.monotonic()
            log.info("redis connected (%s)", self.opts.redis_url)
        self._backoff_s = BACKOFF_MIN_S

    # -- reading calls ----------------------------------------------------------------------------------
    async def _worker(self) -> None:
        node = self.opts.node_id
        group_ready = False
        while not self._stopping:
            if not self.runner.snapshot().admitting:
                await asyncio.sleep(IDLE_POLL_S)
                continue
            try:
                if not group_ready:
                    await self.store.ensure_group()
                    group_ready = True
                got = await self.store.read(node, READ_BLOCK_MS)
                self._up()
                if got is None:
                    continue
                entry, call_id = got
                outcome, claimed = await self.store.claim(node, entry, call_id)
            except (RedisError, OSError) as exc:
                group_ready = False
                await self._down(exc)
                continue
            if claimed is None:
                log.info("call %s: entry %s skipped (%s)", call_id or "?", entry, outcome)
                continue
            await self._start(claimed)

    async def _start(self, claimed: Claimed) -> None:
        node = self.opts.node_id
        owned = self.owned[claimed.call_id] = _Owned(claimed)
        try:
            await self.runner.start_call(claimed.call_id, claimed.config)
        except CallRejected as exc:
            # Recorded by the next upkeep round (retried there while Redis is away).
            owned.final = (RELEASE if exc.retry else "failed", f"node {node}: {exc.reason}")
            self.counters["released"] += 1
            log.info("call %s: not started here (%s)%s", claimed.call_id, exc.reason,
                     ", put back for another node" if exc.retry else "")
            return
        except Exception as exc:
            log.exception("call %s: the runner failed to start it", claimed.call_id)
            owned.final = ("failed", f"node {node}: {exc}")
            return
        self.counters["started"] += 1
        log.info("call %s: started on node %s (entry %s)", claimed.call_id, node, claimed.entry)

    # -- keeping calls fresh, recording their ends, reaping ---------------------------------------------
    async def _upkeep(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._settle()
                await self._heartbeat()
                self._up()
                if (self.connected_since is not None and not self._stopping
                        and time.monotonic() - self.connected_since >= self.opts.stale_s):
                    reaped = await self.store.reap(self.opts.node_id, self.opts.stale_s)
                    expired = await self.store.expire()
                    if reaped:
                        self.counters["reaped"] += len(reaped)
                        log.warning("requeued %d call(s) of a node that stopped refreshing: %s",
                                    len(reaped), ", ".join(reaped))
                    if expired:
                        self.counters["expired"] += len(expired)
                        log.warning("%d call(s) failed: no free slot within their placement time: %s",
                                    len(expired), ", ".join(expired))
            except (RedisError, OSError) as exc:
                await self._down(exc)
                continue
            await asyncio.sleep(max(0.0, self.opts.refresh_s - (time.monotonic() - started)))

    async def _settle(self) -> None:
        node = self.opts.node_id
        live: list[Claimed] = []
        for call_id, owned in list(self.owned.items()):
            if owned.final is None:
                status = self.runner.call_state(call_id)
                if status is None:
                    owned.final = ("failed", f"node {node} no longer knows the call")
                elif status.state in FINAL_STATES:
                    owned.final = (status.state, status.reason)
                elif status.state == UP and owned.recorded != UP and await self.store.update(
                        node, owned.claimed, UP):
                    owned.recorded = UP
                    owned.since_s = time.time()
            if owned.final is not None:
                if owned.final[0] == RELEASE:
                    await self.store.release(node, owned.claimed, owned.final[1])
                else:
                    await self.store.finish(node, owned.claimed, *owned.final)
                    log.info("call %s: %s (%s), acknowledged", call_id, *owned.final)
                del self.owned[call_id]
            else:
                live.append(owned.claimed)
        for call_id in await self.store.refresh(node, live):
            # Requeued by a reaper while this node could not refresh it (a partition longer than stale_s):
            # the call now belongs to another node, so this copy hangs up.
            self.counters["lost"] += 1
            log.warning("call %s: taken over by another node while this one was away; hanging up here", call_id)
            self.owned.pop(call_id, None)
            with contextlib.suppress(Exception):
                await self.runner.stop_call(call_id)

    async def _heartbeat(self) -> None:
        snap = self.runner.snapshot()
        await self.store.heartbeat(self.opts.node_id, {
            "slots": snap.slots, "free": snap.free, "active": snap.active, "draining": int(snap.draining),
            "last_seen": f"{time.time():.3f}", "sip": self.opts.sip_address, "api": self.opts.api_address,
            "cluster_calls": len(self.owned),
        }, NODE_TTL_S)
