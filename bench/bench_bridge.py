"""Benchmark of a whole bridged call: one participant at 640x480@30 in the local room, the bot, the bridge stages,
Janus and a sipp echo peer, in a private namespace (``sipbridge.testing.LocalCall``).

Measured:
* bridge-added latency, one way, from the stages' own per-hop figures (``capture_time_ns`` is stamped where media
  enters the bridge and every stage reports now - capture at its input):
  room -> SIP: the browser stage's receive of a room frame to its arrival at the janus stage (browser, decoder,
  layout transformer, H.264 encoder); SIP -> room: the janus stage's RTP receive to the browser stage's input
  (decoder, transformer); p50 and p95 over the last 512 frames of each stream. Not included: aiortc/Janus on the
  way out (a few ms, see bench_sip) and the page writing the frame into its camera (see bench_browser).
  Baseline in the same run: the codec work alone, in one process, on the same kind of frame (VP8/H.264 decode,
  scale, H.264 encode for room -> SIP; H.264 decode for SIP -> room): the ratio is what process hops, queueing and
  pacing add on top of the unavoidable work.
* lip sync, measured from outside the bridge with the synthetic participant's marks (``--sync-marks``: every 2 s a
  bright band and a 2.5 kHz burst at the same instant): the audio - video offset at the SIP peer (from the capture:
  first RTP packet of the first marked picture, burst onset in the PCMU at its packet's arrival), and in the room as a
  receive-only viewer gets the bot's camera and microphone (the sipp echo, SIP -> room). Baseline in the same run: the
  same viewer's offset for the participant received directly from the room (what the room and the browsers cost
  without the bridge). Bridge-added = offset after the bridge - the direct offset (medians over the marks of the
  window), room -> SIP and for the whole loop back into the room. Timing at the viewer depends on its jitter buffers
  (NetEQ adapts to load), so a loaded machine spreads the room figures widely: read p10..p90 with the median.
* CPU (cores) and PSS (MB) of the whole call: every bridge stage (supervisord's process tree, Chromium included)
  and Janus, over the measurement window; and how many such calls a 2-core machine would hold by CPU.
* apart from the call, what simulating the room cost over the same window: the participant and the viewer
  (``--generators aiortc``, the default: browserless, a pre-encoded loop and an aiortc viewer, so the 2 cores go
  to the bridge; ``--generators chromium``: a Chromium page each, as before).

* with ``--busy N``: N busy-looping processes (batch work at nice 0) beside the call during the window; with
  ``--nice N`` the call runs at that niceness (``[processes] nice``; the harness's Janus, the bridge's too, as well):
  the difference is what process priority buys the media path on a host shared with batch work.

Run as root: ``python bench/bench_bridge.py [--seconds 18] [--busy 2 --nice -10]``; prints a table and writes
bench/results/bridge.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipbridge.testing.lipsync import lipsync_report
from sipbridge.testing.localcall import GENERATORS, CallOptions, LocalCall
from stages.browser.procs import chromium_roles, cpu_seconds, pss_kb, tree_usage
from stages.pattern import PatternGenerator

RESULTS = Path(__file__).resolve().parent / "results" / "bridge.json"
WIDTH, HEIGHT, FPS = 640, 480, 30
MEDIA_TIMEOUT_S = 90.0
MACHINE_CORES = 2
# Issue 10's targets for one call: bridge-added latency per direction, the whole call's CPU and memory, and the
# CPU when H.264 passes through both ways (no video decoded or encoded anywhere in the bridge).
TARGET_P50_MS, TARGET_P95_MS = 15.0, 40.0
TARGET_CORES, TARGET_PSS_MB = 0.5, 600.0
TARGET_PASSTHROUGH_CORES = 0.35
FLOOR_FRAMES = 90


def codec_floor_ms() -> dict[str, float]:
    """Per-frame cost of the codec work each direction must do, measured in-process (the baseline)."""
    import av
    import numpy as np

    pattern = PatternGenerator(WIDTH, HEIGHT)

    def encoder(name: str) -> Any:
        enc: Any = av.CodecContext.create(name, "w")
        enc.width, enc.height, enc.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        enc.time_base, enc.framerate = Fraction(1, FPS), Fraction(FPS, 1)
        enc.bit_rate, enc.max_b_frames, enc.thread_count = 800_000, 0, 1
        if name == "libx264":
            enc.options = {"preset": "veryfast", "tune": "zerolatency"}
        else:
            enc.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        return enc

    def frames() -> list[Any]:
        out = []
        for i in range(FLOOR_FRAMES):
            buf = pattern.frame(i)
            frame = av.VideoFrame.from_numpy_buffer(buf.reshape(HEIGHT * 3 // 2, WIDTH), "yuv420p")
            frame.pts = i
            out.append(frame)
        return out

    # What the room sends (H.264 here, as the bench's participant publishes) and what SIP sends (H.264).
    room_packets = [bytes(p) for f in frames() for p in encoder("libx264").encode(f)]
    dec: Any = av.CodecContext.create("h264", "r")
    enc = encoder("libx264")
    to_sip = []
    for data in room_packets:
        start = time.perf_counter()
        for picture in dec.decode(av.Packet(data)):
            scaled = picture.reformat(width=WIDTH, height=HEIGHT, format="yuv420p")
            np.asarray(scaled.planes[0])  # the compose copy
            scaled.pts = None
            list(enc.encode(scaled))
        to_sip.append((time.perf_counter() - start) * 1000)
    dec2: Any = av.CodecContext.create("h264", "r")
    to_room = []
    for data in room_packets:
        start = time.perf_counter()
        for picture in dec2.decode(av.Packet(data)):
            picture.to_ndarray()
        to_room.append((time.perf_counter() - start) * 1000)
    return {"room_to_sip_ms": statistics.median(to_sip), "sip_to_room_ms": statistics.median(to_room)}


def usage(call: LocalCall) -> tuple[float, int, int]:
    """(CPU seconds, PSS kB, processes) of every bridge stage and of Janus."""
    assert call.supervisor is not None and call.supervisor.proc is not None and call.janus.proc is not None
    cpu, pss, count = tree_usage(call.supervisor.proc.pid, include_root=False)
    janus_pid = call.janus.proc.pid
    return cpu + cpu_seconds(janus_pid), pss + pss_kb(janus_pid), count + 1


def per_program(call: LocalCall) -> dict[str, tuple[float, int]]:
    """(CPU seconds, PSS kB) of each supervised program's process tree, and of Janus."""
    out = {}
    for name, info in (call.supervisor.states() if call.supervisor else {}).items():
        if info.get("pid"):
            cpu, pss, _ = tree_usage(int(info["pid"]))
            out[name] = (cpu, pss)
    if call.janus.proc is not None:
        out["janus-server"] = (cpu_seconds(call.janus.proc.pid), pss_kb(call.janus.proc.pid))
    return out


