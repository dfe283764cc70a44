"""Join recipes: loading (built-in, TOML, module, config table) and the stage giving up on an app it cannot join."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

import protocol
from protocol import EventType
from stages.browser.recipes import Recipe, RecipeError, load_recipe, recipe_from_mapping
from tests.roomfix import Collector, wait_until
from tests.sipfix import netns_fixture  # noqa: F401  (pytest fixture)


def test_builtin_local_room_recipe_formats_variables() -> None:
    recipe = load_recipe("local-room", {"room_url": "http://127.0.0.1:9/", "room": "77", "display_name": "bot"})
    assert recipe.start_url() == "http://127.0.0.1:9/?room=77&codec=h264"
    assert recipe.format(recipe.steps[0]["value"]) == "bot"
    assert recipe.participant_attribute == "data-participant"


def test_toml_recipe_and_bad_steps(tmp_path: Path) -> None:
    path = tmp_path / "app.toml"
    path.write_text('url = "https://app.example/{room}"\nsteps = [{ click = "#go" }, { wait_s = 1 }]\n')
    recipe = load_recipe(str(path), {"room": "r1"})
    assert recipe.start_url() == "https://app.example/r1" and len(recipe.steps) == 2
    with pytest.raises(RecipeError, match="unknown step"):
        recipe_from_mapping({"url": "x", "steps": [{"dance": "#go"}]}, {}, "bad")
    with pytest.raises(RecipeError, match="needs a url"):
        recipe_from_mapping({"steps": []}, {}, "bad")
    with pytest.raises(RecipeError, match="unknown variable"):
        load_recipe(str(path), {}).start_url()
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe("no_such_module_for_sipbridge", {})


def test_module_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_app_recipe.py").write_text(
        "from stages.browser.recipes import Recipe\n"
        "def make_recipe(variables):\n"
        "    return Recipe(url='https://meet.example/{room}', variables={'room': 'x', **variables}, name='my-app')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe("my_app_recipe", {"room": "standup"})
    assert isinstance(recipe, Recipe) and recipe.start_url() == "https://meet.example/standup"


@pytest.mark.media
@pytest.mark.timeout(90)
def test_stage_exits_non_zero_when_it_cannot_join(netns: object, tmp_path: Path) -> None:
    """Nothing listens at the recipe's URL: the stage retries, reports each attempt, then exits 1 for supervisord."""
    config = tmp_path / "pipeline.toml"
    config.write_text('[recipe]\nurl = "http://127.0.0.1:9/"\nsteps = [{ click = "#join", timeout_s = 1 }]\n')
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sipbridge", "--config", str(config), "stage", "browser",
                                 "--recipe", "config", "--out", out, "--stats", f"ipc://{tmp_path}/bot.stats",
                                 "--max-restarts", "1"], start_new_session=True)
        assert proc.wait(60) == 1
        wait_until(lambda: any(e.attributes.get("state") == "failed"
                               for e in collector.events_of(EventType.STAGE_STATE)), 5, "failed state event")
        states = [e.attributes for e in collector.events_of(EventType.STAGE_STATE)]
        rejoins = [s for s in states if s["state"] == "rejoining"]
        assert rejoins and rejoins[0]["reason"].startswith("join failed")
        assert isinstance(collector.events[-1][1], protocol.Event)
    finally:
        collector.close()


def test_chromium_never_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root Playwright starts the user-switching wrapper with a minimal environment; a missing user is an error
    that says how to create it, never a fallback to root."""
    from stages.browser import chromium

    monkeypatch.setenv("SIPBRIDGE_TEST_SECRET", "hunter2")
    monkeypatch.setattr(chromium.os, "geteuid", lambda: 0)
    monkeypatch.setattr(chromium.pwd, "getpwnam", lambda name: pwd_entry(name, 999, 995))
    executable, env = chromium.launch_settings("sb-test-user")
    assert executable == str(chromium.AS_USER_WRAPPER) and os.access(executable, os.X_OK)
    assert env["SIPBRIDGE_CHROMIUM_UID"] == "999" and env["SIPBRIDGE_CHROMIUM_GID"] == "995"
    assert "SIPBRIDGE_TEST_SECRET" not in env
    monkeypatch.setattr(chromium.pwd, "getpwnam", lambda name: pwd_entry(name, 0, 0))
    with pytest.raises(chromium.ChromiumUserError, match="uid or gid 0"):
        chromium.launch_settings("sb-test-user")

    def missing(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(chromium.pwd, "getpwnam", missing)
    with pytest.raises(chromium.ChromiumUserError, match="make setup"):
        chromium.launch_settings("sb-test-user")
    monkeypatch.setattr(chromium.os, "geteuid", lambda: 1000)
    executable, env = chromium.launch_settings("sb-test-user")
    assert executable == chromium.CHROMIUM_PATH and "SIPBRIDGE_TEST_SECRET" not in env


def pwd_entry(name: str, uid: int, gid: int) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", "/nonexistent", "/usr/sbin/nologin"))
