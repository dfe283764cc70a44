"""Per-hop cost of the sipbridge wire format over ZeroMQ, against bare pyzmq sending the same bytes.

Run: python bench/bench_protocol.py   (prints a table, writes bench/results/protocol.json)

Three ways across one ipc:// hop between two processes, in the same run:
  bare      pyzmq PUSH/PULL of the raw I420 bytes (zero-copy), the baseline;
  protocol  protocol.encode -> multipart send -> protocol.decode (what every stage does);
  stage     a real identity transformer process in the middle (two hops and the asyncio runtime),
            against a bare pyzmq relay process doing the same forwarding.
Throughput is messages per second flat out; latency is one-way, paced at 100 messages per second.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import protocol  # noqa: E402
from protocol import MediaHeader, VideoFrame  # noqa: E402

THROUGHPUT_MSGS = 2000
LATENCY_MSGS = 200
LATENCY_RATE_HZ = 100
SIZES = {"640x480": (640, 480), "1280x720": (1280, 720)}
HWM_MSGS = 64


def _receiver(endpoint: str, mode: str, count: int, result: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, HWM_MSGS)
    sock.connect(endpoint)
    latencies = []
    first = None
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        now = time.monotonic_ns()
        if first is None:
            first = time.perf_counter()
        if mode == "bare":
            sent = int.from_bytes(frames[0].buffer[:8], "little")
        else:
            msg = protocol.decode([f.buffer for f in frames])
            sent = msg.header.capture_time_ns  # type: ignore[union-attr]
        latencies.append((now - sent) / 1e6)
    elapsed = time.perf_counter() - (first or time.perf_counter())
    result.put({"elapsed_s": elapsed, "latencies_ms": latencies})
    sock.close()
    ctx.term()


def _frame(width: int, height: int, seq: int, payload: bytearray) -> VideoFrame:
    header = MediaHeader("video0", seq, seq * 3000, Fraction(1, 90000), time.monotonic_ns())
    return VideoFrame(header, width, height, payload)


def _send(sock: zmq.Socket, mode: str, width: int, height: int, seq: int, payload: bytearray) -> None:  # type: ignore[type-arg]
    if mode == "bare":
        payload[:8] = time.monotonic_ns().to_bytes(8, "little")
        sock.send(payload, copy=False)
    else:
        sock.send_multipart(protocol.encode(_frame(width, height, seq, payload)), copy=False)


def one_hop(mode: str, width: int, height: int, count: int, rate_hz: float | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/hop.sock"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, HWM_MSGS)
        sock.bind(endpoint)
        result: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        proc = mp.get_context("fork").Process(target=_receiver, args=(endpoint, mode, count + 1, result))
        proc.start()
        payload = bytearray(protocol.i420_size(width, height))
        _send(sock, mode, width, height, 0, payload)  # warm-up: the connection is up after this
        time.sleep(0.3)
        started = time.perf_counter()
        for seq in range(1, count + 1):
            if rate_hz:
                delay = started + seq / rate_hz - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            _send(sock, mode, width, height, seq, payload)
        out = result.get(timeout=120)
        proc.join()
        sock.close()
        ctx.term()
    lat = out["latencies_ms"][1:]
    return {"msgs_per_s": count / out["elapsed_s"], "latency_ms_p50": statistics.median(lat),
            "latency_ms_p95": sorted(lat)[int(0.95 * (len(lat) - 1))]}


def _relay(inp: str, out: str) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, HWM_MSGS)
    pull.connect(inp)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, HWM_MSGS)
    push.bind(out)
    while True:
        frames = pull.recv_multipart(copy=False)
        push.send_multipart(frames, copy=False)


def through_middle(middle: str, width: int, height: int, count: int, rate_hz: float | None) -> dict[str, float]:
    """Sender -> middle process -> receiver, with the middle a bare relay or a real transformer stage."""
    with tempfile.TemporaryDirectory() as tmp:
        first, second = f"ipc://{tmp}/in.sock", f"ipc://{tmp}/out.sock"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, HWM_MSGS)
        sock.bind(first)
        if middle == "relay":
            mid = mp.get_context("fork").Process(target=_relay, args=(first, second), daemon=True)
            mid.start()
        else:
            env = {**os.environ, "SIPBRIDGE_RUN_DIR": tmp}
            mid = subprocess.Popen(  # type: ignore[assignment]
                [sys.executable, "-m", "sipbridge", "stage", "transformer", "--in", first, "--out", second,
                 "--video-policy", "all", "--hwm", str(HWM_MSGS), "--log-level", "WARNING"], env=env, cwd=ROOT)
        result: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        recv = mp.get_context("fork").Process(target=_receiver, args=(second, "protocol", count + 1, result))
        recv.start()
        payload = bytearray(protocol.i420_size(width, height))
        _send(sock, "protocol", width, height, 0, payload)
        time.sleep(1.5 if middle == "stage" else 0.3)
        started = time.perf_counter()
        for seq in range(1, count + 1):
            if rate_hz:
                delay = started + seq / rate_hz - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            _send(sock, "protocol", width, height, seq, payload)
        out = result.get(timeout=120)
        recv.join()
        if isinstance(mid, subprocess.Popen):
            mid.terminate()
            mid.wait(30)
        else:
            mid.kill()
        sock.close(linger=0)
        ctx.term()
    lat = out["latencies_ms"][1:]
    return {"msgs_per_s": count / out["elapsed_s"], "latency_ms_p50": statistics.median(lat),
            "latency_ms_p95": sorted(lat)[int(0.95 * (len(lat) - 1))]}


def main() -> dict[str, object]:
    results: dict[str, object] = {}
    rows = []
    for label, (w, h) in SIZES.items():
        bare_tp = one_hop("bare", w, h, THROUGHPUT_MSGS, None)
        proto_tp = one_hop("protocol", w, h, THROUGHPUT_MSGS, None)
        bare_lat = one_hop("bare", w, h, LATENCY_MSGS, LATENCY_RATE_HZ)
        proto_lat = one_hop("protocol", w, h, LATENCY_MSGS, LATENCY_RATE_HZ)
        relay = through_middle("relay", w, h, LATENCY_MSGS, LATENCY_RATE_HZ)
        stage = through_middle("stage", w, h, LATENCY_MSGS, LATENCY_RATE_HZ)
        relay_tp = through_middle("relay", w, h, THROUGHPUT_MSGS // 2, None)
        stage_tp = through_middle("stage", w, h, THROUGHPUT_MSGS // 2, None)
        entry = {
            "bare_msgs_per_s": round(bare_tp["msgs_per_s"]),
            "protocol_msgs_per_s": round(proto_tp["msgs_per_s"]),
            "throughput_ratio": round(proto_tp["msgs_per_s"] / bare_tp["msgs_per_s"], 3),
            "bare_latency_ms_p50": round(bare_lat["latency_ms_p50"], 3),
            "protocol_latency_ms_p50": round(proto_lat["latency_ms_p50"], 3),
            "added_latency_ms_p50": round(proto_lat["latency_ms_p50"] - bare_lat["latency_ms_p50"], 3),
            "relay_process_msgs_per_s": round(relay_tp["msgs_per_s"]),
            "stage_process_msgs_per_s": round(stage_tp["msgs_per_s"]),
            "stage_vs_relay_throughput": round(stage_tp["msgs_per_s"] / relay_tp["msgs_per_s"], 3),
            "relay_two_hop_latency_ms_p50": round(relay["latency_ms_p50"], 3),
            "stage_two_hop_latency_ms_p50": round(stage["latency_ms_p50"], 3),
            "stage_added_latency_ms_p50": round(stage["latency_ms_p50"] - relay["latency_ms_p50"], 3),
        }
        results[label] = entry
        rows.append((label, entry))
    results["targets"] = {"throughput_ratio_min": 0.8, "added_latency_ms_p50_max": 0.5}
    print(f"{'I420':<9} {'bare/s':>8} {'proto/s':>8} {'ratio':>6} {'bare p50':>9} {'proto p50':>9} {'added':>7} "
          f"{'relay/s':>8} {'stage/s':>8} {'ratio':>6} {'stage+ms':>8}")
    for label, e in rows:
        print(f"{label:<9} {e['bare_msgs_per_s']:>8} {e['protocol_msgs_per_s']:>8} {e['throughput_ratio']:>6} "
              f"{e['bare_latency_ms_p50']:>9} {e['protocol_latency_ms_p50']:>9} {e['added_latency_ms_p50']:>7} "
              f"{e['relay_process_msgs_per_s']:>8} {e['stage_process_msgs_per_s']:>8} "
              f"{e['stage_vs_relay_throughput']:>6} {e['stage_added_latency_ms_p50']:>8}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "protocol.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