def bot_chromium(call: LocalCall) -> dict[str, tuple[float, int, int]]:
    """The bot's Chromium processes by role (browser, renderer, gpu-process, utilities, zygote)."""
    states = call.supervisor.states() if call.supervisor else {}
    info = states.get("chromium") or states.get("browser", {})  # its keeper's, when the bridge keeps it apart
    return chromium_roles(int(info["pid"])) if info.get("pid") else {}


def chromium_split(before: dict[str, tuple[float, int, int]], after: dict[str, tuple[float, int, int]],
                   elapsed: float) -> dict[str, Any]:
    """Issue 12's question, one browser per call or a browser context per call in one shared browser: the page's
    renderer is per call either way; the rest (browser process, GPU process, utilities, zygotes) is what sharing
    would save each further call."""
    roles = {role: {"cores": round((cpu - before.get(role, (0.0, 0, 0))[0]) / elapsed, 3),
                    "pss_mb": round(pss / 1024, 1), "processes": count}
             for role, (cpu, pss, count) in sorted(after.items())}
    shared = [r for r in roles if r != "renderer"]
    return {"roles": roles,
            "shareable_cores": round(sum(roles[r]["cores"] for r in shared), 3),
            "shareable_pss_mb": round(sum(roles[r]["pss_mb"] for r in shared), 1),
            "per_call_cores": round(sum(r["cores"] for r in roles.values()), 3),
            "per_call_pss_mb": round(sum(r["pss_mb"] for r in roles.values()), 1)}


