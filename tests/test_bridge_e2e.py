"""The bridge end to end: real Chromium, real Janus (VideoRoom and SIP plugin), real sipp, in a private namespace.

Each test runs one bridged call with ``sipbridge.testing.LocalCall``: synthetic participants in the local room, the
bot (browser stage) and the bridge stages under supervisord, and a sipp SIP peer that echoes RTP. What is checked
comes from outside the bridge: the SIP leg from a tshark capture (SDP, RTP payload types, the H.264 and G.711/G.722
payloads decoded), the room side from the participants' probes, which read frame counters out of the pixels and the
tone out of the audio they receive from the bot.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import statistics
import time
import tomllib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol import MediaHeader, VideoFrame
from sipbridge.bridge import DROP_VIDEO, DropVideo, bridge_stages, parse_bridge
from sipbridge.status import StatusCollector
from sipbridge.testing.capture import (
    audio_from_capture,
    h264_frames_from_capture,
    h264_timed_frames_from_capture,
    rtp_flows,
    sdp_codecs,
    sounding_tail,
    tile_counters,
)
from sipbridge.testing.localcall import BOT_NAME, SIP_PEER_MEDIA_PORT, CallOptions, LocalCall
from stages.browser.stage import STATE_REPEAT_INTERVAL_S
from stages.pattern import dominant_frequency

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

MEDIA_TIMEOUT_S = 90.0
MIN_FRAMES = 20
TONE_TOLERANCE_HZ = 25.0
AUDIO_PORT, VIDEO_PORT = SIP_PEER_MEDIA_PORT, SIP_PEER_MEDIA_PORT + 2
PERSON_FPS = {"alice": 15, "bob": 10, "carol": 6}
RATE_TOLERANCE = 0.2
RATE_MIN_REPORTS = 8
RATE_WINDOW_S = 10.0
# The rates are fitted over the last part of the window, before the bridge stops: the first seconds after media
# came may still drain the bridge's start-up backlog (a camera read 12 fps against its source's 10 under load, ci31).
RATE_FIT_S = 6.0
STATS_SETTLE_S = 1.5
SIPP_EXIT_TIMEOUT_S = 10.0
EVENTS_WINDOW_S = 3.0
# A stage state or call state change may fall in the window, and the bot says its state again every
# STATE_REPEAT_INTERVAL_S (each repeat passes every room-to-SIP stage once); a loop makes hundreds.
EVENTS_IN_STEADY_STATE = 5 + math.ceil(EVENTS_WINDOW_S / STATE_REPEAT_INTERVAL_S)
# The room's probe reports every 0.5 s: eight reports with a tone are four seconds of the echo heard in the room, so
# the capture holds the two seconds of tone the checks read with margin (four reports were exactly two seconds,
# and on a loaded CI machine the capture then held 1.94 s).
ECHO_TONE_REPORTS = 8


def need_media_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("janus", "sipp", "tshark", "chromium"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def track_source(track: int) -> str:
    return BOT_NAME if track == 1 else f"{BOT_NAME}#{track}"


def received(call: LocalCall, observer: str, source: str) -> list[dict[str, Any]]:
    assert call.participants is not None
    return call.participants.matching(event="received", participant=observer, **{"from": source})


def counters(call: LocalCall, observer: str, source: str) -> list[int]:
    return [c for r in received(call, observer, source) for c in r["counters"]]


def wait_for_media(call: LocalCall, observer: str, sources: Sequence[str], what: str,
                   moving: int | None = None) -> None:
    """Wait until ``moving`` of ``sources`` (default: all) showed MIN_FRAMES distinct counters to ``observer``."""
    need = len(sources) if moving is None else moving
    deadline = time.monotonic() + MEDIA_TIMEOUT_S
    while time.monotonic() < deadline:
        if sum(len(set(counters(call, observer, s))) >= MIN_FRAMES for s in sources) >= need:
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {name}\n{call.stage_log(name, 15)}" for name in ("browser", "janus", "room-transformer"))
    got = {s: (len(c), len(set(c)), c[-10:]) for s in sources if (c := counters(call, observer, s)) is not None}
    raise AssertionError(f"{what}: not within {MEDIA_TIMEOUT_S:.0f} s (frames, distinct, last: {got})\n{logs}")


def ascending(values: Sequence[int | None], minimum: int = MIN_FRAMES) -> bool:
    """Readable counters never go back (a tile may repeat its last picture) and enough distinct ones arrived.

    0 is left out: the probe reads a black picture (a camera before its first injected frame) as 0.
    """
    seen = [v for v in values if v]
    return len(set(seen)) >= minimum and all(b >= a for a, b in itertools.pairwise(seen))


def control_forwarded(call: LocalCall) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """How many control messages each stage passed downstream over a few seconds of a running call; and the
    stages' last statistics."""
    collector = StatusCollector(call.run_dir)
    try:
        collector.poll(STATS_SETTLE_S)
        before = {stage: fig.get("control_forwarded", 0) for stage, fig in collector.figures.items()}
        collector.poll(EVENTS_WINDOW_S)
        after = {stage: fig.get("control_forwarded", 0) for stage, fig in collector.figures.items()}
        return {stage: count - before.get(stage, 0) for stage, count in after.items()}, collector.figures
    finally:
        collector.close()


