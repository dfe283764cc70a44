"""Encoded video through the bridge, stage by stage without sockets. Room -> SIP passthrough: the room decoder passes
a fitting H.264 camera on encoded, the single layout forwards the shown camera's frames renamed from a keyframe on,
the encoder lets them by (and its keyframe requests go upstream). SIP -> room encoded injection: the SIP decoder
passes H.264 and VP8 on for the bot's page to decode. The bridge file allows each only where nothing needs the
pictures. The whole paths on real components: tests/test_cheap_room.py (test_bridged_call_passes_h264_through,
test_bridged_call_with_cheap_generators[shown-encoded])."""

from __future__ import annotations

import itertools
import tomllib
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

from protocol import Codec, EncodedPacket, KeyframeRequest, MediaHeader, Message, VideoFrame
from sipbridge.bridge import BridgeConfigError, bridge_stages, parse_bridge
from stages import codecs
from stages.base import StageOptions
from stages.decoder import Decoder
from stages.encoder import Encoder, EncoderSettings, video_context
from stages.transformer import PASS_KEYFRAME_REPEAT_S, GridOptions, RoomGrid, TransformerStage
from tests.test_codecs import FRAME_STEP_90K, HEIGHT_PX, WIDTH_PX, video_frame
from tests.test_compose import DrivenClock, is_slate

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bridge-passthrough.toml"
OUT_W, OUT_H = 640, 480
FRAME_S = 1 / 30


def h264_packets(count: int, profile: str = "baseline", stream: str = "alice/video") -> list[EncodedPacket]:
    """Real H.264 made here with PyAV (one keyframe first), ``profile`` baseline or high."""
    if profile == "baseline":
        ctx = video_context(EncoderSettings(keyframe_interval_s=100.0), WIDTH_PX, HEIGHT_PX)
    else:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = WIDTH_PX, HEIGHT_PX, "yuv420p"
        ctx.time_base, ctx.framerate, ctx.max_b_frames = codecs.VIDEO_TIME_BASE, Fraction(30), 0
        ctx.options = {"profile": profile, "tune": "zerolatency", "preset": "fast"}  # ultrafast is baseline
        ctx.open()
    out: list[EncodedPacket] = []
    for i in range(count):
        picture = codecs.i420_to_av(video_frame(i))
        picture.pts = i * FRAME_STEP_90K
        for packet in ctx.encode(picture):
            header = MediaHeader(stream, len(out), packet.pts, codecs.VIDEO_TIME_BASE, 5_000_000 + i)
            out.append(EncodedPacket(header, Codec.H264, packet.is_keyframe, bytes(packet)))
    return out


def encoded(messages: list[Message]) -> list[EncodedPacket]:
    return [m for m in messages if isinstance(m, EncodedPacket)]


def test_the_sps_decides_whether_the_sip_side_takes_h264_as_it_is() -> None:
    baseline, high = h264_packets(2), h264_packets(1, "high")
    assert codecs.h264_sps_profile(baseline[0].data)[0] == 66  # type: ignore[index]
    assert codecs.h264_fits_offer(baseline[0].data) is True
    assert codecs.h264_fits_offer(baseline[1].data) is None  # a P frame carries no SPS: nothing to decide
    assert codecs.h264_sps_profile(high[0].data)[0] == 100  # type: ignore[index]
    assert codecs.h264_fits_offer(high[0].data) is False
    # A level above the offer's 3.1 does not fit either: the same SPS with level_idc 40 (4.0).
    data = bytearray(baseline[0].data)
    sps_at = data.find(b"\x00\x00\x01\x67") + 4
    data[sps_at + 2] = 40
    assert codecs.h264_fits_offer(bytes(data)) is False


def test_decoder_passes_a_fitting_h264_camera_on_and_decodes_another() -> None:
    decoder = Decoder(StageOptions(name="room-decoder"), pass_video={Codec.H264: True})
    packets = h264_packets(5)
    out = [m for p in packets for m in decoder.process(p)]
    passed = encoded(out)
    assert [p.data for p in passed] == [p.data for p in packets]  # byte for byte, none decoded
    assert [p.header.seq for p in passed] == list(range(5)) and passed[0].keyframe
    assert [p.header.capture_time_ns for p in passed] == [p.header.capture_time_ns for p in packets]
    assert decoder.frames_decoded == 0 and decoder.extra_figures()["passed_streams"] == ["alice/video"]
    # High profile is not what the SIP side was offered: decoded to pictures instead.
    high = [m for p in h264_packets(5, "high", stream="bob/video") for m in decoder.process(p)]
    assert not encoded(high) and len([m for m in high if isinstance(m, VideoFrame)]) >= 1
    # Without --pass-video nothing passes.
    plain = Decoder(StageOptions(name="room-decoder"))
    assert not encoded([m for p in packets for m in plain.process(p)])