def generator_usage(call: LocalCall) -> tuple[float, int]:
    """(CPU seconds, PSS kB) of the simulated room's participants and viewer: not part of the bridge."""
    cpu, pss = 0.0, 0
    for name, proc in call.procs.items():
        if name.startswith("participants") and proc.poll() is None:
            c, p, _ = tree_usage(proc.pid)
            cpu, pss = cpu + c, pss + p
    return cpu, pss


def busy_loops(count: int) -> list[subprocess.Popen[bytes]]:
    """Batch work beside the call: CPU-bound processes at the default niceness (issue 10: the call must not lose
    to them)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


# `--fuse`: which of the call's Python stages share one process ([processes] fuse, stages/fused.py).
FUSE_GROUPS: dict[str, list[list[str]]] = {
    "none": [],
    # The room -> SIP transcode chain in one process; the janus stage and the SIP decoder apart.
    "to-sip": [["room-decoder", "room-transformer", "sip-encoder"]],
    # Every Python media stage of the call in one process: one chain from the room's decoder through the janus
    # stage to the SIP side's decoder (the browser stage stays apart: it owns Playwright and its own group).
    "all": [["room-decoder", "room-transformer", "sip-encoder", "janus", "sip-decoder"]],
}


def processes_toml(nice: int, fuse: str) -> str:
    """The bridge file's [processes] table for a niceness and a fuse choice ("" when both are the defaults)."""
    lines = []
    if nice:
        lines.append(f"nice = {nice}")
    if FUSE_GROUPS[fuse]:
        lines.append(f"fuse = {json.dumps(FUSE_GROUPS[fuse])}")
    return "[processes]\n" + "\n".join(lines) + "\n" if lines else ""