def assert_dialled_once_the_bot_was_in(call: LocalCall) -> None:
    """The INVITE went out only after the bot reported itself in the room (issues 12, 14): in the janus stage's own
    log, the bot's arrival comes before the call's "calling" line."""
    log = call.stage_log("janus", 100_000)
    joined, calling = log.find("the room's bot is in the room"), log.find(": calling")
    assert 0 <= joined < calling, log[:3000]


def tone_level(samples: np.ndarray, rate: int, hz: float) -> float:
    """Spectral magnitude around ``hz`` relative to the spectrum's median (how clearly a tone is present)."""
    x = sounding_tail(samples, rate, 2.0).astype(np.float64)
    spectrum = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(x.size)))
    bin_hz = rate / x.size
    k = round(hz / bin_hz)
    return float(spectrum[k - 3 : k + 4].max() / (np.median(spectrum) + 1e-9))


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("bridge-*.toml")), ids=lambda p: p.name)
def test_example_bridge_configs_are_valid(example: Path, tmp_path: Path) -> None:
    """Every shipped example turns into the stages of a bridged call."""
    specs = bridge_stages(parse_bridge(tomllib.loads(example.read_text())), tmp_path)
    assert {"browser", "janus", "room-decoder", "sip-decoder"} <= {s.name for s in specs}


def test_audio_only_endpoint_drops_room_video_before_encoding(tmp_path: Path) -> None:
    example = EXAMPLES / "bridge-legacy-pcma.toml"
    specs = {s.name: s for s in bridge_stages(parse_bridge(tomllib.loads(example.read_text())), tmp_path)}
    assert DROP_VIDEO in specs["room-transformer"].args
    dropped = DropVideo().process(VideoFrame(MediaHeader("a/video", 0, 0, Fraction(1, 30), 1), 2, 2, bytes(6)))
    assert list(dropped) == []


