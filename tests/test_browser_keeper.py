"""A kept Chromium (``sipbridge chromium``): a browser stage killed mid-call is replaced by one that takes over the
bot's page, still in the room, instead of joining again (issue 15)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from protocol import EventType
from stages.base import EOS_DRAIN_TIMEOUT_S
from stages.browser.keeper import GREETING
from stages.browser.procs import chromium_pids, chromium_role
from tests.roomfix import SIPBRIDGE, Collector, Room, room_fixture, wait_until  # noqa: F401  (pytest fixture)
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)
from tests.test_room_robust import janus_call, readded_after, resumed, resumed_gap_s

pytestmark = [pytest.mark.media, pytest.mark.timeout(150)]

ROOM_ID = 4402
MIN_FRAMES = 20
MEDIA_TIMEOUT_S = 40.0
# The stage's end of stream waits up to EOS_DRAIN_TIMEOUT_S for this test's collector, which never hangs up; the page's
# sockets, left open by a kept Chromium, once held it a minute more (aiohttp's shutdown timeout).
STOP_TIMEOUT_S = EOS_DRAIN_TIMEOUT_S + 5.0


def room_ids(http_url: str, room: int, display: str) -> list[int]:
    """The VideoRoom participant ids shown as ``display``."""
    session = janus_call(http_url, "", {"janus": "create", "transaction": "s"})["data"]["id"]
    try:
        handle = janus_call(http_url, f"/{session}", {"janus": "attach", "plugin": "janus.plugin.videoroom",
                                                      "transaction": "a"})["data"]["id"]
        reply = janus_call(http_url, f"/{session}/{handle}", {"janus": "message", "transaction": "m",
                                                               "body": {"request": "listparticipants", "room": room}})
        people = reply["plugindata"]["data"]["participants"]
        return sorted(p["id"] for p in people if p.get("display") == display)
    finally:
        janus_call(http_url, f"/{session}", {"janus": "destroy", "transaction": "d"})


def keeper_children(pid: int) -> list[int]:
    """The keeper's direct children: Chromium's browser process."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def states(collector: Collector, since: float = 0.0) -> list[dict[str, object]]:
    with collector._lock:
        return [e.attributes for at, e in collector.events
                if at > since and e.type == EventType.STAGE_STATE and not e.attributes.get("repeat")]


