"""Suite-wide rules.

Under ``CI=true`` a skipped test is a failure: the media tests skip without root, Janus, Chromium or sipp,
and a CI run that quietly skipped them would prove nothing about a fresh machine.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a fresh machine must run every test): {reason}"
    return report


@pytest.fixture(autouse=True)
def _signal_dispositions_restored() -> Generator[None, None, None]:
    """A stage run inside the test process sets SIGTERM and SIGINT to "ignore" once it has flushed (stages/base.py:
    a late SIGTERM must not spoil a clean exit). An ignored signal stays ignored across fork and exec, so every
    process a later test starts would ignore SIGTERM, its parent-death signal included. Each test starts with
    the dispositions the session had."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
