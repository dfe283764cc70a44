"""The namespace and Janus start-up that every SIP and room test builds on."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

import pytest

from sipbridge import netns as netns_mod
from sipbridge.janus_server import JanusServer, fetch_info
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)
from tests.stagehelp import SIPBRIDGE

pytestmark = [pytest.mark.media, pytest.mark.timeout(60)]


def test_namespace_has_loopback_ice_setup(netns: netns_mod.NetNs) -> None:
    addrs = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True, text=True).stdout)
    by_name = {a["ifname"]: a for a in addrs}
    # The main thread is inside the namespace: only lo and the veth pair are visible.
    assert set(by_name) == {"lo", netns_mod.VETH_INSIDE, netns_mod.VETH_PEER}
    for dev in ("lo", netns_mod.VETH_INSIDE):
        v4 = {i["local"] for i in by_name[dev]["addr_info"] if i["family"] == "inet"}
        assert "127.0.0.2" in v4
    assert not any(i["family"] == "inet6" for a in addrs for i in a["addr_info"])


def test_namespace_is_deleted_after_use() -> None:
    with netns_mod.NetNs() as ns:
        assert netns_mod.exists(ns.name)
        out = ns.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert netns_mod.VETH_INSIDE in out
    assert not netns_mod.exists(ns.name)


def test_janus_answers_info_in_namespace(janus: JanusServer) -> None:
    with urllib.request.urlopen(f"{janus.http_url}/info", timeout=2) as resp:
        info = json.loads(resp.read())
    assert info["janus"] == "server_info"
    plugins = set(info["plugins"])
    assert {"janus.plugin.sip", "janus.plugin.videoroom"} <= plugins
    assert "janus.plugin.echotest" not in plugins
    assert set(info["transports"]) == {"janus.transport.http", "janus.transport.websockets"}
    # Bound on loopback only.
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    local = {line.split()[3] for line in listening.splitlines()}
    assert "127.0.0.1:8088" in local and "127.0.0.1:8188" in local
    assert not any(addr.startswith(("0.0.0.0:", "*:", "[::]:")) for addr in local)


def test_two_janus_instances_in_two_namespaces(tmp_path) -> None:
    with netns_mod.NetNs() as a, netns_mod.NetNs() as b:
        with JanusServer(work_dir=tmp_path / "a", netns=a.name) as ja, \
                JanusServer(work_dir=tmp_path / "b", netns=b.name) as jb:
            assert ja.info["janus"] == jb.info["janus"] == "server_info"
            assert ja.running() and jb.running()
        assert not ja.running() and not jb.running()


def test_janus_server_command_in_foreground(netns: netns_mod.NetNs, tmp_path) -> None:
    """What supervisord runs: `sipbridge janus-server` stays in the foreground and stops on SIGTERM."""
    argv = [*SIPBRIDGE, "janus-server", "--work-dir", str(tmp_path / "j"),
            "--http-port", "8089", "--ws-port", "8189", "--log-file", str(tmp_path / "janus.log")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        info = None
        while info is None and time.monotonic() < deadline:
            try:
                info = fetch_info("http://127.0.0.1:8089/janus")
            except (OSError, ValueError):
                time.sleep(0.1)
        assert info is not None and info["janus"] == "server_info"
        assert proc.poll() is None  # exec'd into janus: still the same, running process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
