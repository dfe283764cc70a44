"""Inbound calls end to end: a SIP caller (sipp) calls the bridge, the route for that caller picks the room, the bot
joins it only for the call and leaves when the caller hangs up. Real Janus, Chromium and sipp in a private namespace
(``sipbridge.testing.LocalCall`` with the SIP peer as caller instead of the echoing callee)."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sipbridge.cli import cli
from sipbridge.janus_server import DEFAULT_RTP_PORT_RANGE
from sipbridge.status import StatusCollector
from sipbridge.testing.localcall import (
    BOT_NAME,
    SIP_PEER_MEDIA_PORT,
    SIP_PEER_PORT,
    CallOptions,
    LocalCall,
    sipp_scenario,
)
from tests.test_bridge_e2e import counters, need_media_tools

ROUTED_ROOM = 1234  # where the participants are
DEFAULT_ROOM = 4321  # the room's default variables: nobody there
CALLER = "caller"  # uac_call.xml calls from sip:caller@...
CALL_DURATION_MS = 12_000
MEDIA_TIMEOUT_S = 60.0
STATE_TIMEOUT_S = 30.0
MIN_FRAMES = 20


@dataclass
class InboundOptions(CallOptions):
    def bridge_toml(self) -> str:
        text = super().bridge_toml()
        assert f'room = "{self.room}"' in text
        text = text.replace(f'room = "{self.room}"', f'room = "{DEFAULT_ROOM}"')
        call_line = next(line for line in text.splitlines() if line.startswith("call = "))
        routes = (f'inbound = true\naccept_from = "^sip:{CALLER}@"\n\n'
                  f'[[sip.route]]\nmatch = "^sip:nobody@"\nvars = {{ room = "{DEFAULT_ROOM + 1}" }}\n\n'
                  f'[[sip.route]]\nmatch = "^sip:{CALLER}@"\nvars = {{ room = "{ROUTED_ROOM}" }}\n')
        return text.replace(call_line, routes)


class InboundCall(LocalCall):
    def _start_sip_peer(self) -> None:
        """The caller starts later, once the bridge has registered."""


def janus_sip_port() -> int:
    """The SIP plugin's signalling port: Janus's one UDP socket outside its WebRTC RTP range (no call is up yet, so
    the SIP plugin has no RTP sockets)."""
    low, high = (int(p) for p in DEFAULT_RTP_PORT_RANGE.split("-"))
    out = subprocess.run(["ss", "-lunpH"], capture_output=True, text=True, check=True).stdout
    ports = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if '"janus"' in line}
    candidates = sorted(p for p in ports if not low <= p <= high)
    assert len(candidates) == 1, f"cannot tell the SIP port from Janus's UDP sockets {sorted(ports)}"
    return candidates[0]


def wait_figures(collector: StatusCollector, stage: str, predicate: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while time.monotonic() < deadline:
        collector.poll(0.5)
        figures = collector.figures.get(stage)
        if figures is not None and predicate(figures):
            return figures
    raise AssertionError(f"{what}: not within {STATE_TIMEOUT_S:.0f} s; last {stage} figures: "
                         f"{ {k: v for k, v in (collector.figures.get(stage) or {}).items() if k != 'streams'} }")


@pytest.mark.media
@pytest.mark.timeout(180)
def test_inbound_call_joins_the_routed_room_for_the_call_only(tmp_path: Path) -> None:
    need_media_tools()
    options = InboundOptions(participants=[("alice", 440.0)], room=ROUTED_ROOM, room_codec="h264", layout="single",
                             max_tiles=1, split=None)
    with InboundCall(tmp_path / "run", options) as call:
        collector = StatusCollector(call.run_dir)
        try:
            wait_figures(collector, "janus", lambda f: f["registration"].get("state") == "registered",
                         "the bridge registering")
            waiting = wait_figures(collector, "browser", lambda f: f["state"] == "waiting_for_call",
                                   "the bot waiting for a call")
            assert waiting["session"] == 0 and waiting["call"] is None  # not in any room before the call
            sipp_dir = call.run_dir / "sipp"
            sipp_dir.mkdir()
            caller = subprocess.Popen(
                ["sipp", "-sf", str(sipp_scenario("uac_call")), "-i", "127.0.0.1", "-p", str(SIP_PEER_PORT),
                 "-mi", "127.0.0.1", "-mp", str(SIP_PEER_MEDIA_PORT), "-m", "1", "-nostdin", "-rtp_echo",
                 "-s", "bridge", "-d", str(CALL_DURATION_MS), "-trace_msg", f"127.0.0.1:{janus_sip_port()}"],
                cwd=sipp_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                in_call = wait_figures(collector, "browser", lambda f: f["state"] == "joined", "the bot joining")
                assert in_call["call"]["peer"].startswith(f"sip:{CALLER}@")
                assert in_call["call"]["vars"] == {"room": str(ROUTED_ROOM)}
                # `sipbridge status` tells the call's state, the caller and the codecs (once the janus stage's
                # figures, once a second on their own socket, say media is up: the bot may join before that).
                wait_figures(collector, "janus", lambda f: (f.get("call") or {}).get("state") == "media_up",
                             "the janus stage saying media is up")
                status = CliRunner().invoke(cli, ["status", "--json", "--run-dir", str(call.run_dir)])
                assert status.exit_code == 0, status.output
                summary = json.loads(status.output)["call"]
                assert "media_up" in summary and f"sip:{CALLER}@" in summary and "PCMU/H264" in summary, summary
                # alice is in the routed room: she sees her own picture come back from the caller's echo.
                deadline = time.monotonic() + MEDIA_TIMEOUT_S
                while time.monotonic() < deadline and len(set(counters(call, "alice", BOT_NAME))) < MIN_FRAMES:
                    time.sleep(0.5)
                seen = counters(call, "alice", BOT_NAME)
                assert len(set(seen)) >= MIN_FRAMES, f"alice never saw the bridged call: {seen[-10:]}"
                assert caller.wait(CALL_DURATION_MS / 1000 + STATE_TIMEOUT_S) == 0, "the caller's call failed"
            finally:
                if caller.poll() is None:
                    caller.kill()
            # The caller hung up: the bot left the room and waits for the next call, without counting a failure.
            after = wait_figures(collector, "browser", lambda f: f["state"] == "waiting_for_call" and f["session"] == 1,
                                 "the bot leaving after the call")
            assert after["call"] is None and after["restarts"] == 0
            # ... and the call ended the normal way: the caller's BYE, answered 200. The janus stage's figures come
            # once a second, on their own socket: the bot may have left on the ended call before they say so.
            janus = wait_figures(collector, "janus", lambda f: (f.get("call") or {}).get("state") != "media_up",
                                 "the janus stage's figures after the call")
            ended = janus["call"]
            assert (ended["state"], ended.get("code")) == ("ended", 200), ended
        finally:
            collector.close()
