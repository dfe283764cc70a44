"""Tiny placeholder pictures, encoded, for the bot's page to decode in place of a room participant's video.

With ``page_video = "placeholder"`` the capture worker copies each received frame for the pipeline and then hands
Chromium's decoder one of these instead (js/capture_worker.js): a 16x16 grey picture costs next to nothing to
decode and draw, where the participant's 640x480 cost what a viewer's would. The receiver still gets a frame per
frame it received, of the same kind (keyframe or not), so to it the stream never stalls (a receiver whose frames
stopped reaching its decoder would ask the room for keyframes).

H.264 is written here bit by bit: one SPS and PPS (constrained baseline, one 16x16 macroblock, 4-bit frame_num,
picture order from frame_num), an IDR slice of one I_PCM macroblock, and P slices of one skipped macroblock. A P
slice carries its frame_num, so there is one per value (16), used in turn after each IDR; consecutive IDRs alternate
idr_pic_id, as the standard asks. VP8 comes from libvpx: a keyframe and an interframe that only repeats it (no
frame number to advance, the same bytes serve every time)."""

from __future__ import annotations

import base64
import functools
from fractions import Fraction

import av
import numpy as np

SIDE_PX = 16  # one macroblock
GREY = 128
LOG2_MAX_FRAME_NUM = 4  # frame_num runs 0..15
START_CODE = b"\x00\x00\x00\x01"


class _Bits:
    """An RBSP written most significant bit first (Exp-Golomb codes as in H.264 clause 9.1)."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, value: int, width: int) -> _Bits:
        self.bits += [(value >> (width - 1 - i)) & 1 for i in range(width)]
        return self

    def ue(self, value: int) -> _Bits:
        code = value + 1
        width = code.bit_length()
        return self.u(0, width - 1).u(code, width)

    def se(self, value: int) -> _Bits:
        return self.ue(2 * value - 1 if value > 0 else -2 * value)

    def align_zero(self) -> _Bits:
        while len(self.bits) % 8:
            self.bits.append(0)
        return self

    def raw(self, data: bytes) -> _Bits:
        assert len(self.bits) % 8 == 0
        for byte in data:
            self.u(byte, 8)
        return self

    def rbsp(self) -> bytes:
        """The bits with rbsp_trailing_bits, as bytes."""
        self.bits.append(1)
        self.align_zero()
        return bytes(int("".join(map(str, self.bits[i:i + 8])), 2) for i in range(0, len(self.bits), 8))


def _nal(header: int, rbsp: bytes) -> bytes:
    """A NAL unit with emulation prevention (no 0x000000-0x000003 inside), behind a start code."""
    out = bytearray([header])
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return START_CODE + bytes(out)


def _sps() -> bytes:
    b = _Bits().u(66, 8).u(0b11000000, 8).u(10, 8)  # baseline, constraint_set0/1 (constrained), level 1.0
    b.ue(0)  # seq_parameter_set_id
    b.ue(LOG2_MAX_FRAME_NUM - 4).ue(2)  # log2_max_frame_num_minus4; pic_order_cnt_type 2 (from frame_num)
    b.ue(1).u(0, 1)  # max_num_ref_frames; gaps_in_frame_num_value_allowed_flag
    b.ue(SIDE_PX // 16 - 1).ue(SIDE_PX // 16 - 1)  # width and height in macroblocks, minus 1
    b.u(1, 1).u(1, 1).u(0, 1).u(0, 1)  # frame_mbs_only, direct_8x8_inference, no cropping, no VUI
    return _nal(0x67, b.rbsp())


def _pps() -> bytes:
    b = _Bits().ue(0).ue(0)  # pic_parameter_set_id, seq_parameter_set_id
    b.u(0, 1).u(0, 1).ue(0)  # CAVLC, no bottom_field_pic_order_in_frame_present, one slice group
    b.ue(0).ue(0).u(0, 1).u(0, 2)  # one reference each list, no weighted prediction
    b.se(0).se(0).se(0)  # pic_init_qp_minus26, pic_init_qs_minus26, chroma_qp_index_offset
    b.u(1, 1).u(0, 1).u(0, 1)  # deblocking_filter_control_present, no constrained intra, no redundant_pic_cnt
    return _nal(0x68, b.rbsp())


def _idr(idr_pic_id: int) -> bytes:
    b = _Bits().ue(0).ue(7).ue(0)  # first_mb_in_slice, slice_type I (all slices), pic_parameter_set_id
    b.u(0, LOG2_MAX_FRAME_NUM).ue(idr_pic_id)  # frame_num 0
    b.u(0, 1).u(0, 1)  # dec_ref_pic_marking: no_output_of_prior_pics, not long-term
    b.se(0).ue(1)  # slice_qp_delta; disable_deblocking_filter_idc 1 (off)
    b.ue(25).align_zero()  # mb_type I_PCM, then pcm_alignment_zero_bits
    b.raw(bytes([GREY]) * (SIDE_PX * SIDE_PX * 3 // 2))  # luma then both chroma planes, 8 bits each
    return _nal(0x65, b.rbsp())


def _p(frame_num: int) -> bytes:
    b = _Bits().ue(0).ue(5).ue(0)  # first_mb_in_slice, slice_type P (all slices), pic_parameter_set_id
    b.u(frame_num, LOG2_MAX_FRAME_NUM)
    b.u(0, 1).u(0, 1)  # num_ref_idx_active_override_flag, ref_pic_list_modification_flag_l0
    b.u(0, 1)  # dec_ref_pic_marking: adaptive_ref_pic_marking_mode_flag 0 (sliding window)
    b.se(0).ue(1)  # slice_qp_delta; deblocking off
    b.ue(SIDE_PX * SIDE_PX // 256)  # mb_skip_run: every macroblock skipped (a copy of the reference)
    return _nal(0x41, b.rbsp())


@functools.cache
def h264() -> tuple[list[bytes], list[bytes]]:
    """(keyframes, delta frames) as Annex B access units: keyframes by idr_pic_id (alternate them), delta frames by
    frame_num (after a keyframe use 1, 2, ... 15, 0, 1, ...)."""
    head = _sps() + _pps()
    return [head + _idr(i) for i in range(2)], [_p(n) for n in range(1 << LOG2_MAX_FRAME_NUM)]


@functools.cache
def vp8() -> tuple[list[bytes], list[bytes]]:
    """(keyframes, delta frames): libvpx's keyframe of the grey picture and an interframe repeating it."""
    ctx = av.CodecContext.create("libvpx", "w")
    ctx.width = ctx.height = SIDE_PX
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, 30)
    ctx.options = {"deadline": "realtime", "lag-in-frames": "0", "auto-alt-ref": "0", "g": "1000"}
    grey = np.full((SIDE_PX * 3 // 2, SIDE_PX), GREY, dtype=np.uint8)
    packets: list[bytes] = []
    for pts in range(3):
        frame = av.VideoFrame.from_ndarray(grey, format="yuv420p")
        frame.pts = pts
        packets += [bytes(p) for p in ctx.encode(frame)]
    packets += [bytes(p) for p in ctx.encode(None)]
    return [packets[0]], [packets[-1]]


def for_page() -> dict[str, dict[str, list[str]]]:
    """The placeholders by the MIME type a receiver reports, base64, for the page's configuration."""
    def b64(frames: list[bytes]) -> list[str]:
        return [base64.b64encode(f).decode("ascii") for f in frames]

    out = {}
    for mime, (keys, deltas) in (("video/h264", h264()), ("video/vp8", vp8())):
        out[mime] = {"key": b64(keys), "delta": b64(deltas)}
    return out
