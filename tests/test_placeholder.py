"""The placeholder streams the bot's page decodes instead of the room's video (``page_video = "placeholder"``): in the
order the capture worker hands them out they decode, with FFmpeg's strictest error detection, to 16x16 grey pictures,
one per frame, across frame_num's wrap and back-to-back keyframes. The page's side: tests/test_cheap_room.py
(test_bot_chromium_reads_cheap_publishers, the placeholder cases)."""

from __future__ import annotations

import av
import numpy as np
import pytest

from stages.browser import placeholder
from stages.browser.placeholder import SIDE_PX, _Bits, _nal

STRICT = {"err_detect": "crccheck+bitstream+buffer+explode"}


def worker_order(keys: list[bytes], deltas: list[bytes], pattern: str) -> list[bytes]:
    """Frames as js/capture_worker.js picks them for a run of received frame types ("K" key, "d" delta): keyframes
    in turn, delta frames by their count since the last keyframe."""
    out: list[bytes] = []
    n_keys = n_deltas = 0
    for kind in pattern:
        if kind == "K":
            n_keys, n_deltas = n_keys + 1, 0
            out.append(keys[n_keys % len(keys)])
        else:
            n_deltas += 1
            out.append(deltas[n_deltas % len(deltas)])
    return out


def decode_all(codec: str, frames: list[bytes]) -> list[np.ndarray]:
    ctx = av.CodecContext.create(codec, "r")
    ctx.options = STRICT
    pictures = []
    for data in frames:
        for picture in ctx.decode(av.Packet(data)):
            assert (picture.width, picture.height) == (SIDE_PX, SIDE_PX)
            pictures.append(picture.to_ndarray())
    pictures += [p.to_ndarray() for p in ctx.decode(None)]
    return pictures


# Past frame_num's wrap (16), keyframes back to back, a keyframe mid-run.
PATTERN = "K" + "d" * 40 + "KK" + "d" * 5 + "K" + "d" * 20


@pytest.mark.parametrize(("codec", "make"), [("h264", placeholder.h264), ("libvpx", placeholder.vp8)])
def test_placeholders_decode_to_one_grey_picture_per_frame(codec: str, make: object) -> None:
    keys, deltas = make()  # type: ignore[operator]
    pictures = decode_all(codec, worker_order(keys, deltas, PATTERN))
    assert len(pictures) == len(PATTERN)
    for picture in pictures:
        assert abs(int(picture.mean()) - placeholder.GREY) <= 2, picture.mean()


def test_h264_placeholder_frames_are_tiny_and_numbered() -> None:
    keys, deltas = placeholder.h264()
    assert len(keys) == 2 and keys[0] != keys[1]  # idr_pic_id 0 and 1
    assert len(deltas) == 16 and max(map(len, deltas)) <= 16
    # FFmpeg does not check frame_num's order, Chromium's other decoders may: the n-th delta frame carries n.
    assert [slice_frame_num(d) for d in deltas] == list(range(16))
    assert {slice_frame_num(k[k.rindex(b"\x00\x00\x00\x01\x65"):]) for k in keys} == {0}


def slice_frame_num(nal: bytes) -> int:
    """frame_num of a slice NAL unit behind a 4-byte start code (first_mb_in_slice, slice_type and
    pic_parameter_set_id are Exp-Golomb codes before it)."""
    bits = "".join(f"{b:08b}" for b in nal[5:])
    at = 0
    for _ in range(3):
        zeros = bits.index("1", at) - at
        at += 2 * zeros + 1
    return int(bits[at:at + placeholder.LOG2_MAX_FRAME_NUM], 2)


def test_exp_golomb_codes_and_emulation_prevention() -> None:
    bits = _Bits().ue(0).ue(1).ue(3).se(-1).se(2)
    assert "".join(map(str, bits.bits)) == "1" + "010" + "00100" + "011" + "00100"
    # No start code can appear inside a NAL unit: 00 00 0x (x <= 3) gets an 03 between.
    assert _nal(0x41, b"\x00\x00\x01\x00\x00\x00") == b"\x00\x00\x00\x01\x41\x00\x00\x03\x01\x00\x00\x03\x00"