def run(seconds: float, generators: str = "aiortc", busy: int = 0, nice: int = 0, page_video: str = "shown",
        fuse: str = "none", passthrough: bool = False, inject: str = "auto",
        room_passthrough: bool = False) -> dict[str, Any]:
    from sipbridge.status import StatusCollector

    options = CallOptions(
        participants=[("alice", 440.0)],
        room_codec="h264",
        participant_size=f"{WIDTH}x{HEIGHT}",
        participant_fps=FPS,
        fps=FPS,
        layout="single",
        max_tiles=1,
        split=None,
        layout_ids=["alice/video"],
        viewer=True,  # receives alice directly (the lip-sync baseline) and the bot
        sync_marks=True,
        generators=generators,
        bridge_extra=processes_toml(nice, fuse),
        page_video=page_video,
        passthrough=passthrough,
        room_passthrough=room_passthrough,
        inject=inject,
    )
    floor = codec_floor_ms()
    run_dir = Path(tempfile.mkdtemp(prefix="sb-bench-bridge-"))
    with LocalCall(run_dir, options) as call:
        collector = StatusCollector(call.run_dir)
        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        while time.monotonic() < deadline and len(call.room_received(1)) < FPS:
            collector.poll(0.5)
        if len(call.room_received(1)) < FPS:
            raise click.ClickException(f"no media through the bridge; see {call.run_dir}/logs")
        if nice and call.janus is not None and call.janus.proc is not None:
            # The harness's Janus is the bridge's Janus too (SIP plugin): it gets the call's niceness.
            os.setpriority(os.PRIO_PROCESS, call.janus.proc.pid, nice)
        batch = busy_loops(busy)
        call.stack.callback(lambda: [(b.kill(), b.wait()) for b in batch])
        cpu0, _, _ = usage(call)
        programs0 = per_program(call)
        chromium0 = bot_chromium(call)
        generators0, _ = generator_usage(call)
        window_start_ms = time.time() * 1000
        t0 = time.monotonic()
        pss_samples = []
        while time.monotonic() - t0 < seconds:
            collector.poll(1.0)
            pss_samples.append(usage(call)[1])
        cpu1, _, processes = usage(call)
        elapsed = time.monotonic() - t0
        programs1 = per_program(call)
        chromium1 = bot_chromium(call)
        generators1, generators_pss = generator_usage(call)
        collector.poll(1.2)
        figures = collector.figures
        echoed = len(call.room_received(1))
        collector.close()
    # After the call: the capture is complete once tshark has stopped.
    lipsync = lipsync_report(call, since_ms=window_start_ms)
    for where in ("sip", "room_direct", "room_via_bridge"):  # per mark, in order: offset, video and audio latency
        pairs = lipsync[where].pop("pairs", [])
        lipsync[where]["per_mark_ms"] = [
            [round(p["offset_ms"], 1), round(p["video_latency_ms"], 1), round(p["audio_latency_ms"], 1)] for p in pairs
        ]
    janus_in = figures.get("janus", {}).get("streams", {})
    browser_in = figures.get("browser", {}).get("streams", {})

    def lat(streams: dict[str, Any], sid: str) -> dict[str, Any]:
        s = streams.get(sid, {})
        return {"frames": s.get("frames_in"), "p50_ms": s.get("latency_ms_p50"), "p95_ms": s.get("latency_ms_p95")}

    result: dict[str, Any] = {
        "config": {
            "size": f"{WIDTH}x{HEIGHT}",
            "fps": FPS,
            "room": "H.264 + Opus, 1 participant",
            "sip": "H.264 + PCMU, sipp echo",
            "seconds": round(elapsed, 1),
            "busy_loops": busy,
            "nice": nice,
            "page_video": page_video,
            "fuse": FUSE_GROUPS[fuse],
            "passthrough": passthrough,
            "room_passthrough": room_passthrough,
            "inject": inject,
        },
        "latency": {
            "room_to_sip_video": lat(janus_in, "room-video"),
            "room_to_sip_audio": lat(janus_in, "room-audio"),
            "sip_to_room_video": lat(browser_in, "sip-video"),
            "sip_to_room_audio": lat(browser_in, "sip-audio"),
        },
        "baseline_codec_floor_ms": floor,
        "usage": {
            "cores": round((cpu1 - cpu0) / elapsed, 3),
            "pss_mb": round(max(pss_samples) / 1024, 1),
            "processes": processes,
            "calls_per_2_cores_by_cpu": round(MACHINE_CORES / max((cpu1 - cpu0) / elapsed, 1e-6), 2),
        },
        "per_program": {
            name: {
                "cores": round((cpu - programs0.get(name, (0.0, 0))[0]) / elapsed, 3),
                "pss_mb": round(pss / 1024, 1),
            }
            for name, (cpu, pss) in sorted(programs1.items())
        },
        "bot_chromium": chromium_split(chromium0, chromium1, elapsed),
        "room_frames_echoed": echoed,
        "generators": {"engine": generators, "cores": round((generators1 - generators0) / elapsed, 3),
                       "pss_mb": round(generators_pss / 1024, 1)},
        "targets": {"p50_ms": TARGET_P50_MS, "p95_ms": TARGET_P95_MS, "pss_mb": TARGET_PSS_MB,
                    "cores": TARGET_PASSTHROUGH_CORES if passthrough and room_passthrough else TARGET_CORES},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1m_at_end": os.getloadavg()[0],
        },
    }
    result["lipsync"] = lipsync
    # Every stage's view of every stream (now - capture at its input): where along the chain the latency builds up.
    result["hops_ms"] = {
        stage: {sid: [s.get("latency_ms_p50"), s.get("latency_ms_p95")]
                for sid, s in sorted(f.get("streams", {}).items()) if s.get("latency_ms_p50") is not None}
        for stage, f in sorted(figures.items()) if isinstance(f, dict)
    }  # fmt: skip
    # From the stages' own figures: both kinds of media carry their capture time, so the difference of their delays
    # through the bridge stages is the audio/video offset those stages add (positive: audio late).
    lat_ = result["latency"]
    result["av_offset_ms"] = {
        direction: (round(lat_[f"{direction}_audio"]["p50_ms"] - lat_[f"{direction}_video"]["p50_ms"], 1)
                    if lat_[f"{direction}_audio"]["p50_ms"] is not None and lat_[f"{direction}_video"]["p50_ms"]
                    is not None else None)
        for direction in ("room_to_sip", "sip_to_room")
    }  # fmt: skip
    for key, base in (("room_to_sip_video", "room_to_sip_ms"), ("sip_to_room_video", "sip_to_room_ms")):
        p50 = result["latency"][key]["p50_ms"]
        result["latency"][key]["ratio_to_floor"] = round(p50 / floor[base], 1) if p50 and floor[base] else None
    return result


