"""The worked example of ARCHITECTURE.md's "Add a transform": a name-and-clock overlay (stages/overlay.py) put into
a bridge by its bridge file only, read back from the pictures the SIP peer decoded."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from protocol import AudioFrame, MediaHeader, VideoFrame
from sipbridge.bridge import bridge_stages, parse_bridge
from sipbridge.testing.capture import h264_frames_from_capture, tile_counters
from sipbridge.testing.localcall import SIP_PEER_MEDIA_PORT, CallOptions, LocalCall, wait_until
from stages.bitmapfont import text_mask
from stages.overlay import NameClock, label_geometry, label_text
from tests.test_bridge_e2e import ascending, need_media_tools

OVERLAY = """
[[transform]]
at = "to_sip"                                # each participant's pictures, before the layout composes them
video = "plugin:stages.overlay:NameClock"
"""
WIDTH, HEIGHT = 320, 240  # the participants' size: the SIP side sees the tile pixel for pixel
MATCH = 0.93  # share of the label's pixels that must read right after H.264 (edges blur a little)
ECHO_TIMEOUT_S = 150.0  # from the bridge's start: on a loaded machine the bot alone took 60 s to join
MIN_FRAMES = 20


def read_label(luma: np.ndarray, candidates: list[str]) -> tuple[str, float]:
    """The candidate text whose label best matches the picture's label area, and the share of pixels that agree."""
    x, y, box_w, box_h, scale = label_geometry(luma.shape[1], luma.shape[0], candidates[0])
    seen = luma[y : y + box_h, x : x + box_w] > 128
    best = ("", 0.0)
    for text in candidates:
        want = np.zeros_like(seen)
        mask = text_mask(text, scale)[: box_h - scale, : box_w - scale]
        want[scale : scale + mask.shape[0], scale : scale + mask.shape[1]] = mask
        score = float(np.mean(seen == want))
        best = max(best, (text, score), key=lambda item: item[1])
    return best


def frame(stream_id: str, capture_ns: int, width: int = WIDTH, height: int = HEIGHT) -> VideoFrame:
    data = np.full(width * height * 3 // 2, 128, dtype=np.uint8)
    return VideoFrame(MediaHeader(stream_id, 0, 0, Fraction(1, 90000), capture_ns), width, height, data.tobytes())


def test_the_overlay_writes_name_and_capture_clock_and_leaves_the_rest() -> None:
    capture_ns = 1_700_000_000 * 10**9  # 2023-11-14 22:13:20 UTC
    (out,) = NameClock().process(frame("alice/video", capture_ns))
    assert isinstance(out, VideoFrame) and out.header == frame("alice/video", capture_ns).header
    luma = np.frombuffer(out.data, dtype=np.uint8)[: WIDTH * HEIGHT].reshape(HEIGHT, WIDTH)
    assert label_text("alice/video", capture_ns) == "ALICE 22:13:20"
    assert read_label(luma, ["ALICE 22:13:20", "ALICE 22:13:21", "BOB 22:13:20"]) == ("ALICE 22:13:20", 1.0)
    x, y, box_w, box_h, _ = label_geometry(WIDTH, HEIGHT, "ALICE 22:13:20")
    untouched = np.ones_like(luma, dtype=bool)
    untouched[y : y + box_h, x : x + box_w] = False
    assert (luma[untouched] == 128).all() and y >= HEIGHT // 8 and y + box_h <= HEIGHT - HEIGHT // 8
    audio = AudioFrame(MediaHeader("alice/audio", 0, 0, Fraction(1, 48000), 1), 48000, 1, 960, bytes(1920))
    assert list(NameClock().process(audio)) == [audio] and list(NameClock().flush("alice/video")) == []
    tiny = frame("alice/video", capture_ns, 32, 16)
    assert list(NameClock().process(tiny)) == [tiny]  # no room to write without covering the marks


def test_the_bridge_file_alone_puts_it_between_the_room_and_the_layout(tmp_path: Path) -> None:
    import tomllib

    data = tomllib.loads(CallOptions(bridge_extra=OVERLAY).bridge_toml())
    specs = {s.name: s for s in bridge_stages(parse_bridge(data), tmp_path)}
    assert specs["transform-1"].inputs == ["room-decoder"] and specs["room-transformer"].inputs == ["transform-1"]
    assert specs["transform-1"].args == ["--video", "plugin:stages.overlay:NameClock"]


# The same call with the room-to-SIP chain in one process (stages/fused.py): the same checks hold.
FUSED = """
[processes]
fuse = [["room-decoder", "transform-1", "room-transformer", "sip-encoder"]]
"""


@pytest.mark.media
@pytest.mark.timeout(300)
@pytest.mark.parametrize("processes", ["separate", "fused"])
def test_a_transform_from_the_bridge_file_is_on_each_tile_the_sip_peer_decodes(processes: str, tmp_path: Path) -> None:
    need_media_tools()
    options = CallOptions(participants=[("alice", 440.0)], max_tiles=1, split=None, width=WIDTH, height=HEIGHT,
                          bridge_extra=OVERLAY + (FUSED if processes == "fused" else ""))
    started_s = time.time()
    with LocalCall(tmp_path / "run", options) as call:
        # The SIP peer echoes: once the room sees the bot's camera, the SIP peer has decoded pictures too.
        wait_until(lambda: len(set(call.room_received())) >= MIN_FRAMES, ECHO_TIMEOUT_S, "the echo reaching the room")
        call.stop_bridge()
    ended_s = time.time()
    frames = [f.to_ndarray(format="gray") for f in h264_frames_from_capture(call.pcap, SIP_PEER_MEDIA_PORT + 2)]
    # alice's pictures (the slate and black pictures read as no counter, or 0): counters still read, so the label
    # covered nothing else.
    shown = [(luma, counter) for luma in frames if (counter := tile_counters_of(luma))]
    assert ascending([c for _, c in shown]), [c for _, c in shown]
    candidates = [label_text("alice/video", int(s * 1e9)) for s in range(int(started_s) - 1, int(ended_s) + 2)]
    labels = [read_label(luma, candidates) for luma, _ in shown]
    read = [text for text, score in labels if score >= MATCH]
    assert len(read) >= 0.9 * len(labels), sorted(score for _, score in labels)[:10]
    assert len(set(read)) >= 2, set(read)  # a clock: the seconds move on


def tile_counters_of(luma: np.ndarray) -> int | None:
    class Gray:
        def to_ndarray(self, format: str) -> np.ndarray:
            return luma

    return tile_counters(Gray(), 1, 1)[0]
