"""Benchmark of the cluster layer with 1, 2 and 3 nodes (hold calls: SIP + RTP, no browser).

Measured, in one private namespace (Kamailio and Redis on 127.0.0.10, node N on 127.0.0.(10+N)):
* INVITE -> 200 OK through Kamailio: sipp's response time for each call (``-trace_rtt``), calls placed at
  ``--rate`` per second, at most one per node up at once (a node that was full is picked again only
  after its next OPTIONS probe, up to the ping interval later: that lag is not what this measures); the
  proxy's choice, the node's front, the call's user agent and back;
* submit -> call up through the Redis stream: from the submit (the call's ``submitted`` time in Redis) to
  the node's ``call_up`` event (the far end answered); the node's read, claim, dial and the answer;
* takeover: SIGKILL of a node holding two calls -> both up again on another node (with 2+ nodes).

Run as root: ``python bench/bench_cluster.py`` (``--calls 30``). Prints a table, writes
bench/results/cluster.json.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import clusterfix as cf

RESULTS = Path(__file__).resolve().parent / "results" / "cluster.json"
SLOTS = 2
STALE_S = 3.0
BRIDGE = {"room": {"url": "http://127.0.0.1:9/room"}, "sip": {"call": f"sip:echo@{cf.FAR_END_IP}:{cf.FAR_END_PORT}"}}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(pct(values, 0.5), 2), "p95_ms": round(pct(values, 0.95), 2),
            "mean_ms": round(statistics.fmean(values), 2) if values else float("nan")}


def invite_to_200(c: cf.Cluster, nodes: int, calls: int, rate: float) -> list[float]:
    out = c.run_dir / f"rtt-{nodes}"
    out.mkdir(exist_ok=True)
    proc = c.ns.run(cf.sipp("cluster_uac", f"{cf.PROXY_IP}:{cf.PROXY_PORT}", 5061, "-m", str(calls),
                            "-l", str(nodes), "-r", str(rate), "-d", "300", "-trace_rtt",
                            "-rtt_freq", "1"),
                    capture_output=True, text=True, timeout=300, cwd=out)
    if proc.returncode != 0:
        raise RuntimeError(f"sipp through Kamailio failed: {proc.stderr[-1000:]}")
    values = []
    for csv in out.glob("*_rtt.csv"):
        for line in csv.read_text().splitlines()[1:]:
            parts = line.split(";")
            if len(parts) >= 2:
                try:
                    values.append(float(parts[1]))
                except ValueError:
                    continue
    return values


def submit_to_up(c: cf.Cluster, nodes: int, calls: int, rate: float) -> list[float]:
    import redis.asyncio as aioredis

    from sipbridge.cluster.streams import CallStore

    async def body() -> list[str]:
        client = aioredis.from_url(c.redis_url)
        store = CallStore(client)
        ids = []
        try:
            for i in range(calls):
                ids.append((await store.submit(BRIDGE, f"bench-{nodes}-{i}", 120.0))[0])
                await asyncio.sleep(1.0 / rate)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [(await store.get_call(cid) or {}).get("state") for cid in ids]
                if all(s in ("ended", "failed") for s in states):
                    break
                await asyncio.sleep(0.2)
            return ids
        finally:
            await client.aclose()

    ids = c.ns.call(lambda: asyncio.run(body()))
    calls_by_id = {x["id"]: x for x in c.status()["calls"]}
    up_at = {e["call"]: e["t"] for n in range(1, nodes + 1) for e in c.events(n) if e["event"] == "call_up"}
    return [(up_at[cid] - float(calls_by_id[cid]["submitted"])) * 1000 for cid in ids if cid in up_at]


def takeover(c: cf.Cluster, nodes: int) -> float | None:
    if nodes < 2:
        return None
    import redis.asyncio as aioredis

    from sipbridge.cluster.streams import CallStore

    async def submit_two() -> list[str]:
        client = aioredis.from_url(c.redis_url)
        try:
            return [(await CallStore(client).submit(BRIDGE, f"takeover-{nodes}-{i}", 60.0))[0] for i in range(2)]
        finally:
            await client.aclose()

    ids = c.ns.call(lambda: asyncio.run(submit_two()))
    cf.wait_until(lambda: all({x["id"]: x for x in c.status()["calls"]}.get(cid, {}).get("state") == "up"
                              for cid in ids), 30, "two calls up")
    calls = {x["id"]: x for x in c.status()["calls"]}
    victim = calls[ids[0]]["node"]
    moved = [cid for cid in ids if calls[cid]["node"] == victim]
    killed = time.time()
    c.signal(victim, signal.SIGKILL)
    cf.wait_until(lambda: all((x := {y["id"]: y for y in c.status()["calls"]}[cid])["state"] == "up"
                              and x["node"] != victim for cid in moved), 60, "calls taken over")
    # From the kill to the last moved call's call_up event on its new node (the far end answered): the
    # nodes' own clocks, not this loop's polling.
    up_at = [e["t"] for n in range(1, nodes + 1) if f"n{n}" != victim for e in c.events(n)
             if e["event"] == "call_up" and e["call"] in moved and e["t"] > killed]
    return (max(up_at) - killed) * 1000


@click.command()
@click.option("--calls", default=30, show_default=True)
@click.option("--rate", default=10.0, show_default=True, help="Calls started per second.")
def main(calls: int, rate: float) -> None:
    why = cf.have_tools()
    if why:
        raise click.ClickException(why)
    results: dict[str, Any] = {"calls": calls, "rate_per_s": rate, "slots_per_node": SLOTS, "stale_s": STALE_S,
                               "refresh_s": 0.5, "ping_interval_s": 1, "by_nodes": {}}
    for nodes in (1, 2, 3):
        with tempfile.TemporaryDirectory(prefix="sb-bench-cluster-") as tmp, cf.cluster(Path(tmp)) as c:
            c.start_redis()
            c.spawn("far-end", ["sipp", "-sn", "uas", "-i", cf.FAR_END_IP, "-p", str(cf.FAR_END_PORT), "-mi",
                                cf.FAR_END_IP, "-rtp_echo", "-nostdin"], cwd=c.run_dir)
            cf.wait_until(lambda c=c: c.udp_listening(cf.FAR_END_IP, cf.FAR_END_PORT), 20, "far end")
            for n in range(1, nodes + 1):
                c.start_node(n, slots=SLOTS, hold_s=0.3, redis=True, stale_s=STALE_S)
            c.start_kamailio(list(range(1, nodes + 1)), slots=SLOTS, ping_interval_s=1)
            cf.wait_until(lambda c=c, nodes=nodes: all(
                c.dispatcher_flags().get(f"sip:{cf.node_ip(n)}:5060", "").startswith("AP")
                for n in range(1, nodes + 1)), 20, "nodes active in Kamailio")
            rtt = invite_to_200(c, nodes, calls, rate)
            up = submit_to_up(c, nodes, calls, rate)
            for n in range(1, nodes + 1):  # the takeover needs calls that stay up
                c.signal(f"n{n}", signal.SIGKILL)
                c.procs[f"n{n}"].wait(5)
                c.start_node(n, slots=SLOTS, hold_s=0.0, redis=True, stale_s=STALE_S)
            time.sleep(STALE_S)  # the survivors' reapers start after stale_s connected
            took = takeover(c, nodes)
            results["by_nodes"][str(nodes)] = {"invite_to_200": summary(rtt), "submit_to_up": summary(up),
                                               "takeover_ms": round(took, 1) if took is not None else None}
    print(f"{'nodes':>5}  {'INVITE->200 p50/p95 ms':>24}  {'submit->up p50/p95 ms':>24}  {'takeover ms':>11}")
    for nodes, r in results["by_nodes"].items():
        a, b = r["invite_to_200"], r["submit_to_up"]
        print(f"{nodes:>5}  {a['p50_ms']:>11.1f} / {a['p95_ms']:<10.1f}  {b['p50_ms']:>11.1f} / {b['p95_ms']:<10.1f}"
              f"  {r['takeover_ms'] if r['takeover_ms'] is not None else '-':>11}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