def test_a_restarted_browser_stage_takes_over_the_bot_still_in_the_room(room: Room, tmp_path: Path) -> None:
    room.participants(ROOM_ID, [("alice", 440.0)], engine="aiortc")
    keeper_socket = tmp_path / "chromium.cdp"
    keeper = room.spawn([*SIPBRIDGE, "chromium", "--socket", str(keeper_socket)], stdout=None)
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    extra = ("--chromium-socket", str(keeper_socket))
    try:
        bot = room.bot(ROOM_ID, out, extra=extra)
        wait_until(lambda: len(collector.counters("alice/video")) >= MIN_FRAMES, MEDIA_TIMEOUT_S, "alice's video")
        before = room_ids(room.janus.http_url, ROOM_ID, "bot")
        assert len(before) == 1
        said = [s["state"] for s in states(collector)]
        assert said.count("launching") == 1 and said[-1] == "joined", said  # each state said once
        assert not chromium_pids(bot.pid), "the bot's Chromium must be the keeper's, not the stage's"
        assert chromium_pids(keeper.pid)
        # One renderer, the bot's page: no address-bar popup WebUI and no spare renderer (DISABLED_FEATURES).
        renderers = [p for p in chromium_pids(keeper.pid) if chromium_role(p) == "renderer"]
        webui = [p for p in renderers if b"--top-chrome-webui" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(renderers) == 1 and not webui, f"renderers {renderers}, browser UI among them {webui}"

        t_kill = time.monotonic()
        os.kill(bot.pid, signal.SIGKILL)  # as supervisord sees a crash: the stage only, its driver follows
        bot.wait(10)
        bot = room.bot(ROOM_ID, out, extra=extra)  # what supervisord does next
        wait_until(lambda: resumed(collector, "alice/video", t_kill, MIN_FRAMES), MEDIA_TIMEOUT_S,
                   "capture resumed after the browser stage was killed")
        gap = resumed_gap_s(collector, "alice/video", t_kill)
        print(f"\ncapture gap across the browser stage's restart: {gap:.2f} s"
              f" (announced again {readded_after(collector, 'alice/video', t_kill) - t_kill:.2f} s after the kill)")
        after = states(collector, t_kill)
        assert "joining" not in [s["state"] for s in after], after  # no second join
        assert after[-1]["state"] == "joined" and after[-1].get("taken_over") is True, after
        # The same participant in the room throughout: nobody saw the bot leave or a new one come.
        assert room_ids(room.janus.http_url, ROOM_ID, "bot") == before
        assert keeper.poll() is None
        # A stop reaches the stage's whole process group (supervisord's stopasgroup): it ends promptly.
        t_stop = time.monotonic()
        os.killpg(bot.pid, signal.SIGTERM)
        assert bot.wait(STOP_TIMEOUT_S) == 0
        print(f"stage stopped {time.monotonic() - t_stop:.2f} s after SIGTERM")
    finally:
        collector.close()


def test_the_keeper_serves_one_client_at_a_time_restarts_chromium_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    keeper_socket = tmp_path / "chromium.cdp"
    keeper = subprocess.Popen([*SIPBRIDGE, "chromium", "--socket", str(keeper_socket)],
                              env={**os.environ, "SIPBRIDGE_RUN_DIR": str(tmp_path)}, start_new_session=True)
    try:
        wait_until(keeper_socket.exists, 20, "the keeper's socket")
        assert keeper_socket.stat().st_mode & 0o777 == 0o600
        first_profile = Path((tmp_path / "chromium.profile").read_text().strip())
        assert first_profile.is_dir()
        first = socket.socket(socket.AF_UNIX)
        first.connect(str(keeper_socket))
        assert first.recv(100) == GREETING + b"\0"
        second = socket.socket(socket.AF_UNIX)
        second.connect(str(keeper_socket))
        assert second.recv(100) == b""  # refused: closed at once
        first.sendall(b'{"id":7,"method":"Browser.getVersion"}\0')
        answer = b""
        while not answer.endswith(b"\0"):
            answer += first.recv(65536)
        assert answer.startswith(b'{"id":7,') and b"product" in answer  # the client's own id comes back
        first.sendall(b"not json\0")  # counted and dropped, the keeper goes on
        first.sendall(b'{"id":8,"method":"Browser.getVersion"}\0')
        answer = b""
        while not answer.endswith(b"\0"):
            answer += first.recv(65536)
        assert answer.startswith(b'{"id":8,')
        second.close()
        # Chromium dies: its client is dropped, a new Chromium starts in the same keeper and serves the next client.
        dead = keeper_children(keeper.pid)
        assert len(dead) == 1
        os.kill(dead[0], signal.SIGKILL)
        first.settimeout(10)
        assert first.recv(100) == b""
        first.close()
        fresh = wait_until(lambda: [p for p in keeper_children(keeper.pid) if p not in dead], 10, "a new Chromium")
        assert keeper.poll() is None
        third = socket.socket(socket.AF_UNIX)
        third.settimeout(10)
        third.connect(str(keeper_socket))
        assert third.recv(100) == GREETING + b"\0"
        third.sendall(b'{"id":1,"method":"Browser.getVersion"}\0')
        answer = b""
        while not answer.endswith(b"\0"):
            answer += third.recv(65536)
        assert answer.startswith(b'{"id":1,') and b"product" in answer
        third.close()
        assert fresh and not first_profile.exists()  # the dead one's profile is gone
        profile = Path((tmp_path / "chromium.profile").read_text().strip())
        browsers = chromium_pids(keeper.pid)
        assert browsers
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(15) == 0
        # At once: a node checks what a call left behind as soon as its supervisord is gone (test_node).
        left = [p for p in browsers if Path(f"/proc/{p}").exists()]
        assert not left, f"Chromium outlived its keeper: {left}"
        assert not profile.exists(), "the profile folder was left behind"
    finally:
        if keeper.poll() is None:
            keeper.kill()


def test_the_driver_hears_at_once_when_the_keeper_drops_it(tmp_path: Path) -> None:
    """The keeper drops its client when Chromium dies; the driver's WebSocket must close then, not when the driver
    next sends a command (it may send none for seconds, and the rejoin waits on its 'disconnected')."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from stages.browser import cdplink

    async def scenario() -> list[aiohttp.WSMsgType]:
        async def fake_keeper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'{"method":"Target.targetCreated"}\0')
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()  # as the keeper does when Chromium dies

        server = await asyncio.start_unix_server(fake_keeper, path=str(tmp_path / "k.sock"))

        async def handler(request: web.Request) -> web.WebSocketResponse:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "k.sock"))
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await cdplink.relay(ws, reader, writer)
            return ws

        app = web.Application()
        app.router.add_get("/cdp", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        seen = []
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/cdp") as ws:
                # The driver sends nothing: only the relay can end this.
                while True:
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    seen.append(msg.type)
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        break
        finally:
            await runner.cleanup()
            server.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == aiohttp.WSMsgType.TEXT
    assert seen[-1] in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
