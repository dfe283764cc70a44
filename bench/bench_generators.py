"""What the simulated room itself costs: a browserless (aiortc, pre-encoded loop) publisher and viewer against the
Chromium ones, in the same run, on the same Janus VideoRoom.

In a private namespace (root): Janus and the local room server, then two phases of ``--seconds`` each,
one publisher at a time so neither receives the other:

* phase chromium: ``sipbridge room participant`` (a Chromium page publishing the synthetic pattern + tone);
* phase aiortc: ``sipbridge room participant --engine aiortc`` (the same pattern and tone, encoded once).

In both phases a Chromium viewer (``sipbridge room viewer --engine chromium``, the probe page) and an aiortc viewer
(``sipbridge room viewer``) receive the publisher and read its counters. Measured per process tree over the window
(after a warm-up): CPU (cores) and PSS (MB) from /proc, and the frames per second each viewer read, so a cheaper
generator is only counted as one if the viewers see it at full rate. The loop's one-off encoding happens before the
window (and is cached under ~/.cache/sipbridge/room-loops).

Run as root: ``python bench/bench_generators.py [--seconds 15]``; prints a table and writes
bench/results/generators.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.browser.procs import tree_usage

RESULTS = Path(__file__).resolve().parent / "results" / "generators.json"
SIPBRIDGE = [sys.executable, "-m", "sipbridge"]
ROOM_HTTP_PORT = 8480
ROOM_ID = 5101
START_TIMEOUT_S = 90.0  # the aiortc publisher encodes its loop first (once per machine, then cached)
WARMUP_S = 4.0
STOP_TIMEOUT_S = 10.0
MACHINE_CORES = os.cpu_count() or 1


class Program:
    """A child process (own session) whose stdout JSON lines are kept."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError), self.lock:
                    self.records.append({**json.loads(line), "t": time.monotonic()})

    def matching(self, **want: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.records if all(r.get(k) == v for k, v in want.items())]

    def counters_from(self, source: str, since: float, until: float) -> int:
        return sum(len(r.get("counters", [])) for r in self.matching(event="received", **{"from": source})
                   if since <= r["t"] < until)

    def usage(self) -> tuple[float, int]:
        cpu, pss, _ = tree_usage(self.proc.pid)
        return cpu, pss

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def phase(engine: str, viewers: dict[str, Program], log_dir: Path, room_url: str, media: list[str],
          seconds: float, fps: int) -> dict[str, Any]:
    name = f"{engine}-pub"
    publisher = Program(name, [*SIPBRIDGE, "room", "participant", "--engine", engine, "--room-url", room_url,
                               "--room", str(ROOM_ID), "--name", name, "--tone", "440", *media], log_dir)
    try:
        wait_for(lambda: all(v.counters_from(name, 0, time.monotonic() + 1) >= fps for v in viewers.values())
                 or publisher.proc.poll() is not None, START_TIMEOUT_S, f"both viewers reading {name}")
        if publisher.proc.poll() is not None:
            raise RuntimeError(f"{name} exited; see {log_dir}/{name}.log")
        time.sleep(WARMUP_S)
        programs = {"publisher": publisher, **viewers}
        before = {key: p.usage() for key, p in programs.items()}
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
        after = {key: p.usage() for key, p in programs.items()}
        wall = end - start
        out: dict[str, Any] = {"seconds": round(wall, 2)}
        for key in programs:
            out[key] = {"cores": round((after[key][0] - before[key][0]) / wall, 3),
                        "pss_mb": round(after[key][1] / 1024, 1)}
        for key, viewer in viewers.items():
            out[key]["fps_read"] = round(viewer.counters_from(name, start, end) / wall, 1)
        return out
    finally:
        publisher.stop()
        time.sleep(1.0)  # the viewers see the publisher leave before the next one joins