@pytest.mark.media
@pytest.mark.timeout(180)
@pytest.mark.parametrize("room_codec", ["vp8", "vp9"])
def test_room_vp8_vp9_opus_to_h264_pcmu_sip_peer_and_back(room_codec: str, tmp_path: Path) -> None:
    """Video over SIP both ways, with transcoding for a legacy endpoint: the room sends VP8 (or VP9) + Opus, the SIP
    peer takes only H.264 + PCMU; two participants composed side by side for SIP, the echo split back into two
    cameras."""
    need_media_tools()
    options = CallOptions(
        participants=[("alice", 440.0), ("bob", 660.0)],
        room_codec=room_codec,
        layout_ids=["alice/video", "bob/video"],
        split="2x1",
    )
    with LocalCall(tmp_path / "run", options) as call:
        # bob sees the bot's first camera (alice's half of the echoed composite) and its second (bob's half).
        wait_for_media(call, "bob", [track_source(1), track_source(2)], "the echoed video reaching the room")
        forwarded, figures = control_forwarded(call)
        # Read while the call is up: a report whose half second straddles the hang-up estimates a tone from a
        # partial window (ci15: 85 Hz after seconds of 660).
        tones = [r["tone_hz"] for r in received(call, "bob", BOT_NAME) if r.get("tone_hz")]
        call.stop_bridge()  # hang up, so the capture holds the whole call
        # Stopping the bridge hung up: the SIP peer got a BYE, answered it and finished its scenario.
        assert call.procs["sipp"].wait(SIPP_EXIT_TIMEOUT_S) == 0, call.stage_log("janus", 10)
        assert_dialled_once_the_bot_was_in(call)
        room = {t: counters(call, "bob", track_source(t)) for t in (1, 2)}
    # The SIP wire, from the capture: only what the legacy endpoint takes was offered and sent.
    sdp = sdp_codecs(call.pcap)
    assert set(sdp["answer"]) == {"H264/90000", "PCMU/8000"}, sdp
    assert not {"VP8/90000", "VP9/90000", "opus/48000/2"} & set(sdp["offer"]), sdp
    # What the bot took from the room really was the room's codec (the room decoder's decoders by stream).
    assert figures["room-decoder"]["decoders"] == {
        "alice/video": room_codec.upper(),
        "bob/video": room_codec.upper(),
        "alice/audio": "OPUS",
        "bob/audio": "OPUS",
    }, figures["room-decoder"]["decoders"]
    flows = rtp_flows(call.pcap, [AUDIO_PORT, VIDEO_PORT])
    assert set(flows[f"to_sip:{AUDIO_PORT}"].payload_types) == {0}, flows  # PCMU
    video_pts = set(flows[f"to_sip:{VIDEO_PORT}"].payload_types)
    assert len(video_pts) == 1 and min(video_pts) >= 96, flows  # the one dynamic H.264 payload type
    # Pictures survive: the H.264 the SIP peer received decodes, both halves carry their counters in order.
    frames = h264_frames_from_capture(call.pcap, VIDEO_PORT)
    tiles = [tile_counters(f, 2, 1) for f in frames]
    for tile in (0, 1):
        assert ascending([t[tile] for t in tiles]), [t[tile] for t in tiles]
    # Tones survive: both participants' tones are in the PCMU mix the SIP peer received.
    samples, rate = audio_from_capture(call.pcap, AUDIO_PORT, "pcmu")
    assert samples.size > rate * 2
    assert tone_level(samples, rate, 440.0) > 20 and tone_level(samples, rate, 660.0) > 20
    # And back into the room: each of the bot's two cameras shows its half, counters in order; the audio arrives.
    for track in (1, 2):
        assert ascending(room[track]), room[track]
    assert len(tones) >= 4 and 400.0 <= statistics.median(tones[-4:]) <= 700.0, tones  # the 440 + 660 Hz mix, echoed
    # Events end at the legs' ends: none keeps circling the ring browser -> ... -> janus -> ... -> browser.
    assert all(growth <= EVENTS_IN_STEADY_STATE for growth in forwarded.values()), forwarded


