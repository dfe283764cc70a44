"""Chromium's processes told apart by role (stages/browser/procs.py), as the bridge bench splits the bot's cost."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipbridge.testing.localcall import wait_until
from stages.browser.procs import chromium_role

SLEEP = "import time; time.sleep(60)"
EXEC_TIMEOUT_S = 30.0


@pytest.fixture(name="spawn")
def spawn_fixture() -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> int:
        procs.append(subprocess.Popen([sys.executable, "-c", SLEEP, *args]))
        pid = procs[-1].pid
        # Until the exec, the child's command line is still the test's own.
        wait_until(lambda: SLEEP.encode() in Path(f"/proc/{pid}/cmdline").read_bytes(), EXEC_TIMEOUT_S, "the exec")
        return pid

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait()


def test_each_process_is_named_by_its_type_switch(spawn: object) -> None:
    assert callable(spawn)
    assert chromium_role(spawn()) == "browser"  # no --type: the main process
    assert chromium_role(spawn("--type=renderer", "--lang=en")) == "renderer"
    assert chromium_role(spawn("--type=gpu-process")) == "gpu-process"
    network = spawn("--type=utility", "--utility-sub-type=network.mojom.NetworkService")
    assert chromium_role(network) == "utility:NetworkService"
    assert chromium_role(spawn("--type=utility")) == "utility"


def test_a_process_that_is_gone_says_so() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert chromium_role(proc.pid) == "gone"
