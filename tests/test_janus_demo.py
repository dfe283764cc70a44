"""Janus's own VideoRoom demo page (Debian janus-demos), a page the project does not control, served by the room
server against the test's Janus: two of the page's own participants publish, the bot (the browser stage with the
shipped ``janus-demo`` recipe) captures both under the names the page shows, its camera shows up in their page, and
``sipbridge recipe check janus-demo`` passes there."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import EventType
from sipbridge.room import janusdemos
from sipbridge.room.server import STATIC_DIR
from stages.browser.recipes import load_recipe
from tests.roomfix import Collector, Room, in_order, room_fixture, stop_process, wait_until  # noqa: F401
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)
from tests.stagehelp import SIPBRIDGE
from tests.test_room_inject import Pusher

ROOM_ID = 4701
PEOPLE = {"alice": 440.0, "bob": 660.0}  # the demo page takes letters and digits only
BOT = "bot"  # tests/roomfix.py's bot joins as "bot"
WIDTH, HEIGHT, FPS = 320, 240, 15
# Deadlines, not expectations: on a quiet machine all of it takes seconds, at a load average of 50+ on 2 cores a
# Chromium page takes a minute to join (sipbridge/testing/localcall.py measured the same).
JOIN_TIMEOUT_S = 120.0
MEDIA_TIMEOUT_S = 120.0
MIN_FRAMES = 30
TONE_TOLERANCE_HZ = 15.0
CHECK_TIMEOUT_S = 180.0

# A participant of the demo page gets the project's synthetic camera (frame counter) and a tone of its own in place
# of a real camera and microphone; the page itself runs as shipped.
PARTICIPANT_INIT = """
navigator.mediaDevices.getUserMedia = async () =>
  window.SyntheticMedia.create({ width: %d, height: %d, fps: %d, toneHz: %s });
"""

# The counter (stages/pattern.py's convention) read from the picture the page shows for ``name``: the video in the
# panel whose title label carries that name, drawn into a canvas.
READ_SHOWN_COUNTER_JS = """
(name) => {
  for (const panel of document.querySelectorAll(".panel")) {
    const label = panel.querySelector(".panel-title .label");
    const video = panel.querySelector("video");
    if (!label || !video || label.textContent.trim() !== name || !video.videoWidth) continue;
    const w = video.videoWidth, h = video.videoHeight;
    const canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = h;
    const g = canvas.getContext("2d");
    g.drawImage(video, 0, 0);
    const band = Math.max(1, Math.floor(h / 8)), cell = Math.floor(w / 16);
    const pixels = g.getImageData(0, Math.floor(band / 2), w, 1).data;
    let value = 0;
    for (let i = 0; i < 16; i++) {
      const x = i * cell + Math.floor(cell / 2);
      const luma = 0.299 * pixels[4 * x] + 0.587 * pixels[4 * x + 1] + 0.114 * pixels[4 * x + 2];
      if (luma >= 128) value |= 1 << (15 - i);
    }
    return { counter: value, width: w, height: h };
  }
  return null;
}
"""


# ----- no browser --------------------------------------------------------------------------------------------------
def test_demo_files_stay_inside_the_demos_and_their_libraries() -> None:
    assert janusdemos.resolve("videoroomtest.html") == janusdemos.DEMOS_DIR / "videoroomtest.html"
    # Through the package's own symlinks into /usr/share/javascript and fonts-font-awesome.
    assert janusdemos.resolve("javascript/janus-gateway/janus.min.js") is not None
    assert janusdemos.resolve("fonts/font-awesome/css/font-awesome.min.css") is not None
    for bad in ("../../../etc/passwd", "javascript/../../../../etc/passwd", "/etc/passwd", "nothing.html", ""):
        assert janusdemos.resolve(bad) is None, bad
    assert janusdemos.page_room("http://127.0.0.1:8480/janus-demos/videoroomtest.html?room=77&x=1") == 77
    assert janusdemos.page_room("http://127.0.0.1:8480/janus-demos/videoroomtest.html?room=abc") == 1234
    assert janusdemos.page_room(None) == 1234
    settings = janusdemos.settings_js("ws://127.0.0.1:8188")
    assert 'var server = "ws://127.0.0.1:8188";' in settings and "var iceServers = [];" in settings
    assert "var token = null;" in settings and "var apisecret = null;" in settings
    assert 'var apisecret = "s3cret";' in janusdemos.settings_js("ws://127.0.0.1:8188", "s3cret")


def test_shipped_recipe_loads() -> None:
    recipe = load_recipe("janus-demo", {"room_url": "http://127.0.0.1:9/", "room": "5"})
    assert recipe.start_url() == "http://127.0.0.1:9/janus-demos/videoroomtest.html?room=5"
    assert recipe.participant_script and not recipe.participant_attribute


# ----- real Janus, Chromium and the bot ---------------------------------------------------------------------------
class DemoParticipants:
    """The demo page's own participants: pages of one headless Chromium, driven through the page's own buttons."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        from stages.browser.chromium import CHROMIUM_FLAGS, launch_settings

        executable, env = launch_settings()
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS,
                                                chromium_sandbox=True, env=dict(env))
        self.pages: dict[str, Any] = {}
        self.synthetic = (STATIC_DIR / "synthetic.js").read_text()

    def join(self, url: str, name: str, tone_hz: float) -> None:
        page = self.browser.new_page()
        page.add_init_script(self.synthetic + PARTICIPANT_INIT % (WIDTH, HEIGHT, FPS, tone_hz))
        page.goto(url, wait_until="domcontentloaded")
        page.click("#start")
        page.fill("#username", name)
        page.click("#register")
        self.pages[name] = page

    def wait_joined(self) -> None:
        for page in self.pages.values():
            page.wait_for_selector("#videolocal video", timeout=JOIN_TIMEOUT_S * 1000)

    def shown_counter(self, viewer: str, name: str) -> dict[str, int] | None:
        result = self.pages[viewer].evaluate(READ_SHOWN_COUNTER_JS, name)
        return dict(result) if result else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.browser.close()
        self._pw.stop()


