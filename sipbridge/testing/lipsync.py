"""Lip sync measured from outside the bridge: the marks of synthetic.js (sync=1), found at the SIP peer (in the
capture) and in the room (by a viewer page), paired into audio - video offsets."""

from __future__ import annotations

import contextlib
import math
import subprocess
from pathlib import Path
from typing import Any

from sipbridge.testing.capture import AUDIO_DECODERS, h264_annexb
from sipbridge.testing.localcall import BOT_NAME, SIP_PEER_MEDIA_PORT, LocalCall, ProbeLines

# Must match synthetic.js and probe.js.
SYNC_PERIOD_MS = 2000.0
MARK_HZ = 2500.0
MARK_BAND_FRACTION = 8  # the mark is the bottom 1/8 of a participant's picture
MARK_ENVELOPE_MS = 4.0  # each of the burst detector's two moving averages
MARK_DETECT_LEVEL = 0.06  # envelope (full scale 1.0) that says "a burst"; the burst is sent at 0.2
MARK_REFRACTORY_MS = 1000.0  # one onset per mark


def rtp_packets(pcap: Path, dst_port: int) -> list[tuple[float, int, bytes]]:
    """RTP packets to ``dst_port`` in capture order: (arrival time in epoch ms, RTP timestamp, payload)."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"udp.port=={dst_port},rtp", "-Y", f"rtp && udp.dstport=={dst_port}",
         "-T", "fields", "-e", "frame.time_epoch", "-e", "rtp.timestamp", "-e", "rtp.payload"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    packets = []
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) < 3 or not cols[2]:
            continue
        with contextlib.suppress(ValueError):
            packets.append((float(cols[0]) * 1000.0, int(cols[1]), bytes.fromhex(cols[2].replace(":", ""))))
    return packets


def mark_band_bright(y: Any) -> bool:
    """Whether a picture's (luma plane's) bottom band shows the lip-sync mark: its middle is bright."""
    h, w = y.shape
    band = max(1, h // MARK_BAND_FRACTION)
    region = y[h - band + band // 4 : max(h - band + band // 4 + 1, h - band // 4), w // 10 : w - w // 10]
    return bool(region.mean() >= 128)


def video_mark_onsets(pcap: Path, dst_port: int, grid: tuple[int, int]) -> list[float]:
    """Arrival times (epoch ms) of the first RTP packet of each picture that starts a mark in the first grid cell.

    The H.264 RTP is grouped into pictures by RTP timestamp, each picture decoded on its own (its index as pts), so a
    decoded picture maps back to the arrival of its first packet."""
    import av

    pictures: list[tuple[float, bytearray]] = []
    last_ts: int | None = None
    for t, ts, payload in rtp_packets(pcap, dst_port):
        if ts != last_ts:
            pictures.append((t, bytearray()))
            last_ts = ts
        pictures[-1][1].extend(h264_annexb(payload))
    codec: Any = av.CodecContext.create("h264", "r")
    cols, rows = grid
    onsets: list[float] = []
    state = {"marked": True, "last": -math.inf}  # a capture that starts inside a mark has no onset to time

    def look(frames: list[Any]) -> None:
        for frame in frames:
            if frame.pts is None or not 0 <= frame.pts < len(pictures):
                continue
            y = frame.to_ndarray(format="gray")
            marked = mark_band_bright(y[: y.shape[0] // rows, : y.shape[1] // cols])
            arrived = pictures[frame.pts][0]
            if marked and not state["marked"] and arrived - state["last"] > MARK_REFRACTORY_MS:
                onsets.append(arrived)
                state["last"] = arrived
            state["marked"] = marked

    for index, (_, data) in enumerate(pictures):
        packet = av.Packet(bytes(data))
        packet.pts = index
        with contextlib.suppress(av.FFmpegError):
            look(list(codec.decode(packet)))
    with contextlib.suppress(av.FFmpegError):
        look(list(codec.decode(None)))
    return onsets


def mark_envelope(samples: Any, rate: int) -> Any:
    """Envelope of the MARK_HZ burst: the signal shifted down by MARK_HZ, smoothed by two moving averages of
    MARK_ENVELOPE_MS (the other tones, >= 1.5 kHz away, are attenuated ~50 dB). Causal, like probe.js's."""
    import numpy as np

    n = np.arange(samples.size)
    shifted = samples * np.exp(-2j * np.pi * MARK_HZ * (n % rate) / rate)
    length = max(1, round(rate * MARK_ENVELOPE_MS / 1000))
    kernel = np.ones(length) / length
    smooth = np.convolve(np.convolve(shifted, kernel)[: samples.size], kernel)[: samples.size]
    return 2 * np.abs(smooth)


