"""API-started calls through a Redis stream: exactly once, taken over when a node dies, safe across a Redis
restart, and a clear failure when nobody can place a call.

Real redis-server (AOF on, as deployed) and `sipbridge cluster node` processes making hold calls to a sipp
far end, all inside one network namespace. "Started exactly once" is counted where it cannot be faked: the
INVITEs the far end received, grouped by the cluster call id each Call-ID carries.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import clusterfix as cf

pytestmark = [pytest.mark.media, pytest.mark.skipif(cf.have_tools() is not None, reason=cf.have_tools() or "")]

BRIDGE = {"room": {"url": "http://127.0.0.1:9/room"}, "sip": {"call": f"sip:echo@{cf.FAR_END_IP}:{cf.FAR_END_PORT}"}}
CALL_ID_RE = re.compile(r"^Call-ID:\s*([0-9a-f]+)\.[0-9a-f]+@", re.M | re.I)


def start_far_end(c: cf.Cluster) -> Path:
    """sipp's built-in UAS answering every call, logging every message it receives."""
    log = c.run_dir / "far-end-messages.log"
    c.spawn("far-end", ["sipp", "-sn", "uas", "-i", cf.FAR_END_IP, "-p", str(cf.FAR_END_PORT), "-mi", cf.FAR_END_IP,
                        "-rtp_echo", "-nostdin", "-trace_msg", "-message_file", str(log)], cwd=c.run_dir)
    cf.wait_until(lambda: c.udp_listening(cf.FAR_END_IP, cf.FAR_END_PORT), cf.START_TIMEOUT_S, "far-end sipp")
    return log


def invites_per_call(log: Path) -> Counter[str]:
    """Cluster call id -> INVITEs (first transmissions, by Call-ID) the far end received for it."""
    if not log.exists():
        return Counter()
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    for block in log.read_text(errors="replace").split("UDP message received")[1:]:
        body = block.split("\n", 2)[-1].lstrip()
        if not body.startswith("INVITE "):
            continue
        full = re.search(r"^Call-ID:\s*(\S+)", body, re.M | re.I)
        m = CALL_ID_RE.search(body)
        if full and m and full.group(1) not in seen:  # a retransmission carries the same Call-ID
            seen.add(full.group(1))
            counts[m.group(1)] += 1
    return counts


