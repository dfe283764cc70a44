"""Call hygiene and safe defaults (issues 12 and 14), on real components: no outbound call is placed while the
room's bot is not in the room (what the call, the node, `sipbridge status` and the logs then say); the project's
Janus refuses requests without its API secret, has no admin API, and keeps the secret out of sight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipbridge.janus_server import JanusConfig, JanusServer, fetch_info, generate_api_secret
from tests.sipfix import Sipp, netns_fixture  # noqa: F401  (pytest fixture)
from tests.stagehelp import SIPBRIDGE
from tests.test_node import AUTH, get_call, node_client, run_root_fixture, settings_for, until  # noqa: F401
from tests.test_recipe_check import strict_page_fixture, strict_recipe  # noqa: F401  (pytest fixture)

SIPP_PORT = 5090
SIPP_MEDIA_PORT = 6000
# Long enough for the test to see the call waiting (the node reads the stage's figures every second or so), short
# for a test. On a quiet machine the bot's first failed join (a 3 s step) falls within it; on a loaded one the bot
# may still be starting when the bound passes, and the reason then says that.
WAIT_FOR_ROOM_S = 20
# The node and the bot's Chromium starting on a loaded 2-core machine, then the bound, then the node seeing the end.
NOT_PLACED_TIMEOUT_S = 150.0


SECRET_ENV = "SB_TEST_JANUS_API_SECRET"


@pytest.fixture(name="secret_janus")
def secret_janus_fixture(netns: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JanusServer]:
    """The project's Janus with an API secret, in the test's namespace; the secret in this process's environment
    under SECRET_ENV, for a bridge configuration to name (`janus.api_secret = "env:..."`)."""
    secret = generate_api_secret()
    monkeypatch.setenv(SECRET_ENV, secret)
    server = JanusServer(JanusConfig(api_secret=secret), work_dir=tmp_path / "janus")
    server.start()
    try:
        yield server
    finally:
        print(f"--- Janus log tail ({server.log_file}) ---\n{server.tail_log(40)}")
        server.stop()


def janus_post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        reply: dict[str, Any] = json.loads(response.read())
    return reply


def assert_janus_demands_its_secret(http_url: str, secret: str) -> None:
    """A request without the secret, or with a wrong one, is refused (403); with it, it is served; info stays open."""
    assert fetch_info(http_url)["janus"] == "server_info"
    for body in ({"janus": "create", "transaction": "a"},
                 {"janus": "create", "transaction": "b", "apisecret": "not-" + secret}):
        reply = janus_post(http_url, body)
        assert (reply["janus"], reply["error"]["code"]) == ("error", 403), reply
    reply = janus_post(http_url, {"janus": "create", "transaction": "c", "apisecret": secret})
    assert reply["janus"] == "success" and reply["data"]["id"] > 0, reply


def listening_tcp_ports() -> set[int]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def _status(run_dir: Path) -> dict[str, Any]:
    out = subprocess.run([*SIPBRIDGE, "status", "--json", "--run-dir", str(run_dir)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


async def _not_placed(run_root: Path, body: dict[str, Any], sipp: Sipp) -> None:
    async with node_client(settings_for(run_root, slots=1, allow_pipelines=False)) as (_node, client):
        resp = await client.post("/calls", json=body, headers=AUTH)
        assert resp.status == 201, await resp.text()
        call_id = (await resp.json())["id"]
        run_dir = run_root / call_id

        # While it waits, the call's state and `sipbridge status` say so.
        async def waiting() -> Any:
            sip = (await get_call(client, call_id))["sip"] or {}
            return sip if sip.get("state") == "waiting_for_room" else None
        sip = await until(waiting, NOT_PLACED_TIMEOUT_S, "the call waiting for the room")
        assert sip["reason"].startswith(f"waiting up to {WAIT_FOR_ROOM_S} s for the bot to be in the room ("), sip
        status = await asyncio.to_thread(_status, run_dir)
        assert status["call"].startswith(f"call {sip['call_id']}: "), status["call"]
        assert "waiting_for_room" in status["call"] or "not placed" in status["call"], status["call"]

        async def ended() -> Any:
            view = await get_call(client, call_id)
            return view if view["state"] == "ended" else None
        view = await until(ended, NOT_PLACED_TIMEOUT_S, "the call to end unplaced")
        sip = view["sip"]
        assert (view["end_reason"], sip["state"], sip["not_placed"], sip["code"]) == ("not_placed", "failed", True,
                                                                                      None), view
        reason = sip["reason"]
        assert reason.startswith(f"not placed: the bot was not in the room after {WAIT_FOR_ROOM_S} s (bot "), reason
        if "bot rejoining" in reason:  # the bot failed a join within the bound (not when it started too slowly)
            assert "join failed at step 3/3 (wait_for '#videos' to be visible)" in reason, reason
            assert "page shows: 'Input is not alphanumeric'" in reason and "likely fix: " in reason, reason
        print(f"\nnot placed: {reason}")
        assert view["error"] == reason
        # The janus stage's log names the stage and the call, with the reason.
        log = (run_dir / "logs" / "janus.log").read_text(errors="replace")
        lines = [line for line in log.splitlines() if f"call {sip['call_id']}: failed" in line]
        assert lines and "[janus]" in lines[0] and "reason=not placed: the bot was not in the room" in lines[0], log
    # No INVITE ever reached the SIP peer, which still waits for one.
    assert sipp.running(), sipp.output()
    assert "INVITE" not in sipp.messages(), sipp.messages()


@pytest.mark.media
@pytest.mark.timeout(300)
def test_outbound_call_not_placed_while_the_bot_cannot_join(secret_janus: JanusServer, strict_page: str,
                                                            run_root: Path, tmp_path: Path) -> None:
    """A bridge whose bot cannot get in (the page refuses its display name) never dials: after the bound the call
    ends unplaced, and the node's call view, `sipbridge status` and the janus stage's log say why, in the bot's
    words (the failed step, the page's own error text, the likely fix). Its Janus has an API secret, which the
    janus stage got from the node's secret broker: the call waits (it is only placed once registered)."""
    janus = secret_janus
    sipp = Sipp("uas_echo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    body = {
        "room": {"url": strict_page, "recipe": str(strict_recipe(tmp_path)), "vars": {"page_url": strict_page}},
        "janus": {"url": janus.ws_url, "api_secret": f"env:{SECRET_ENV}"},
        "sip": {"call": f"sip:echo@127.0.0.1:{SIPP_PORT}", "wait_for_room_s": WAIT_FOR_ROOM_S},
        "media": {"to_sip": {"width": 320, "height": 240, "fps": 10}},
        "layout": {"mode": "single"},
    }
    try:
        asyncio.run(_not_placed(run_root, body, sipp))
    finally:
        sipp.stop()


@pytest.mark.media
@pytest.mark.timeout(120)
def test_janus_server_sets_an_api_secret_and_no_admin_api(netns: Any, tmp_path: Path) -> None:
    """`sipbridge janus-server` (what `sipbridge up` and a node's operator run) generates an API secret, keeps it in
    a 0600 file (the same one on the next start), renders it into 0600 configuration files, and Janus then refuses
    every request without it; no admin API listens; the secret is in no command line, environment or log."""
    work = tmp_path / "j"
    secrets_seen = []
    for start in range(2):
        argv = [*SIPBRIDGE, "janus-server", "--work-dir", str(work), "--http-port", "8089", "--ws-port", "8189",
                "--log-file", str(tmp_path / f"janus-{start}.log")]
        output = tmp_path / f"janus-server-{start}.out"
        with open(output, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    fetch_info("http://127.0.0.1:8089/janus")
                    break
                except (OSError, ValueError):
                    time.sleep(0.1)
            secret_file = work / "api_secret"
            secret = secret_file.read_text().strip()
            secrets_seen.append(secret)
            assert len(secret) >= 32
            assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
            assert stat.S_IMODE((work / "conf").stat().st_mode) == 0o700
            for conf in (work / "conf").glob("*.jcfg"):
                assert stat.S_IMODE(conf.stat().st_mode) == 0o600, conf
            assert f'api_secret = "{secret}"' in (work / "conf" / "janus.jcfg").read_text()
            assert_janus_demands_its_secret("http://127.0.0.1:8089/janus", secret)
            # Only the two transports listen (Janus's admin API would be on 7088/7188 and the like).
            assert listening_tcp_ports() == {8089, 8189}, listening_tcp_ports()
            assert proc.poll() is None  # exec'd into janus
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
            assert secret.encode() not in cmdline and secret.encode() not in environ
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        for log in (tmp_path / f"janus-{start}.log", output):
            assert secret not in log.read_text(errors="replace"), log
        assert "api_secret (0600)" in output.read_text()
    assert secrets_seen[0] == secrets_seen[1]  # a node's Janus keeps its secret across restarts: calls reconnect


def test_up_generates_the_janus_secret_for_its_own_janus(tmp_path: Path) -> None:
    """A bridge that starts its own Janus gets a secret generated per `sipbridge up` run, handed by the secret
    broker to the janus-server program and the janus stage only; one that names its own passes that one."""
    import tomllib

    from sipbridge.bridge import RUN_JANUS_SECRET_ENV, bridge_stages, parse_bridge, run_secrets
    from sipbridge.supervise import render_config, stage_secrets, supervisor_environment

    data = tomllib.loads((Path(__file__).resolve().parent.parent / "examples" / "bridge-local.toml").read_text())
    specs = bridge_stages(parse_bridge(data), tmp_path)
    given = {s.name: s.secrets for s in specs if s.secrets}
    assert given == {"janus-server": {"SIPBRIDGE_JANUS_API_SECRET": RUN_JANUS_SECRET_ENV},
                     "janus": {"SIPBRIDGE_STAGE_JANUS_API_SECRET": RUN_JANUS_SECRET_ENV}}
    env = run_secrets(specs, {"PATH": "/usr/bin"})
    secrets = stage_secrets(specs, env)
    secret = env[RUN_JANUS_SECRET_ENV]
    assert secrets["janus-server"]["SIPBRIDGE_JANUS_API_SECRET"] == secret == \
        secrets["janus"]["SIPBRIDGE_STAGE_JANUS_API_SECRET"]
    assert run_secrets(specs, {})[RUN_JANUS_SECRET_ENV] != secret  # a new one per run
    assert secret not in render_config(specs, tmp_path) and RUN_JANUS_SECRET_ENV not in supervisor_environment(env)
    data["janus"]["api_secret"] = "env:MY_JANUS_SECRET"
    specs = bridge_stages(parse_bridge(data), tmp_path)
    assert {s.name: s.secrets for s in specs if s.secrets}["janus-server"] == {
        "SIPBRIDGE_JANUS_API_SECRET": "MY_JANUS_SECRET"}
    assert RUN_JANUS_SECRET_ENV not in run_secrets(specs, {"MY_JANUS_SECRET": "x" * 20})


# ----- no composing or encoding for a media line the peer refused ---------------------------------------------
REFUSAL_TIMEOUT_S = 240.0  # the harness's room, bot and call coming up on a loaded 2-core machine
AUDIO_FRAMES_WATCHED = 150  # 3 s of the 20 ms audio the encoder sends while the video figures must stand still
STATS_SETTLE_S = 2.5  # the figures of frames already on their way when the refusal arrived


def _figure(figures: dict[str, dict[str, Any]], stage: str, stream: str, key: str) -> int:
    return int(figures.get(stage, {}).get("streams", {}).get(stream, {}).get(key, 0))


@pytest.mark.media
@pytest.mark.timeout(420)
def test_no_composing_or_encoding_for_video_the_peer_refused(tmp_path: Path) -> None:
    """An audio-only phone answers an offer that had video with the video line at port 0: the janus stage tells the
    stages upstream on their control sockets, and the room's video is no longer decoded, composed (no picture, no
    slate) or encoded, while the audio flows. Figures asserted, between two snapshots while 3 s of audio went to
    the peer: room-decoder streams["alice/video"].frames_out, room-transformer streams["room-video"].frames_out,
    sip-encoder streams["room-video"].frames_in/frames_out and the janus stage's drops["video_not_negotiated"]
    do not grow; sip-encoder streams["room-audio"].frames_out and the janus stage's audio_packets_sent do."""
    from sipbridge.status import StatusCollector
    from sipbridge.testing.localcall import CallOptions, LocalCall, wait_until

    options = CallOptions(participants=[("alice", 440.0)], room_codec="vp8", sip_scenario="uas_novideo",
                          sip_video="h264", sip_audio="pcmu", layout="single", max_tiles=1, split=None,
                          layout_ids=["alice/video"], width=320, height=240, fps=15, generators="aiortc")
    with LocalCall(tmp_path / "run", options) as call:
        collector = StatusCollector(call.run_dir)
        try:
            def refused_everywhere() -> bool:
                collector.poll(0.5)
                f = collector.figures
                call_fig = f.get("janus", {}).get("call", {})
                return (call_fig.get("state") == "media_up" and call_fig.get("audio_codec") == "PCMU"
                        and all(f.get(s, {}).get("refused_kinds") == ["video"]
                                for s in ("sip-encoder", "room-transformer", "room-decoder"))
                        and _figure(f, "room-decoder", "alice/video", "frames_in") > 0)
            try:
                wait_until(refused_everywhere, REFUSAL_TIMEOUT_S, "the refused video reaching the stages upstream")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {json.dumps(collector.figures, default=str)[:4000]}\n"
                                     f"{call.stage_log('janus', 30)}") from None
            collector.poll(STATS_SETTLE_S)
            before = json.loads(json.dumps(collector.figures))
            assert "video_codec" not in before["janus"]["call"]  # the peer really refused it (port 0)
            # (Video made before the call was answered, the slate or the picture, may or may not show in these figures:
            # the call is placed once the bot is in, and an audio-only peer answers at once. They stay where they are.)

            def audio_went() -> bool:
                collector.poll(0.5)
                return (_figure(collector.figures, "sip-encoder", "room-audio", "frames_out")
                        >= _figure(before, "sip-encoder", "room-audio", "frames_out") + AUDIO_FRAMES_WATCHED)
            wait_until(audio_went, REFUSAL_TIMEOUT_S, "audio to the SIP peer")
            after = collector.figures
        finally:
            collector.close()
        call.stop_bridge()

    def grew(stage: str, stream: str, key: str) -> int:
        return _figure(after, stage, stream, key) - _figure(before, stage, stream, key)

    decoded = (grew("room-decoder", "alice/video", "frames_in"), grew("room-decoder", "alice/video", "frames_out"))
    print(f"\nwhile 3 s of audio went out: room-decoder alice/video in/out +{decoded[0]}/+{decoded[1]},"
          " room-transformer room-video out "
          f"+{grew('room-transformer', 'room-video', 'frames_out')}, sip-encoder room-video in/out "
          f"+{grew('sip-encoder', 'room-video', 'frames_in')}/+{grew('sip-encoder', 'room-video', 'frames_out')}, "
          f"sip-encoder room-audio out +{grew('sip-encoder', 'room-audio', 'frames_out')}")
    assert grew("room-decoder", "alice/video", "frames_in") > 0  # the room kept sending alice's video ...
    assert grew("room-decoder", "alice/video", "frames_out") == 0  # ... which was not decoded,
    assert grew("room-transformer", "room-video", "frames_out") == 0  # composed (nor a slate or a repeat),
    assert grew("sip-encoder", "room-video", "frames_in") == grew("sip-encoder", "room-video", "frames_out") == 0
    assert after["room-decoder"]["drops"]["refused_by_peer"] > before["room-decoder"]["drops"].get("refused_by_peer", 0)
    janus_drops = (after["janus"]["drops"].get("video_not_negotiated", 0),
                   before["janus"]["drops"].get("video_not_negotiated", 0))
    assert janus_drops[0] == janus_drops[1], janus_drops  # nothing reached the janus stage to be dropped there
    assert grew("sip-encoder", "room-audio", "frames_out") >= AUDIO_FRAMES_WATCHED  # while the audio flowed
    assert after["janus"]["audio_packets_sent"] > before["janus"]["audio_packets_sent"]