def audio_mark_onsets(samples: Any, rate: int, chunk_starts: Any, chunk_times: Any) -> list[float]:
    """Onsets (epoch ms) of the MARK_HZ bursts in ``samples`` (full scale 1.0); sample i of the chunk starting at
    sample chunk_starts[k] is at chunk_times[k] + i / rate. An onset is where the envelope reaches half of the
    burst's plateau, minus the L - 1 samples the two moving averages take to get there from a sharp start."""
    import numpy as np

    env = mark_envelope(samples, rate)
    length = max(1, round(rate * MARK_ENVELOPE_MS / 1000))
    onsets: list[float] = []
    last = -math.inf
    for p in (int(i) for i in np.flatnonzero(env > MARK_DETECT_LEVEL)):
        if (p - last) * 1000 / rate <= MARK_REFRACTORY_MS:
            continue
        if p + 3 * length >= env.size:
            break
        window_end = p + 3 * length + 1
        plateau = env[p:window_end].max()
        low: int = max(0, p - 2 * length)
        half = low + int(np.argmax(env[low:window_end] >= plateau / 2))
        onset = half - (length - 1)
        k = int(np.searchsorted(chunk_starts, onset, side="right")) - 1
        if k >= 0:
            onsets.append(float(chunk_times[k] + (onset - chunk_starts[k]) * 1000 / rate))
        last = onset
    return onsets


def audio_mark_onsets_from_capture(pcap: Path, dst_port: int, codec: str) -> list[float]:
    """Burst onsets in the audio the SIP peer received, each sample placed at its RTP packet's arrival plus its
    position in the packet (as if played out on arrival)."""
    import av
    import numpy as np

    name, rate = AUDIO_DECODERS[codec]
    decoder: Any = av.CodecContext.create(name, "r")
    decoder.sample_rate, decoder.layout = rate, "mono"
    chunks, starts, times = [], [], []
    count = 0
    for t, _, payload in rtp_packets(pcap, dst_port):
        with contextlib.suppress(av.FFmpegError, ValueError):
            for frame in decoder.decode(av.Packet(payload)):
                samples = frame.to_ndarray().reshape(-1)
                starts.append(count)
                times.append(t)
                chunks.append(samples)
                count += samples.size
    if not chunks:
        return []
    samples = np.concatenate(chunks).astype(np.float64) / 32768.0
    return audio_mark_onsets(samples, rate, np.array(starts), np.array(times))


def pair_marks(video_ms: list[float], audio_ms: list[float]) -> list[dict[str, float]]:
    """Each video onset with the nearest audio onset less than half a period away: offset = audio - video (ms,
    positive: audio late); latency of each from the mark's nominal instant (n * SYNC_PERIOD_MS on the wall clock,
    assuming less than a period of delay)."""
    pairs = []
    free = sorted(audio_ms)
    for v in sorted(video_ms):
        if not free:
            break
        a = min(free, key=lambda x: abs(x - v))
        if abs(a - v) < SYNC_PERIOD_MS / 2:
            free.remove(a)
            nominal = math.floor(min(a, v) / SYNC_PERIOD_MS) * SYNC_PERIOD_MS
            pairs.append({"video_ms": v, "audio_ms": a, "offset_ms": a - v,
                          "video_latency_ms": v - nominal, "audio_latency_ms": a - nominal})  # fmt: skip
    return pairs


def offset_figures(pairs: list[dict[str, float]]) -> dict[str, Any]:
    """Median and spread of the pairs' offsets (and their latencies from the nominal mark instant); pairs in time
    order."""
    import numpy as np

    if not pairs:
        return {"marks": 0, "offset_ms_p50": None}
    offsets = np.array([p["offset_ms"] for p in pairs])
    return {
        "marks": len(pairs),
        "offset_ms_p50": round(float(np.median(offsets)), 1),
        "offset_ms_min": round(float(offsets.min()), 1),
        "offset_ms_max": round(float(offsets.max()), 1),
        "offset_ms_p10": round(float(np.percentile(offsets, 10)), 1),
        "offset_ms_p90": round(float(np.percentile(offsets, 90)), 1),
        # Receivers' A/V sync converges during a call: the last marks show where it settles.
        "offset_ms_p50_last5": round(float(np.median(offsets[-5:])), 1),
        "video_latency_ms_p50": round(float(np.median([p["video_latency_ms"] for p in pairs])), 1),
        "audio_latency_ms_p50": round(float(np.median([p["audio_latency_ms"] for p in pairs])), 1),
    }


def sync_at_sip(pcap: Path, grid: tuple[int, int], audio_codec: str, since_ms: float = 0.0) -> dict[str, Any]:
    """Marks as the SIP peer received them (video in the first cell of the composite, audio in the mix), from
    ``since_ms`` (epoch ms) on."""
    video = [t for t in video_mark_onsets(pcap, SIP_PEER_MEDIA_PORT + 2, grid) if t >= since_ms]
    audio = [t for t in audio_mark_onsets_from_capture(pcap, SIP_PEER_MEDIA_PORT, audio_codec) if t >= since_ms]
    pairs = pair_marks(video, audio)
    return {**offset_figures(pairs), "video_onsets": len(video), "audio_onsets": len(audio), "pairs": pairs}