@pytest.mark.media
@pytest.mark.timeout(150)
@pytest.mark.parametrize("codec, payload_type", [("g722", 9), ("pcma", 8)])
def test_audio_only_legacy_sip_peer(codec: str, payload_type: int, tmp_path: Path) -> None:
    """A legacy endpoint that takes only G.722, or only PCMA (and no video): Opus from the room becomes that codec
    on the wire and the tone survives the round trip back into the room."""
    need_media_tools()
    options = CallOptions(
        participants=[("alice", 1000.0), ("bob", 1000.0)],
        room_codec="h264",
        sip_scenario=f"uas_{codec}",
        sip_audio=codec,
        sip_video="none",
        layout="single",
        max_tiles=1,
        split=None,
    )
    with LocalCall(tmp_path / "run", options) as call:
        deadline = time.monotonic() + MEDIA_TIMEOUT_S
        while (time.monotonic() < deadline
               and len([r for r in received(call, "bob", BOT_NAME) if r.get("tone_hz")]) < ECHO_TONE_REPORTS):
            time.sleep(0.5)
        call.stop_bridge()
        tones = [r["tone_hz"] for r in received(call, "bob", BOT_NAME) if r.get("tone_hz")]
    sdp = sdp_codecs(call.pcap)
    assert set(sdp["answer"]) == {f"{codec.upper()}/8000"}, sdp  # G.722's RTP clock is 8 kHz too
    flows = rtp_flows(call.pcap, [AUDIO_PORT, VIDEO_PORT])
    assert set(flows[f"to_sip:{AUDIO_PORT}"].payload_types) == {payload_type}, flows
    samples, rate = audio_from_capture(call.pcap, AUDIO_PORT, codec)
    assert samples.size > rate * 2
    tail = sounding_tail(samples, rate, 2.0)
    assert tail.size == rate * 2, tail.size  # two whole seconds of tone, not just the hang-up's silence
    assert abs(dominant_frequency(tail, rate) - 1000.0) < TONE_TOLERANCE_HZ
    assert len(tones) >= 4, f"bob heard no tone from the bot: {tones}\n{call.stage_log('browser', 20)}"
    assert abs(statistics.median(tones[-4:]) - 1000.0) < TONE_TOLERANCE_HZ, tones


def counter_rate(call: LocalCall, observer: str, source: str,
                 span: tuple[float, float] | None = None) -> float | None:
    """Frames per second at which ``source``'s counter advances as ``observer`` receives it (least squares over the
    probe's reports, those read within ``span`` (monotonic clock) if given). A constant delay does not change it,
    so it identifies whose picture a track carries; a delay that changes inside the span (a start-up backlog
    draining, the bridge's tail flushed as it stops) makes a track look faster than its source: hence the span."""
    points = [
        (r["t"], statistics.median(v))
        for r in received(call, observer, source)
        if (v := [c for c in r["counters"] if c]) and (span is None or span[0] <= r["t"] <= span[1])
    ]
    if len(points) < RATE_MIN_REPORTS:
        return None
    t, c = np.array(points).T
    return float(np.polyfit(t, c, 1)[0])


def owners_by_rate(camera_rates: dict[int, float], direct: dict[str, float]) -> dict[str, int] | None:
    """Whose picture each moving camera shows, from the rates of the counters: the one-to-one assignment of cameras
    to people in which no camera runs faster than its owner (a loaded machine drops frames, it never adds any) and
    the rates are closest (least squares on the log of the ratio). None when no assignment fits.

    Nearest rate per camera alone misreads a loaded machine: bob's camera (10 fps) that lost a quarter of its
    frames is nearer carol's 6 fps than bob's own, and is then too fast to be carol's."""
    cameras = sorted(camera_rates)
    fits = []
    for owners in itertools.permutations(direct, len(cameras)):
        pairs = list(zip(cameras, owners, strict=True))
        if all(0 < camera_rates[c] < (1 + RATE_TOLERANCE) * direct[p] for c, p in pairs):
            cost = sum(float(np.log(direct[p] / camera_rates[c])) ** 2 for c, p in pairs)
            fits.append((cost, {p: c for c, p in pairs}))
    return min(fits, key=lambda fit: fit[0])[1] if fits else None


