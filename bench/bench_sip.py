"""Benchmark of the SIP leg: the Janus stage process, real Janus, sipp echo peers, in a private namespace.

Measured (640x480 @ 30 fps H.264 + PCMU, loopback):
* call set-up time: the ``call`` request to the first RTP packet of each kind arriving at the SIP peer
  (read from a tshark capture at the peer's ports, not from our logs), with the stage's own milestones
  (SIP 200 OK accepted, WebRTC media up) as a breakdown;
* echo round trip per video frame: an encoded frame handed to the stage -> aiortc -> Janus -> sipp echo ->
  Janus -> aiortc -> stage -> decoded with the counter read back; median and p95. Baseline in the same run:
  the same call with aiortc's stock receive jitter buffer (``--jitter-buffer aiortc``); and as a floor,
  an RTP-sized UDP echo straight through sipp plus an in-process H.264 decode of the same frame;
* CPU (cores) and PSS (MB) of the Janus stage process per call, and of Janus itself;
* simultaneous echo calls: N stage processes, each with its own sipp echo peer, replaying pre-encoded
  640x480@30 H.264 + PCMU; frames lost per call (counters read back from the decoded pictures).
  Target: at least 4 calls without loss on 2 cores.

Run as root: ``python -m bench.bench_sip`` (``--calls 4 --seconds 10``). Prints a table and writes
bench/results/sip.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import click

from protocol import Codec, EncodedPacket
from sipbridge.janus_server import JanusConfig, JanusServer
from sipbridge.netns import NetNs
from tests.sipfix import (
    Capture,
    MediaCollector,
    MediaFeeder,
    Sipp,
    StageProcess,
    stop_stage_and_collector,
)

RESULTS = Path(__file__).resolve().parent / "results" / "sip.json"
WIDTH, HEIGHT, FPS = 640, 480, 30
SIPP_PORT = 5090
SIPP_MEDIA_PORT = 6000
PORT_STRIDE = 10  # call i uses SIP port 5090 + 10 i and media ports 6000 + 10 i ...
SETUP_CALLS = 3
UDP_ECHO_PROBES = 200
RTP_PACKET_BYTES = 1200
TARGET_SETUP_MS = 300.0
TARGET_RTT_MEDIAN_MS = 40.0
TARGET_CALLS = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASE_TIMEOUT_S = 60.0  # beyond the measured seconds: set-up and tear-down of one phase


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def pss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


class CpuMeter:
    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start_cpu = sum(cpu_seconds(p) for p in pids)
        self.start = time.monotonic()

    def cores(self) -> float:
        return (sum(cpu_seconds(p) for p in self.pids) - self.start_cpu) / max(1e-9, time.monotonic() - self.start)


def first_rtp_epoch(capture: Capture, port: int) -> float | None:
    out = subprocess.run(["tshark", "-r", str(capture.path), "-d", f"udp.port=={port},rtp", "-Y",
                          f"rtp && udp.dstport=={port}", "-T", "fields", "-e", "frame.time_epoch"],
                         capture_output=True, text=True, check=False).stdout.split()
    return float(out[0]) if out else None


class ReplayFeeder(MediaFeeder):
    """A feeder that replays frames encoded once up front (many calls must not cost many encoders)."""

    def __init__(self, endpoint: str, video_frames: list[list[EncodedPacket]],
                 audio_frames: list[list[EncodedPacket]]) -> None:
        super().__init__(endpoint, video=None, audio=None, width=WIDTH, height=HEIGHT, fps=FPS)
        self.video, self.audio = Codec.H264, Codec.PCMU
        self._video_frames, self._audio_frames = video_frames, audio_frames

    def video_packets(self, index: int) -> list[EncodedPacket]:
        now = self.sent_ns[index] = time.time_ns()
        return [fresh(p, now) for p in self._video_frames[index % len(self._video_frames)]]

    def audio_packets(self, index: int) -> list[EncodedPacket]:
        return [fresh(p, time.time_ns()) for p in self._audio_frames[index % len(self._audio_frames)]]


def fresh(packet: EncodedPacket, now_ns: int) -> EncodedPacket:
    """A replayed packet stamped as captured now (the stages' latency figures stay meaningful)."""
    return dataclasses.replace(packet, header=dataclasses.replace(packet.header, capture_time_ns=now_ns))


def pre_encode(seconds: float) -> tuple[list[list[EncodedPacket]], list[list[EncodedPacket]]]:
    encoder = MediaFeeder(f"ipc://{tempfile.mkdtemp(prefix='sb-bench-')}/pre.sock", width=WIDTH, height=HEIGHT,
                          fps=FPS)
    try:
        count = int(seconds * FPS) + FPS
        video = [encoder.video_packets(i) for i in range(count)]
        audio = [encoder.audio_packets(i) for i in range(int(seconds * 50) + 50)]
    finally:
        encoder.close()
    return video, audio


def decode_baseline_ms(frames: int = 60) -> float:
    """Median in-process H.264 decode of one 640x480 frame (the part of the round trip in our test reader)."""
    video, _ = pre_encode(frames / FPS)
    dec: Any = av.CodecContext.create("h264", "r")
    dec.thread_count = 1  # as in the test reader: no frame threading delay
    times = []
    for packets in video[:frames]:
        for msg in packets:
            t0 = time.perf_counter()
            dec.decode(av.Packet(bytes(msg.data)))
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def udp_echo_baseline_ms(work: Path) -> float:
    """RTT of RTP-sized UDP packets echoed by sipp -rtp_echo directly (no Janus, no WebRTC)."""
    port, media = SIPP_PORT + 500, SIPP_MEDIA_PORT + 500
    with Sipp("uas_echo", work / "udp_baseline", port, media, extra=["-rtp_echo"]):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        payload = bytes([0x80, 96]) + bytes(RTP_PACKET_BYTES - 2)
        rtts = []
        for _ in range(UDP_ECHO_PROBES):
            t0 = time.perf_counter()
            sock.sendto(payload, ("127.0.0.1", media + 2))
            try:
                sock.recv(2048)
            except TimeoutError:
                continue
            rtts.append((time.perf_counter() - t0) * 1000)
        sock.close()
    return statistics.median(rtts) if rtts else float("nan")


async def single_call(work: Path, janus: JanusServer, seconds: float, setup_calls: int = SETUP_CALLS,
                      stage_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Set-up times over a few calls, then one longer call for the round trip and the stage's cost."""
    work.mkdir(parents=True, exist_ok=True)
    feed = f"ipc://{work}/feed.sock"
    feeder = MediaFeeder(feed, width=WIDTH, height=HEIGHT, fps=FPS)
    stage = StageProcess(work / "stage", feed, janus.ws_url, args=stage_args).start()
    collector = MediaCollector(stage.output)
    collect = asyncio.create_task(collector.run())
    setups: list[dict[str, float | None]] = []
    result: dict[str, Any] = {}
    try:
        await stage.wait_registered()
        assert stage.proc is not None and janus.proc is not None
        idle_pss = pss_mb(stage.proc.pid)
        feeding = feeder.run_in_thread(3600)
        peer = f"sip:echo@127.0.0.1:{SIPP_PORT}"
        for i in range(setup_calls + 1):
            measured_call = i == setup_calls
            # Start-up helpers block: keep them off the loop that reads the echoed frames.
            capture = await asyncio.to_thread(
                Capture(work / f"setup{i}.pcapng", [SIPP_MEDIA_PORT, SIPP_MEDIA_PORT + 2]).start)
            try:
                sipp = await asyncio.to_thread(
                    Sipp("uas_echo", work / f"sipp{i}", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start)
                try:
                    requested = time.time()
                    reply = await stage.command({"cmd": "call", "uri": peer, "wait": True})
                    if not reply["ok"]:
                        raise RuntimeError(f"call failed: {reply}")
                    if measured_call:
                        collector.counters.clear()
                        collector.counter_ns.clear()
                        meter = CpuMeter([stage.proc.pid])
                        janus_meter = CpuMeter([janus.proc.pid])
                        await asyncio.sleep(seconds)
                        result["stage_cores"] = meter.cores()
                        result["janus_cores"] = janus_meter.cores()
                        result["stage_pss_mb"] = pss_mb(stage.proc.pid)
                        result["janus_pss_mb"] = pss_mb(janus.proc.pid)
                    else:
                        await asyncio.sleep(1.5)
                    status = await stage.command({"cmd": "status"})
                    await stage.command({"cmd": "hangup"})
                    await asyncio.to_thread(sipp.wait, 10)
                finally:
                    sipp.stop()
            finally:
                await asyncio.to_thread(capture.stop)
            call = status["call"]
            first_audio = first_rtp_epoch(capture, SIPP_MEDIA_PORT)
            first_video = first_rtp_epoch(capture, SIPP_MEDIA_PORT + 2)
            setups.append({
                "accepted_ms": (call["accepted_ns"] / 1e9 - requested) * 1000 if call.get("accepted_ns") else None,
                "media_up_ms": (call["media_up_ns"] / 1e9 - requested) * 1000 if call.get("media_up_ns") else None,
                "first_audio_at_peer_ms": (first_audio - requested) * 1000 if first_audio else None,
                "first_video_at_peer_ms": (first_video - requested) * 1000 if first_video else None,
            })
            await asyncio.sleep(0.3)
        feeder.stopped = True
        await asyncio.to_thread(feeding.join)
        rtts = [(collector.counter_ns[c] - feeder.sent_ns[c]) / 1e6 for c in collector.counter_ns
                if c in feeder.sent_ns]
        result["idle_stage_pss_mb"] = idle_pss
        result["rtt_ms"] = rtts
        result["rtt_by_counter"] = sorted((c, (collector.counter_ns[c] - feeder.sent_ns[c]) / 1e6)
                                          for c in collector.counter_ns if c in feeder.sent_ns)
        result["frames_back"] = len(set(collector.counters))
    finally:
        await stop_stage_and_collector(stage, collector, collect)
        feeder.close()
    result["setups"] = setups
    return result


async def simultaneous_calls(work: Path, janus: JanusServer, calls: int, seconds: float,
                             media: tuple[list[list[EncodedPacket]], list[list[EncodedPacket]]]) -> dict[str, Any]:
    rigs = []
    sipps = []
    work.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(calls):
            feed = f"ipc://{work}/feed{i}.sock"
            feeder = ReplayFeeder(feed, *media)
            # Lossless output edge: a slow reader in this (busy) benchmark process must not count as SIP loss.
            stage = StageProcess(work / f"stage{i}", feed, janus.ws_url, name=f"janus{i}",
                                 args=["--video-policy", "all"]).start()
            collector = MediaCollector(stage.output)
            rigs.append((feeder, stage, collector, asyncio.create_task(collector.run())))
            sipps.append(Sipp("uas_echo", work / f"sipp{i}", SIPP_PORT + PORT_STRIDE * i,
                              SIPP_MEDIA_PORT + PORT_STRIDE * i, extra=["-rtp_echo"]).start())
        for _, stage, _, _ in rigs:
            await stage.wait_registered()
        replies = await asyncio.gather(*(
            stage.command({"cmd": "call", "uri": f"sip:echo@127.0.0.1:{SIPP_PORT + PORT_STRIDE * i}", "wait": True})
            for i, (_, stage, _, _) in enumerate(rigs)))
        if not all(r["ok"] for r in replies):
            raise RuntimeError(f"a call failed: {replies}")
        assert janus.proc is not None
        pids = [stage.proc.pid for _, stage, _, _ in rigs if stage.proc is not None]
        feeding = [feeder.run_in_thread(seconds) for feeder, _, _, _ in rigs]
        stage_meter, janus_meter = CpuMeter(pids), CpuMeter([janus.proc.pid])
        for thread in feeding:
            await asyncio.to_thread(thread.join)
        stage_cores, janus_cores = stage_meter.cores(), janus_meter.cores()
        await asyncio.sleep(0.5)  # the last frames are on their way back
        statuses = [await stage.command({"cmd": "status"}) for _, stage, _, _ in rigs]
        per_call = []
        for (feeder, _, collector, _), status in zip(rigs, statuses, strict=True):
            got = sorted(set(collector.counters))
            # From the first keyframe the peer could decode to the last frame sent a round trip ago.
            last_expected = feeder.frames_sent - 1 - FPS // 10
            window = [c for c in got if c <= last_expected]
            expected = last_expected - window[0] + 1 if window else 0
            per_call.append({"frames_back": len(window), "expected": expected,
                             "lost": expected - len(window), "unreadable": collector.unreadable,
                             "decode_errors": collector.decode_errors, "stage_drops": status["drops"]})
        for _, stage, _, _ in rigs:
            await stage.command({"cmd": "hangup"})
        for sipp in sipps:
            sipp.wait(10)
        return {"calls": calls, "per_call": per_call, "lost_total": sum(c["lost"] for c in per_call),
                "stage_cores_total": stage_cores, "janus_cores": janus_cores,
                "stage_pss_mb_total": sum(pss_mb(p) for p in pids)}
    finally:
        for sipp in sipps:
            sipp.stop()
        for feeder, stage, collector, collect in rigs:
            await stop_stage_and_collector(stage, collector, collect)
            feeder.close()


async def run_all(work: Path, janus: JanusServer, calls: int, seconds: float) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    udp_ms = await udp_echo_baseline_ms(work)
    decode_ms = decode_baseline_ms()
    single = await asyncio.wait_for(single_call(work / "single", janus, seconds),
                                    (SETUP_CALLS + 1) * PHASE_TIMEOUT_S + seconds)
    # Baseline for the round trip: the same call with aiortc's stock receive jitter buffer.
    stock = await asyncio.wait_for(single_call(work / "stock", janus, seconds, setup_calls=0,
                                               stage_args=("--jitter-buffer", "aiortc")),
                                   PHASE_TIMEOUT_S + seconds)
    media = pre_encode(seconds)
    ladder = sorted({1, calls} | ({2} if calls > 2 else set()))
    concurrent = []
    for n in ladder:
        concurrent.append(await asyncio.wait_for(simultaneous_calls(work / f"n{n}", janus, n, seconds, media),
                                                 PHASE_TIMEOUT_S + seconds))
    return {"load_start": load_start, "udp_echo_ms": udp_ms, "decode_ms": decode_ms, "single": single,
            "stock_rtt_ms": stock["rtt_ms"],
            "concurrent": concurrent}


def summarise(raw: dict[str, Any], calls: int, seconds: float) -> dict[str, Any]:
    single = raw["single"]
    rtts = single.pop("rtt_ms")
    setups = single["setups"][:SETUP_CALLS]

    def med(key: str) -> float | None:
        values = [s[key] for s in setups if s[key] is not None]
        return statistics.median(values) if values else None

    single.pop("rtt_by_counter", None)
    baseline = raw["udp_echo_ms"] + raw["decode_ms"]
    rtt50 = percentile(rtts, 0.5)
    stock50 = percentile(raw["stock_rtt_ms"], 0.5)
    best = max((c for c in raw["concurrent"] if c["lost_total"] == 0), key=lambda c: c["calls"], default=None)
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    # Other work on the machine skews every figure: keep the load next to them.
                    "load_average_start": raw["load_start"], "load_average_end": os.getloadavg()[0]},
        "settings": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "video": "H.264", "audio": "PCMU",
                     "seconds": seconds, "setup_calls": SETUP_CALLS},
        "setup_ms": {"accepted": med("accepted_ms"), "media_up": med("media_up_ms"),
                     "first_audio_at_peer": med("first_audio_at_peer_ms"),
                     "first_video_at_peer": med("first_video_at_peer_ms"), "target": TARGET_SETUP_MS,
                     "calls": setups},
        "rtt_ms": {"median": rtt50, "p95": percentile(rtts, 0.95), "frames": len(rtts),
                   "target_median": TARGET_RTT_MEDIAN_MS,
                   "floor_udp_echo_plus_decode": baseline,
                   "baseline_aiortc_jitter_buffer_median": stock50,
                   "baseline_aiortc_jitter_buffer_p95": percentile(raw["stock_rtt_ms"], 0.95),
                   "ratio_to_baseline": rtt50 / stock50 if rtt50 and stock50 else None},
        "per_call": {"stage_cores": single["stage_cores"], "stage_pss_mb": single["stage_pss_mb"],
                     "idle_stage_pss_mb": single["idle_stage_pss_mb"], "janus_cores": single["janus_cores"],
                     "janus_pss_mb": single["janus_pss_mb"]},
        "concurrent": raw["concurrent"],
        "max_calls_without_loss": best["calls"] if best else 0,
        "target_calls": TARGET_CALLS,
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(res: dict[str, Any]) -> None:
    s, r, p = res["setup_ms"], res["rtt_ms"], res["per_call"]
    rows = [
        ("call set-up: 200 OK accepted", f"{fmt(s['accepted'])} ms", ""),
        ("call set-up: WebRTC media up", f"{fmt(s['media_up'])} ms", ""),
        ("call set-up: first audio at SIP peer", f"{fmt(s['first_audio_at_peer'])} ms", f"target < {TARGET_SETUP_MS:.0f}"),  # noqa: E501
        ("call set-up: first video at SIP peer", f"{fmt(s['first_video_at_peer'])} ms", f"target < {TARGET_SETUP_MS:.0f}"),  # noqa: E501
        ("echo round trip per frame, median", f"{fmt(r['median'])} ms", f"target < {TARGET_RTT_MEDIAN_MS:.0f}"),
        ("echo round trip per frame, p95", f"{fmt(r['p95'])} ms", ""),
        ("baseline: same, aiortc's jitter buffer", f"{fmt(r['baseline_aiortc_jitter_buffer_median'])} ms",
         f"p95 {fmt(r['baseline_aiortc_jitter_buffer_p95'])} ms; ours/baseline {fmt(r['ratio_to_baseline'], 2)}"),
        ("floor: UDP echo via sipp + decode", f"{fmt(r['floor_udp_echo_plus_decode'], 2)} ms", ""),
        ("Janus stage per call: CPU", f"{fmt(p['stage_cores'], 2)} cores", ""),
        ("Janus stage per call: PSS", f"{fmt(p['stage_pss_mb'])} MB", f"idle {fmt(p['idle_stage_pss_mb'])} MB"),
        ("Janus server (1 call): CPU / PSS", f"{fmt(p['janus_cores'], 2)} cores", f"{fmt(p['janus_pss_mb'])} MB"),
    ]
    for c in res["concurrent"]:
        rows.append((f"{c['calls']} simultaneous echo calls: lost frames", str(c["lost_total"]),
                     f"stages {fmt(c['stage_cores_total'], 2)} cores, Janus {fmt(c['janus_cores'], 2)}"))
    rows.append(("max simultaneous calls without loss", str(res["max_calls_without_loss"]),
                 f"target >= {TARGET_CALLS}"))
    width = max(len(r[0]) for r in rows)
    m = res["machine"]
    print(f"\nSIP leg benchmark ({WIDTH}x{HEIGHT}@{FPS} H.264 + PCMU, loopback, {m['cpus']} CPUs, "
          f"load average {m['load_average_start']:.1f} -> {m['load_average_end']:.1f})")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>14}  {note}")


@click.command()
@click.option("--calls", type=click.IntRange(1, 16), default=TARGET_CALLS, show_default=True,
              help="Largest number of simultaneous echo calls to try.")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Length of each measured call.")
@click.option("--output", type=click.Path(dir_okay=False), default=str(RESULTS), show_default=True)
def main(calls: int, seconds: float, output: str) -> None:
    """Benchmark the SIP leg (needs root for the private network namespace)."""
    if os.geteuid() != 0:
        raise click.ClickException("run as root (the benchmark uses a private network namespace)")
    work = Path(tempfile.mkdtemp(prefix="sb-bench-sip-"))
    # SIGTERM unwinds like Ctrl-C, so the namespace, Janus and the stage processes are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with NetNs() as ns, ns.entered(), JanusServer(JanusConfig(), work_dir=work / "janus") as janus:
        raw = asyncio.run(run_all(work, janus, calls, seconds))
    if os.environ.get("SIPBRIDGE_BENCH_DEBUG"):
        print(raw["udp_echo_ms"], raw["decode_ms"], raw["single"]["rtt_by_counter"])
    res = summarise(raw, calls, seconds)
    print_table(res)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(res, indent=2, default=float))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
