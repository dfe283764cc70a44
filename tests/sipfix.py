"""Pytest fixtures and helpers for tests that need a private namespace, Janus or sipp.

Import the fixtures into a test module (pytest finds fixtures by name in the module)::

    from sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)

    def test_x(netns, janus): ...

(The functions are named ``*_fixture`` and registered under the short names so the
test parameters do not shadow the imports.)

Fixtures:

* ``netns`` -> ``sipbridge.netns.NetNs``: a fresh namespace (lo up, veth sbv0/sbv1 inside,
  127.0.0.2/32 on lo and sbv0), *and the test's main thread is moved into it* for the
  duration of the test (setns(2) on the calling thread, undone afterwards). Everything
  the test body does from the main thread (sockets, asyncio loops created in the test,
  aiortc, Playwright, subprocesses such as sipp, Janus, Chromium or stage processes)
  therefore lives in the namespace, so fixed ports never clash between tests or helpers
  and nothing can leave the machine. Threads started before the test (e.g. an executor
  created at import time) stay outside: create loops/threads inside the test.
  The namespace is always deleted, and stale ``sb-<pid>-*`` namespaces of dead processes
  are removed first.
* ``janus`` -> ``sipbridge.janus_server.JanusServer``: Janus started with the project's
  configuration in that namespace (HTTP ``janus.http_url``, WebSocket ``janus.ws_url``,
  log ``janus.log_file``), stopped (SIGTERM) at the end. Its log tail is printed when the
  test fails (pytest shows captured output).

Helpers: ``Sipp`` (run a scenario from tests/sipp/ in the namespace), ``free_udp_port()``,
``wait_for(predicate, timeout_s)``, ``sipp_scenario(name)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from sipbridge import netns as netns_mod
from sipbridge.janus_server import JanusConfig, JanusServer

SIPP_DIR = Path(__file__).resolve().parent / "sipp"
SIPP_STOP_TIMEOUT_S = 5.0


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


@pytest.fixture(name="netns")
def netns_fixture() -> Iterator[netns_mod.NetNs]:
    need_root()
    netns_mod.cleanup_stale()
    ns = netns_mod.NetNs()
    ns.create()
    try:
        with ns.entered():
            yield ns
    finally:
        ns.delete()


@pytest.fixture(name="janus")
def janus_fixture(netns: netns_mod.NetNs, tmp_path: Path) -> Iterator[JanusServer]:
    if shutil.which("janus") is None:
        pytest.skip("janus is not installed")
    server = JanusServer(JanusConfig(), work_dir=tmp_path / "janus")
    server.start()
    try:
        yield server
    finally:
        print(f"--- Janus log tail ({server.log_file}) ---\n{server.tail_log(40)}")
        server.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def sipp_scenario(name: str) -> Path:
    path = SIPP_DIR / name
    if not path.suffix:
        path = path.with_suffix(".xml")
    if not path.exists():
        raise FileNotFoundError(path)
    return path


class Sipp:
    """One sipp process running a scenario from tests/sipp/ (in the caller's namespace).

    ``Sipp("uas_echo", port=5090, media_port=6000, extra=["-rtp_echo"])``; ``start()`` returns
    self; ``wait()`` returns the exit code (0 = every call succeeded); ``stop()`` ends it.
    The message trace goes to ``work_dir/<scenario>_messages.log`` (``-trace_msg``).
    """

    def __init__(self, scenario: str, work_dir: Path, port: int = 5090, media_port: int = 6000,
                 extra: Sequence[str] = (), remote: str | None = None, calls: int = 1,
                 ip: str = "127.0.0.1") -> None:
        self.scenario = sipp_scenario(scenario)
        self.work_dir = work_dir
        self.port = port
        self.media_port = media_port
        self.argv = ["sipp", "-sf", str(self.scenario), "-i", ip, "-p", str(port), "-mi", ip,
                     "-mp", str(media_port), "-m", str(calls), "-nostdin", "-trace_msg", "-trace_err",
                     *extra]
        if remote:
            self.argv.append(remote)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sipp:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.stdout = open(self.work_dir / f"{self.scenario.stem}.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, cwd=self.work_dir, stdin=subprocess.DEVNULL,
                                     stdout=self.stdout, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def messages(self) -> str:
        """The SIP messages sipp sent and received (its -trace_msg file)."""
        text = []
        for path in sorted(self.work_dir.glob(f"{self.scenario.stem}*_messages.log")):
            text.append(path.read_text(errors="replace"))
        return "\n".join(text)

    def output(self) -> str:
        path = self.work_dir / f"{self.scenario.stem}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(SIPP_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.stdout.close()
        return proc.returncode

    def __enter__(self) -> Sipp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