@pytest.fixture(name="demo")
def demo_fixture(room: Room) -> Iterator[DemoParticipants]:
    people = DemoParticipants()
    try:
        yield people
    finally:
        people.close()


def demo_url(room: Room) -> str:
    return f"{room.url}janus-demos/videoroomtest.html?room={ROOM_ID}"


@pytest.mark.media
@pytest.mark.timeout(420)
def test_bot_on_the_janus_demo_page(room: Room, demo: DemoParticipants, tmp_path: Path) -> None:
    # The page's own script and libraries come from the room server, which points it at the test's Janus.
    with urllib.request.urlopen(f"{room.url}janus-demos/settings.js", timeout=5) as response:
        assert json.dumps(room.janus.ws_url) in response.read().decode()

    for name, tone in PEOPLE.items():
        demo.join(demo_url(room), name, tone)
    demo.wait_joined()

    inject = f"ipc://{tmp_path}/inject.sock"
    out = f"ipc://{tmp_path}/bot.sock"
    pusher = Pusher(inject)
    collector = Collector(out)
    bot = None
    try:
        bot = room.bot(ROOM_ID, out, inputs=(inject,), extra=("--recipe", "janus-demo"))

        # The bot captures both publishers under the names the page shows them with.
        def captured() -> bool:
            return all(len(collector.counters(f"{name}/video")) >= MIN_FRAMES
                       and collector.tone(f"{name}/audio") is not None for name in PEOPLE)

        try:
            wait_until(captured, MEDIA_TIMEOUT_S, "the bot capturing alice and bob from the demo page")
        except TimeoutError as exc:
            seen = {sid: (len(collector.counters(sid)), collector.tone(sid)) for sid in list(collector.streams)}
            events = [(e.type.value, e.stream_id, e.attributes.get("identified_by"))
                      for _, e in list(collector.events)]
            raise AssertionError(f"{exc}; streams (frames, tone): {seen}; events: {events[-12:]}") from None
        added = {e.stream_id: e.attributes for e in collector.events_of(EventType.TRACK_ADDED)}
        for name, tone in PEOPLE.items():
            for kind in ("video", "audio"):
                assert added[f"{name}/{kind}"]["identified_by"] == "script", added
            assert in_order(collector.counters(f"{name}/video"))
            heard = collector.tone(f"{name}/audio")
            assert heard is not None and abs(heard - tone) < TONE_TOLERANCE_HZ, (name, heard)
        assert not [sid for sid in added if sid.split("/")[0] not in PEOPLE], added

        # The bot's camera (the pipeline's counter pattern) shows up in both participants' pages, under its name.
        def bot_shown() -> bool:
            return all(demo.shown_counter(viewer, BOT) for viewer in PEOPLE)

        wait_until(bot_shown, MEDIA_TIMEOUT_S, "the bot's camera in alice's and bob's pages")
        for viewer in PEOPLE:
            readings = []

            def advancing(viewer: str = viewer, readings: list[int] = readings) -> bool:
                shown = demo.shown_counter(viewer, BOT)
                if shown:  # any size: a loaded sender may scale down, the counter's columns scale with it
                    readings.append(shown["counter"])
                return len(set(readings)) >= 3

            wait_until(advancing, MEDIA_TIMEOUT_S / 2, f"the bot's picture moving in {viewer}'s page")
            assert readings == sorted(readings) and readings[-1] > 0, readings
    finally:
        if bot is not None:
            stop_process(bot)
        collector.close()
        pusher.close()

    # The recipe check joins the same page and finds both publishers by the recipe's script, and its camera sent.
    proc = subprocess.run([*SIPBRIDGE, "recipe", "check", "janus-demo", "--var", f"room_url={room.url}", "--var",
                           f"room={ROOM_ID}", "--display-name", "checker", "--watch-s", "4", "--save-dir",
                           str(tmp_path / "saved"), "--json"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["joined"] and all(step["ok"] for step in result["steps"])
    named = {(t["participant"], t["kind"], t["identified_by"]) for t in result["tracks"]}
    for name in PEOPLE:
        assert {(name, "video", "script"), (name, "audio", "script")} <= named, named
    assert result["camera_sent"], result["camera"]