def run(seconds: float, size: str, fps: int, codec: str) -> dict[str, Any]:
    from sipbridge import netns as netns_mod
    from sipbridge.janus_server import JanusConfig, JanusServer

    if os.geteuid() != 0:
        raise click.ClickException("needs root (it creates a network namespace)")
    work = Path(tempfile.mkdtemp(prefix="sb-bench-generators-"))
    netns_mod.cleanup_stale()
    ns = netns_mod.NetNs().create()
    programs: list[Program] = []
    try:
        with ns.entered():
            janus = JanusServer(JanusConfig(), work_dir=work / "janus").start()
            try:
                room_url = f"http://127.0.0.1:{ROOM_HTTP_PORT}/"
                server = Program("room-server", [*SIPBRIDGE, "room", "serve", "--port", str(ROOM_HTTP_PORT),
                                                 "--janus", janus.ws_url], work)
                programs.append(server)
                wait_for(lambda: healthy(room_url + "healthz"), 20, "room server")
                common = ["--room-url", room_url, "--room", str(ROOM_ID), "--codec", codec]
                viewers = {
                    "chromium_viewer": Program("chromium-viewer", [*SIPBRIDGE, "room", "viewer", "--engine",
                                                                   "chromium", "--name", "chromium-viewer", *common],
                                               work),
                    "aiortc_viewer": Program("aiortc-viewer", [*SIPBRIDGE, "room", "viewer", "--engine", "aiortc",
                                                               "--name", "aiortc-viewer", *common], work),
                }
                programs += viewers.values()
                wait_for(lambda: all(v.matching(event="joined") for v in viewers.values()), 60, "viewers joining")
                media = [*common[4:], "--size", size, "--fps", str(fps)]
                load_before = os.getloadavg()
                phases = {engine: phase(engine, viewers, work, room_url, media, seconds, fps)
                          for engine in ("chromium", "aiortc")}
                load_after = os.getloadavg()
            finally:
                for program in reversed(programs):
                    program.stop()
                janus.stop()
    finally:
        ns.delete()
    return {"phases": phases, "size": size, "fps": fps, "codec": codec,
            "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
            "machine": {"cores": MACHINE_CORES, "python": platform.python_version()}, "work_dir": str(work)}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


@click.command()
@click.option("--seconds", type=float, default=15.0, show_default=True, help="Measurement window of each phase.")
@click.option("--size", default="640x480", show_default=True)
@click.option("--fps", type=int, default=30, show_default=True)
@click.option("--codec", type=click.Choice(["h264", "vp8"]), default="h264", show_default=True)
def main(seconds: float, size: str, fps: int, codec: str) -> None:
    result = run(seconds, size, fps, codec)
    chromium, cheap = result["phases"]["chromium"], result["phases"]["aiortc"]
    print(f"\nroom load generators, one publisher {size}@{fps} {codec.upper()} + Opus, {seconds:.0f} s windows "
          f"(load avg {result['load_avg_before'][0]:.1f} -> {result['load_avg_after'][0]:.1f}, "
          f"{MACHINE_CORES} cores)")
    print(f"{'generator':34s} {'cores':>7s} {'PSS MB':>8s}   fps read by chromium / aiortc viewer")
    for label, fig in (("publisher, Chromium page", chromium["publisher"]),
                       ("publisher, aiortc pre-encoded loop", cheap["publisher"])):
        source = chromium if fig is chromium["publisher"] else cheap
        print(f"{label:34s} {fig['cores']:7.3f} {fig['pss_mb']:8.1f}   "
              f"{source['chromium_viewer']['fps_read']:5.1f} / {source['aiortc_viewer']['fps_read']:5.1f}")
    for label, key in (("viewer, Chromium probe page", "chromium_viewer"), ("viewer, aiortc", "aiortc_viewer")):
        print(f"{label:34s} {cheap[key]['cores']:7.3f} {cheap[key]['pss_mb']:8.1f}   (receiving the aiortc "
              f"publisher; {chromium[key]['cores']:.3f} cores receiving the Chromium one)")
    publishers = ratio(cheap["publisher"]["cores"], chromium["publisher"]["cores"])
    viewers = ratio(cheap["aiortc_viewer"]["cores"], cheap["chromium_viewer"]["cores"])
    print(f"aiortc publisher: {publishers} the CPU of a Chromium publisher; aiortc viewer: {viewers} that of a "
          f"Chromium viewer")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