def tile_series_summary(frames: Sequence[tuple[float, Any]], tiles: Sequence[Sequence[int | None]],
                        tile: int) -> str:
    """What a failed tile check needs to say: how many pictures the capture decoded over what span, when the
    tile's first counter came, how many distinct counters it read, and where it went back, if it did."""
    series = [t[tile] for t in tiles]
    nonzero = [(i, v) for i, v in enumerate(series) if v]
    if not frames:
        return f"tile {tile}: no picture decoded from the capture"
    t0 = frames[0][0]
    back = [(i, a, b) for (_, a), (i, b) in itertools.pairwise(nonzero) if b < a]
    first = f"{frames[nonzero[0][0]][0] - t0:.1f} s" if nonzero else "never"
    return (f"tile {tile}: {len(frames)} pictures over {frames[-1][0] - t0:.1f} s; first counter at {first}; "
            f"{len(set(v for _, v in nonzero))} distinct (need {MIN_FRAMES}); went back at {back[:5]}; "
            f"unreadable {series.count(None)}; last 20: {series[-20:]}")


@pytest.mark.media
@pytest.mark.timeout(200)
def test_three_participants_composed_for_sip_and_split_back_into_four_cameras(tmp_path: Path) -> None:
    """Three room participants are composed into one 2x2 grid for SIP; the SIP side's 2x2 composite (the echo)
    is split into four cameras in the room, each showing its quadrant: the three people and one empty cell."""
    need_media_tools()
    people = ["alice", "bob", "carol"]
    options = CallOptions(
        participants=[("alice", 440.0), ("bob", 550.0), ("carol", 660.0)],
        room_codec="h264",
        max_tiles=4,
        layout_ids=[f"{p}/video" for p in people],
        split="2x2",
        stagger_s=0.5,
        # Each person's counter advances at its own rate: a camera in the room is identified by the rate of the
        # counter it shows, whatever the delay through the bridge.
        fps_of=PERSON_FPS,
    )
    with LocalCall(tmp_path / "run", options) as call:
        # Three of the four cameras move (the people's); which camera number shows the empty cell is the room's
        # track order, so all four are watched.
        wait_for_media(call, "alice", [track_source(t) for t in (1, 2, 3, 4)], "four cameras in the room", moving=3)
        settled = time.monotonic() + RATE_WINDOW_S - RATE_FIT_S
        time.sleep(RATE_WINDOW_S)
        span = (settled, time.monotonic())
        call.stop_bridge()
        # Direct rates: alice as bob receives her, bob and carol as alice receives them.
        direct = {p: counter_rate(call, "bob" if p == "alice" else "alice", p, span) for p in people}
        assert all(direct.values()), direct
        camera_rates: dict[int, float] = {}
        empty = []
        for track in (1, 2, 3, 4):
            seen = counters(call, "alice", track_source(track))
            if not any(seen):
                empty.append(track)  # a black cell: every counter bit reads 0
                continue
            assert ascending(seen), (track, seen)
            rate = counter_rate(call, "alice", track_source(track), span)
            assert rate is not None, (track, seen)
            camera_rates[track] = rate
    shown = owners_by_rate(camera_rates, {p: r or 0.0 for p, r in direct.items()})
    # Every person is on exactly one camera of their own and the fourth camera is the empty cell. (Which camera
    # number a viewer sees first is up to the room's track order, not the tile order: see the report.)
    assert shown is not None and sorted(shown) == sorted(people), (camera_rates, direct)
    assert len(empty) == 1, empty
    # The SIP side received one 2x2 composite: three quadrants count, the fourth is empty.
    frames = h264_timed_frames_from_capture(call.pcap, VIDEO_PORT)
    tiles = [tile_counters(f, 2, 2) for _, f in frames]
    capture_log = (call.run_dir / "logs" / "tshark.log").read_text(errors="replace")[-300:]
    for tile in range(3):
        assert ascending([t[tile] for t in tiles]), f"{tile_series_summary(frames, tiles, tile)}\n{capture_log}"
    assert {t[3] for t in tiles} <= {0, None}
