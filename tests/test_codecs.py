"""Codec helpers and the decoder/encoder stage logic, in process (real PyAV codecs, no sockets)."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from typing import cast

import av
import numpy as np
import pytest

from protocol import AudioFrame, Codec, EncodedPacket, KeyframeRequest, MediaHeader, Message, VideoFrame, i420_size
from stages import codecs
from stages.base import StageOptions
from stages.decoder import Decoder
from stages.encoder import Encoder, EncoderSettings

pytestmark = pytest.mark.timeout(60)

WIDTH_PX, HEIGHT_PX = 320, 240
FRAME_STEP_90K = 3000  # 30 fps in the 90 kHz clock
TONE_HZ = 1000
TONE_AMPLITUDE = 8000
INPUT_RATE_HZ = 48_000


def pattern(index: int, width: int = WIDTH_PX, height: int = HEIGHT_PX) -> bytes:
    """A diagonal gradient that moves 4 px per frame, flat chroma."""
    y = ((np.arange(width)[None, :] + np.arange(height)[:, None] + 4 * index) % 256).astype(np.uint8)
    cw, ch = codecs.chroma_size(width, height)
    u = np.full((ch, cw), 100, np.uint8)
    v = np.full((ch, cw), 150, np.uint8)
    return np.concatenate([y.ravel(), u.ravel(), v.ravel()]).tobytes()


def video_frame(index: int, stream: str = "v", width: int = WIDTH_PX, height: int = HEIGHT_PX) -> VideoFrame:
    header = MediaHeader(stream, index, index * FRAME_STEP_90K, Fraction(1, 90_000), 1_000_000 + index)
    return VideoFrame(header, width, height, pattern(index, width, height))


def tone(seconds: float, rate: int = INPUT_RATE_HZ) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.int16)


def peak_hz_and_rms(samples: np.ndarray, rate: int) -> tuple[float, float]:
    # Skip the codec start-up (look-ahead, filter settling) before measuring.
    body = samples[len(samples) // 4 :].astype(float)
    spectrum = np.abs(np.fft.rfft(body * np.hanning(len(body))))
    return float(np.fft.rfftfreq(len(body), 1 / rate)[spectrum.argmax()]), float(np.sqrt((body**2).mean()))


def audio_only(messages: Iterable[Message]) -> list[AudioFrame]:
    out = list(messages)
    assert all(isinstance(m, AudioFrame) for m in out)
    return cast(list[AudioFrame], out)


def packets_only(messages: Iterable[Message]) -> list[EncodedPacket]:
    out = list(messages)
    assert all(isinstance(m, EncodedPacket) for m in out)
    return cast(list[EncodedPacket], out)


def new_decoder() -> Decoder:
    return Decoder(StageOptions("test-decoder"))


def new_encoder(**settings: object) -> Encoder:
    return Encoder(StageOptions("test-encoder"), EncoderSettings(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "height"), [(320, 240), (17, 9), (1, 1)])
def test_i420_av_round_trip_keeps_every_byte(width: int, height: int) -> None:
    data = np.random.default_rng(width).integers(0, 256, i420_size(width, height), dtype=np.uint8).tobytes()
    frame = VideoFrame(MediaHeader("v", 0, 0, Fraction(1, 90_000), 0), width, height, data)
    picture = codecs.i420_to_av(frame)
    assert (picture.width, picture.height, picture.format.name) == (width, height, "yuv420p")
    out_width, out_height, out_data = codecs.av_to_i420(picture)
    assert (out_width, out_height, bytes(out_data)) == (width, height, data)


def test_s16_av_round_trip_keeps_interleaving() -> None:
    samples = np.arange(-480, 480, dtype=np.int16)
    frame = AudioFrame(MediaHeader("a", 0, 0, Fraction(1, 8000), 0), 8000, 2, 480, samples.tobytes())
    converted = codecs.s16_to_av(frame)
    assert (converted.samples, converted.sample_rate, len(converted.layout.channels)) == (480, 8000, 2)
    assert np.array_equal(codecs.av_to_s16(converted), samples)


def test_codec_names_and_rates() -> None:
    assert codecs.codec_from_name("H264") is Codec.H264
    assert codecs.codec_from_name("pcmu") is Codec.PCMU
    with pytest.raises(ValueError):
        codecs.codec_from_name("mp3")
    assert codecs.audio_frame_samples(Codec.OPUS) == 960
    assert codecs.audio_frame_samples(Codec.G722) == 320
    assert codecs.RTP_CLOCK_HZ[Codec.G722] == 8000
    for codec in Codec:
        if codec is not Codec.AV1:
            assert codecs.decoder_name(codec) in av.codecs_available


@pytest.mark.parametrize("codec", [Codec.H264, Codec.VP8, Codec.VP9])
def test_video_round_trip_in_process(codec: Codec) -> None:
    encoder, decoder = new_encoder(video_codec=codec, keyframe_interval_s=100.0), new_decoder()
    packets = [p for i in range(20) for p in encoder.process(video_frame(i))] + list(encoder.flush(""))
    assert packets and all(isinstance(p, EncodedPacket) and p.codec is codec for p in packets)
    assert packets[0].keyframe and not any(p.keyframe for p in packets[1:])  # type: ignore[union-attr]
    assert codecs.is_keyframe_payload(codec, packets[0].data)  # type: ignore[union-attr]
    frames = [f for p in packets for f in decoder.process(p)] + list(decoder.flush(""))
    assert [f.header.pts for f in frames] == [i * FRAME_STEP_90K for i in range(20)]  # type: ignore[union-attr]
    for i, frame in enumerate(frames):
        assert isinstance(frame, VideoFrame)
        assert frame.header.capture_time_ns == 1_000_000 + i and frame.header.seq == i
        original = np.frombuffer(pattern(i), np.uint8)[: WIDTH_PX * HEIGHT_PX].reshape(HEIGHT_PX, WIDTH_PX)
        assert np.abs(codecs.y_plane(frame).astype(int) - original).mean() < 4.0
    assert not decoder.drops and not encoder.drops


def test_keyframe_request_forces_next_frame() -> None:
    encoder = new_encoder(video_codec=Codec.H264, keyframe_interval_s=100.0)
    flags = [p.keyframe for i in range(5) for p in encoder.process(video_frame(i))]  # type: ignore[union-attr]
    assert encoder.on_keyframe_request(KeyframeRequest("v", "test"))
    after = [p for i in range(5, 8) for p in encoder.process(video_frame(i))]
    assert flags == [True, False, False, False, False]
    assert [p.keyframe for p in after] == [True, False, False]  # type: ignore[union-attr]
    assert 5 in codecs.h264_nal_types(memoryview(after[0].data))  # type: ignore[union-attr]  # IDR slice


def test_encoder_scales_frames_of_another_size() -> None:
    encoder, decoder = new_encoder(video_codec=Codec.VP8, width=160, height=120), new_decoder()
    out = [f for i in range(3) for p in encoder.process(video_frame(i, width=321, height=239))
           for f in decoder.process(p)]
    assert [(f.width, f.height) for f in out] == [(160, 120)] * 3  # type: ignore[union-attr]
    assert encoder.scaled_frames == 3


@pytest.mark.parametrize("codec", [Codec.OPUS, Codec.PCMU, Codec.PCMA, Codec.G722])
def test_audio_round_trip_keeps_frequency_and_level(codec: Codec) -> None:
    encoder, decoder = new_encoder(audio_codec=codec), new_decoder()
    signal = tone(1.0)
    chunk = 480  # 10 ms input frames: the encoder must re-chunk them to 20 ms codec frames
    packets: list[EncodedPacket] = []
    for i in range(len(signal) // chunk):
        header = MediaHeader("a", i, i * chunk, Fraction(1, INPUT_RATE_HZ), 2_000_000 + i)
        data = signal[i * chunk : (i + 1) * chunk].tobytes()
        packets += packets_only(encoder.process(AudioFrame(header, INPUT_RATE_HZ, 1, chunk, data)))
    packets += packets_only(encoder.flush(""))
    rate = codecs.SAMPLE_RATE_HZ[codec]
    step = codecs.audio_frame_samples(codec)
    # pts continue the input clock in the codec's own clock, one 20 ms frame apart.
    assert [p.header.pts for p in packets] == [i * step for i in range(len(packets))]
    assert all(p.header.time_base == Fraction(1, rate) for p in packets)
    frames = audio_only(f for p in packets for f in decoder.process(p))
    assert all(f.sample_rate == rate for f in frames)
    decoded = np.concatenate([np.frombuffer(f.data, np.int16).reshape(-1, f.channels)[:, 0] for f in frames])
    peak, rms = peak_hz_and_rms(decoded, rate)
    assert abs(peak - TONE_HZ) < 5
    assert rms == pytest.approx(TONE_AMPLITUDE / np.sqrt(2), rel=0.1)


BROWSER_AUDIO_FRAME_SAMPLES = 960  # 20 ms at 48 kHz: what the room decoder gives the SIP encoder
IMPULSE_AT_SAMPLE = 3 * BROWSER_AUDIO_FRAME_SAMPLES + 500


@pytest.mark.parametrize("codec", [Codec.PCMU, Codec.PCMA, Codec.G722, Codec.OPUS], ids=lambda c: c.name)
def test_each_codec_frame_leaves_with_the_input_frame_that_completes_it(codec: Codec) -> None:
    """No codec frame waits for the next input frame: the resampler holds a few samples back from every input, and
    without priming every 20 ms packet ended in the next frame and left 20 ms late (room -> SIP audio latency)."""
    encoder, decoder = new_encoder(audio_codec=codec), new_decoder()
    n = BROWSER_AUDIO_FRAME_SAMPLES
    signal = np.zeros(n * 20, dtype=np.int16)
    signal[IMPULSE_AT_SAMPLE - 2 : IMPULSE_AT_SAMPLE + 3] = 20_000  # a short click: where it lands tells the shift
    packets: list[EncodedPacket] = []
    for i in range(20):
        header = MediaHeader("a", i, i * n, Fraction(1, INPUT_RATE_HZ), 5_000_000 + i)
        data = signal[i * n : (i + 1) * n].tobytes()
        out = packets_only(encoder.process(AudioFrame(header, INPUT_RATE_HZ, 1, n, data)))
        # One packet per input frame, from the first one on, stamped with that frame's capture time.
        assert [p.header.capture_time_ns for p in out] == [5_000_000 + i], (i, out)
        packets += out
    if codec in (Codec.PCMU, Codec.PCMA):  # sample-exact codecs: the click's place is the resampler's alone
        frames = audio_only(f for p in packets for f in decoder.process(p))
        decoded = np.concatenate([np.frombuffer(f.data, np.int16) for f in frames]).astype(np.int32)
        start_s = float(frames[0].header.pts * frames[0].header.time_base)
        shift_s = start_s + int(np.argmax(np.abs(decoded))) / 8000 - IMPULSE_AT_SAMPLE / INPUT_RATE_HZ
        assert 0 <= shift_s <= 0.0025, shift_s  # the output runs 2 ms behind its input, no more


def test_decoder_drops_corrupt_packets_and_resynchronises_on_a_keyframe() -> None:
    encoder, decoder = new_encoder(video_codec=Codec.VP8, keyframe_interval_s=100.0), new_decoder()
    packets: list[EncodedPacket] = [p for i in range(6) for p in encoder.process(video_frame(i))]  # type: ignore[misc]
    assert len(list(decoder.process(packets[0]))) == 1
    garbage = EncodedPacket(MediaHeader("v", 1, 1, Fraction(1, 90_000), 0), Codec.VP8, False, b"\xff" * 40)
    assert list(decoder.process(garbage)) == []
    assert decoder.drops["corrupt"] == 1 and decoder.errors["corrupt_packet"] == 1
    # After the damage, delta frames are dropped until a keyframe comes.
    assert list(decoder.process(packets[2])) == []
    assert decoder.drops["await_keyframe"] == 1
    encoder.on_keyframe_request(KeyframeRequest("v"))
    key = next(iter(encoder.process(video_frame(6))))
    assert list(decoder.process(key)) and list(decoder.process(next(iter(encoder.process(video_frame(7))))))


def test_decoder_treats_a_sequence_gap_as_a_lost_reference() -> None:
    encoder, decoder = new_encoder(video_codec=Codec.H264, keyframe_interval_s=100.0), new_decoder()
    packets = [p for i in range(4) for p in encoder.process(video_frame(i))]
    assert list(decoder.process(packets[0])) and list(decoder.process(packets[1]))
    assert list(decoder.process(packets[3])) == []  # seq 2 went missing
    assert decoder.drops["seq_gap"] == 1


@pytest.mark.parametrize(
    ("codec", "payload", "problem"),
    [
        (Codec.VP8, b"\x10\x02\x00\x9d\x01\x2a\x40\x01\xf0\x00", "truncated"),
        (Codec.VP8, b"\x00", "shorter"),
        (Codec.H264, b"garbage bytes", "start code"),
        (Codec.H264, b"\x00\x00\x00\x01\xe5\x00", "forbidden"),
    ],
)
def test_structural_payload_checks(codec: Codec, payload: bytes, problem: str) -> None:
    found = codecs.check_payload(codec, payload)
    assert found is not None and problem in found


def test_raw_frames_and_encoded_packets_pass_through() -> None:
    frame = video_frame(0)
    assert list(new_decoder().process(frame)) == [frame]
    packet = EncodedPacket(frame.header, Codec.VP8, True, b"\x00" * 20)
    assert list(new_encoder().process(packet)) == [packet]


def test_encoder_follows_an_audio_input_that_changes_rate_and_channels() -> None:
    encoder, decoder = new_encoder(audio_codec=Codec.G722), new_decoder()
    packets: list[EncodedPacket] = []
    for i, (rate, channels) in enumerate([(48_000, 1)] * 25 + [(8_000, 2)] * 25):
        samples = rate // 50  # 20 ms
        signal = np.repeat(tone(0.02, rate), channels)
        header = MediaHeader("a", i, i * 20, Fraction(1, 1000), 0)
        packets += packets_only(encoder.process(AudioFrame(header, rate, channels, samples, signal.tobytes())))
    assert not encoder.drops and len(packets) >= 48
    frames = audio_only(f for p in packets for f in decoder.process(p))
    decoded = np.concatenate([np.frombuffer(f.data, np.int16) for f in frames])
    half = len(decoded) // 2
    for part in (decoded[:half], decoded[half:]):
        assert abs(peak_hz_and_rms(part, 16_000)[0] - TONE_HZ) < 10
