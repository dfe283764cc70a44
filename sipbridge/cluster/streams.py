"""API-started calls through a Redis Stream and one consumer group shared by every node.

Keys (``PREFIX`` = ``sb`` unless configured):

* ``sb:calls``: the stream; one entry per placement of a call (``call`` = its id). Group ``nodes``.
* ``sb:call:ID``: the call (hash): key, state (queued, starting, up, ended, failed), node, since, entry
  (the stream entry that currently carries it), attempts, reason, deadline, config (JSON).
* ``sb:idem:KEY``: idempotency key -> call id, so a repeated submit returns the first call.
* ``sb:callidx`` (zset by submit time) and ``sb:nodes`` + ``sb:node:ID`` (hash): what ``status`` lists.

Every step that reads and then writes is one Lua script, so two nodes (or a node and a reaper) can never
both win: submit (idempotency check + XADD + call hash), claim (queued -> starting, only for the entry that
currently carries the call and before its deadline), update and finish (only by the node and entry that
own the call: a node that lost its call to the reaper cannot overwrite it), reap (XAUTOCLAIM entries idle
past the stale time, re-add them as a new entry, requeue the call) and expire (queued past the deadline:
failed, with a reason). A live call's entry stays fresh because its node XCLAIMs it to itself every second
(XCLAIM resets the idle time); a node that dies stops doing so and the reaper of any other node takes
the call over after ``stale_s``.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

DEFAULT_PREFIX = "sb"
GROUP = "nodes"
DEFAULT_PLACE_TIMEOUT_S = 30.0
IDEM_TTL_S = 24 * 3600  # how long a repeated submit still finds its first call
ENDED_TTL_S = 24 * 3600  # how long an ended call stays readable
REAP_BATCH = 50

_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
local id = ARGV[2]
local ck = ARGV[1] .. ':call:' .. id
local entry = redis.call('XADD', KEYS[2], '*', 'call', id)
redis.call('HSET', ck, 'id', id, 'key', ARGV[3], 'state', 'queued', 'node', '', 'since', ARGV[5],
  'submitted', ARGV[5], 'deadline', ARGV[5] + ARGV[6], 'place_timeout', ARGV[6], 'attempts', 0,
  'reason', '', 'entry', entry, 'config', ARGV[4])
redis.call('SET', KEYS[1], id, 'EX', ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[5], id)
return {1, id}
"""

_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'gone' end
if redis.call('HGET', KEYS[1], 'entry') ~= ARGV[3] then return 'superseded' end
if st ~= 'queued' then return st end
if tonumber(redis.call('HGET', KEYS[1], 'deadline')) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'since', ARGV[2],
    'reason', 'no node had a free slot within ' .. redis.call('HGET', KEYS[1], 'place_timeout') .. ' s')
  return 'expired'
end
redis.call('HSET', KEYS[1], 'state', 'starting', 'node', ARGV[1], 'since', ARGV[2], 'reason', '')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 'ok'
"""

# KEYS: call hash; ARGV: node, entry, state, reason, now, ttl (0 = none), final (1/0)
_UPDATE = """
if redis.call('HGET', KEYS[1], 'node') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'entry') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'reason', ARGV[4], 'since', ARGV[5])
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
return 1
"""

# A node that read a call but could not start it (its last slot went to an inbound call meanwhile) puts it
# back as a fresh entry. KEYS: call hash, stream; ARGV: node, entry, group, now, reason
_RELEASE = """
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'node') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'entry') ~= ARGV[2] then
  return 0
