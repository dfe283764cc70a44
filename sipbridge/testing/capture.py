"""The SIP leg as the SIP peer saw it, read back from the tshark capture: SDP codecs, SIP answers, RTP payload types
each way, the H.264 pictures and G.711/G.722 audio it received (decoded with PyAV), the frame counters in each tile."""

from __future__ import annotations

import collections
import contextlib
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipbridge.testing.localcall import SIP_PEER_MEDIA_PORT, SIP_PEER_PORT
from stages import codecs

# RTP payload types with a static meaning (RFC 3551) that the SIP leg may carry (the codec registry's).
STATIC_PAYLOAD_TYPES = {pt: info.rtp_name for pt, info in codecs.BY_STATIC_PAYLOAD_TYPE.items()}


@dataclass
class RtpFlow:
    dst_port: int
    payload_types: collections.Counter[int] = field(default_factory=collections.Counter)
    packets: int = 0
    frames: int = 0  # marker bits (video) or packets (audio)


def sdp_codecs(pcap: Path) -> dict[str, list[str]]:
    """Codecs named in the SDP of INVITE (offer, from Janus) and 200 OK (answer, from the SIP peer)."""
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-d",
            f"udp.port=={SIP_PEER_PORT},sip",
            "-Y",
            "sdp",
            "-T",
            "fields",
            "-e",
            "sip.Method",
            "-e",
            "sip.Status-Code",
            "-e",
            "sdp.media.format",
            "-e",
            "sdp.media_attr",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        cols = line.split("\t")
        side = "offer" if cols[0] == "INVITE" else "answer" if cols[1:2] == ["200"] else ""
        if not side:
            continue
        attrs = cols[3] if len(cols) > 3 else ""
        result[side] = sorted(set(re.findall(r"rtpmap:\d+ ([A-Za-z0-9-]+/\d+)", attrs)))
    return result


def sdp_payload_map(pcap: Path) -> dict[int, str]:
    """Payload type -> codec name (``H264``, ``PCMU``, ...) as the SIP peer's answer (200 OK) named them, plus the
    static payload types (RFC 3551) an answer may use without an rtpmap."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"udp.port=={SIP_PEER_PORT},sip", "-Y", "sdp && sip.Status-Code == 200",
         "-T", "fields", "-e", "sdp.media_attr"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    mapping = {pt: name for pt, name in STATIC_PAYLOAD_TYPES.items()}
    for line in out.splitlines():
        for pt, name in re.findall(r"rtpmap:(\d+) ([A-Za-z0-9-]+)/", line):
            mapping[int(pt)] = name
    return mapping


def invite_responses(pcap: Path) -> list[tuple[int, str]]:
    """Final responses (code, reason phrase) to INVITEs on the SIP leg, in capture order."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"udp.port=={SIP_PEER_PORT},sip",
         "-Y", 'sip.Status-Code >= 200 && sip.CSeq.method == "INVITE"', "-T", "fields",
         "-e", "sip.Status-Code", "-e", "sip.Status-Line"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    responses = []
    for line in out.splitlines():
        cols = line.split("\t")
        if cols[0].isdigit():
            # "SIP/2.0 486 Busy Here": the reason phrase is what follows the code.
            reason = cols[1].split(" ", 2)[2] if len(cols) > 1 and cols[1].count(" ") >= 2 else ""
            responses.append((int(cols[0]), reason))
    return responses


def rtp_flows(pcap: Path, ports: list[int]) -> dict[str, RtpFlow]:
    """RTP packets to and from the SIP peer's media ports (direction keys: 'to_sip:PORT', 'from_sip:PORT')."""
    decode = [a for p in ports for a in ("-d", f"udp.port=={p},rtp")]
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            *decode,
            "-Y",
            "rtp",
            "-T",
            "fields",
            "-e",
            "udp.srcport",
            "-e",
            "udp.dstport",
            "-e",
            "rtp.p_type",
            "-e",
            "rtp.marker",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    flows: dict[str, RtpFlow] = {}
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) < 4 or not cols[2].isdigit():
            continue
        src, dst, pt, marker = int(cols[0]), int(cols[1]), int(cols[2]), cols[3] in ("1", "True")
        key = f"to_sip:{dst}" if dst in ports else f"from_sip:{src}"
        flow = flows.setdefault(key, RtpFlow(dst if dst in ports else src))
        flow.packets += 1
        flow.payload_types[pt] += 1
        video = (dst if dst in ports else src) != ports[0]
        flow.frames += int(marker) if video else 1  # a video frame ends at its marker bit
    return flows


