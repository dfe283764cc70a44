"""One real bridged call through the cluster: a bridge configuration submitted to the Redis stream is taken by a
`sipbridge node` (its Node, in this process), which runs the whole bridge: the room bot joins the local room
where a browserless participant publishes, the picture goes to a sipp echo as H.264 + PCMU and comes back.
Stopping it hangs up with BYE, and the cluster records the call as ended on that node."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

REDIS_PORT = 6391
REDIS_START_TIMEOUT_S = 30.0


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0
MEDIA_TIMEOUT_S = 150.0


def _stream_in(view: dict[str, Any], stage: str, stream: str) -> int:
    return int(view["stages"].get(stage, {}).get("streams", {}).get(stream, {}).get("frames_in", 0))


async def _through_cluster(call: Any, run_root: Path, redis_url: str) -> dict[str, Any]:
    from sipbridge.cluster.noderunner import join_cluster, submit_to_cluster
    from sipbridge.node.config import NodeSettings
    from sipbridge.node.service import Node

    node = Node(NodeSettings(slots=1, cpu_ceiling=1.0, run_root=run_root, drain_timeout_s=0.0, name="bridge1",
                             auth=False))
    await node.start()
    member = await join_cluster(node, redis_url, stale_s=6.0, refresh_s=0.5)
    store = member.agent.store
    try:
        body = tomllib.loads(call.options.bridge_toml())  # the harness's bridge.toml, as the API would get it
        call_id, created = await submit_to_cluster(redis_url, body, "bridged-1")
        assert created
        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            running = node.calls.get(call_id)
            if running is not None:
                view = running.view(detail=True)
                up = (view.get("sip") or {}).get("state") == "media_up"
                if up and _stream_in(view, "janus", "room-video") >= 10 and _stream_in(view, "browser",
                                                                                      "sip-video") >= 10:
                    break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"no media both ways through the bridged call: {str(view)[:3000]}")
        recorded_up = (await store.get_call(call_id) or {}).get("state")
        for _ in range(20):  # the agent records "up" on its next refresh
            if recorded_up == "up":
                break
            await asyncio.sleep(0.25)
            recorded_up = (await store.get_call(call_id) or {}).get("state")
        await node.stop_call(node.calls[call_id], "deleted")
        while time.monotonic() < deadline and (await store.get_call(call_id) or {}).get("state") != "ended":
            await asyncio.sleep(0.2)
        return {"view": view, "recorded_up": recorded_up, "final": await store.get_call(call_id),
                "started": dict(node.started)}
    finally:
        await node.drain(timeout_s=0)
        await member.close()
        await node.close()


@pytest.mark.media
@pytest.mark.timeout(300)
def test_a_bridged_call_from_the_stream_runs_on_a_node_with_media_both_ways(tmp_path: Path) -> None:
    from sipbridge.testing.localcall import CallOptions, LocalCall, wait_until

    for tool in ("janus", "sipp", "tshark", "chromium", "redis-server"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")

    class NodeCall(LocalCall):
        def _start_bridge(self) -> None:  # the cluster's node starts the bridge
            pass

    run_root = Path(f"/tmp/sbcb-{os.getpid()}")  # short: the calls' unix socket paths
    options = CallOptions(participants=[("alice", 440.0)], room_codec="vp8", layout="single", max_tiles=1,
                          split=None, layout_ids=["alice/video"], width=320, height=240, generators="aiortc")
    try:
        with NodeCall(tmp_path / "run", options) as call:
            # This thread is inside the call's namespace now: Redis starts there, on its loopback.
            (tmp_path / "redis").mkdir()
            redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--dir",
                                      str(tmp_path / "redis"), "--appendonly", "yes", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                # Redis takes a moment to listen, longer on a loaded machine: connect only once it does.
                wait_until(lambda: _listening(REDIS_PORT) or redis.poll() is not None, REDIS_START_TIMEOUT_S,
                           "redis to listen")
                assert redis.poll() is None, f"redis-server exited {redis.returncode}"
                result = asyncio.run(_through_cluster(call, run_root, f"redis://127.0.0.1:{REDIS_PORT}/0"))
                # The hang-up reached the SIP peer: BYE answered, its scenario done.
                assert call.procs["sipp"].wait(15) == 0
            finally:
                redis.terminate()
                redis.wait(10)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
    sip = result["view"]["sip"]
    assert (sip["state"], sip["audio_codec"], sip["video_codec"]) == ("media_up", "PCMU", "H264"), sip
    assert result["recorded_up"] == "up"
    final = result["final"]
    assert final["state"] == "ended" and final["node"] == "bridge1" and final["attempts"] == "1", final
    assert result["started"] == {"bridge": 1}
