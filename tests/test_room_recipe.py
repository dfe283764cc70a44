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
from tests.test_recipe_check import strict_page_fixture, strict_recipe  # noqa: F401  (pytest fixture)


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
    with pytest.raises(RecipeError, match="no step kind"):
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
@pytest.mark.timeout(180)
def test_stage_exits_non_zero_when_it_cannot_join(netns: object, tmp_path: Path) -> None:
    """Nothing listens at the recipe's URL: the stage retries, reports each attempt, then exits 1 for supervisord."""
    config = tmp_path / "pipeline.toml"
    config.write_text('[recipe]\nurl = "http://127.0.0.1:9/"\nsteps = [{ click = "#join", timeout_s = 1 }]\n')
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sipbridge", "--config", str(config), "stage", "browser",
                                 "--recipe", "config", "--out", out, "--stats", f"ipc://{tmp_path}/bot.stats",
                                 "--max-restarts", "1"], start_new_session=True,
                                env={**os.environ, "SIPBRIDGE_RUN_DIR": str(tmp_path)})  # failure captures go there
        assert proc.wait(150) == 1
        wait_until(lambda: any(e.attributes.get("state") == "failed"
                               for e in collector.events_of(EventType.STAGE_STATE)), 5, "failed state event")
        states = [e.attributes for e in collector.events_of(EventType.STAGE_STATE)]
        rejoins = [s for s in states if s["state"] == "rejoining"]
        assert rejoins and rejoins[0]["reason"].startswith("join failed at step 0/1 (open http://127.0.0.1:9/)")
        assert "unsafe-port list" in rejoins[0]["diagnosis"]["suggestion"]  # Chromium never opens port 9
        assert Path(rejoins[0]["diagnosis"]["page"]).parent == tmp_path
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


@pytest.mark.media
@pytest.mark.timeout(180)
def test_stage_join_failure_explains_itself(strict_page: str, tmp_path: Path) -> None:
    """Issue 14: the stage that cannot join says why in its error line and state event: the failed step, the page's
    own error text, a likely fix, and a screenshot, console and page text saved in the run folder."""
    run = tmp_path / "run"
    run.mkdir()
    out = f"ipc://{run}/bot.sock"
    collector = Collector(out)
    try:
        proc = subprocess.run([sys.executable, "-m", "sipbridge", "stage", "browser", "--recipe",
                               str(strict_recipe(tmp_path)), "--var", f"page_url={strict_page}", "--out", out,
                               "--stats", f"ipc://{run}/bot.stats", "--max-restarts", "0"],
                              env={**os.environ, "SIPBRIDGE_RUN_DIR": str(run)}, capture_output=True, text=True,
                              timeout=150)
        assert proc.returncode == 1
        wait_until(lambda: collector.events_of(EventType.STAGE_STATE)
                   and collector.events_of(EventType.STAGE_STATE)[-1].attributes.get("state") == "failed", 5,
                   "failed state event")
        failed = collector.events_of(EventType.STAGE_STATE)[-1].attributes
        diagnosis = failed["diagnosis"]
        assert failed["reason"].startswith("join failed at step 3/3 (wait_for '#videos' to be visible)")
        assert diagnosis["page_errors"] == ["Input is not alphanumeric"]
        assert "--var display_name=SIPbridge" in diagnosis["suggestion"]
        assert Path(diagnosis["screenshot"]).parent == run
        assert Path(diagnosis["screenshot"]).read_bytes().startswith(b"\x89PNG")
        assert 'join refused for name "SIP bridge"' in Path(diagnosis["console"]).read_text()
        error_lines = [line for line in (proc.stdout + proc.stderr).splitlines()
                       if "join_failed" in line and "ERROR" in line]
        assert error_lines, proc.stderr[-3000:]
        assert "Input is not alphanumeric" in error_lines[0] and diagnosis["screenshot"] in error_lines[0]
    finally:
        collector.close()


