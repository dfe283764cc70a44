"""`sipbridge recipe check`: passes on the local room and reports what the bot found; fails helpfully (the step, a
screenshot, the console, the page's own error text, a likely fix) on a wrong selector and on a refused name."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stages.browser.diagnose import Diagnosis, SelectorProbe, suggest
from stages.browser.recipes import RecipeStepError, recipe_from_mapping
from tests.roomfix import Room, room_fixture  # noqa: F401  (pytest fixture)
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)
from tests.stagehelp import SIPBRIDGE

ROOM_ID = 4501
CHECK_TIMEOUT_S = 120
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A page like the third-party one of issue 14: names must be letters and digits, and a refusal shows only in the
# page's own DOM (and its console), while the video area stays hidden.
STRICT_NAME_PAGE = b"""<!doctype html>
<html><head><title>Strict names</title></head><body>
<form id="login" onsubmit="return false">
  <label>Your name <input id="name"></label> <button id="join" type="button">Join</button>
</form>
<div id="problem" class="form-error" hidden></div>
<div id="videos" hidden>in the call</div>
<script>
document.getElementById("join").onclick = () => {
  const name = document.getElementById("name").value;
  if (!/^[A-Za-z0-9]+$/.test(name)) {
    console.error("join refused for name " + JSON.stringify(name));
    const problem = document.getElementById("problem");
    problem.textContent = "Input is not alphanumeric";
    problem.hidden = false;
    return;
  }
  console.log("joined as " + name);
  document.getElementById("login").hidden = true;
  document.getElementById("videos").hidden = false;
};
</script></body></html>
"""

STRICT_RECIPE = """
url = "{page_url}"
joined_selector = "#videos:not([hidden])"
steps = [
  { fill = "#name", value = "{display_name}" },
  { click = "%s" },
  { wait_for = "#videos", state = "visible", timeout_s = 3 },
]
[defaults]
display_name = "SIP bridge"
"""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(STRICT_NAME_PAGE)))
        self.end_headers()
        self.wfile.write(STRICT_NAME_PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(name="strict_page")
def strict_page_fixture(netns: object) -> Iterator[str]:
    """The strict-name page on loopback inside the test's namespace (the socket is made on this thread)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def strict_recipe(tmp_path: Path, click: str = "#join") -> Path:
    path = tmp_path / "strict.toml"
    path.write_text(STRICT_RECIPE % click)
    return path


def run_check(*args: str, save_dir: Path) -> tuple[int, str, dict[str, Any]]:
    proc = subprocess.run([*SIPBRIDGE, "recipe", "check", *args, "--save-dir", str(save_dir), "--json"],
                          capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr}"
    return proc.returncode, proc.stdout, json.loads(lines[-1])


def assert_saved(result: dict[str, Any], console_says: str) -> None:
    assert Path(result["screenshot"]).read_bytes().startswith(PNG_SIGNATURE)
    assert console_says in Path(result["console"]).read_text()
    assert result["reason"] in Path(result["page"]).read_text()


# ----- no browser: the likely-fix logic -----------------------------------------------------------------------------
def recipe_and_failure(index: int, cause: str) -> tuple[Any, RecipeStepError]:
    recipe = recipe_from_mapping({"url": "http://127.0.0.1:9/", "defaults": {"display_name": "SIP bridge"},
                                  "steps": [{"fill": "#name", "value": "{display_name}"}, {"click": "#join"},
                                            {"wait_for": "#videos", "state": "visible"}]}, {}, "t")
    step = recipe.steps[index - 1] if index else None
    return recipe, RecipeStepError("t", index, 3, "x", step, RuntimeError(cause))


def test_suggestions() -> None:
    recipe, failure = recipe_and_failure(3, "Timeout 20000ms exceeded.")
    fix = suggest(recipe, failure, ["Input is not alphanumeric"], SelectorProbe("#videos", 1, 0, "<div id=videos>"))
    assert fix and "refused the display_name 'SIP bridge'" in fix and "display_name=SIPbridge" in fix
    # The same timeout with nothing on screen: the element is there, hidden.
    fix = suggest(recipe, failure, [], SelectorProbe("#videos", 1, 0, '<div id="videos" hidden>'))
    assert fix and "matched a hidden element" in fix
    recipe, failure = recipe_and_failure(2, "Timeout 20000ms exceeded.")
    fix = suggest(recipe, failure, [], SelectorProbe("#jion", 0, 0, candidates=['#join "Join"']))
    assert fix and "no element matches '#jion'" in fix and '#join "Join"' in fix
    fix = suggest(recipe, failure, [], SelectorProbe("#join", 0, 0, in_frames=["http://127.0.0.1:9/inner"]))
    assert fix and "inside the frame http://127.0.0.1:9/inner" in fix
    recipe, failure = recipe_and_failure(0, "net::ERR_CONNECTION_REFUSED at http://127.0.0.1:9/")
    fix = suggest(recipe, failure, [], None)
    assert fix and "nothing answers at http://127.0.0.1:9/" in fix
    recipe, failure = recipe_and_failure(0, "net::ERR_FILE_NOT_FOUND at file:///root/app.html")
    fix = suggest(recipe, failure, [], None)
    assert fix and "readable by that user" in fix
    line = Diagnosis("join failed at step 3/3 (x): Timeout", ["Input is not alphanumeric"], "a fix",
                     {"screenshot": "/r/a.png"}).line()
    assert line == ("join failed at step 3/3 (x): Timeout; page shows: 'Input is not alphanumeric'; "
                    "likely fix: a fix; saved: screenshot /r/a.png")


