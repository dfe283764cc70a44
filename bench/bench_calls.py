"""Benchmark: how many bridged calls one machine holds, measured rather than extrapolated.

Runs 1, then N simultaneous bridged calls (each a ``sipbridge.testing.LocalCall`` in its own network namespace:
its own Janus, room with one participant at 640x480@30 H.264 + Opus, bot, bridge stages and sipp echo peer)
and measures, over the same window for every call:
* the bridge-added latency each way (the stages' own per-hop figures, as in bench_bridge.py): room -> SIP at
  the janus stage's input, SIP -> room at the browser stage's input, p50 and p95;
* the echoed picture coming back into the room: frames per second the room's viewer reads;
* the machine's CPU (all processes, from /proc/stat) in cores, and apart from it what simulating the rooms cost
  (each call's participant and viewer: browserless aiortc ones by default, ``--generators chromium`` for a
  Chromium page each), so the machine's CPU less the generators' is what the bridged calls used.
The baseline is the single call of the same run: the ratios say what sharing the machine costs each call.

Run as root: ``python bench/bench_calls.py [--calls 2] [--seconds 15]``; prints a table and writes
bench/results/calls.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipbridge.status import StatusCollector
from sipbridge.testing.localcall import GENERATORS, CallOptions, LocalCall
from stages.browser.procs import tree_usage

RESULTS = Path(__file__).resolve().parent / "results" / "calls.json"
WIDTH, HEIGHT, FPS = 640, 480, 30
MEDIA_TIMEOUT_S = 120.0
TARGET_P50_MS, TARGET_P95_MS = 15.0, 40.0  # issue 10's bridge-added latency targets, per direction
# Echoed frames per second below this share of the participant's rate mean the call is not keeping up.
KEEPING_UP_SHARE = 0.9


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CallRunner(threading.Thread):
    """One bridged call on its own thread: a network namespace is entered per thread."""

    def __init__(self, index: int, ready: threading.Event, measure: threading.Event, done: threading.Event,
                 generators: str = "aiortc", passthrough: bool = False, page_video: str = "shown") -> None:
        super().__init__(name=f"call-{index}", daemon=True)
        self.index = index
        self.generators = generators
        self.passthrough, self.page_video = passthrough, page_video
        self.ready, self.measure, self.done = ready, measure, done
        self.window_s = 0.0
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        options = CallOptions(
            participants=[("alice", 440.0)], room_codec="h264", participant_size=f"{WIDTH}x{HEIGHT}",
            participant_fps=FPS, fps=FPS, layout="single", max_tiles=1, split=None, layout_ids=["alice/video"],
            generators=self.generators, passthrough=self.passthrough, room_passthrough=self.passthrough,
            page_video=self.page_video,
        )
        try:
            run_dir = Path(tempfile.mkdtemp(prefix=f"sb-bench-call{self.index}-"))
            with LocalCall(run_dir, options) as call:
                collector = StatusCollector(call.run_dir)
                try:
                    deadline = time.monotonic() + MEDIA_TIMEOUT_S
                    while time.monotonic() < deadline and len(call.room_received(1)) < FPS:
                        collector.poll(0.5)
                    if len(call.room_received(1)) < FPS:
                        raise RuntimeError(f"call {self.index}: no media through the bridge; see {run_dir}/logs")
                    self.ready.set()
                    self.measure.wait()
                    echoed0, t0 = len(call.room_received(1)), time.monotonic()
                    generators0 = generator_cpu_s(call)
                    while not self.done.is_set():
                        collector.poll(0.5)
                    generators1 = generator_cpu_s(call)
                    collector.poll(1.2)
                    elapsed = time.monotonic() - t0
                    echoed = len(call.room_received(1)) - echoed0
                    self.result = summarise(collector.figures, echoed / elapsed)
                    self.result["generators_cores"] = round((generators1 - generators0) / elapsed, 3)
                finally:
                    collector.close()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            self.ready.set()


def generator_cpu_s(call: LocalCall) -> float:
    """CPU seconds of the call's simulated room (its participant and viewer processes): not the bridge's."""
    return sum(tree_usage(p.pid)[0] for n, p in call.procs.items() if n.startswith("participants") and p.poll() is None)


def summarise(figures: dict[str, Any], echoed_fps: float) -> dict[str, Any]:
    janus_in = figures.get("janus", {}).get("streams", {})
    browser_in = figures.get("browser", {}).get("streams", {})

    def lat(streams: dict[str, Any], sid: str) -> list[float | None]:
        s = streams.get(sid, {})
        return [s.get("latency_ms_p50"), s.get("latency_ms_p95")]

    return {
        "room_to_sip_video": lat(janus_in, "room-video"),
        "room_to_sip_audio": lat(janus_in, "room-audio"),
        "sip_to_room_video": lat(browser_in, "sip-video"),
        "sip_to_room_audio": lat(browser_in, "sip-audio"),
        "echoed_fps": round(echoed_fps, 1),
        "drops": {stage: fig.get("drops", {}) for stage, fig in figures.items() if fig.get("drops")},
    }


def run_calls(count: int, seconds: float, generators: str = "aiortc", passthrough: bool = False,
              page_video: str = "shown") -> dict[str, Any]:
    measure, done = threading.Event(), threading.Event()
    runners = []
    # One after the other: each set-up takes the machine for a few seconds, and LocalCall sets process-wide
    # environment variables while it starts its bridge.
    for index in range(count):
        ready = threading.Event()
        runner = CallRunner(index + 1, ready, measure, done, generators, passthrough, page_video)
        runner.start()
        ready.wait(MEDIA_TIMEOUT_S + 60)
        runners.append(runner)
        if runner.error is not None:
            done.set()
            measure.set()
            raise click.ClickException(str(runner.error))
    busy0, total0 = machine_busy_jiffies()
    measure.set()
    time.sleep(seconds)
    busy1, total1 = machine_busy_jiffies()
    done.set()
    for runner in runners:
        runner.join(MEDIA_TIMEOUT_S)
    errors = [r.error for r in runners if r.error is not None]
    if errors:
        raise click.ClickException(str(errors[0]))
    cores = (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)
    generator_cores = sum(r.result.get("generators_cores", 0.0) for r in runners)
    return {"calls": count, "machine_cores_busy": round(cores, 2), "generators": generators,
            "passthrough": passthrough, "page_video": page_video,
            "generators_cores": round(generator_cores, 3), "per_call": [r.result for r in runners]}


def worst(runs: dict[str, Any], key: str, which: int) -> float:
    values = [c[key][which] for c in runs["per_call"] if c[key][which] is not None]
    return max(values) if values else float("nan")


@click.command()
@click.option("--calls", type=click.IntRange(2, 8), default=2, show_default=True, help="Simultaneous calls.")
@click.option("--seconds", type=float, default=15.0, show_default=True, help="Measurement window.")
@click.option("--generators", type=click.Choice(GENERATORS), default="aiortc", show_default=True,
              help="Who simulates each room: browserless aiortc participants or a Chromium page each.")
@click.option("--passthrough/--no-passthrough", default=False, show_default=True,
              help="[media.to_sip] and [media.to_room] passthrough: H.264 both ways as it came.")
@click.option("--page-video", type=click.Choice(["shown", "hidden"]), default="shown",
              show_default=True, help="The bot page's video elements ([room] page_video).")
def main(calls: int, seconds: float, generators: str, passthrough: bool, page_video: str) -> None:
    if os.geteuid() != 0:
        raise click.ClickException("run as root (each call gets its own network namespace)")
    single = run_calls(1, seconds, generators, passthrough, page_video)
    several = run_calls(calls, seconds, generators, passthrough, page_video)
    load = os.getloadavg()[0]
    print(f"\n{calls} simultaneous bridged calls vs 1, each 640x480@30 H.264+Opus <-> H.264+PCMU sipp echo, "
          f"{seconds:.0f} s windows (load avg {load:.1f}, {os.cpu_count()} cores"
          f"{'; H.264 passed through both ways' if passthrough else ''}; page video {page_video})")
    print(f"{'measure (worst call)':28s} {'1 call p50/p95 ms':>18s} {f'{calls} calls p50/p95 ms':>20s} "
          f"{'p50 ratio':>9s}  target")
    for key in ("room_to_sip_video", "room_to_sip_audio", "sip_to_room_video", "sip_to_room_audio"):
        a50, a95 = worst(single, key, 0), worst(single, key, 1)
        b50, b95 = worst(several, key, 0), worst(several, key, 1)
        met = "met" if b50 < TARGET_P50_MS and b95 < TARGET_P95_MS else "NOT met"
        print(f"{key:28s} {a50:8.1f} / {a95:6.1f}   {b50:9.1f} / {b95:6.1f}   {b50 / a50:8.2f}  "
              f"p50<{TARGET_P50_MS:.0f} p95<{TARGET_P95_MS:.0f} {met}")
    echoed = [c["echoed_fps"] for c in several["per_call"]]
    keeping_up = all(fps >= KEEPING_UP_SHARE * FPS for fps in echoed)
    print(f"echoed picture back in the room: 1 call {single['per_call'][0]['echoed_fps']} fps; "
          f"{calls} calls {echoed} fps ({'every call keeps up' if keeping_up else 'NOT keeping up'})")
    print(f"machine CPU: 1 call {single['machine_cores_busy']} cores, {calls} calls "
          f"{several['machine_cores_busy']} cores of {os.cpu_count()}; of which the simulated rooms ({generators} "
          f"participant and viewer per call) {single['generators_cores']} / {several['generators_cores']} cores")
    result = {"single": single, "several": several, "keeping_up": keeping_up,
              "targets": {"p50_ms": TARGET_P50_MS, "p95_ms": TARGET_P95_MS, "echoed_share": KEEPING_UP_SHARE},
              "machine": {"cores": os.cpu_count(), "load_avg": round(load, 2), "python": platform.python_version()}}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