def in_ns(c: cf.Cluster, coro_fn: Any, *args: Any) -> Any:
    """Run an async function against the cluster's Redis from a thread inside the namespace."""
    import redis.asyncio as aioredis

    from sipbridge.cluster.streams import CallStore

    async def body() -> Any:
        client = aioredis.from_url(c.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        try:
            return await coro_fn(CallStore(client), *args)
        finally:
            await client.aclose()

    return c.ns.call(lambda: asyncio.run(body()))


def calls_by_id(c: cf.Cluster) -> dict[str, dict[str, str]]:
    return {call["id"]: call for call in c.status()["calls"]}


def test_thirty_calls_submitted_with_repeated_keys_start_exactly_once_each(tmp_path: Path) -> None:
    with cf.cluster(tmp_path) as c:
        c.start_redis()
        far_log = start_far_end(c)
        for n in (1, 2, 3):
            c.start_node(n, slots=2, hold_s=1.0, redis=True)

        async def submit_all(store: Any) -> dict[str, list[tuple[str, bool]]]:
            out: dict[str, list[tuple[str, bool]]] = {}
            for rnd in range(3):  # every key three times, the repeats while the first ones run
                for i in range(30):
                    out.setdefault(f"key-{i}", []).append(await store.submit(BRIDGE, f"key-{i}", 120.0))
                await asyncio.sleep(0.3 * rnd)
            return out

        results = in_ns(c, submit_all)
        ids = {key: {cid for cid, _ in got} for key, got in results.items()}
        assert all(len(v) == 1 for v in ids.values()), ids
        assert all([created for _, created in got] == [True, False, False] for got in results.values())
        # The command line gives the same answer for a key already used.
        bridge_file = tmp_path / "bridge.toml"
        bridge_file.write_text(f'[room]\nurl = "http://127.0.0.1:9/room"\n[sip]\ncall = "{BRIDGE["sip"]["call"]}"\n')
        proc = c.sipbridge("cluster", "submit", str(bridge_file), "--key", "key-7", "--redis", c.redis_url)
        assert proc.returncode == 0, proc.stderr
        again = json.loads(proc.stdout)
        assert again["call"] in ids["key-7"] and again["created"] is False

        call_ids = {next(iter(v)) for v in ids.values()}
        # Each look is a `sipbridge cluster status` process: once a second, so the looking does not starve the
        # nodes of a loaded machine's CPU.
        try:
            cf.wait_until(lambda: all(calls_by_id(c).get(cid, {}).get("state") == "ended" for cid in call_ids), 180,
                          "all 30 calls to end", poll_s=1.0)
        except TimeoutError:
            calls = calls_by_id(c)
            states = Counter(calls.get(cid, {}).get("state", "missing") for cid in call_ids)
            stuck = {cid: calls.get(cid) for cid in call_ids if calls.get(cid, {}).get("state") != "ended"}
            raise AssertionError(f"calls not ended: {dict(states)}; {str(stuck)[:1500]}; "
                                 f"n1 log: {c.log('n1')[-1500:]}") from None
        counts = invites_per_call(far_log)
        assert set(counts) == call_ids and set(counts.values()) == {1}, counts
        calls = calls_by_id(c)
        assert {calls[cid]["attempts"] for cid in call_ids} == {"1"}
        started = sum(c.count(n, "call_start", "api") for n in (1, 2, 3))
        assert started == 30
        # Spread: a node reads only while it has a free slot, so no node took them all.
        per_node = Counter(calls[cid]["node"] for cid in call_ids)
        assert len(per_node) == 3, per_node
        status = c.sipbridge("cluster", "status", "--redis", c.redis_url)
        assert status.returncode == 0 and "n1" in status.stdout and "ended" in status.stdout, status.stderr


def test_a_killed_nodes_calls_are_started_again_on_another_node(tmp_path: Path) -> None:
    stale_s = 3.0
    with cf.cluster(tmp_path) as c:
        c.start_redis()
        far_log = start_far_end(c)
        c.start_node(1, slots=2, redis=True, stale_s=stale_s)

        async def submit_two(store: Any) -> list[str]:
            return [(await store.submit(BRIDGE, f"kill-{i}", 60.0))[0] for i in range(2)]

        call_ids = in_ns(c, submit_two)
        cf.wait_until(lambda: all(calls_by_id(c).get(cid, {}).get("state") == "up" for cid in call_ids), 30,
                      "both calls up on n1")
        assert {calls_by_id(c)[cid]["node"] for cid in call_ids} == {"n1"}
        c.start_node(2, slots=2, redis=True, stale_s=stale_s)
        killed_at = time.time()
        c.signal("n1", signal.SIGKILL)
        cf.wait_until(lambda: all(calls_by_id(c).get(cid, {}).get("node") == "n2"
                                  and calls_by_id(c)[cid].get("state") == "up" for cid in call_ids),
                      60, "both calls up again on n2")
        took = max(e["t"] for e in c.events(2) if e["event"] == "call_up") - killed_at  # the node's own clock
        print(f"calls of a SIGKILLed node up again on another node after {took:.2f} s "
              f"(stale_s {stale_s}, refresh 0.5 s)")
        calls = calls_by_id(c)
        assert {calls[cid]["attempts"] for cid in call_ids} == {"2"}
        # The far end saw each call dialled twice: once by the dead node, once by its successor.
        counts = invites_per_call(far_log)
        assert all(counts[cid] == 2 for cid in call_ids), counts
        assert c.count(2, "call_start", "api") == 2


def test_redis_restarted_mid_run_loses_and_duplicates_no_call(tmp_path: Path) -> None:
    with cf.cluster(tmp_path) as c:
        c.start_redis()
        far_log = start_far_end(c)
        for n in (1, 2):
            c.start_node(n, slots=3, hold_s=2.0, redis=True)

        async def submit(store: Any, keys: list[str]) -> list[str]:
            return [(await store.submit(BRIDGE, key, 120.0))[0] for key in keys]

        first = in_ns(c, submit, [f"r-{i}" for i in range(12)])
        cf.wait_until(lambda: sum(1 for x in calls_by_id(c).values() if x["state"] == "up") >= 4, 30, "calls up")
        # Restart Redis while calls run, end and wait in the queue.
        c.signal("redis", signal.SIGTERM)
        assert c.wait_exit("redis") == 0
        time.sleep(1.5)  # an outage of its own length: calls end meanwhile (their acks wait in the outbox)
        c.start_redis()
        second = in_ns(c, submit, [f"r-{i}" for i in range(6, 18)])  # half of them repeats
        assert second[:6] == first[6:12]
        call_ids = set(first) | set(second)
        assert len(call_ids) == 18
        cf.wait_until(lambda: all(calls_by_id(c).get(cid, {}).get("state") == "ended" for cid in call_ids), 180,
                      "all 18 calls to end")
        counts = invites_per_call(far_log)
        assert set(counts) == call_ids and set(counts.values()) == {1}, counts
        errors = sum(1 for n in (1, 2) for line in c.log(f"n{n}").splitlines() if "redis unreachable" in line)
        assert errors >= 1  # the outage was real for the nodes


def test_a_call_nobody_can_place_fails_with_a_reason_the_submitter_reads(tmp_path: Path) -> None:
    with cf.cluster(tmp_path) as c:
        c.start_redis()
        start_far_end(c)
        c.start_node(1, slots=1, redis=True)
        bridge_file = tmp_path / "bridge.toml"
        bridge_file.write_text(f'[room]\nurl = "http://127.0.0.1:9/room"\n[sip]\ncall = "{BRIDGE["sip"]["call"]}"\n')
        holder = c.sipbridge("cluster", "submit", str(bridge_file), "--wait-s", "20", "--redis", c.redis_url)
        assert holder.returncode == 0 and json.loads(holder.stdout)["state"] == "up", holder.stdout + holder.stderr
        late = c.sipbridge("cluster", "submit", str(bridge_file), "--place-timeout-s", "2", "--wait-s", "30",
                           "--redis", c.redis_url)
        result = json.loads(late.stdout)
        assert late.returncode == 1 and result["state"] == "failed", late.stdout + late.stderr
        assert result["reason"] == "no node had a free slot within 2 s"
        # A configuration the node cannot run fails at once with the node's reason, and is not retried.
        bad: dict[str, Any] = {"room": {"url": "http://127.0.0.1:9/room"}, "sip": {"identity": "sip:x@127.0.0.1"}}

        async def submit_bad(store: Any) -> str:
            return (await store.submit(bad, "bad", 30.0))[0]

        bad_id = in_ns(c, submit_bad)
        c.start_node(2, slots=1, redis=True)  # n1 is full: the bad call goes to n2
        cf.wait_until(lambda: calls_by_id(c).get(bad_id, {}).get("state") == "failed", 30, "the bad call to fail")
        bad_call = calls_by_id(c)[bad_id]
        assert bad_call["reason"].startswith("node n2: invalid bridge configuration: "), bad_call
        assert bad_call["attempts"] == "1" and bad_call["node"] == "n2"


def test_a_node_cut_off_longer_than_stale_loses_its_call_and_hangs_its_copy_up(tmp_path: Path) -> None:
    """A node that cannot refresh for longer than stale_s (frozen with SIGSTOP: to the cluster, a partition)
    has its call started on another node; when it comes back it finds the call taken over and hangs its own
    copy up, so after the recovery exactly one copy runs."""
    stale_s = 3.0
    with cf.cluster(tmp_path) as c:
        c.start_redis()
        far_log = start_far_end(c)
        c.start_node(1, slots=1, redis=True, stale_s=stale_s)

        async def submit_one(store: Any) -> str:
            return str((await store.submit(BRIDGE, "partition", 60.0))[0])

        call_id = in_ns(c, submit_one)
        cf.wait_until(lambda: calls_by_id(c).get(call_id, {}).get("state") == "up", 30, "the call up on n1")
        c.start_node(2, slots=1, redis=True, stale_s=stale_s)
        time.sleep(stale_s)  # n2's reaper starts stale_s after it connected
        c.signal("n1", signal.SIGSTOP)
        try:
            cf.wait_until(lambda: (x := calls_by_id(c).get(call_id, {})).get("node") == "n2"
                          and x.get("state") == "up", 60, "the call up again on n2")
        finally:
            c.signal("n1", signal.SIGCONT)
        cf.wait_until(lambda: any(e["event"] == "call_ended" for e in c.events(1)), 30, "n1 to hang up its copy")
        ended = next(e for e in c.events(1) if e["event"] == "call_ended")
        assert ended["reason"].startswith("stopped by the node"), ended
        assert "taken over by another node" in c.log("n1")
        call = calls_by_id(c)[call_id]
        assert call["node"] == "n2" and call["state"] == "up" and call["attempts"] == "2", call
        assert invites_per_call(far_log)[call_id] == 2