def test_failure_captures_are_bounded(tmp_path: Path) -> None:
    """A stage that fails to join over and over keeps only the newest captures, not one set per attempt."""
    import os

    from stages.browser.diagnose import MAX_CAPTURES_KEPT, _prune

    for n in range(MAX_CAPTURES_KEPT + 5):
        for suffix in (".png", ".console.log", ".page.txt"):
            path = tmp_path / f"browser-failure-20261203-0000{n:02d}-{n}{suffix}"
            path.write_text("x")
            os.utime(path, (n, n))
    (tmp_path / "other-20261203-000000-1.page.txt").write_text("not ours")
    _prune(tmp_path, "browser-failure")
    kept = sorted(p.name for p in tmp_path.glob("browser-failure-*.page.txt"))
    assert len(kept) == MAX_CAPTURES_KEPT and kept[0].startswith("browser-failure-20261203-000005-5")
    assert len(list(tmp_path.glob("browser-failure-*"))) == 3 * MAX_CAPTURES_KEPT
    assert (tmp_path / "other-20261203-000000-1.page.txt").exists()


# ----- real Chromium ------------------------------------------------------------------------------------------------
@pytest.mark.media
@pytest.mark.timeout(CHECK_TIMEOUT_S)
def test_check_refused_name(strict_page: str, tmp_path: Path) -> None:
    code, text, result = run_check(str(strict_recipe(tmp_path)), "--var", f"page_url={strict_page}",
                                   save_dir=tmp_path / "saved")
    print(text)
    assert code == 1 and not result["joined"]
    assert "step 3/3 (wait_for '#videos' to be visible)" in result["reason"]
    assert "resolved to hidden <div" in result["reason"]
    assert "Input is not alphanumeric" in result["page_errors"]
    assert "refused the display_name 'SIP bridge'" in result["suggestion"]
    assert "--var display_name=SIPbridge" in result["suggestion"]
    assert_saved(result, 'join refused for name "SIP bridge"')
    # Every step was printed with its time; the failing one says so.
    assert [s["ok"] for s in result["steps"]] == [True, True, True, False]
    assert "FAILED" in text and "likely fix" in text and result["screenshot"] in text
    # With the name it suggests, the same recipe joins.
    code, _, result = run_check(str(strict_recipe(tmp_path)), "--var", f"page_url={strict_page}", "--var",
                                "display_name=SIPbridge", "--watch-s", "0", save_dir=tmp_path / "saved")
    assert code == 0 and result["joined"] and result["peer_connections"] == []


@pytest.mark.media
@pytest.mark.timeout(CHECK_TIMEOUT_S)
def test_check_wrong_selector(strict_page: str, tmp_path: Path) -> None:
    recipe = strict_recipe(tmp_path, click="#join-now")
    code, text, result = run_check(str(recipe), "--var", f"page_url={strict_page}", "--display-name", "bot",
                                   save_dir=tmp_path / "saved")
    print(text)
    assert code == 1
    assert result["reason"].startswith("join failed at step 2/3 (click '#join-now')")
    assert "no element matches '#join-now'" in result["suggestion"] and '#join "Join"' in result["suggestion"]
    assert Path(result["screenshot"]).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.media
@pytest.mark.timeout(3 * CHECK_TIMEOUT_S)
def test_check_passes_on_local_room(room: Room, tmp_path: Path) -> None:
    room.participants(ROOM_ID, [("alice", 440.0)], probe=True)
    code, text, result = run_check("local-room", "--var", f"room_url={room.url}", "--var", f"room={ROOM_ID}",
                                   "--display-name", "checker", save_dir=tmp_path / "saved")
    print(text)
    assert code == 0 and result["joined"], text
    assert all(step["ok"] for step in result["steps"]) and len(result["steps"]) == 4
    alice = [t for t in result["tracks"] if t["participant"] == "alice"]
    assert {t["kind"] for t in alice} == {"audio", "video"}
    assert all(t["identified_by"] == "attribute" for t in alice)
    assert all(t["frames_to_bot"] > 0 for t in alice)  # captured through the bot's own path
    receives = {codec for pc in result["peer_connections"] for codec in pc["receives"]}
    assert "video/H264" in receives and "audio/opus" in receives
    assert result["get_user_media_calls"] >= 1
    assert result["camera_sent"], result["camera"]
    assert "camera sent: yes" in text and "of 'alice' (by participant_attribute" in text
    # The same room through a participant_script (a page that shows names elsewhere would need one): the check says
    # the script named the tracks.
    scripted = tmp_path / "scripted.toml"
    builtin = (Path(__file__).resolve().parent.parent / "stages/browser/recipes/local_room.toml").read_text()
    scripted.write_text(builtin.replace(
        'participant_attribute = "data-participant"',
        "participant_script = \"return 'by-script-' + element.closest('[data-participant]').dataset.participant\""))
    code, text, result = run_check(str(scripted), "--var", f"room_url={room.url}", "--var", f"room={ROOM_ID}",
                                   "--display-name", "checker2", "--watch-s", "3", save_dir=tmp_path / "saved")
    print(text)
    assert code == 0
    named = {(t["participant"], t["identified_by"]) for t in result["tracks"]}
    assert ("by-script-alice", "script") in named and all(how == "script" for _, how in named)
