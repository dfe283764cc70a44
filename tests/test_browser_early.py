"""The browser stage's command starts Chromium while the stage's own modules import (stages/browser/early.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from stages.browser import early
from tests.stagehelp import SIPBRIDGE

pytestmark = [pytest.mark.timeout(90)]

# The stage's module takes this long to import in the test (a slow or loaded machine, made certain); long enough
# for the driver and Chromium to start beside it on a loaded machine.
SLOW_IMPORT_S = 10.0
REPORT_TIMEOUT_S = 40.0

# Run at interpreter start-up (sitecustomize) in the stage's process: executing stages.browser.stage first waits
# SLOW_IMPORT_S, then writes down which Chromium processes the stage already has. (The wait is in the module's
# execution, not in find_spec, which runs under the interpreter's global import lock.)
SLOW_IMPORT_HOOK = """
import importlib.machinery, json, os, sys, time

class _SlowStage:
    def find_spec(self, name, path=None, target=None):
        if name != "stages.browser.stage":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module

        def slow(module):
            time.sleep({delay})
            from stages.browser.procs import chromium_pids
            with open({report!r} + ".tmp", "w") as f:
                json.dump({{"chromium_pids": chromium_pids(os.getpid())}}, f)
            os.rename({report!r} + ".tmp", {report!r})
            execute(module)

        spec.loader.exec_module = slow
        return spec

sys.meta_path.insert(0, _SlowStage())
"""


def test_chromium_is_launched_while_the_stage_module_imports(tmp_path: Path) -> None:
    """Without early.py the launch waits for every import: no Chromium exists when the import ends."""
    report = tmp_path / "report.json"
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(textwrap.dedent(
        SLOW_IMPORT_HOOK.format(delay=SLOW_IMPORT_S, report=str(report))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
           "SIPBRIDGE_RUN_DIR": str(tmp_path / "run")}
    # A room nobody serves (a closed loopback port): the join fails and the bot retries; only the launch matters.
    argv = [*SIPBRIDGE, "stage", "browser", "--name", "browser-early", "--out", f"ipc://{tmp_path}/bot.sock",
            "--var", "room_url=http://127.0.0.1:9/", "--stats", f"ipc://{tmp_path}/bot.stats"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        while not report.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert report.exists(), f"the stage never imported its module (exit {proc.poll()})"
        seen = json.loads(report.read_text())["chromium_pids"]
        assert seen, "no Chromium was running when the stage's module finished importing"
        assert (tmp_path / "run" / early.NODE_COMPILE_CACHE_DIR).is_dir()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_page_started_ahead_runs_the_init_script_added_later() -> None:
    """The stage adds its init script (page socket URL and token) to the blank page only when it takes it."""

    async def main() -> tuple[object, bool]:
        started = await early.start(bypass_csp=False)
        try:
            assert started.error is None and started.browser is not None
            taken = started.take_page()
            assert taken is not None and started.take_page() is None  # once only
            context, page = taken
            await context.add_init_script(script="window.__sipbridge_probe = 'hooked';")
            await page.goto("data:text/html,<p>room</p>")
            probe = await page.evaluate("window.__sipbridge_probe")
        finally:
            await started.close()
        return probe, started.browser.is_connected()

    probe, connected = asyncio.run(main())
    assert probe == "hooked"
    assert not connected  # close() stopped what was started
