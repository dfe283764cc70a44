"""Inbound calls spread by Kamailio over nodes whose SIP fronts answer OPTIONS from their free slots.

Real Kamailio (the shipped configuration, rendered), real sipp callers, `sipbridge cluster node` processes
holding hold calls (SIP + RTP, no browser), all inside one network namespace on 127.0.0.x addresses.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sipbridge.cluster import kamailio
from sipbridge.cluster.front import SipFront, options_probe
from sipbridge.cluster.runner import CallRejected, NodeSnapshot
from tests import clusterfix as cf

SIPP_TIMEOUT_S = 90.0


# -- no root: configuration and the front's answers ---------------------------------------------------------
@pytest.mark.skipif(not kamailio.TEMPLATE.exists(), reason="deploy/kamailio/kamailio.cfg missing")
def test_kamailio_config_renders_and_kamailio_accepts_it(tmp_path: Path) -> None:
    nodes = [kamailio.parse_node("sip:127.0.0.11:5060", 2, 1), kamailio.parse_node("sip:127.0.0.12,slots=5,id=b", 2, 2)]
    cfg = kamailio.render(nodes, listen="127.0.0.10:5060", out_dir=tmp_path, ping_interval_s=1)
    listed = (tmp_path / "dispatcher.list").read_text().splitlines()[1:]
    assert listed == ["1 sip:127.0.0.11:5060 0 0 duid=node1;maxload=2", "1 sip:127.0.0.12:5060 0 0 duid=b;maxload=5"]
    text = cfg.read_text()
    assert "@@" not in text.replace("dispatcher@127", "")
    assert 'modparam("dispatcher", "ds_probing_mode", 1)' in text
    assert 'modparam("dispatcher", "ds_ping_interval", 1)' in text
    # Kamailio's RPC FIFO and socket are this instance's own: another Kamailio on the host must not delete them.
    assert f'"{tmp_path.resolve()}/kamailio_rpc.sock"' in text and f'"{tmp_path.resolve()}/kamailio_rpc.fifo"' in text
    if kamailio.shutil.which("kamailio") or Path("/usr/sbin/kamailio").exists():
        kamailio.check(cfg)  # raises with Kamailio's own complaint
    for bad in ("127.0.0.11:5060", "sip:127.0.0.11:5060,slots=0", "sip:host:5060,color=red"):
        with pytest.raises(kamailio.KamailioConfigError):
            kamailio.parse_node(bad, 2, 1)
    with pytest.raises(kamailio.KamailioConfigError, match="unique"):
        kamailio.dispatcher_list([nodes[0], nodes[0]])


class _Slots:
    """A runner with settable state, to check the front's answers alone."""

    def __init__(self) -> None:
        self.slots, self.active, self.draining = 2, 0, False

    def snapshot(self) -> NodeSnapshot:
        return NodeSnapshot("t", self.slots, self.active, self.draining)

    def screen(self, caller: str) -> CallRejected | None:
        return None

    async def start_inbound(self, call_id: str, caller: str = "") -> tuple[str, int]:
        raise CallRejected("test runner takes no calls")