def print_table(r: dict[str, Any]) -> None:
    click.echo(
        f"bridged call, {r['config']['size']}@{r['config']['fps']}, {r['config']['room']} <-> "
        f"{r['config']['sip']}, {r['config']['seconds']} s (load avg {r['machine']['loadavg_1m_at_end']:.1f}; "
        f"{r['config']['busy_loops']} busy loops beside it; the call at nice {r['config']['nice']}"
        + ("; video to SIP passed through" if r["config"].get("passthrough") else "")
        + ("; video to the room passed through" if r["config"].get("room_passthrough") else "")
        + ("; SIP video decoded in the bridge" if r["config"].get("inject") == "raw" else "") + ")"
    )
    click.echo(f"{'measure':<28}{'p50 ms':>10}{'p95 ms':>10}{'frames':>9}{'floor ms':>10}{'ratio':>8}  target")
    floors = r["baseline_codec_floor_ms"]
    for key, lat in r["latency"].items():
        floor = (
            floors["room_to_sip_ms"]
            if key.startswith("room_to_sip_video")
            else (floors["sip_to_room_ms"] if key.startswith("sip_to_room_video") else None)
        )

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.1f}"

        click.echo(
            f"{key:<28}{f(lat['p50_ms']):>10}{f(lat['p95_ms']):>10}{lat['frames'] or 0:>9}{f(floor):>10}"
            f"{f(lat.get('ratio_to_floor')):>8}  p50<{TARGET_P50_MS:.0f} p95<{TARGET_P95_MS:.0f}"
        )
    click.echo("per program: " + ", ".join(f"{n} {v['cores']:.2f} core/{v['pss_mb']:.0f} MB"
                                           for n, v in r["per_program"].items()))  # fmt: skip
    c = r["bot_chromium"]
    click.echo(f"bot Chromium {c['per_call_cores']:.2f} core/{c['per_call_pss_mb']:.0f} MB, of which a browser "
               f"shared by calls (a context per call) would share {c['shareable_cores']:.2f} core/"
               f"{c['shareable_pss_mb']:.0f} MB: "
               + ", ".join(f"{n} {v['cores']:.2f}/{v['pss_mb']:.0f}" for n, v in c["roles"].items()))
    click.echo("at each stage's input, p50/p95 ms since capture: " + "; ".join(
        f"{stage} " + ", ".join(f"{sid} {v[0]:.1f}/{v[1]:.1f}" for sid, v in streams.items())
        for stage, streams in r["hops_ms"].items() if streams))
    click.echo(f"audio/video offset added by the bridge stages (their p50 audio - p50 video): {r['av_offset_ms']}")
    print_lipsync(r["lipsync"])
    g = r["generators"]
    click.echo(f"room simulation, not counted in the call: {g['engine']} participant and viewer {g['cores']:.2f} "
               f"cores, {g['pss_mb']:.0f} MB PSS")
    if g["engine"] == "aiortc":
        click.echo("  (the aiortc viewer times marks after aiortc's jitter buffers, ~3 audio packets and ~1 video "
                   "frame, with no A/V sync: its room offsets compare with each other (the loop), not with the "
                   "capture's; --generators chromium for a browser's view)")
    u = r["usage"]
    click.echo(
        f"whole call: {u['cores']:.2f} cores, {u['pss_mb']:.0f} MB PSS over {u['processes']} processes "
        f"(targets <= {r['targets']['cores']} core, <= {TARGET_PSS_MB:.0f} MB); "
        f"~{u['calls_per_2_cores_by_cpu']:.1f} calls per 2 cores by CPU"
    )


