"""The supervisord adapter (sipbridge/supervisord.py): the poll after a reap does not wait, only on the pinned
supervisor; the whole supervised path (a killed stage restarted) runs through it in tests/test_supervised.py."""

from __future__ import annotations

from typing import Any

import pytest
from supervisor import options, poller

from sipbridge import supervisord


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """supervisor's waitpid and poll replaced by recorders (monkeypatch puts the real ones back afterwards)."""
    seen: dict[str, Any] = {"timeouts": [], "pid": None}
    monkeypatch.setattr(options.ServerOptions, "waitpid", lambda self: (seen["pid"], 0 if seen["pid"] else None))
    monkeypatch.setattr(poller.Poller, "poll", lambda self, timeout: seen["timeouts"].append(timeout) or ([], []))
    return seen


def test_the_poll_after_a_reap_returns_at_once_and_only_that_one(recorded: dict[str, Any]) -> None:
    assert supervisord.patch() is None
    waitpid: Any = options.ServerOptions.waitpid
    poll: Any = poller.Poller.poll
    poll(None, 1)  # nothing died: supervisord's own one-second wait
    recorded["pid"] = 4242
    assert waitpid(None) == (4242, 0)  # a program died and was reaped ...
    recorded["pid"] = None
    assert waitpid(None) == (None, None)  # ... and nothing else
    poll(None, 1)  # the next poll: at once, so the restart is not a second late
    poll(None, 1)  # then the clock again (a program in back-off must not spin the loop)
    assert recorded["timeouts"] == [1, 0, 1]


def test_another_supervisor_version_is_left_unpatched(
    recorded: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisord, "version", lambda name: "9.9.9")
    before = (options.ServerOptions.waitpid, poller.Poller.poll)
    problem = supervisord.patch()
    assert problem is not None and "9.9.9" in problem and supervisord.SUPERVISOR_VERSION in problem
    assert (options.ServerOptions.waitpid, poller.Poller.poll) == before


def test_the_command_runs_this_interpreter_s_supervisor(tmp_path: Any) -> None:
    import sys

    conf = tmp_path / "supervisord.conf"
    assert supervisord.command(conf) == [sys.executable, "-m", "sipbridge.supervisord", "-n", "-c", str(conf)]