def test_decoder_still_waits_for_a_keyframe_after_a_gap_before_passing_on() -> None:
    decoder = Decoder(StageOptions(name="room-decoder"), pass_video={Codec.H264: True})
    packets = h264_packets(4)
    assert len(encoded(list(decoder.process(packets[0])))) == 1
    assert not list(decoder.process(packets[2]))  # packet 1 lost: its successors reference it
    assert decoder.drops["seq_gap"] == 1 and decoder.drops["await_keyframe"] == 1


def passing_grid(clock: DrivenClock, asked: list[tuple[str, str]], pinned: list[str] | None = None) -> RoomGrid:
    grid = RoomGrid(OUT_W, OUT_H, 1, pinned, "room-video", GridOptions(names=False, title="room 1", passthrough=True),
                    clock)
    grid.request_keyframe = lambda sid, reason: asked.append((sid, reason))
    return grid


def test_single_layout_forwards_the_shown_camera_from_a_keyframe_on() -> None:
    clock, asked = DrivenClock(), []
    grid = passing_grid(clock, asked)
    packets = h264_packets(6)
    sent: list[EncodedPacket] = []
    # Joining after the camera's keyframe: its frames wait (and ask once per interval) until the next one.
    for packet in packets[1:3]:
        sent += encoded(list(grid.process(packet)))
        clock.advance(FRAME_S)
    assert not sent and [sid for sid, _ in asked] == ["alice/video"] and grid.pass_awaiting_keyframe == 2
    assert grid.tick() == []  # no slate or black repeat in place of the camera that is shown
    for packet in [packets[0], *packets[3:]]:  # the keyframe it asked for, then the rest
        sent += encoded(list(grid.process(packet)))
        clock.advance(FRAME_S)
    assert [p.data for p in sent] == [packets[0].data, *(p.data for p in packets[3:])]
    assert {p.header.stream_id for p in sent} == {"room-video"} and sent[0].keyframe
    pts = [p.header.pts for p in sent]
    assert all(b > a for a, b in itertools.pairwise(pts)) and sent[0].header.time_base == Fraction(1, 90000)
    # A keyframe request for the output reaches the camera; the camera leaving brings the slate back, on one clock.
    assert grid.keyframe_source("room-video") == "alice/video" and grid.keyframe_source("mix") is None
    list(grid.flush("alice/video"))
    slate = [m for m in grid.tick() if isinstance(m, VideoFrame)]
    assert slate and is_slate(slate[0], "room 1") and slate[0].header.pts > pts[-1]
    assert grid.keyframe_source("room-video") is None


def test_a_decoded_picture_in_between_makes_passthrough_wait_for_a_keyframe_again() -> None:
    clock, asked = DrivenClock(), []
    grid = passing_grid(clock, asked)
    packets = h264_packets(3)
    assert encoded(list(grid.process(packets[0])))
    list(grid.flush("alice/video"))
    clock.advance(1.0)
    assert grid.tick()  # the slate: the SIP side's decoder now holds our references, not alice's
    clock.advance(PASS_KEYFRAME_REPEAT_S)
    assert not encoded(list(grid.process(packets[1])))  # alice is back with a P frame: not forwarded
    assert asked and asked[-1][0] == "alice/video"


def test_transformer_stage_sends_an_output_keyframe_request_to_the_passed_camera() -> None:
    clock, asked = DrivenClock(), []
    grid = passing_grid(clock, asked)
    stage = TransformerStage(StageOptions(name="room-transformer"), [grid], 1)
    forwarded: list[tuple[str, str]] = []
    stage.request_keyframe_threadsafe = lambda sid, reason: forwarded.append((sid, reason))  # type: ignore[method-assign]
    assert stage.on_keyframe_request(KeyframeRequest("room-video", "pli")) is False  # nothing passed yet
    list(stage.process(h264_packets(1)[0]))
    assert stage.on_keyframe_request(KeyframeRequest("room-video", "pli")) is True
    assert forwarded == [("alice/video", "pli")]


