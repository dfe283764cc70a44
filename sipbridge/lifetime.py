"""Child processes that end with the process that started them."""

from __future__ import annotations


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` wrapped so the process gets SIGTERM when the process that started it dies, however it died.

    A SIGKILLed ``sipbridge up``, or a test run killed by its timeout, would otherwise leave supervisord, its
    stages, Janus and Chromium running unseen: a call nobody controls, holding ports the next run needs.
    SIGTERM is a clean stop for all of them (supervisord stops its stages in order: the call is hung up).
    ``setpriv`` (util-linux, on every Debian) sets the parent-death signal and execs, so no Python code runs
    between fork and exec; the setting survives the exec of ``ip netns exec`` too.
    """
    return ["setpriv", "--pdeathsig", "TERM", "--", *argv]
