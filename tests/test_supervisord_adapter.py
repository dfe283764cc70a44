"""The supervisord adapter (sipbridge/supervisord.py): a signal ends supervisord's poll, the poll after a reap does
not wait, and only the pinned supervisor is patched. The whole supervised path (a killed stage restarted) runs
through it in tests/test_supervised.py and tests/test_node.py."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from supervisor import options, poller

from sipbridge import supervisord

# Far longer than a woken poll takes on any machine: a poll that lasts this long was not woken.
UNWOKEN_POLL_S = 30.0


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """supervisor's classes and the process's signal wake-up descriptor as they were, after the test."""
    monkeypatch.setattr(options.ServerOptions, "waitpid", options.ServerOptions.waitpid)
    monkeypatch.setattr(poller.Poller, "poll", poller.Poller.poll)
    yield monkeypatch
    write_fd = signal.set_wakeup_fd(-1)
    if write_fd != -1:
        os.close(write_fd)


def test_the_poll_after_a_reap_returns_at_once_and_only_that_one(restored: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {"timeouts": [], "pid": None}
    restored.setattr(options.ServerOptions, "waitpid", lambda self: (seen["pid"], 0 if seen["pid"] else None))
    restored.setattr(poller.Poller, "poll", lambda self, timeout: seen["timeouts"].append(timeout) or ([], []))
    assert supervisord.patch() is None
    waitpid: Any = options.ServerOptions.waitpid
    poll: Any = poller.Poller.poll
    stub = SimpleNamespace(register_readable=lambda fd: None)
    poll(stub, 1)  # nothing died: supervisord's own one-second wait
    seen["pid"] = 4242
    assert waitpid(None) == (4242, 0)  # a program died and was reaped ...
    seen["pid"] = None
    assert waitpid(None) == (None, None)  # ... and nothing else
    poll(stub, 1)  # the next poll: at once, so the restart is not a second late
    poll(stub, 1)  # then the clock again (a program in back-off must not spin the loop)
    assert seen["timeouts"] == [1, 0, 1]
    os.close(getattr(stub, supervisord.WAKE_FD_ATTRIBUTE))


def test_a_signal_ends_the_poll_and_is_not_reported_as_a_descriptor(restored: pytest.MonkeyPatch) -> None:
    assert supervisord.patch() is None
    real = poller.Poller(SimpleNamespace(logger=None))
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # as supervisord handles SIGCHLD
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        started = time.monotonic()
        readables, writables = real.poll(UNWOKEN_POLL_S)
        waited = time.monotonic() - started
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert waited < UNWOKEN_POLL_S / 2, "the signal did not end the poll"
    assert (readables, writables) == ([], [])  # the wake-up pipe is ours, not one of supervisord's descriptors
    real.close()
    os.close(getattr(real, supervisord.WAKE_FD_ATTRIBUTE))


def test_another_supervisor_version_is_left_unpatched(restored: pytest.MonkeyPatch) -> None:
    restored.setattr(supervisord, "version", lambda name: "9.9.9")
    before = (options.ServerOptions.waitpid, poller.Poller.poll)
    problem = supervisord.patch()
    assert problem is not None and "9.9.9" in problem and supervisord.SUPERVISOR_VERSION in problem
    assert (options.ServerOptions.waitpid, poller.Poller.poll) == before


def test_the_command_runs_this_interpreter_s_supervisor(tmp_path: Path) -> None:
    conf = tmp_path / "supervisord.conf"
    assert supervisord.command(conf) == [sys.executable, "-m", "sipbridge.supervisord", "-n", "-c", str(conf)]