def test_front_answers_options_200_with_a_free_slot_and_503_when_full_or_draining() -> None:
    async def scenario() -> list[int | None]:
        runner = _Slots()
        front = SipFront(runner, "127.0.0.1", 0)  # type: ignore[arg-type]
        await front.start()
        codes = []
        try:
            codes.append(await options_probe("127.0.0.1", front.port))
            runner.active = 2
            codes.append(await options_probe("127.0.0.1", front.port))
            runner.active, runner.draining = 0, True
            codes.append(await options_probe("127.0.0.1", front.port))
            runner.draining = False
            codes.append(await options_probe("127.0.0.1", front.port))
            # Garbage is a counted drop, and the front still answers afterwards.
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                               remote_addr=("127.0.0.1", front.port))
            for junk in (b"\x00\xff" * 50, b"INVITE nothing\r\n\r\n", b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n"):
                transport.sendto(junk)
            transport.close()
            codes.append(await options_probe("127.0.0.1", front.port))
            assert front.counters["malformed"] >= 2
        finally:
            front.close()
        return codes

    assert asyncio.run(scenario()) == [200, 503, 503, 200, 200]


# -- root: the whole path through Kamailio --------------------------------------------------------------------
pytestmark_media = pytest.mark.skipif(cf.have_tools() is not None, reason=cf.have_tools() or "")


def _wait_flags(c: cf.Cluster, want: dict[int, str], timeout_s: float) -> float:
    """Wait until Kamailio sees each node n in state want[n] ("AP"/"IP"); return how long it took."""
    started = time.monotonic()
    cf.wait_until(lambda: all(c.dispatcher_flags().get(f"sip:{cf.node_ip(n)}:5060", "").startswith(s)
                              for n, s in want.items()), timeout_s, f"kamailio to see {want}")
    return time.monotonic() - started


@pytest.mark.media
@pytestmark_media
def test_six_invites_land_two_per_node_and_a_seventh_gets_503(tmp_path: Path) -> None:
    with cf.cluster(tmp_path) as c:
        for n in (1, 2, 3):
            c.start_node(n, slots=2)
        c.start_kamailio([1, 2, 3], slots=2, ping_interval_s=1)
        _wait_flags(c, {1: "AP", 2: "AP", 3: "AP"}, 20)
        # Six calls, all up at once (held 6 s), then one more while they are.
        six = c.ns.popen(cf.sipp("cluster_uac", f"{cf.PROXY_IP}:{cf.PROXY_PORT}", 5061, "-m", "6", "-l", "6",
                                 "-r", "20", "-d", "6000"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         cwd=tmp_path)
        cf.wait_until(lambda: sum(c.count(n, "call_up") for n in (1, 2, 3)) == 6, 30, "six calls up")
        seventh = c.ns.run(cf.sipp("cluster_uac_503", f"{cf.PROXY_IP}:{cf.PROXY_PORT}", 5062, "-m", "1"),
                           capture_output=True, text=True, timeout=SIPP_TIMEOUT_S, cwd=tmp_path)
        assert seventh.returncode == 0, f"the 7th INVITE was not refused with 503: {seventh.stderr[-2000:]}"
        assert six.wait(SIPP_TIMEOUT_S) == 0, six.stderr.read().decode(errors="replace")[-2000:] if six.stderr else ""
        cf.wait_until(lambda: sum(c.count(n, "call_ended") for n in (1, 2, 3)) == 6, 30, "six calls ended")
        per_node = {n: c.count(n, "call_up") for n in (1, 2, 3)}
        assert per_node == {1: 2, 2: 2, 3: 2}, per_node
        # Media flowed both ways on each call (the caller's sipp echoes the node's RTP), and each ended with the
        # caller's BYE, which reached the node through Kamailio's Record-Route.
        for n in (1, 2, 3):
            for e in c.events(n):
                if e["event"] == "call_ended":
                    assert e["reason"] == "BYE from the peer", e
                    assert e["rtp_out"] > 50 and e["rtp_in"] > 50, e
            assert c.count(n, "call_start") == 2  # the 7th reached no node's user agent


@pytest.mark.media
@pytestmark_media
def test_full_and_draining_nodes_receive_no_invite_and_the_draining_one_hangs_up_and_exits_0(tmp_path: Path) -> None:
    with cf.cluster(tmp_path) as c:
        c.start_node(1, slots=2)
        c.start_node(2, slots=2, drain_timeout_s=3.0)
        c.start_node(3, slots=4)
        specs = [kamailio.Node(f"sip:{cf.node_ip(n)}:5060", s, f"n{n}") for n, s in ((1, 2), (2, 2), (3, 4))]
        cfg = kamailio.render(specs, listen=f"{cf.PROXY_IP}:{cf.PROXY_PORT}", out_dir=tmp_path / "kamailio",
                              ping_interval_s=1, fr_timer_ms=1000)
        c.spawn("kamailio", kamailio.command(cfg))
        _wait_flags(c, {1: "AP", 2: "AP", 3: "AP"}, 20)
        # n1 is made full by calls that do not pass Kamailio (its own count cannot know them: only the
        # OPTIONS answers can); n2 gets one call and is then told to drain.
        fill = c.ns.popen(cf.sipp("cluster_uac", f"{cf.node_ip(1)}:5060", 5063, "-m", "2", "-l", "2", "-d", "60000"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        drained = c.ns.popen(cf.sipp("cluster_uac_wait_bye", f"{cf.node_ip(2)}:5060", 5064, "-m", "1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
        try:
            cf.wait_until(lambda: c.count(1, "call_up") == 2 and c.count(2, "call_up") == 1, 30, "direct calls up")
            c.signal("n2", signal.SIGTERM)
            took = _wait_flags(c, {1: "IP", 2: "IP", 3: "AP"}, 20)
            print(f"full and draining nodes inactive in Kamailio {took:.2f} s after the drain began")
            through = c.ns.run(cf.sipp("cluster_uac", f"{cf.PROXY_IP}:{cf.PROXY_PORT}", 5065, "-m", "4", "-l", "4",
                                       "-r", "20", "-d", "1000"), capture_output=True, text=True,
                               timeout=SIPP_TIMEOUT_S, cwd=tmp_path)
            assert through.returncode == 0, through.stderr[-2000:]
            assert c.count(3, "call_up") == 4
            for n in (1, 2):  # not one INVITE through Kamailio reached them, not even to be refused
                sources = [e for e in c.events(n) if e["event"] in ("invite_accepted", "invite_refused")
                           and e["source"].startswith(cf.PROXY_IP)]
                assert sources == [], sources
            # The draining node hangs up its call (BYE, which the caller answered) and exits 0.
            assert drained.wait(SIPP_TIMEOUT_S) == 0, drained.stderr.read().decode(errors="replace") if drained.stderr \
                else ""
            assert c.wait_exit("n2") == 0
            ended = [e for e in c.events(2) if e["event"] == "call_ended"]
            # (sipp sends its 200 for that BYE to the address it called, the front, not to the BYE's Via, so
            # the node may record "no answer to BYE"; the caller's exit code above is what proves the BYE.)
            assert len(ended) == 1 and ended[0]["reason"].startswith("stopped by the node"), ended
        finally:
            fill.kill()
            fill.wait(10)


@pytest.mark.media
@pytestmark_media
def test_a_killed_node_stops_receiving_invites_within_the_probing_interval(tmp_path: Path) -> None:
    ping_interval_s = 1
    with cf.cluster(tmp_path) as c:
        c.start_node(1, slots=4)
        c.start_node(2, slots=4)
        c.start_kamailio([1, 2], slots=4, ping_interval_s=ping_interval_s)
        _wait_flags(c, {1: "AP", 2: "AP"}, 20)
        c.signal("n1", signal.SIGKILL)
        took = _wait_flags(c, {1: "IP", 2: "AP"}, 20)
        # The probe that finds it dead must time out first (Kamailio's fr_timer, 1 s here) after at most one
        # interval: measured, not asserted (the machine may be loaded); the deadline above is the bound.
        print(f"killed node inactive in Kamailio after {took:.2f} s (ping interval {ping_interval_s} s, "
              f"probe timeout 1 s)")
        calls = c.ns.run(cf.sipp("cluster_uac", f"{cf.PROXY_IP}:{cf.PROXY_PORT}", 5066, "-m", "4", "-l", "4",
                                 "-r", "20", "-d", "500"), capture_output=True, text=True, timeout=SIPP_TIMEOUT_S,
                         cwd=tmp_path)
        assert calls.returncode == 0, calls.stderr[-2000:]
        assert c.count(2, "call_up") == 4