def test_encoder_lets_the_sip_codec_by_and_hands_keyframe_requests_up() -> None:
    encoder = Encoder(StageOptions(name="sip-encoder"), EncoderSettings(video_codec=Codec.H264, width=OUT_W,
                                                                        height=OUT_H))
    packets = [EncodedPacket(MediaHeader("room-video", 40 + i, p.header.pts, p.header.time_base, 7), p.codec,
                             p.keyframe, p.data) for i, p in enumerate(h264_packets(3))]
    out = encoded([m for p in packets for m in encoder.process(p)])
    assert [p.data for p in out] == [p.data for p in packets] and [p.header.seq for p in out] == [0, 1, 2]
    assert encoder.on_keyframe_request(KeyframeRequest("room-video", "pli")) is False  # upstream made them
    # Another codec is not the encoder's to judge (the janus stage refuses what its call did not negotiate).
    vp8 = EncodedPacket(MediaHeader("vp8-video", 3, 0, codecs.VIDEO_TIME_BASE, 7), Codec.VP8, True, b"\x00" * 20)
    assert list(encoder.process(vp8)) == [vp8] and encoder.packets_passed == 3
    # A picture made here after passed frames starts with a keyframe, and the sequence goes on.
    frame = video_frame(0, "room-video")
    made = encoded(list(encoder.process(frame)))
    assert made and made[0].keyframe and made[0].header.seq == 3
    assert encoder.on_keyframe_request(KeyframeRequest("room-video", "pli")) is True


def example(**changes: Any) -> dict[str, Any]:
    data = tomllib.loads(EXAMPLE.read_text())
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        table = data
        for part in path:
            table = table.setdefault(part, {})
        table[key] = value
    return data


def test_bridge_file_turns_passthrough_into_stage_arguments(tmp_path: Path) -> None:
    specs = {s.name: s for s in bridge_stages(parse_bridge(example()), tmp_path)}
    assert specs["room-decoder"].args[-2:] == ["--pass-video", "h264-offer"]
    assert "--passthrough" in specs["room-transformer"].args
    assert any(a.startswith("compose:grid:640x480:1") for a in specs["room-transformer"].args)
    assert "--passthrough" in specs["browser"].args  # [media.to_room] passthrough
    plain = {s.name: s for s in bridge_stages(parse_bridge(example(**{"media.to_sip.passthrough": False,
                                                                      "media.to_room.passthrough": False})), tmp_path)}
    assert "--pass-video" not in plain["room-decoder"].args and "--passthrough" not in plain["room-transformer"].args
    assert "--passthrough" not in plain["browser"].args