def test_recipe_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Typos are refused with their name, not ignored; a relative path that is not there says where it looked."""
    with pytest.raises(RecipeError, match=r"unknown key.*joined_selecter"):
        recipe_from_mapping({"url": "x", "joined_selecter": "#in"}, {}, "t")
    with pytest.raises(RecipeError, match=r"step 2 \(click\) has unknown key\(s\) timeout;"):
        recipe_from_mapping({"url": "x", "steps": [{"click": "#a"}, {"click": "#b", "timeout": 5}]}, {}, "t")
    with pytest.raises(RecipeError, match="several kinds"):
        recipe_from_mapping({"url": "x", "steps": [{"click": "#a", "fill": "#b"}]}, {}, "t")
    with pytest.raises(RecipeError, match="needs a key"):
        recipe_from_mapping({"url": "x", "steps": [{"press": "#a"}]}, {}, "t")
    with pytest.raises(RecipeError, match="state must be one of"):
        recipe_from_mapping({"url": "x", "steps": [{"wait_for": "#a", "state": "shown"}]}, {}, "t")
    with pytest.raises(RecipeError, match="bypass_csp must be true or false"):
        recipe_from_mapping({"url": "x", "bypass_csp": "yes"}, {}, "t")
    assert recipe_from_mapping({"url": "x", "bypass_csp": True}, {}, "t").bypass_csp
    assert not recipe_from_mapping({"url": "x"}, {}, "t").bypass_csp
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=f"relative path is taken from {tmp_path}"):
        load_recipe("missing.toml", {})
    recipe = recipe_from_mapping({"url": "x", "steps": [{"fill": "#n", "value": "{display_name}"},
                                                       {"wait_for": "#v", "state": "visible"}, {"wait_s": 2}]},
                                 {"display_name": "bot"}, "t")
    assert [recipe.describe_step(s) for s in recipe.steps] == [
        "fill '#n' with 'bot'", "wait_for '#v' to be visible", "wait 2 s"]


@pytest.mark.media
@pytest.mark.timeout(60)
def test_joined_check_holds_no_handles() -> None:
    """Issue 15: the watchdog asks is_joined every second for the whole call; each answer must leave nothing behind
    in Playwright's client (an ElementHandle per call grew the stage's memory without bound)."""
    import asyncio
    import gc

    from playwright.async_api import async_playwright

    from stages.browser.chromium import launch_chromium

    recipe = recipe_from_mapping({"url": "x", "joined_selector": "#in-call"}, {}, "t")

    async def handles_after(checks: int) -> tuple[list[bool], int]:
        async with async_playwright() as pw:
            browser = await launch_chromium(pw)
            try:
                page = await browser.new_page()
                await page.set_content("<div id='in-call'>in the call</div>")
                answers = [await recipe.is_joined(page) for _ in range(checks)]
                await page.set_content("<div>left</div>")
                answers.append(await recipe.is_joined(page))
                gc.collect()
                held = sum(1 for o in gc.get_objects() if type(o).__name__ in ("ElementHandle", "JSHandle"))
                return answers, held
            finally:
                await browser.close()

    answers, held = asyncio.run(handles_after(50))
    assert answers == [True] * 50 + [False]
    assert held < 5, f"{held} element handles held after 50 joined checks"


def test_the_page_lag_bound_reaches_the_page_and_the_relay_applies_it() -> None:
    """The command line's default is the stage's, and the bound travels in the page's config to the relay."""
    from stages.browser import command
    from stages.browser.stage import DEFAULT_MAX_PAGE_LAG_MS, JS_DIR, init_script

    (option,) = [p for p in command.params if p.name == "max_page_lag_ms"]
    assert option.default == DEFAULT_MAX_PAGE_LAG_MS
    script = init_script("ws://127.0.0.1:1/x", load_recipe("local-room", {"room_url": "http://127.0.0.1:1/"}),
                         max_page_lag_ms=123)
    assert '"maxLagMs": 123' in script
    relay = (JS_DIR / "relay_worker.js").read_text()
    assert "cfg.maxLagMs" in relay and "drops.lag" in relay
