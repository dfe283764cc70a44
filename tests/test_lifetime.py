"""Children started through ``die_with_parent`` end when their starter dies, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sipbridge.lifetime import die_with_parent
from sipbridge.testing.localcall import wait_until

CHILD_GONE_TIMEOUT_S = 60.0  # generous: a deadline costs nothing when the machine is quick
CHILD_START_TIMEOUT_S = 120.0

# The starter may ignore SIGTERM itself (as a stage does after its clean exit): its children must still end.
STARTER = """
import signal, subprocess, sys
from sipbridge.lifetime import die_with_parent
if sys.argv[1] == "ignoring":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(die_with_parent([sys.executable, "-c", sys.argv[2]]))
print(child.pid, flush=True)
child.wait()
"""
SLEEPER = "import time; time.sleep(600)"
SLEEPER_ARGV = [sys.executable.encode(), b"-c", SLEEPER.encode()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"  # a zombie has ended; only its parent's wait is missing
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("starter_sigterm", ["default", "ignoring"])
def test_a_child_ends_when_its_starter_is_killed(starter_sigterm: str) -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER, starter_sigterm, SLEEPER], stdout=subprocess.PIPE,
                               text=True)
    assert starter.stdout is not None
    child = int(starter.stdout.readline())
    try:
        # Wait for the sleeper itself: past the fork (until its exec the child is a copy of the starter, argv and all,
        # so its first word is the same Python; ci26, under load, killed the starter then, before setpriv had set
        # the parent-death signal), past setpriv (sets that signal, then execs) and env (restores SIGTERM's default
        # action, then execs). Killing the starter earlier would be a race the test made.
        wait_until(
            lambda: Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[:3] == SLEEPER_ARGV,
            CHILD_START_TIMEOUT_S,
            "the child to start",
        )
        assert alive(child)
        starter.kill()
        starter.wait()
        wait_until(lambda: not alive(child), CHILD_GONE_TIMEOUT_S, "the orphan to get SIGTERM")
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_blocked_sigterm_is_refused_rather_than_inherited() -> None:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        with pytest.raises(RuntimeError, match="SIGTERM is blocked"):
            die_with_parent(["true"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