def print_lipsync(ls: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:+.1f}"

    click.echo("lip sync from the marks, audio - video in ms (+: audio late), over the window:")
    click.echo(f"  {'where':<40}{'p50':>8}{'p10':>8}{'p90':>8}{'min':>8}{'max':>8}{'last 5':>8}{'marks':>7}"
               f"{'video lat':>11}{'audio lat':>11}")  # fmt: skip
    for key, label in (
        ("sip", "at the SIP peer (capture)"),
        ("room_direct", f"room, {ls['direct_source']} directly (baseline)"),
        ("room_via_bridge", "room, the bot (SIP echo)"),
    ):
        x = ls[key]
        click.echo(
            f"  {label:<40}{f(x.get('offset_ms_p50')):>8}{f(x.get('offset_ms_p10')):>8}{f(x.get('offset_ms_p90')):>8}"
            f"{f(x.get('offset_ms_min')):>8}{f(x.get('offset_ms_max')):>8}{f(x.get('offset_ms_p50_last5')):>8}"
            f"{x.get('marks', 0):>7}"
            f"{f(x.get('video_latency_ms_p50')):>11}{f(x.get('audio_latency_ms_p50')):>11}"
        )
    added = ls["bridge_added_ms"]
    src = ls["source"]
    click.echo(
        f"  bridge-added offset (median after the bridge - median direct): room -> SIP {f(added['room_to_sip'])}, "
        f"loop back into the room {f(added['loop'])} (SIP -> room alone {f(added['sip_to_room'])}); "
        f"over the last 5 marks: room -> SIP {f(ls['bridge_added_ms_last5']['room_to_sip'])}, "
        f"loop {f(ls['bridge_added_ms_last5']['loop'])}"
    )
    click.echo(
        f"  source alignment (participant page, {src.get('marks', 0)} marks): audio write - video write "
        f"p50 {f(src.get('audio_minus_video_ms_p50'))} ms, max |{src.get('audio_minus_video_ms_max', '-')}| ms; "
        "latency columns: p50 from the mark's nominal instant; last 5: median of the last 5 marks (the viewer's "
        "A/V sync converges during the call)"
    )


@click.command()
@click.option("--seconds", type=float, default=18.0, show_default=True, help="Measurement window.")
@click.option("--generators", type=click.Choice(GENERATORS), default="aiortc", show_default=True,
              help="Who simulates the room: browserless aiortc participants or a Chromium page each.")
@click.option("--busy", type=click.IntRange(0, 16), default=0, show_default=True,
              help="Busy-looping processes (batch work at nice 0) beside the call during the window.")
@click.option("--nice", type=click.IntRange(-20, 19), default=0, show_default=True,
              help="The call's niceness ([processes] nice; the harness's Janus too).")
@click.option("--page-video", type=click.Choice(["shown", "hidden"]), default="shown", show_default=True,
              help="The bot page's video elements ([room] page_video).")
@click.option("--fuse", type=click.Choice(sorted(FUSE_GROUPS)), default="none", show_default=True,
              help="Python stages that share one process ([processes] fuse): to-sip = the room -> SIP transcode "
                   "chain, all = every media stage from the room's decoder to the SIP side's.")
@click.option("--passthrough/--no-passthrough", default=False, show_default=True,
              help="[media.to_sip] passthrough: the participant's H.264 goes to SIP undecoded.")
@click.option("--room-passthrough/--no-room-passthrough", default=False, show_default=True,
              help="[media.to_room] passthrough: the SIP side's H.264 goes into the room as it came (the bot's "
                   "Chromium encodes a placeholder instead of the SIP side's pictures).")
@click.option("--inject", type=click.Choice(["auto", "raw", "encoded"]), default="auto", show_default=True,
              help="[room] inject: the SIP side's video decoded by the SIP decoder (raw) or in the bot's page "
                   "(encoded; auto: encoded here).")
def main(seconds: float, generators: str, busy: int, nice: int, page_video: str, fuse: str, passthrough: bool,
         room_passthrough: bool, inject: str) -> None:
    """Bridge-added latency both ways and the whole call's CPU and PSS at 640x480@30."""
    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespace)")
    result = run(seconds, generators, busy, nice, page_video, fuse, passthrough, inject, room_passthrough)
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