@pytest.mark.parametrize(("changes", "named"), [
    ({"layout.mode": "grid"}, "layout.mode"),
    ({"media.to_sip.video_codec": "vp8"}, "media.to_sip.video_codec"),
    ({"room.capture": "raw"}, "room.capture"),
    ({"transform": [{"at": "to_sip", "video": "resize:320x240"}]}, "to_sip"),
    ({"room.inject": "raw"}, "media.to_room.passthrough"),
    ({"room_side.split": "2x1"}, "media.to_room.passthrough"),
    ({"media.to_sip.passthrough": "yes"}, "media.to_sip.passthrough"),
])
def test_bridge_file_refuses_passthrough_where_pictures_are_needed(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(BridgeConfigError, match=named.replace(".", r"\.")):
        parse_bridge(example(**changes))


def test_encoded_injection_passes_the_sip_sides_video_on_to_the_page(tmp_path: Path) -> None:
    specs = {s.name: s for s in bridge_stages(parse_bridge(example(**{"room.inject": "encoded"})), tmp_path)}
    args = specs["sip-decoder"].args
    assert args[args.index("--pass-video") :][:4] == ["--pass-video", "h264", "--pass-video", "vp8"]
    decoder = Decoder(StageOptions(name="sip-decoder"), pass_video={Codec.H264: False, Codec.VP8: False})
    high = h264_packets(3, "high", stream="sip-video")  # the page decodes any profile: passed all the same
    assert [p.data for p in encoded([m for p in high for m in decoder.process(p)])] == [p.data for p in high]
    # By default ("auto") only where nothing on the way to the room needs the pictures.
    assert "--pass-video" in {s.name: s for s in bridge_stages(parse_bridge(example()), tmp_path)}["sip-decoder"].args
    split = {s.name: s for s in bridge_stages(parse_bridge(example(**{"room_side.split": "2x1",
                                                                      "media.to_room.passthrough": False})), tmp_path)}
    assert "--pass-video" not in split["sip-decoder"].args
    for refused in ({"room_side.split": "2x1"}, {"transform": [{"at": "to_room", "video": "resize:320x240"}]},
                    {"room.inject": "yes"}):
        with pytest.raises(BridgeConfigError, match="inject"):
            parse_bridge(example(**{"room.inject": "encoded", **refused}))


def test_a_corrupt_packet_is_not_passed_on_and_the_stream_waits_for_a_keyframe() -> None:
    """What the page's decoder (or the SIP peer's) would choke on stops at the decoder, as when it decodes itself:
    the structural checks drop it, counted, and the stream waits for a keyframe it asks upstream for."""
    decoder = Decoder(StageOptions(name="sip-decoder"), pass_video={Codec.H264: False})
    asked: list[str] = []
    decoder._request_keyframe = lambda sid, reason, state: asked.append(reason)  # type: ignore[method-assign]
    decoder._report = lambda *args: None  # type: ignore[method-assign]  # no event loop here
    packets = h264_packets(4, stream="sip-video")
    assert encoded(list(decoder.process(packets[0])))
    bad = packets[1]
    garbage = EncodedPacket(bad.header, bad.codec, False, b"\x00\x00\x01\xe5" + bad.data[4:])  # forbidden bit
    assert not list(decoder.process(garbage)) and decoder.drops["corrupt"] == 1 and asked
    assert not list(decoder.process(packets[2])) and decoder.drops["await_keyframe"] == 1
    assert decoder.packets_passed == 1


def test_injection_drops_to_a_keyframe_and_never_drops_the_keyframe() -> None:
    """Encoded injection under backpressure (the page behind, say on a host with two calls on two cores): a packet
    beyond the in-flight bound is dropped, and with it the camera's chain: its next packets wait here for a keyframe,
    asked upstream once a second; the keyframe goes past the bound (the way out of the backlog). Before this (a bound
    of 3 raw frames for packets too) two calls on two cores dropped hundreds of packets, keyframes among them, and
    the echo showed 0-10 fps in the room."""
    from stages.browser.recipes import load_recipe
    from stages.browser.stage import MAX_INJECT_IN_FLIGHT_PACKETS, BrowserConfig, BrowserStage, PageConnection

    stage = BrowserStage(StageOptions(name="browser"), BrowserConfig(recipe=load_recipe("local-room", {})))
    conn = PageConnection(ws=None, role="page", top=True)  # type: ignore[arg-type]  # nothing is sent here
    stage._connections.add(conn)
    asked: list[str] = []
    stage._spawn_keyframe_request = asked.append  # type: ignore[method-assign]
    for seq in range(MAX_INJECT_IN_FLIGHT_PACKETS):
        stage._inject_packet(b"delta", (seq, 0), 0, False, "sip-video")
    assert len(conn.queue) == MAX_INJECT_IN_FLIGHT_PACKETS and not asked
    stage._inject_packet(b"delta", (100, 0), 0, False, "sip-video")
    assert stage.drops["inject_backlog"] == 1 and asked == ["sip-video"]
    conn.queue.clear()  # the page caught up
    stage._inject_packet(b"delta", (101, 0), 0, False, "sip-video")
    assert stage.drops["inject_await_keyframe"] == 1 and not conn.queue and asked == ["sip-video"]  # once a second
    for seq in range(MAX_INJECT_IN_FLIGHT_PACKETS):  # behind again, and the keyframe comes: it goes past the bound
        stage._inject_packet(b"delta", (200 + seq, 0), 1, False, "sip-video-2")
    stage._inject_packet(b"key", (300, 0), 0, True, "sip-video")
    stage._inject_packet(b"delta", (301, 0), 0, False, "sip-video")
    assert [data for data, _ in conn.queue][-1:] == [b"key"]  # the delta after it is over the bound: dropped
    assert stage.drops["inject_backlog"] == 2