end
local id = redis.call('HGET', KEYS[1], 'id')
local fresh = redis.call('XADD', KEYS[2], '*', 'call', id)
redis.call('HSET', KEYS[1], 'state', 'queued', 'node', '', 'entry', fresh, 'since', ARGV[4], 'reason', ARGV[5])
return 1
"""

# KEYS: stream; ARGV: group, reaper, min idle ms, now, prefix, count
_REAP = """
local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[6])
local out = {}
for _, e in ipairs(res[2]) do
  local entry = e[1]
  local fields = e[2]
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
  local id = nil
  if fields then
    for i = 1, #fields, 2 do if fields[i] == 'call' then id = fields[i + 1] end end
  end
  if id then
    local ck = ARGV[5] .. ':call:' .. id
    local st = redis.call('HGET', ck, 'state')
    if st and st ~= 'ended' and st ~= 'failed' and redis.call('HGET', ck, 'entry') == entry then
      local prev = redis.call('HGET', ck, 'node')
      local fresh = redis.call('XADD', KEYS[1], '*', 'call', id)
      local timeout = redis.call('HGET', ck, 'place_timeout')
      redis.call('HSET', ck, 'state', 'queued', 'node', '', 'entry', fresh, 'since', ARGV[4],
        'deadline', ARGV[4] + timeout, 'reason', 'requeued: node ' .. prev .. ' stopped refreshing the call')
      table.insert(out, id)
    end
  end
end
return out
"""

# KEYS: stream; ARGV: group, now, prefix, count. Entries still queued past their deadline fail.
_EXPIRE = """
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[4])
local out = {}
for _, e in ipairs(entries) do
  local entry = e[1]
  local fields = e[2]
  local id = nil
  for i = 1, #fields, 2 do if fields[i] == 'call' then id = fields[i + 1] end end
  local ck = ARGV[3] .. ':call:' .. (id or '')
  local st = id and redis.call('HGET', ck, 'state')
  if not st then
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    redis.call('XDEL', KEYS[1], entry)
  elseif st == 'queued' and redis.call('HGET', ck, 'entry') == entry
      and tonumber(redis.call('HGET', ck, 'deadline')) < tonumber(ARGV[2]) then
    redis.call('HSET', ck, 'state', 'failed', 'since', ARGV[2],
      'reason', 'no node had a free slot within ' .. redis.call('HGET', ck, 'place_timeout') .. ' s')
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    redis.call('XDEL', KEYS[1], entry)
    table.insert(out, id)
  end
