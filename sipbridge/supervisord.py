"""supervisord that restarts a dead program at once, not after its next idle second.

supervisord's loop (``Supervisor.runforever`` in supervisor 4.3.0) polls its file descriptors with a one-second
timeout, then starts what should run (``transition``), then reaps dead children (``reap``). A program that died is
reaped after the poll its death woke, and started again only after the *next* poll, which sleeps up to a second
when no program writes anything meanwhile. Measured in ``sipbridge bench faults`` (quiet machine, 24 restarts):
0.004-1.008 s between supervisord's "exited" and "spawned" lines, 0.55 s on average, of media lost at every
restart for nothing. Here the poll that follows a reap does not wait, so the restart comes in the same instant.

This touches supervisor's private internals (``ServerOptions.waitpid``, the platform ``Poller.poll``), so only the
exact version they were read from is patched (``SUPERVISOR_VERSION``, pinned in pyproject.toml); with any other
the unpatched supervisord runs and says so on stderr: restarts stay correct, only up to a second slower.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

SUPERVISOR_VERSION = "4.3.0"


def command(config: Path) -> list[str]:
    """The command that runs supervisord in the foreground on ``config``, with this interpreter's supervisor."""
    return [sys.executable, "-m", "sipbridge.supervisord", "-n", "-c", str(config)]


def patch() -> str | None:
    """Make the poll after a reap return at once. None when patched, else why not."""
    installed = version("supervisor")
    if installed != SUPERVISOR_VERSION:
        return f"supervisor {installed} is not {SUPERVISOR_VERSION}, the version this patch was read from"
    from supervisor import options, poller

    server_options: Any = options.ServerOptions
    platform_poller: Any = poller.Poller
    for owner, name in ((server_options, "waitpid"), (platform_poller, "poll")):
        if not callable(getattr(owner, name, None)):
            return f"supervisor {installed} has no {owner.__name__}.{name}"
    waitpid, poll = server_options.waitpid, platform_poller.poll
    reaped = False

    def waitpid_noting_reaps(self: Any) -> tuple[int | None, int | None]:
        nonlocal reaped
        pid, status = waitpid(self)
        if pid:
            reaped = True
        return pid, status

    def poll_at_once_after_a_reap(self: Any, timeout: float) -> tuple[list[int], list[int]]:
        nonlocal reaped
        if reaped:  # one poll only: a program in back-off still waits on the clock, no busy loop
            reaped = False
            timeout = 0
        result: tuple[list[int], list[int]] = poll(self, timeout)
        return result

    server_options.waitpid = waitpid_noting_reaps
    platform_poller.poll = poll_at_once_after_a_reap
    return None


def main(argv: Sequence[str] | None = None) -> None:
    problem = patch()
    if problem is not None:
        print(f"sipbridge.supervisord: restarts may wait up to 1 s: {problem}", file=sys.stderr, flush=True)
    from supervisor.supervisord import main as supervisord_main

    supervisord_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
