"""Benchmark: the decode -> transform -> encode chain (VP8 640x480 in, H.264 out), three ways in one run.

1. separate processes over ZeroMQ ipc:// (decoder -> transformer -> encoder, video policy "all",
   plus the two-process variant decoder -> encoder), and the same three stages fused into one process
   (`sipbridge stage fused`: one event loop, each stage with its own codec thread and sockets);
2. the same stage code in one process (Decoder.process -> identity -> Encoder.process in a loop);
3. the ``ffmpeg`` command line doing the same transcode with the same encoder settings.

The input is pre-encoded first (a moving test pattern, VP8 via libvpx) and written to a WebM file
for ffmpeg; the packets demuxed from that same file feed variants 1 and 2. Throughput is frames over
wall time from the first packet in to the last packet out. Prints a table with the ratios against the
issue's targets and writes bench/results/chain.json. Runnable as ``python bench/bench_chain.py`` and
through ``sipbridge bench chain`` (``main()``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import zmq

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

import protocol  # noqa: E402
from protocol import Codec, EncodedPacket, EndOfStream, Heartbeat, MediaHeader, Message  # noqa: E402
from stages.base import StageOptions, control_endpoint  # noqa: E402
from stages.decoder import Decoder  # noqa: E402
from stages.encoder import Encoder, EncoderSettings  # noqa: E402

RESULTS = PROJECT_DIR / "bench" / "results" / "chain.json"
WIDTH_PX, HEIGHT_PX = 640, 480
FPS = 30
DEFAULT_FRAMES = 300
DEFAULT_BITRATE_KBPS = 1000
KEYFRAME_INTERVAL_S = 2.0
PRESET = "veryfast"
# Targets from issue 2 (on 2 cores).
TARGET_VS_ONE_PROCESS = 1.3
TARGET_VS_FFMPEG = 0.9
STARTUP_TIMEOUT_S = 20.0
RECEIVE_TIMEOUT_MS = 60_000
PROGRAM = "from sipbridge.cli import main; main()"


# ----- input ------------------------------------------------------------------------------------------
def moving_pattern(index: int) -> np.ndarray:
    """Gradient plus a moving bright square: enough motion and detail to make both encoders work."""
    y = ((np.arange(WIDTH_PX)[None, :] // 2 + np.arange(HEIGHT_PX)[:, None] + 3 * index) % 220 + 16).astype(np.uint8)
    x0 = (index * 7) % (WIDTH_PX - 96)
    y0 = (index * 5) % (HEIGHT_PX - 96)
    y[y0 : y0 + 96, x0 : x0 + 96] = 235
    noise = np.random.default_rng(index).integers(0, 12, (HEIGHT_PX, WIDTH_PX), dtype=np.uint8)
    y = y + noise  # texture, so the encoders cannot skip every block
    u = np.full((HEIGHT_PX // 2, WIDTH_PX // 2), 110 + index % 30, np.uint8)
    v = np.full((HEIGHT_PX // 2, WIDTH_PX // 2), 140, np.uint8)
    return np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(HEIGHT_PX * 3 // 2, WIDTH_PX)


def make_input(path: Path, frames: int, bitrate_kbps: int) -> list[EncodedPacket]:
    """Encode the pattern to VP8 in WebM, then demux it back into wire packets."""
    with av.open(str(path), "w") as container:
        stream: Any = container.add_stream("libvpx", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH_PX, HEIGHT_PX, "yuv420p"
        stream.bit_rate = bitrate_kbps * 1000
        stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        stream.gop_size = round(KEYFRAME_INTERVAL_S * FPS)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(moving_pattern(i), format="yuv420p")
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    packets: list[EncodedPacket] = []
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        for packet in container.demux(video):
            if packet.size == 0 or packet.pts is None:
                continue
            header = MediaHeader("cam", len(packets), packet.pts, Fraction(video.time_base or Fraction(1, 1000)), 0)
            packets.append(EncodedPacket(header, Codec.VP8, packet.is_keyframe, bytes(packet)))
    return packets


def encoder_settings(bitrate_kbps: int, threads: int) -> EncoderSettings:
    return EncoderSettings(video_codec=Codec.H264, fps=FPS, bitrate_kbps=bitrate_kbps,
                           keyframe_interval_s=KEYFRAME_INTERVAL_S, preset=PRESET, threads=threads)


def stamped(packet: EncodedPacket) -> EncodedPacket:
    h = packet.header
    return EncodedPacket(MediaHeader(h.stream_id, h.seq, h.pts, h.time_base, time.time_ns()), packet.codec,
                         packet.keyframe, packet.data)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----- 2. one process -----------------------------------------------------------------------------------
def run_one_process(packets: list[EncodedPacket], bitrate_kbps: int, threads: int) -> dict[str, Any]:
    from stages.transformer import TransformerStage

    decoder = Decoder(StageOptions("bench-decoder"))
    transformer = TransformerStage(StageOptions("bench-transformer"), [])  # identity
    encoder = Encoder(StageOptions("bench-encoder"), encoder_settings(bitrate_kbps, threads))
    out: list[Message] = []
    cpu_started = time.process_time()
    started = time.perf_counter()
    for packet in packets:
        for frame in decoder.process(packet):
            for same in transformer.process(frame):
                out.extend(encoder.process(same))
    for frame in decoder.flush(""):
        out.extend(encoder.process(frame))
    out.extend(encoder.flush(""))
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    count = sum(isinstance(m, EncodedPacket) for m in out)
    return {"frames": count, "seconds": elapsed, "fps": count / elapsed, "cpu_ms_per_frame": 1000 * cpu_s / count}


# ----- 1. separate processes --------------------------------------------------------------------------------
def run_processes(packets: list[EncodedPacket], bitrate_kbps: int, threads: int, with_transformer: bool,
                  work: Path, *, fused: bool = False) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="chain-", dir=work))
    env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(run_dir)}
    ctx: zmq.Context[Any] = zmq.Context()
    feed = f"ipc://{run_dir}/feed.sock"
    push = ctx.socket(zmq.PUSH)
    push.bind(feed)
    feed_control = ctx.socket(zmq.PULL)  # keyframe requests from the decoder (none expected)
    feed_control.bind(control_endpoint(feed))
    chain: list[tuple[str, list[str]]] = [("decoder", [])]
    if with_transformer:
        chain.append(("transformer", []))
    chain.append(("encoder", ["--video-codec", "h264", "--fps", str(FPS), "--bitrate-kbps", str(bitrate_kbps),
                              "--keyframe-interval-s", str(KEYFRAME_INTERVAL_S), "--preset", PRESET,
                              "--threads", str(threads)]))
    procs: list[subprocess.Popen[bytes]] = []
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    upstream = feed
    fused_stages: list[str] = []
    for kind, extra in chain:
        output, stats = f"ipc://{run_dir}/{kind}.sock", f"ipc://{run_dir}/{kind}.stats"
        stage_args = [kind, "--in", upstream, "--out", output, "--stats", stats, "--video-policy", "all",
                      "--log-level", "WARNING", *extra]
        if fused:
            fused_stages += ["--stage", shlex.join(stage_args)]
        else:
            procs.append(subprocess.Popen([sys.executable, "-c", PROGRAM, "stage", *stage_args], env=env,
                                          cwd=PROJECT_DIR))
        sub.connect(stats)
        upstream = output
    if fused:
        # The same stages on one event loop (`sipbridge stage fused`): each keeps its codec thread and its sockets.
        procs.append(subprocess.Popen([sys.executable, "-c", PROGRAM, "stage", "fused", *fused_stages], env=env,
                                      cwd=PROJECT_DIR))
    heartbeats_wanted = len(chain) if not fused else 1  # a fused process's stages share one pid
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, RECEIVE_TIMEOUT_MS)
    pull.connect(upstream)
    try:
        # Start the clock only once every stage is up (heartbeats), as ffmpeg's start-up is tiny by comparison.
        alive: set[int] = set()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(alive) < heartbeats_wanted:
            dead = [p.args for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"chain stages did not start (exited: {dead})")
            if not sub.poll(1000):
                continue
            msg = protocol.decode(sub.recv_multipart())
            if isinstance(msg, Heartbeat):
                alive.add(msg.pid)

        def feed_all() -> None:
            for packet in packets:
                push.send_multipart(protocol.encode(stamped(packet)))
            push.send_multipart(protocol.encode(EndOfStream("")))

        cpu_started = [process_cpu_s(p.pid) for p in procs]
        started = time.perf_counter()
        sender = threading.Thread(target=feed_all, daemon=True)
        sender.start()
        count = 0
        latencies_ms = []
        while True:
            msg = protocol.decode(pull.recv_multipart())
            if isinstance(msg, EndOfStream) and not msg.stream_id:
                break
            if isinstance(msg, EncodedPacket):
                count += 1
                latencies_ms.append((time.time_ns() - msg.header.capture_time_ns) / 1e6)
        elapsed = time.perf_counter() - started
        # The stages wait for this consumer to leave, so they are still alive to be measured.
        cpu_by_process = [process_cpu_s(p.pid) - before for p, before in zip(procs, cpu_started, strict=True)]
        sender.join()
        pull.close()  # the encoder waits for its consumer to leave before exiting
        codes = [p.wait(30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sock in (push, feed_control, sub, pull):
            sock.close(linger=0)
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)
    names = ["+".join(kind for kind, _ in chain)] if fused else [kind for kind, _ in chain]
    return {
        "processes": names,
        "frames": count,
        "seconds": elapsed,
        "fps": count / elapsed,
        "cpu_ms_per_frame": 1000 * sum(cpu_by_process) / max(count, 1),
        "cpu_ms_per_frame_by_stage": {name: round(1000 * cpu / max(count, 1), 2)
                                      for name, cpu in zip(names, cpu_by_process, strict=True)},
        "latency_ms_p50": statistics.median(latencies_ms) if latencies_ms else None,
        "exit_codes": codes,
    }


# ----- 3. ffmpeg ----------------------------------------------------------------------------------------
def ffmpeg_command(webm: Path, bitrate_kbps: int, threads: int) -> list[str]:
    rate = f"{bitrate_kbps}k"
    return [
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats",
        "-c:v", "vp8", "-i", str(webm),
        "-c:v", "libx264", "-preset", PRESET, "-tune", "zerolatency", "-profile:v", "baseline",
        "-b:v", rate, "-maxrate", rate, "-bufsize", rate, "-g", str(round(KEYFRAME_INTERVAL_S * FPS)), "-bf", "0",
        "-forced-idr", "1", "-threads", str(threads),
        "-f", "null", "-",
    ]


def run_ffmpeg(webm: Path, frames: int, bitrate_kbps: int, threads: int) -> dict[str, Any]:
    cmd = ffmpeg_command(webm, bitrate_kbps, threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"frames": frames, "seconds": elapsed, "fps": frames / elapsed, "cpu_ms_per_frame": 1000 * cpu_s / frames,
            "command": " ".join(cmd)}


# ----- main ---------------------------------------------------------------------------------------------
def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    top = max(runs, key=lambda r: r["fps"])
    return {**top, "fps_all_runs": [round(r["fps"], 1) for r in runs]}


LABELS = {
    "processes_3": "decoder | transformer | encoder (3 processes, ZeroMQ ipc)",
    "processes_2": "decoder | encoder (2 processes, ZeroMQ ipc)",
    "fused_3": "decoder | transformer | encoder fused (1 process, ZeroMQ ipc)",
    "one_process": "same stage code in one process",
    "ffmpeg": "ffmpeg command line",
}
TARGETS = {
    "processes_3_vs_one_process": TARGET_VS_ONE_PROCESS,
    "processes_3_vs_ffmpeg": TARGET_VS_FFMPEG,
    "processes_2_vs_one_process": TARGET_VS_ONE_PROCESS,
    "processes_2_vs_ffmpeg": TARGET_VS_FFMPEG,
    "fused_3_vs_one_process": TARGET_VS_ONE_PROCESS,
    "fused_3_vs_ffmpeg": TARGET_VS_FFMPEG,
}


def measure(packets: list[EncodedPacket], webm: Path, work: Path, bitrate_kbps: int, threads: int,
            repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LABELS}
    for _ in range(repeat):
        # Interleaved so background load on the machine hits every variant alike.
        runs["processes_3"].append(run_processes(packets, bitrate_kbps, threads, True, work))
        runs["processes_2"].append(run_processes(packets, bitrate_kbps, threads, False, work))
        runs["fused_3"].append(run_processes(packets, bitrate_kbps, threads, True, work, fused=True))
        runs["one_process"].append(run_one_process(packets, bitrate_kbps, threads))
        runs["ffmpeg"].append(run_ffmpeg(webm, len(packets), bitrate_kbps, threads))
    figures = {name: best(r) for name, r in runs.items()}
    ratios = {}
    for multi in ("processes_3", "processes_2", "fused_3"):
        for base in ("one_process", "ffmpeg"):
            ratios[f"{multi}_vs_{base}"] = figures[multi]["fps"] / figures[base]["fps"]
    return {"x264_threads": threads, "results": figures, "ratios": ratios}


def print_table(measured: dict[str, Any], frames: int, bitrate_kbps: int, repeat: int) -> None:
    threads = measured["x264_threads"]
    print(f"\nVP8 {WIDTH_PX}x{HEIGHT_PX} -> H.264 (libx264 {PRESET} zerolatency baseline, {bitrate_kbps} kbit/s, "
          f"keyint {KEYFRAME_INTERVAL_S:g} s), x264 threads={threads or 'auto'}, {frames} frames, best of {repeat}, "
          f"{os.cpu_count()} cores")
    print(f"{'variant':<58} {'fps':>7} {'seconds':>8} {'cpu ms/frame':>13}  fps of each run")
    for name, label in LABELS.items():
        f = measured["results"][name]
        print(f"{label:<58} {f['fps']:>7.1f} {f['seconds']:>8.2f} {f['cpu_ms_per_frame']:>13.2f}  {f['fps_all_runs']}")
        if "cpu_ms_per_frame_by_stage" in f:
            print(f"{'':<4}cpu ms/frame by stage: {f['cpu_ms_per_frame_by_stage']}")
    for name, value in measured["ratios"].items():
        verdict = "met" if value >= TARGETS[name] else "NOT met"
        print(f"  {name:<30} {value:5.2f}x  (target >= {TARGETS[name]}x: {verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each variant; the fastest counts.")
    parser.add_argument("--bitrate-kbps", type=int, default=DEFAULT_BITRATE_KBPS)
    parser.add_argument("--threads", type=int, action="append", default=None,
                        help="x264 threads, same in every variant (0 = automatic); repeat for several "
                             "configurations [0 and 1].")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("ffmpeg not found on PATH", file=sys.stderr)
        return 2
    configurations = []
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        work = Path(tmp)
        webm = work / "in.webm"
        packets = make_input(webm, args.frames, args.bitrate_kbps)
        print(f"input: {len(packets)} VP8 packets {WIDTH_PX}x{HEIGHT_PX}, {webm.stat().st_size / 1e3:.0f} kB")
        for threads in args.threads or [0, 1]:
            measured = measure(packets, webm, work, args.bitrate_kbps, threads, args.repeat)
            print_table(measured, len(packets), args.bitrate_kbps, args.repeat)
            configurations.append(measured)
    load = os.getloadavg()
    print(f"\nload average during the run: {load[0]:.1f} (other work on the machine skews wall-clock figures; "
          "cpu ms/frame is steadier)")
    report = {
        "benchmark": "chain",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "av": av.__version__,
                    "platform": platform.platform(), "load_average_1min": load[0]},
        "settings": {"width": WIDTH_PX, "height": HEIGHT_PX, "fps": FPS, "frames": len(packets),
                     "bitrate_kbps": args.bitrate_kbps, "keyframe_interval_s": KEYFRAME_INTERVAL_S, "preset": PRESET,
                     "repeat": args.repeat},
        "configurations": configurations,
        "targets": {"vs_one_process": TARGET_VS_ONE_PROCESS, "vs_ffmpeg": TARGET_VS_FFMPEG},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
