"""Fixtures and helpers for the room-leg tests: a private namespace with Janus, the local room, participants.

The namespace and Janus come from the SIP leg's ``tests/sipfix.py`` when it is there; otherwise (or when
``SIPBRIDGE_ROOM_OWN_JANUS=1``) this module sets up its own with the field-notes recipe, so the room leg can
be tested on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
JANUS_CONF_DIR = REPO / "janus-conf"
JANUS_START_TIMEOUT_S = 10.0
PROCESS_STOP_TIMEOUT_S = 5.0
ROOM_HTTP_PORT = 8480
JANUS_WS_PORT = 8188
JANUS_HTTP_PORT = 8088
MEDIA_ADDRESS = "127.0.0.2"


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class Namespace:
    name: str

    def exec_args(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


def create_namespace(prefix: str = "sbroom") -> Namespace:
    """A fresh namespace following the field notes: lo up, veth pair, 127.0.0.2 on lo and the veth."""
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    _sh("ip", "netns", "add", name)
    ex = ["ip", "netns", "exec", name]
    _sh(*ex, "ip", "link", "set", "lo", "up")
    _sh(*ex, "ip", "link", "add", "sbv0", "type", "veth", "peer", "name", "sbv1")
    for dev in ("sbv0", "sbv1"):
        _sh(*ex, "sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1")
    _sh(*ex, "ip", "addr", "add", f"{MEDIA_ADDRESS}/32", "dev", "lo")
    _sh(*ex, "ip", "addr", "add", f"{MEDIA_ADDRESS}/32", "dev", "sbv0")
    _sh(*ex, "ip", "link", "set", "sbv0", "up")
    _sh(*ex, "ip", "link", "set", "sbv1", "up")
    return Namespace(name)


def delete_namespace(ns: Namespace) -> None:
    subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True)


def wait_http(ns: Namespace, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = subprocess.run([*ns.exec_args(), "curl", "-sf", "-m", "1", url], capture_output=True)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@dataclass
class JanusProcess:
    proc: subprocess.Popen[bytes]
    conf_dir: str
    ws_url: str = f"ws://127.0.0.1:{JANUS_WS_PORT}"

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.conf_dir, ignore_errors=True)


def start_own_janus(ns: Namespace) -> JanusProcess:
    """Render the project's janus-conf templates into a temporary folder and run Janus in ``ns``."""
    conf = tempfile.mkdtemp(prefix="sbroom-janus-")
    values = {
        "CONFIGS_FOLDER": conf,
        "LOG_FILE": os.path.join(conf, "janus.log"),
        "DEBUG_LEVEL": "3",
        "RTP_PORT_RANGE": "20000-20999",
        "ICE_ENFORCE_LIST": "sbv0",
        "BIND_IP": "127.0.0.1",
        "HTTP_PORT": str(JANUS_HTTP_PORT),
        "WS_PORT": str(JANUS_WS_PORT),
        "SIP_IP": "127.0.0.1",
        "SIP_RTP_PORT_RANGE": "21000-21999",
    }
    for src in JANUS_CONF_DIR.glob("*.jcfg"):
        text = string.Template(src.read_text()).safe_substitute(values)
        Path(conf, src.name).write_text(text)
    proc = subprocess.Popen([*ns.exec_args(), "janus", "-F", conf, "-o"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(ns, f"http://127.0.0.1:{JANUS_HTTP_PORT}/janus/info", JANUS_START_TIMEOUT_S)
    return JanusProcess(proc, conf)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = PROCESS_STOP_TIMEOUT_S) -> int | None:
    """SIGTERM the process group (Chromium leaves children behind otherwise), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
    return proc.returncode


class JsonLines:
    """Reads a subprocess's stdout as JSON lines on a thread; tests wait for matching records."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                self.records.append(record)
                self._queue.put(record)

    def wait_for(self, predicate: Any, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        for record in list(self.records):
            if predicate(record):
                return record
        while time.monotonic() < deadline:
            try:
                record = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if predicate(record):
                return record
        raise TimeoutError(f"no matching record within {timeout_s} s; last: {self.records[-3:]}")


@dataclass
class Room:
    """The local room server and Janus, inside one namespace."""

    ns: Namespace
    janus_ws: str
    http_port: int
    server: subprocess.Popen[bytes]
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, room: int, name: str, **params: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"room": room, "name": name, **params}.items())
        return f"http://127.0.0.1:{self.http_port}/?{query}"

    def spawn(self, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([*self.ns.exec_args(), *args], stdout=stdout, stderr=None, env=env,
                                start_new_session=True)
        self.children.append(proc)
        return proc

    def participant(self, room: int, name: str, tone_hz: float, *extra: str) -> tuple[subprocess.Popen[bytes], JsonLines]:
        proc = self.spawn("sipbridge", "room", "participant", "--janus", self.janus_ws,
                          "--room-url", f"http://127.0.0.1:{self.http_port}/", "--room", str(room),
                          "--name", name, "--tone", str(tone_hz), *extra)
        return proc, JsonLines(proc)

    def stop(self) -> None:
        for proc in reversed(self.children):
            stop_process(proc)
        stop_process(self.server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def room_env() -> Iterator[Room]:
    """One namespace with Janus and the room server for a test module."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    ns = create_namespace()
    janus = start_own_janus(ns)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([*ns.exec_args(), "sipbridge", "room", "serve", "--port",
                               str(ROOM_HTTP_PORT), "--janus", janus.ws_url], env=env, start_new_session=True)
    try:
        wait_http(ns, f"http://127.0.0.1:{ROOM_HTTP_PORT}/healthz", JANUS_START_TIMEOUT_S)
        room = Room(ns, janus.ws_url, ROOM_HTTP_PORT, server)
        yield room
        room.stop()
    finally:
        stop_process(server)
        janus.stop()
        delete_namespace(ns)


# ----- pattern helpers (same convention as the lead's source/sink) -------------------------------------------------
PATTERN_COLUMNS = 16


def read_counter(y_plane: np.ndarray) -> int:
    """Counter from the top band of a Y plane: 16 columns, bit (15-i) in column i, threshold 128."""
    height, width = y_plane.shape
    band = max(1, height // 8)
    cell = width // PATTERN_COLUMNS
    value = 0
    for i in range(PATTERN_COLUMNS):
        x0 = i * cell + cell // 4
        x1 = (i + 1) * cell - cell // 4
        y0, y1 = band // 4, band - band // 4
        mean = float(y_plane[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].mean())
        if mean >= 128:
            value |= 1 << (PATTERN_COLUMNS - 1 - i)
    return value


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    """Frequency of the strongest spectral peak of mono s16 samples."""
    x = samples.astype(np.float64)
    x -= x.mean()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[0] = 0
    return float(np.argmax(spectrum) * rate / len(x))