end
return out
"""


@dataclass
class Claimed:
    call_id: str
    entry: str
    config: dict[str, Any]


class CallStore:
    """The cluster's Redis keys and the atomic steps on them."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.r = client
        self.prefix = prefix
        self.stream = f"{prefix}:calls"
        self._submit = client.register_script(_SUBMIT)
        self._claim = client.register_script(_CLAIM)
        self._update = client.register_script(_UPDATE)
        self._release = client.register_script(_RELEASE)
        self._reap = client.register_script(_REAP)
        self._expire = client.register_script(_EXPIRE)

    def call_key(self, call_id: str) -> str:
        return f"{self.prefix}:call:{call_id}"

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(self, config: dict[str, Any], key: str | None = None,
                     place_timeout_s: float = DEFAULT_PLACE_TIMEOUT_S) -> tuple[str, bool]:
        """Queue a call; returns (call id, created). A key already used returns its call, created False."""
        await self.ensure_group()
        key = key or secrets.token_hex(16)
        call_id = secrets.token_hex(8)
        created, found = await self._submit(
            keys=[f"{self.prefix}:idem:{key}", self.stream, f"{self.prefix}:callidx"],
            args=[self.prefix, call_id, key, json.dumps(config), time.time(), f"{place_timeout_s:g}", IDEM_TTL_S],
        )
        return _s(found), bool(created)

    async def read(self, node: str, block_ms: int) -> tuple[str, str] | None:
        """One new entry for ``node`` from the group (entry id, call id), or None after ``block_ms``."""
        result: Any = await self.r.xreadgroup(GROUP, node, {self.stream: ">"}, count=1, block=block_ms)
        for _stream, entries in result or []:
            for entry, fields in entries:
                call = fields.get(b"call") or fields.get("call")
                return _s(entry), _s(call) if call is not None else ""
        return None

    async def claim(self, node: str, entry: str, call_id: str) -> tuple[str, Claimed | None]:
        outcome = _s(await self._claim(keys=[self.call_key(call_id)], args=[node, time.time(), entry]))
        if outcome != "ok":
            await self.drop_entry(entry)
            return outcome, None
        raw = await self.r.hget(self.call_key(call_id), "config")
        config = json.loads(_s(raw)) if raw else {}
        return outcome, Claimed(call_id, entry, config)

    async def drop_entry(self, entry: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, entry)
            pipe.xdel(self.stream, entry)
            await pipe.execute()

    async def update(self, node: str, claimed: Claimed, state: str, reason: str = "") -> bool:
        """Record a call's state; False when this node no longer owns the call (it must stop it)."""
        ok = await self._update(keys=[self.call_key(claimed.call_id)],
                                args=[node, claimed.entry, state, reason, time.time(), 0])
        return bool(ok)

    async def finish(self, node: str, claimed: Claimed, state: str, reason: str) -> bool:
        """A call ended on this node: record it (if still ours) and acknowledge its entry either way."""
        ok = await self._update(keys=[self.call_key(claimed.call_id)],
                                args=[node, claimed.entry, state, reason, time.time(), ENDED_TTL_S])
        await self.drop_entry(claimed.entry)
        return bool(ok)

    async def release(self, node: str, claimed: Claimed, reason: str) -> bool:
        """Give a claimed call back to the group (as a new entry) for another node to start."""
        ok = await self._release(keys=[self.call_key(claimed.call_id), self.stream],
                                 args=[node, claimed.entry, GROUP, time.time(), reason])
        return bool(ok)

    async def refresh(self, node: str, claimed: list[Claimed]) -> list[str]:
        """Keep live calls' entries fresh (XCLAIM to ourselves resets their idle time); return the ids
        of calls this node no longer owns (requeued by a reaper while this node was away)."""
        if not claimed:
            return []
        await self.r.xclaim(self.stream, GROUP, node, 0, [c.entry for c in claimed], justid=True)
        async with self.r.pipeline(transaction=False) as pipe:
            for c in claimed:
                pipe.hmget(self.call_key(c.call_id), "node", "entry")
            owners = await pipe.execute()
        # A call whose hash is gone (a Redis that restarted without its data) is not taken over by anyone:
        # it keeps running here, unrecorded, rather than being hung up.
        return [c.call_id for c, (n, e) in zip(claimed, owners, strict=True)
                if n is not None and (_s(n) != node or _s(e) != c.entry)]

    async def reap(self, node: str, stale_s: float) -> list[str]:
        """Requeue calls whose entries nobody refreshed for ``stale_s``; returns their ids."""
        await self.ensure_group()
        out = await self._reap(keys=[self.stream],
                               args=[GROUP, node, int(stale_s * 1000), time.time(), self.prefix, REAP_BATCH])
        return [_s(x) for x in out]

    async def expire(self) -> list[str]:
        out = await self._expire(keys=[self.stream], args=[GROUP, time.time(), self.prefix, 200])
        return [_s(x) for x in out]

    async def get_call(self, call_id: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(self.call_key(call_id))
        return {_s(k): _s(v) for k, v in raw.items()} or None

    async def heartbeat(self, node: str, fields: dict[str, Any], ttl_s: float) -> None:
        key = f"{self.prefix}:node:{node}"
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, int(ttl_s))
            pipe.sadd(f"{self.prefix}:nodes", node)
            await pipe.execute()

    async def status(self, calls_limit: int = 100) -> dict[str, Any]:
        nodes = []
        for node in sorted(_s(n) for n in await self.r.smembers(f"{self.prefix}:nodes")):
            raw = await self.r.hgetall(f"{self.prefix}:node:{node}")
            if not raw:
                await self.r.srem(f"{self.prefix}:nodes", node)  # expired: gone for good
                continue
            nodes.append({"node": node, **{_s(k): _s(v) for k, v in raw.items()}})
        calls = []
        ids: list[Any] = await self.r.zrevrange(f"{self.prefix}:callidx", 0, calls_limit - 1)
        for call_id in ids:
            call = await self.get_call(_s(call_id))
            if call is None:
                await self.r.zrem(f"{self.prefix}:callidx", _s(call_id))
                continue
            call.pop("config", None)
            calls.append(call)
        return {"nodes": nodes, "calls": calls}


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
