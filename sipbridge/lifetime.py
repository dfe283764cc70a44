"""Child processes that end with the process that started them."""

from __future__ import annotations

import signal


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` wrapped so the process gets SIGTERM when the process that started it dies, however it died.

    A SIGKILLed ``sipbridge up``, or a test run killed by its timeout, would otherwise leave supervisord, its
    stages, Janus and Chromium running unseen: a call nobody controls, holding ports the next run needs.
    SIGTERM is a clean stop for all of them (supervisord stops its stages in order: the call is hung up).
    ``setpriv`` (util-linux, on every Debian) sets the parent-death signal and execs, so no Python code runs
    between fork and exec; the setting survives the exec of ``ip netns exec`` too.

    An ignored signal stays ignored across fork and exec, and then the parent-death SIGTERM does nothing: a starter
    that ignores SIGTERM (a stage after its clean exit does, to keep a late SIGTERM from spoiling it) would leave
    every child it starts unkillable this way. ``env --default-signal=TERM`` (coreutils >= 8.31) gives the child
    the default action back before it runs. A blocked SIGTERM, equally inherited, is refused here rather than
    turned into a child that silently outlives its parent.
    """
    if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        raise RuntimeError("SIGTERM is blocked in this thread: a child started from it would not die with it")
    return ["setpriv", "--pdeathsig", "TERM", "--", "env", "--default-signal=TERM", "--", *argv]
