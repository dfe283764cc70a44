"""A stage whose codec thread carries its media (``Stage.media_thread``): real ipc sockets, the stage's own event loop
in a thread of the test, a producer and a consumer on the test's side. What must hold as on the event loop's path:
order (control keeps its place among media), audio first within a receive, one bad message dropping alone, the
loop's calls reaching the codec thread while media flows, backpressure per kind, end of stream, and a stop that
does not wait for a consumer that never reads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import zmq

import protocol
from protocol import (
    AudioFrame,
    Codec,
    EncodedPacket,
    EndOfStream,
    Event,
    EventType,
    KeyframeRequest,
    MediaHeader,
    Message,
)
from stages import base
from stages.base import AUDIO_SEND_WAIT_MS, Stage, StageOptions, VideoPolicy, control_endpoint

RATE_HZ = 8000
FRAME_SAMPLES = 160  # 20 ms
RECEIVE_TIMEOUT_MS = 5000
STOP_TIMEOUT_S = 10.0
# Enough to fill the kernel's socket buffers too within a few packets: small messages would all fit there.
BIG_PACKET_BYTES = 256 * 1024


def audio(stream: str, seq: int) -> AudioFrame:
    header = MediaHeader(stream, seq, seq * FRAME_SAMPLES, Fraction(1, RATE_HZ), time.time_ns())
    return AudioFrame(header, RATE_HZ, 1, FRAME_SAMPLES, bytes(2 * FRAME_SAMPLES))


def video_packet(stream: str, seq: int, size: int = 100) -> EncodedPacket:
    header = MediaHeader(stream, seq, seq * 3000, Fraction(1, 90000), time.time_ns())
    return EncodedPacket(header, Codec.H264, seq == 0, b"\x00\x00\x00\x01\x65" + bytes([seq % 256]) * size)


class Relay(Stage):
    """Passes media on, records which thread did each piece of work; stream "bad" raises."""

    media_thread = True
    own_signals = False

    def __init__(self, options: StageOptions) -> None:
        super().__init__(options)
        self.threads: dict[str, set[str]] = {"process": set(), "control": set(), "keyframe": set(), "call": set()}
        self.keyframe_requests: list[str] = []
        self.processed: list[tuple[str, int]] = []

    def process(self, msg: Message) -> list[Message]:
        self.threads["process"].add(threading.current_thread().name)
        header = msg.header  # type: ignore[union-attr]  # media only
        if header.stream_id == "bad":
            raise ValueError("corrupt")
        self.processed.append((header.stream_id, header.seq))
        return [msg]

    async def on_control(self, msg: Message) -> None:
        # On the loop, and a call to the codec thread from here must not deadlock it (it waits for this hook).
        self.threads["control"].add(threading.current_thread().name)
        await self.run_codec(lambda: self.threads["call"].add(threading.current_thread().name))

    def on_keyframe_request(self, request: KeyframeRequest) -> bool:
        self.threads["keyframe"].add(threading.current_thread().name)
        self.keyframe_requests.append(request.stream_id)
        return True


@contextmanager
def running(stage: Stage, edge: Edge) -> Iterator[tuple[threading.Thread, list[int]]]:
    """Run the stage's own event loop in a thread; at the end the consumer hangs up and the stage is stopped (as
    SIGTERM would), so it need not wait for a consumer to read its end of stream."""
    code: list[int] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: code.append(loop.run_until_complete(stage.run())), name="stage-loop")
    thread.start()
    try:
        yield thread, code
    finally:
        if edge.consumer is not None:
            edge.consumer.close()
        if thread.is_alive():
            loop.call_soon_threadsafe(stage.request_stop)
        thread.join(STOP_TIMEOUT_S)
        loop.close()


def wait_for(condition: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Edge:
    """The test's ends of the stage's edges: a producer bound at its input, a consumer at its output."""

    def __init__(self, tmp_path: Path, consumer_hwm: int = 1000) -> None:
        self.ctx = zmq.Context()
        self.input = f"ipc://{tmp_path}/in.sock"
        self.output = f"ipc://{tmp_path}/out.sock"
        self.stats = f"ipc://{tmp_path}/stats.sock"
        self.producer = self.ctx.socket(zmq.PUSH)
        self.producer.setsockopt(zmq.LINGER, 0)
        self.producer.bind(self.input)
        self.consumer_hwm = consumer_hwm
        self.consumer: zmq.Socket[Any] | None = None

    def connect_consumer(self) -> None:
        self.consumer = self.ctx.socket(zmq.PULL)
        self.consumer.setsockopt(zmq.RCVHWM, self.consumer_hwm)
        self.consumer.setsockopt(zmq.LINGER, 0)
        self.consumer.setsockopt(zmq.RCVTIMEO, RECEIVE_TIMEOUT_MS)
        self.consumer.connect(self.output)

    def send(self, *messages: Message) -> None:
        for msg in messages:
            self.producer.send_multipart(protocol.encode(msg))

    def send_raw(self, *parts: bytes) -> None:
        self.producer.send_multipart(list(parts))

    def receive(self, count: int) -> list[Message]:
        assert self.consumer is not None
        return [protocol.decode(self.consumer.recv_multipart()) for _ in range(count)]

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def key(msg: Message) -> tuple[str, int] | str:
    if isinstance(msg, (AudioFrame, EncodedPacket)):
        return msg.header.stream_id, msg.header.seq
    return type(msg).__name__


def test_media_keeps_its_order_around_control_and_every_piece_of_work_runs_where_it_should(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every wait of the codec thread must end by a wake-up, not by its timeout: a missed one (the loop finishing a
    # control hook without waking the thread stalled media half a second per event) now stalls for a minute, and
    # the consumer's receive times out.
    monkeypatch.setattr(base, "MEDIA_WAKE_TIMEOUT_MS", 60_000)
    edge = Edge(tmp_path)
    stage = Relay(StageOptions(name="relay", inputs=[edge.input], output=edge.output, live=True))
    try:
        with running(stage, edge):
            edge.connect_consumer()
            assert wait_for(lambda: stage._consumers == 1)
            edge.send(audio("alice", 1), video_packet("cam", 0))
            edge.send_raw(b"not a sipbridge message", b"")
            edge.send(Event(EventType.TRACK_ADDED, "bob/audio", {}), video_packet("bad", 1), audio("alice", 2))
            got = [key(m) for m in edge.receive(4)]
            # The event between the two media batches keeps its place; the bad message and the malformed one drop
            # alone (counted), the rest go on.
            assert got == [("alice", 1), ("cam", 0), "Event", ("alice", 2)]
            for seq in range(3, 13):  # one event at a time, each followed by media
                edge.send(Event(EventType.TRACK_ADDED, f"p{seq}/audio", {}))
                time.sleep(0.02)
                edge.send(audio("alice", seq))
                assert [key(m) for m in edge.receive(2)] == ["Event", ("alice", seq)]
            # A keyframe request from the consumer (the loop's control socket) is handled on the codec thread.
            ctl = edge.ctx.socket(zmq.PUSH)
            ctl.setsockopt(zmq.LINGER, 0)
            ctl.connect(control_endpoint(edge.output))
            ctl.send_multipart(protocol.encode(KeyframeRequest("cam", "test")))
            assert wait_for(lambda: stage.keyframe_requests == ["cam"])
            # The loop reads the figures through the codec thread while media runs.
            assert wait_for(lambda: stage.streams.get("alice") is not None and stage.streams["alice"].frames_out == 12)
        codec_thread = {"relay-codec_0"}
        assert stage.threads["process"] == codec_thread and stage.threads["keyframe"] == codec_thread
        assert stage.threads["call"] == codec_thread and stage.threads["control"] == {"stage-loop"}
        assert stage.drops["process_error"] == 1 and stage.drops["malformed"] == 1
    finally:
        edge.close()


def test_audio_goes_first_within_one_receive(tmp_path: Path) -> None:
    edge = Edge(tmp_path)
    stage = Relay(StageOptions(name="relay", inputs=[edge.input], output=edge.output, live=True))
    entered, hold = threading.Event(), threading.Event()
    real_process = stage.process

    def held(msg: Message) -> list[Message]:
        if msg.header.stream_id == "gate":  # type: ignore[union-attr]
            entered.set()
            hold.wait(5.0)  # the next messages queue up and arrive in one receive
        return real_process(msg)

    stage.process = held  # type: ignore[method-assign]
    try:
        with running(stage, edge):
            edge.connect_consumer()
            assert wait_for(lambda: stage._consumers == 1)
            edge.send(audio("gate", 0))
            assert entered.wait(5.0)
            edge.send(video_packet("cam", 0), video_packet("cam", 1), audio("alice", 1), audio("alice", 2))
            time.sleep(0.2)
            hold.set()
            got = [key(m) for m in edge.receive(5)]
        assert got == [("gate", 0), ("alice", 1), ("alice", 2), ("cam", 0), ("cam", 1)]
    finally:
        edge.close()


def test_a_consumer_that_reads_nothing_costs_one_audio_wait_and_does_not_hold_the_stop(tmp_path: Path) -> None:
    edge = Edge(tmp_path, consumer_hwm=1)
    stage = Relay(StageOptions(name="relay", inputs=[edge.input], output=edge.output, live=True, hwm=1))
    waits_ms: list[int | None] = []
    real_send = stage._send_now

    def send_now(parts: list[Any], copy: bool, timeout_ms: int | None) -> bool:
        waits_ms.append(timeout_ms)
        return real_send(parts, copy, timeout_ms)

    stage._send_now = send_now  # type: ignore[method-assign]
    try:
        with running(stage, edge) as (thread, code):
            edge.connect_consumer()  # connected, never reads: its queue, the kernel's and the stage's fill up
            assert wait_for(lambda: stage._consumers == 1)
            edge.send(*[video_packet("cam", i, size=BIG_PACKET_BYTES) for i in range(1, 31)])
            assert wait_for(lambda: len(stage.processed) == 30)
            # Video never waits: what finds no room is dropped, and a dropped packet asks for a keyframe.
            assert stage.drops["send_full"] > 0 and set(waits_ms) == {0} and "cam" in stage.keyframe_requests
            waits_ms.clear()
            edge.send(*[audio("alice", i) for i in range(10)])
            assert wait_for(lambda: len(stage.processed) == 40)
            # One wait of AUDIO_SEND_WAIT_MS, then drops at once while the consumer stays full (not 10 waits).
            assert waits_ms == [AUDIO_SEND_WAIT_MS] + [0] * 9 and stage.drops["send_timeout"] == 10
            stopping = time.monotonic()
        assert not thread.is_alive() and code == [0]
        assert time.monotonic() - stopping < STOP_TIMEOUT_S
    finally:
        edge.close()


def test_a_blocked_send_that_loses_nothing_still_yields_to_a_stop(tmp_path: Path) -> None:
    """Under VideoPolicy.ALL a send waits for room as long as it takes; a stop still ends the stage."""
    edge = Edge(tmp_path, consumer_hwm=1)
    options = StageOptions(name="relay", inputs=[edge.input], output=edge.output, hwm=1,
                           video_policy=VideoPolicy.ALL)
    stage = Relay(options)
    try:
        with running(stage, edge) as (thread, code):
            edge.connect_consumer()
            assert wait_for(lambda: stage._consumers == 1)
            edge.send(*[video_packet("cam", i, size=BIG_PACKET_BYTES) for i in range(20)])
            assert wait_for(lambda: len(stage.processed) >= 3)
            time.sleep(0.3)
            blocked_at = len(stage.processed)
            assert blocked_at < 20 and not stage.drops  # waiting, not dropping
        assert not thread.is_alive() and code == [0]
    finally:
        edge.close()


def test_a_finite_stage_ends_with_its_inputs_and_passes_the_end_of_stream_on(tmp_path: Path) -> None:
    edge = Edge(tmp_path)
    stage = Relay(StageOptions(name="relay", inputs=[edge.input], output=edge.output,
                               video_policy=VideoPolicy.ALL))
    try:
        with running(stage, edge) as (thread, code):
            edge.connect_consumer()
            assert wait_for(lambda: stage._consumers == 1)
            edge.send(*[audio("alice", i) for i in range(50)], EndOfStream("alice"), EndOfStream(""))
            got = [key(m) for m in edge.receive(52)]
            assert edge.consumer is not None
            edge.consumer.close()  # read to the end: the hang-up lets the stage go at once
            thread.join(STOP_TIMEOUT_S)
            assert not thread.is_alive() and code == [0]
        assert got == [("alice", i) for i in range(50)] + ["EndOfStream", "EndOfStream"]
    finally:
        edge.close()