def h264_annexb(payload: bytes) -> bytes:
    """One H.264 RTP payload (RFC 6184: single NAL unit, STAP-A or FU-A) as Annex B bytes."""
    start = b"\x00\x00\x00\x01"
    if not payload:
        return b""
    nal_type = payload[0] & 0x1F
    out = bytearray()
    if 1 <= nal_type <= 23:
        out += start + payload
    elif nal_type == 24:  # STAP-A: 16-bit sizes, then NAL units
        pos = 1
        while pos + 2 <= len(payload):
            size = int.from_bytes(payload[pos : pos + 2], "big")
            out += start + payload[pos + 2 : pos + 2 + size]
            pos += 2 + size
    elif nal_type == 28 and len(payload) > 2:  # FU-A
        fu = payload[1]
        if fu & 0x80:
            out += start + bytes([(payload[0] & 0xE0) | (fu & 0x1F)])
        out += payload[2:]
    return bytes(out)


def _has_idr(annexb: bytes) -> bool:
    """Whether an access unit (Annex B) holds an IDR slice: a decoder can start, or recover, there."""
    return any(len(nal) and nal[0] & 0x1F == 5 for nal in annexb.split(b"\x00\x00\x00\x01"))


def h264_units_from_capture(pcap: Path, dst_port: int) -> list[tuple[float, bytes]]:
    """The H.264 access units the SIP peer received whole on ``dst_port``: (arrival of the unit's last packet, epoch
    seconds; Annex B bytes), one per RTP timestamp.

    After a packet the capture does not hold (an RTP sequence gap: lost on the way, or missed by the capture on a
    loaded machine), units are skipped up to the next IDR, as a receiver that asked for a keyframe would: a decoder
    fed across the gap conceals the loss with pictures whose counters read as garbage."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"udp.port=={dst_port},rtp", "-Y", f"rtp && udp.dstport=={dst_port}",
         "-T", "fields", "-e", "frame.time_epoch", "-e", "rtp.seq", "-e", "rtp.timestamp", "-e", "rtp.payload"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    units: list[tuple[float, bytes]] = []
    current: bytearray | None = None
    arrived, last_ts, last_seq = 0.0, None, None
    whole = False  # the current unit had no gap before or inside it
    synced = False  # an IDR was decoded since the last gap

    def close_unit() -> None:
        nonlocal synced
        if current is None:
            return
        data = bytes(current)
        synced = synced or (whole and _has_idr(data))
        if whole and synced:
            units.append((arrived, data))

    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) < 4 or not cols[3]:
            continue
        at, seq, ts = float(cols[0]), int(cols[1]), int(cols[2])
        gap = last_seq is not None and seq != (last_seq + 1) % 65536
        last_seq = seq
        if ts != last_ts:
            close_unit()
            current, last_ts, whole = bytearray(), ts, not gap
        elif gap:
            whole = False
        if gap:
            synced = False
        assert current is not None
        current += h264_annexb(bytes.fromhex(cols[3].replace(":", "")))
        arrived = at
    close_unit()
    return units


def h264_timed_frames_from_capture(pcap: Path, dst_port: int) -> list[tuple[float, Any]]:
    """The H.264 pictures the SIP peer received whole on ``dst_port``, decoded by PyAV, each with its arrival time
    (epoch seconds of the last RTP packet of its access unit): what a test needs to say when a picture got there."""
    import av

    units = h264_units_from_capture(pcap, dst_port)
    codec: Any = av.CodecContext.create("h264", "r")
    frames: list[tuple[float, Any]] = []
    for index, (_, data) in enumerate(units):
        packet = av.Packet(data)
        packet.pts = index  # carried to the picture, whatever delay the decoder has
        with contextlib.suppress(av.FFmpegError):
            frames.extend((units[f.pts][0], f) for f in codec.decode(packet) if f.pts is not None)
    with contextlib.suppress(av.FFmpegError):
        frames.extend((units[f.pts][0], f) for f in codec.decode(None) if f.pts is not None)
    return frames


def h264_frames_from_capture(pcap: Path, dst_port: int) -> list[Any]:
    """The H.264 pictures the SIP peer received whole on ``dst_port``: RTP depacketised (RFC 6184), decoded."""
    return [frame for _, frame in h264_timed_frames_from_capture(pcap, dst_port)]


# The static payload types' audio codecs (G.711, G.722): each RTP payload decodes on its own. Name -> (FFmpeg
# decoder, sample rate).
AUDIO_DECODERS = {info.name: (info.decoders[0], info.sample_rate_hz or info.clock_hz)
                  for info in codecs.BY_STATIC_PAYLOAD_TYPE.values()}


def audio_from_capture(pcap: Path, dst_port: int, codec: str) -> tuple[Any, int]:
    """The audio the SIP peer received on ``dst_port`` (G.711 or G.722 RTP payloads), decoded: (samples, rate)."""
    import av
    import numpy as np

    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"udp.port=={dst_port},rtp", "-Y", f"rtp && udp.dstport=={dst_port}",
         "-T", "fields", "-e", "rtp.payload"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    name, rate = AUDIO_DECODERS[codec]
    decoder: Any = av.CodecContext.create(name, "r")
    decoder.sample_rate, decoder.layout = rate, "mono"
    chunks = []
    for line in out.split():
        with contextlib.suppress(av.FFmpegError, ValueError):
            for frame in decoder.decode(av.Packet(bytes.fromhex(line.replace(":", "")))):
                chunks.append(frame.to_ndarray().reshape(-1))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return samples, rate


def sounding_tail(samples: Any, rate: int, seconds: float) -> Any:
    """The last ``seconds`` of ``samples`` before trailing silence.

    A hang-up ends the room's streams first, and the mix then sends silence to the SIP peer until the encoder and
    the Janus stage stop; on a loaded machine that takes seconds, so a fixed "last N seconds" window can hold only
    that silence. A block counts as sounding when its RMS is above a tenth of the loudest block's."""
    import numpy as np

    block = max(1, rate // 50)  # 20 ms, the packet size of every telephony codec here
    usable = samples.size - samples.size % block
    if usable == 0:
        return samples[:0]
    rms = np.sqrt(np.mean(np.square(samples[:usable].astype(np.float64).reshape(-1, block)), axis=1))
    sounding = np.flatnonzero(rms > rms.max() / 10) if rms.max() > 0 else np.zeros(0, dtype=np.int64)
    if sounding.size == 0:
        return samples[:0]
    end = (int(sounding[-1]) + 1) * block
    return samples[max(0, end - int(rate * seconds)) : end]


def write_png(frame: Any, path: Path) -> None:
    """One decoded picture as a PNG file (PyAV's own encoder: no imaging library needed)."""
    import av

    with av.open(str(path), "w", format="image2") as png:
        stream: Any = png.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "rgb24"
        rgb = frame.reformat(format="rgb24")
        rgb.pts = 0
        for packet in [*stream.encode(rgb), *stream.encode(None)]:
            png.mux(packet)


def tile_counters(frame: Any, cols: int, rows: int) -> list[int | None]:
    """The frame counter in each cell of a ``cols`` x ``rows`` grid picture (None: unreadable or empty)."""
    from stages.pattern import read_counter

    y = frame.to_ndarray(format="gray")
    h, w = y.shape
    return [
        read_counter(y[r * h // rows : (r + 1) * h // rows, c * w // cols : (c + 1) * w // cols])
        for r in range(rows)
        for c in range(cols)
    ]


def sip_leg_report(pcap: Path, video_codec: str, snapshot: Path | None, grid: tuple[int, int]) -> dict[str, Any]:
    """What the SIP peer saw: SDP codecs, RTP payload types each way, and (H.264) the decoded pictures."""
    ports = [SIP_PEER_MEDIA_PORT, SIP_PEER_MEDIA_PORT + 2]
    flows = rtp_flows(pcap, ports)
    report: dict[str, Any] = {"sdp": sdp_codecs(pcap), "rtp": {}}
    for key, flow in sorted(flows.items()):
        report["rtp"][key] = {"packets": flow.packets, "payload_types": dict(flow.payload_types), "frames": flow.frames}
    if video_codec == "h264":
        frames = h264_frames_from_capture(pcap, ports[1])
        report["video_frames_decoded"] = len(frames)
        counters = [tile_counters(f, *grid) for f in frames]
        report["tile_counters"] = [[c[i] for c in counters if c[i] is not None] for i in range(grid[0] * grid[1])]
        if frames and snapshot is not None:
            write_png(frames[-1], snapshot)
            report["snapshot"] = str(snapshot)
    return report
