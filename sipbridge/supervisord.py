"""supervisord that restarts a dead program at once, not after its next idle second.

supervisord's loop (``Supervisor.runforever`` in supervisor 4.3.0) polls its file descriptors with a one-second
timeout, then starts what should run (``transition``), then reaps dead children (``reap``). Two waits follow a
death, each up to that second, when no program writes anything meanwhile:

* SIGCHLD does not end the poll (Python retries an interrupted poll, PEP 475), and the dying child's pipes reach
  end of file a moment before the kernel makes it reapable, so the poll they wake often finds nothing to reap;
* a child reaped after a poll is started again only after the *next* poll.

Measured with a program SIGKILLed six times: plain supervisord started it again 1.010-1.032 s after the kill,
every time; with the first fix alone, 0.010-1.028 s. Here a signal wakes the poll (``signal.set_wakeup_fd`` on a
pipe the poll watches) and the poll that follows a reap does not wait, so the restart comes within milliseconds.

This touches supervisor's private internals (``ServerOptions.waitpid``, the platform ``Poller.poll``), so only the
exact version they were read from is patched (``SUPERVISOR_VERSION``, pinned in pyproject.toml); with any other
the unpatched supervisord runs and says so on stderr: restarts stay correct, only up to a second slower.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

SUPERVISOR_VERSION = "4.3.0"
WAKE_FD_ATTRIBUTE = "_sipbridge_wake_fd"  # on the poller: the read end of its signal wake-up pipe


def command(config: Path) -> list[str]:
    """The command that runs supervisord in the foreground on ``config``, with this interpreter's supervisor."""
    return [sys.executable, "-m", "sipbridge.supervisord", "-n", "-c", str(config)]


def patch() -> str | None:
    """Make a signal end the poll, and the poll after a reap return at once. None when patched, else why not."""
    installed = version("supervisor")
    if installed != SUPERVISOR_VERSION:
        return f"supervisor {installed} is not {SUPERVISOR_VERSION}, the version this patch was read from"
    from supervisor import options, poller

    server_options: Any = options.ServerOptions
    platform_poller: Any = poller.Poller
    for owner, name in ((server_options, "waitpid"), (platform_poller, "poll"), (platform_poller, "register_readable")):
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

    def poll_woken_by_signals(self: Any, timeout: float) -> tuple[list[int], list[int]]:
        nonlocal reaped
        wake_fd = getattr(self, WAKE_FD_ATTRIBUTE, None)
        if wake_fd is None:
            # Made at a poller's first poll, not at import: supervisord closes every descriptor from 5 up as it
            # starts, and again on a reload (SIGHUP), which then makes a new poller and so a new pipe here.
            wake_fd, write_fd = os.pipe()
            os.set_blocking(wake_fd, False)
            os.set_blocking(write_fd, False)
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            setattr(self, WAKE_FD_ATTRIBUTE, wake_fd)
        if reaped:  # one poll only: a program in back-off still waits on the clock, no busy loop
            reaped = False
            timeout = 0
        self.register_readable(wake_fd)
        readables, writables = poll(self, timeout)
        if wake_fd in readables:
            readables = [fd for fd in readables if fd != wake_fd]
            try:
                while os.read(wake_fd, 512):
                    pass
            except BlockingIOError:
                pass
        return readables, writables

    server_options.waitpid = waitpid_noting_reaps
    platform_poller.poll = poll_woken_by_signals
    return None


def main(argv: Sequence[str] | None = None) -> None:
    problem = patch()
    if problem is not None:
        print(f"sipbridge.supervisord: restarts may wait up to 1 s: {problem}", file=sys.stderr, flush=True)
    from supervisor.supervisord import main as supervisord_main

    supervisord_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
