"""Helpers for tests that run real stage processes: spawn them, feed them, collect from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

import protocol

STAGE_EXIT_TIMEOUT_S = 30.0
# The project under test, from the interpreter running the tests: never a `sipbridge` looked up on PATH,
# which on a fresh machine is missing (or, worse, an older install).
SIPBRIDGE = [sys.executable, "-m", "sipbridge"]


class StageProcs:
    """Stage processes of one test; everything still running at the end is killed."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.run_dir}/{name}.sock"

    def start(self, kind: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(self.run_dir)}
        cmd = [*SIPBRIDGE, "stage", kind, "--name", name, *args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def wait_all(self, timeout_s: float = STAGE_EXIT_TIMEOUT_S) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not exit; log:\n{self.log(name)}") from None
        return codes

    def log(self, name: str) -> str:
        return (self.run_dir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(5)


@contextmanager
def stage_procs(run_dir: Path) -> Iterator[StageProcs]:
    procs = StageProcs(run_dir)
    try:
        yield procs
    finally:
        procs.stop()


class Collector:
    """A test-side consumer: connects a PULL to a stage's output, like a downstream stage would."""

    def __init__(self, endpoint: str, hwm: int = 1000) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def receive(self, timeout_s: float = 10.0) -> protocol.Message | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return protocol.decode(self.sock.recv_multipart())

    def until_end(self, timeout_s: float = 30.0) -> list[protocol.Message]:
        out: list[protocol.Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.receive(max(0.05, deadline - time.monotonic()))
            if msg is None:
                break
            if isinstance(msg, protocol.EndOfStream) and not msg.stream_id:
                self.close()  # like a stage: hang up once everything is read, so the producer may exit
                return out
            out.append(msg)
        raise AssertionError(f"no end of stream within {timeout_s}s ({len(out)} messages)")

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.close()


class Feeder:
    """A test-side producer: binds a PUSH where a stage's --in connects, plus its control PULL."""

    def __init__(self, endpoint: str) -> None:
        from stages.base import control_endpoint

        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.bind(endpoint)
        self.control = self.ctx.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(control_endpoint(endpoint))

    def send(self, msg: protocol.Message) -> None:
        self.sock.send_multipart(protocol.encode(msg))

    def send_raw(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def control_message(self, timeout_s: float = 5.0) -> protocol.Message | None:
        if not self.control.poll(int(timeout_s * 1000)):
            return None
        return protocol.decode(self.control.recv_multipart())

    def close(self) -> None:
        self.sock.close()
        self.control.close()


class StatsWatcher:
    """Subscribes to a stage's statistics PUB socket."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.errors: list[protocol.ErrorReport] = []

    def latest_stats(self, predicate: Any = None, timeout_s: float = 10.0) -> dict[str, Any]:
        """Wait for a Stats message whose figures satisfy ``predicate``; return those figures."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            msg = protocol.decode(self.sock.recv_multipart())
            if isinstance(msg, protocol.ErrorReport):
                self.errors.append(msg)
            if isinstance(msg, protocol.Stats):
                last = msg.figures
                if predicate is None or predicate(last):
                    return last
        raise AssertionError(f"statistics never matched; last: {json.dumps(last)[:2000]}")

    def close(self) -> None:
        self.sock.close()
