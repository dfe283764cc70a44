"""Benchmark of the browser stage in the local room (real Chromium, real Janus VideoRoom, private namespace).

Per scenario: a synthetic participant publishes W x H @ 30 fps; the bot captures it (raw or encoded) and,
in the bridged-call scenarios, injects a 640x480@30 pattern as its camera. Measured:
* capture fps at the ZeroMQ consumer, against a plain viewer page in the same room in the same run (baseline:
  what an ordinary participant's browser receives of the same stream);
* capture latency: page receive (capture_time_ns set in the page) to the message arriving at a ZeroMQ PULL;
* injection latency: frame off ZeroMQ in the stage to the page's acknowledgement that it wrote the frame into
  its MediaStreamTrackGenerator (includes the acknowledgement's trip back, so an upper bound);
* CPU (cores) and PSS (MB, from /proc/PID/smaps_rollup) of the whole browser stage: Python, the Playwright
  driver and every Chromium process. Targets per bridged 640x480 call: < 0.6 core, < 600 MB PSS.

Run as root: ``python -m bench.bench_browser`` (or ``sipbridge bench`` when wired by the lead).
Prints a table and writes bench/results/browser.json.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import zmq

import protocol
from sipbridge.janus_server import JanusConfig, JanusServer
from sipbridge.netns import NetNs
from sipbridge.testing.localcall import SIPBRIDGE
from stages.browser.procs import chromium_pids, command_name, cpu_seconds, descendants, pss_kb, tree_usage
from stages.pattern import PatternGenerator, tone

RESULTS = Path(__file__).resolve().parent / "results" / "browser.json"
ROOM_HTTP_PORT = 8480
FPS = 30
MEASURE_S = float(os.environ.get("SIPBRIDGE_BENCH_MEASURE_S", "10"))
WARMUP_FRAMES = 30
START_TIMEOUT_S = 40.0
STOP_TIMEOUT_S = 8.0
INJECT_SIZE = (640, 480)
SAMPLE_RATE = 48000
AUDIO_FRAME_SAMPLES = 960
TARGET_CORES = 0.6
TARGET_PSS_MB = 600.0
SELENIUM_GATEWAY_CORES = 2.5  # the budget a known Selenium-based room gateway gives one 640x360 call

SCENARIOS = [
    {"name": "raw 640x480 + inject", "mode": "raw", "size": (640, 480), "inject": True},
    {"name": "encoded 640x480 + inject", "mode": "encoded", "size": (640, 480), "inject": True},
    {"name": "raw 1280x720", "mode": "raw", "size": (1280, 720), "inject": False},
    {"name": "encoded 1280x720", "mode": "encoded", "size": (1280, 720), "inject": False},
]


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def spawn(argv: list[str], stdout: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stdout=stdout, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


class Capture:
    """PULL on the bot's output: arrival times and latency of one video stream."""

    def __init__(self, endpoint: str, stream_id: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.connect(endpoint)
        self.stream_id = stream_id
        self.arrivals: list[float] = []
        self.latency_ms: list[tuple[float, float]] = []
        self.codecs: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            msg = protocol.decode(self.sock.recv_multipart())
            if not isinstance(msg, (protocol.VideoFrame, protocol.EncodedPacket)):
                continue
            if msg.header.stream_id == self.stream_id:
                now = time.monotonic()
                self.arrivals.append(now)
                self.latency_ms.append((now, (time.time_ns() - msg.header.capture_time_ns) / 1e6))
                if isinstance(msg, protocol.EncodedPacket):
                    self.codecs.add(msg.codec.name)

    def window(self, t0: float, t1: float) -> tuple[float, list[float]]:
        frames = sum(1 for t in self.arrivals if t0 <= t < t1)
        return frames / (t1 - t0), [lat for t, lat in self.latency_ms if t0 <= t < t1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


class Injector:
    """Pipeline side feeding the bot: 640x480@30 pattern + tone, paced in real time."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 8)
        self.sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        width, height = INJECT_SIZE
        frames = [PatternGenerator(width, height).frame(i) for i in range(FPS)]
        start = time.monotonic()
        v = a = 0
        while not self._stop.is_set():
            now = time.monotonic() - start
            if v / FPS <= now:
                header = protocol.MediaHeader("inject/video", v, v, Fraction(1, FPS), time.time_ns())
                self._send(protocol.VideoFrame(header, width, height, frames[v % FPS]))
                v += 1
            if a * AUDIO_FRAME_SAMPLES / SAMPLE_RATE <= now:
                first = a * AUDIO_FRAME_SAMPLES
                header = protocol.MediaHeader("inject/audio", a, first, Fraction(1, SAMPLE_RATE), time.time_ns())
                pcm = tone(1000.0, SAMPLE_RATE, first, AUDIO_FRAME_SAMPLES).tobytes()
                self._send(protocol.AudioFrame(header, SAMPLE_RATE, 1, AUDIO_FRAME_SAMPLES, pcm))
                a += 1
            time.sleep(0.002)

    def _send(self, msg: protocol.Message) -> None:
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart(protocol.encode(msg), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


class StatsListener:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(100):
                with contextlib.suppress(protocol.ProtocolError):
                    msg = protocol.decode(self.sock.recv_multipart())
                    if isinstance(msg, protocol.Stats):
                        self.last = msg.figures

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not within {timeout_s} s")


def viewer_fps(lines: collections.deque[dict[str, Any]], t0: float, t1: float) -> float | None:
    frames = sum(len(r.get("counters", [])) for r in list(lines)
                 if r.get("from") == "alice" and t0 <= r.get("_at", 0) < t1)
    return round(frames / (t1 - t0), 2) if frames else None


def run_scenario(index: int, scenario: dict[str, Any], room_url: str, work: Path) -> dict[str, Any]:
    room_id = 5000 + index
    width, height = scenario["size"]
    participants = spawn([*SIPBRIDGE, "room", "participant", "--room-url", room_url, "--room", str(room_id),
                          "--name", "alice", "--tone", "440", "--viewer", "viewer", "--probe",
                          "--size", f"{width}x{height}", "--fps", str(FPS)], stdout=subprocess.PIPE)
    viewer_lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=10000)

    def read_viewer() -> None:
        assert participants.stdout is not None
        for raw in participants.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(raw)
                if record.get("participant") == "viewer" and record.get("event") == "received":
                    record["_at"] = time.monotonic()
                    viewer_lines.append(record)

    threading.Thread(target=read_viewer, daemon=True).start()
    out = f"ipc://{work}/bot{index}.sock"
    stats_ep = f"ipc://{work}/bot{index}.stats"
    inject_ep = f"ipc://{work}/inject{index}.sock"
    capture = Capture(out, "alice/video")
    stats = StatsListener(stats_ep)
    injector = Injector(inject_ep) if scenario["inject"] else None
    argv = [*SIPBRIDGE, "stage", "browser", "--name", "bench-browser", "--out", out, "--stats", stats_ep,
            "--mode", scenario["mode"], "--display-name", "bot", "--var", f"room_url={room_url}",
            "--var", f"room={room_id}"]
    if injector:
        argv += ["--in", inject_ep]
    bot = spawn(argv)
    try:
        wait_until(lambda: len(capture.arrivals) >= WARMUP_FRAMES, START_TIMEOUT_S, "first captured frames")
        time.sleep(1.0)
        cpu0, _, _ = tree_usage(bot.pid)
        py0 = cpu_seconds(bot.pid)
        t0 = time.monotonic()
        pss_samples = []
        while time.monotonic() - t0 < MEASURE_S:
            time.sleep(1.0)
            pss_samples.append(tree_usage(bot.pid)[1])
        t1 = time.monotonic()
        cpu1, _, nprocs = tree_usage(bot.pid)
        py1 = cpu_seconds(bot.pid)
        fps, latencies = capture.window(t0, t1)
        chrome_pss_kb = sum(pss_kb(p) for p in chromium_pids(bot.pid))
        driver_pss_kb = sum(pss_kb(p) for p in descendants(bot.pid) if command_name(p).startswith("node"))
        figures = stats.last
        base_fps = viewer_fps(viewer_lines, t0, t1)
        result = {
            "scenario": scenario["name"],
            "mode": scenario["mode"],
            "size": f"{width}x{height}",
            "nominal_fps": FPS,
            "capture_fps": round(fps, 2),
            "viewer_fps_baseline": base_fps,
            "capture_vs_viewer": round(fps / base_fps, 3) if base_fps else None,
            "capture_latency_ms_p50": pct(latencies, 50),
            "capture_latency_ms_p95": pct(latencies, 95),
            "inject_latency_ms_p50": _round(figures.get("inject_latency_ms_p50")) if injector else None,
            "inject_latency_ms_p95": _round(figures.get("inject_latency_ms_p95")) if injector else None,
            "cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
            "cpu_cores_stage_python": round((py1 - py0) / (t1 - t0), 3),
            "pss_mb": round(max(pss_samples) / 1024, 1),
            "chromium_pss_mb": round(chrome_pss_kb / 1024, 1),
            "playwright_driver_pss_mb": round(driver_pss_kb / 1024, 1),
            "stage_python_pss_mb": round(pss_kb(bot.pid) / 1024, 1),
            "processes": nprocs,
            "drops": figures.get("drops", {}),
            "codecs": sorted(capture.codecs),
        }
        return result
    finally:
        stop(bot)
        stop(participants)
        capture.close()
        stats.close()
        if injector:
            injector.close()


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("scenario", 26), ("capture_fps", 8), ("viewer_fps_baseline", 8), ("capture_vs_viewer", 7),
            ("capture_latency_ms_p50", 8), ("capture_latency_ms_p95", 8), ("inject_latency_ms_p50", 8),
            ("inject_latency_ms_p95", 8), ("cpu_cores", 7), ("pss_mb", 7)]
    heads = ["scenario", "fps", "viewer", "ratio", "cap p50", "cap p95", "inj p50", "inj p95", "cores", "PSS MB"]
    print("  ".join(h.ljust(w) for h, (_, w) in zip(heads, cols, strict=True)))
    for row in rows:
        cells = []
        for key, width in cols:
            value = row.get(key)
            cells.append(("-" if value is None else str(value)).ljust(width))
        print("  ".join(cells))


def main() -> int:
    if os.geteuid() != 0:
        print("bench_browser needs root (network namespace)", file=sys.stderr)
        return 2
    ns = NetNs()
    ns.create()
    rows: list[dict[str, Any]] = []
    try:
        with ns.entered(), tempfile.TemporaryDirectory(prefix="sb-bench-browser-") as tmp:
            work = Path(tmp)
            janus = JanusServer(JanusConfig(), work_dir=work / "janus")
            janus.start()
            room = spawn([*SIPBRIDGE, "room", "serve", "--port", str(ROOM_HTTP_PORT), "--janus", janus.ws_url])
            room_url = f"http://127.0.0.1:{ROOM_HTTP_PORT}/"
            try:
                wait_until(lambda: _healthy(room_url + "healthz"), 10, "room server")
                for index, scenario in enumerate(SCENARIOS):
                    print(f"running: {scenario['name']} ...", flush=True)
                    try:
                        rows.append(run_scenario(index, scenario, room_url, work))
                    except TimeoutError as exc:
                        rows.append({"scenario": scenario["name"], "error": str(exc)})
            finally:
                stop(room)
                janus.stop()
    finally:
        ns.delete()
    calls = [r for r in rows if "inject" in r.get("scenario", "") and "cpu_cores" in r]
    summary = {
        "target_cores": TARGET_CORES,
        "target_pss_mb": TARGET_PSS_MB,
        "selenium_gateway_cores": SELENIUM_GATEWAY_CORES,
        "bridged_call_cores_vs_target": [round(r["cpu_cores"] / TARGET_CORES, 3) for r in calls],
        "bridged_call_pss_vs_target": [round(r["pss_mb"] / TARGET_PSS_MB, 3) for r in calls],
        "bridged_call_cores_vs_selenium_gateway": [round(r["cpu_cores"] / SELENIUM_GATEWAY_CORES, 3) for r in calls],
    }
    print_table([r for r in rows if "error" not in r])
    for r in rows:
        if "error" in r:
            print(f"{r['scenario']}: FAILED {r['error']}")
    print(json.dumps(summary))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
                                   "measure_s": MEASURE_S, "scenarios": rows, "summary": summary}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
