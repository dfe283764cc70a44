"""The cluster layer on the real `sipbridge node` (issue 12): calls from the stream run as the node's own
calls (real stage processes under its supervisord), end, and are acknowledged; its SIP front answers
Kamailio's probes from the node's admission state."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest

from sipbridge.cluster.front import options_probe
from tests import clusterfix as cf

pytestmark = [pytest.mark.media, pytest.mark.timeout(240),
              pytest.mark.skipif(cf.have_tools() is not None, reason=cf.have_tools() or "")]

CALLS = 3
SLOTS = 2


def cheap_call(frames: int) -> dict[str, Any]:
    """A call that holds a slot with real processes and media: test pattern + tone -> sink."""
    return {"stage": [
        {"name": "source", "kind": "source", "args": ["--width", "160", "--height", "120", "--fps", "10",
                                                      "--frames", str(frames)]},
        {"name": "sink", "kind": "sink", "inputs": ["source"]},
    ]}


def test_stream_calls_run_on_the_real_node_and_its_front_follows_its_admission(tmp_path: Path) -> None:
    from sipbridge.cluster.noderunner import join_cluster, submit_to_cluster
    from sipbridge.node.config import NodeSettings
    from sipbridge.node.service import Node

    # The calls' unix sockets must stay under 107 bytes: a short run root.
    run_root = Path(f"/tmp/sbc-{secrets.token_hex(4)}")
    sip = (cf.node_ip(1), 5060)

    async def scenario(c: cf.Cluster) -> dict[str, Any]:
        node = Node(NodeSettings(slots=SLOTS, cpu_ceiling=1.0, run_root=run_root, allow_pipelines=True,
                                 drain_timeout_s=0.0, name="real1", auth=False))
        await node.start()
        member = await join_cluster(node, c.redis_url, sip=sip, stale_s=3.0, refresh_s=0.5)
        try:
            probes = [await options_probe(*sip)]
            ids = [(await submit_to_cluster(c.redis_url, cheap_call(frames=40), f"real-{i}"))[0] for i in range(CALLS)]
            again = await submit_to_cluster(c.redis_url, cheap_call(frames=40), "real-0")
            assert again == (ids[0], False)
            # Both slots taken by stream calls: the front now tells Kamailio the node is full.
            deadline = asyncio.get_running_loop().time() + 90
            while len(node.active()) < SLOTS and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            probes.append(await options_probe(*sip))
            store = member.agent.store
            while asyncio.get_running_loop().time() < deadline:
                states = [(await store.get_call(cid) or {}).get("state") for cid in ids]
                if all(s == "ended" for s in states):
                    break
                await asyncio.sleep(0.2)
            calls = {cid: await store.get_call(cid) for cid in ids}
            node.draining = True
            probes.append(await options_probe(*sip))
            return {"probes": probes, "calls": calls, "node_calls": sorted(node.calls),
                    "started": dict(node.started), "ended": dict(node.ended)}
        finally:
            await node.drain(timeout_s=0)
            await member.close()
            await node.close()

    try:
        with cf.cluster(tmp_path) as c:
            c.start_redis()
            result = c.ns.call(lambda: asyncio.run(scenario(c)))
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
    assert result["probes"] == [200, 503, 503], result["probes"]
    calls = result["calls"]
    assert all(call and call["state"] == "ended" and call["node"] == "real1" and call["attempts"] == "1"
               for call in calls.values()), calls
    assert sorted(calls) == result["node_calls"]  # the node ran them under the cluster's ids
    assert result["started"] == {"pipeline": CALLS}, result


def test_sipbridge_node_in_cluster_mode_queues_post_calls_and_answers_probes(tmp_path: Path) -> None:
    """The `sipbridge node` process with --cluster-redis/--sip: POST /calls queues in the stream (an
    Idempotency-Key repeat returns the first call), the node runs the call, its front answers OPTIONS, and
    SIGTERM ends it with exit 0."""
    import json
    import signal
    import urllib.request

    run_root = Path(f"/tmp/sbc-{secrets.token_hex(4)}-p")
    api = f"http://{cf.node_ip(1)}:8090"

    def post(body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"{api}/calls", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Idempotency-Key": key})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{api}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        with cf.cluster(tmp_path) as c:
            c.start_redis()
            c.spawn("node", [*cf.SIPBRIDGE, "node", "--listen", cf.node_ip(1), "--no-auth", "--slots", "2",
                             "--cpu-ceiling", "1.0", "--allow-pipelines", "--run-root", str(run_root), "--name",
                             "real1", "--drain-timeout-s", "5", "--cluster-redis", c.redis_url, "--sip",
                             f"{cf.node_ip(1)}:5060"])
            cf.wait_until(lambda: c.ns.call(healthy) or c.procs["node"].poll() is not None, 60, "node API")
            assert c.procs["node"].poll() is None, c.log("node")
            first = c.ns.call(post, cheap_call(frames=30), "same-key")
            again = c.ns.call(post, cheap_call(frames=30), "same-key")
            assert first[0] == 202 and first[1]["queued"] and first[1]["created"], first
            assert again == (200, {**first[1], "created": False}), again
            call_id = first[1]["call"]
            cf.wait_until(lambda: {x["id"]: x for x in c.status()["calls"]}.get(call_id, {}).get("state")
                          == "ended", 90, "the queued call to run and end on the node")
            call = {x["id"]: x for x in c.status()["calls"]}[call_id]
            assert call["node"] == "real1" and call["attempts"] == "1", call
            nodes = {n["node"]: n for n in c.status()["nodes"]}
            assert nodes["real1"]["sip"] == f"sip:{cf.node_ip(1)}:5060" and nodes["real1"]["slots"] == "2", nodes
            assert c.ns.call(lambda: asyncio.run(options_probe(cf.node_ip(1), 5060))) == 200
            c.signal("node", signal.SIGTERM)
            assert c.wait_exit("node") == 0, c.log("node")[-3000:]
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