def sync_in_room(lines: ProbeLines, observer: str, source: str, since_ms: float = 0.0) -> dict[str, Any]:
    """Marks as ``observer``'s page received ``source``'s first camera and audio, from ``since_ms`` on."""
    records = lines.matching(event="received", participant=observer, **{"from": source})
    video = [t for r in records for t in r.get("marks_video", []) if t >= since_ms]
    audio = [t for r in records for t in r.get("marks_audio", []) if t >= since_ms]
    pairs = pair_marks(video, audio)
    return {**offset_figures(pairs), "video_onsets": len(video), "audio_onsets": len(audio), "pairs": pairs}


def source_skew(lines: ProbeLines, participant: str, since_ms: float = 0.0) -> dict[str, Any]:
    """How well the participant page itself aligned its marks: write time of the burst's first audio chunk minus
    that of the first marked frame (ms), and the frame's lateness against its nominal instant."""
    import numpy as np

    sent = [r for r in lines.matching(event="mark_sent", participant=participant) if r["nominal_ms"] >= since_ms]
    if not sent:
        return {"marks": 0}
    skew = np.array([r["audio_ms"] - r["video_ms"] for r in sent])
    late = np.array([r["video_ms"] - r["nominal_ms"] for r in sent])
    return {"marks": len(sent), "audio_minus_video_ms_p50": round(float(np.median(skew)), 1),
            "audio_minus_video_ms_max": round(float(np.abs(skew).max()), 1),
            "video_late_ms_p50": round(float(np.median(late)), 1)}  # fmt: skip


def _diff(a: dict[str, Any], b: dict[str, Any], key: str = "offset_ms_p50") -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return round(float(a[key]) - float(b[key]), 1)


def lipsync_report(call: LocalCall, sip: dict[str, Any] | None = None, since_ms: float = 0.0) -> dict[str, Any]:
    """Audio/video offsets of the lip-sync marks: at the SIP peer (from the capture), in the room as the observer
    receives the bot (the SIP peer's echo) and, the baseline of the same run, as it receives the first participant
    directly; the bridge-added offsets are the differences of the medians. ``sip``: an already computed
    ``sync_at_sip`` (the capture is complete only after the hang-up). ``since_ms``: only marks received from then
    on (epoch ms; e.g. the start of a measurement window)."""
    assert call.participants is not None
    opts = call.options
    direct_source = opts.participants[0][0]
    observer = call.sync_observer
    report: dict[str, Any] = {"observer": observer, "direct_source": direct_source}
    if sip is None:
        # Only H.264 is decoded from the capture; an audio-only peer has no pictures to time.
        sip = (sync_at_sip(call.pcap, opts.grid(), opts.sip_audio, since_ms) if opts.sip_video == "h264"
               else {"marks": 0, "offset_ms_p50": None, "pairs": []})  # fmt: skip
    report["sip"] = sip
    report["room_via_bridge"] = sync_in_room(call.participants, observer, BOT_NAME, since_ms)
    report["room_direct"] = sync_in_room(call.participants, observer, direct_source, since_ms)
    report["source"] = source_skew(call.participants, direct_source, since_ms)
    report["bridge_added_ms"] = {
        "room_to_sip": _diff(report["sip"], report["room_direct"]),
        "sip_to_room": _diff(report["room_via_bridge"], report["sip"]),
        "loop": _diff(report["room_via_bridge"], report["room_direct"]),
    }
    last5 = "offset_ms_p50_last5"
    report["bridge_added_ms_last5"] = {
        "room_to_sip": _diff(report["sip"], report["room_direct"], last5),
        "loop": _diff(report["room_via_bridge"], report["room_direct"], last5),
    }
    return report


def lipsync_line(report: dict[str, Any]) -> str:
    """One line: the offsets (audio - video, positive: audio late) and what the bridge adds."""

    def fig(f: dict[str, Any]) -> str:
        if f.get("offset_ms_p50") is None:
            return "no marks"
        spread = f"{f['offset_ms_min']:+.0f}..{f['offset_ms_max']:+.0f}"
        return f"{f['offset_ms_p50']:+.0f} ms [{spread}, {f['marks']} marks]"

    added = report["bridge_added_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:+.0f} ms"

    return (
        f"lip sync (audio - video; median [min..max]): at the SIP peer {fig(report['sip'])}; "
        f"in the room ({report['observer']}) {report['direct_source']} directly {fig(report['room_direct'])}, "
        f"the bot (echo) {fig(report['room_via_bridge'])}; bridge adds room->SIP {ms(added['room_to_sip'])}, "
        f"SIP->room {ms(added['sip_to_room'])}, loop {ms(added['loop'])}"
    )
