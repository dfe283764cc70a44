"""A stage that fell behind drops queued audio instead of carrying the backlog as latency, a stalled consumer does
not stall its producer, and a receive batch costs one codec-thread hand-off (stages.base)."""

from __future__ import annotations

import asyncio
import threading
from fractions import Fraction
from typing import Any

from protocol import AudioFrame, Codec, EncodedPacket, Event, EventType, MediaHeader, Message, VideoFrame, i420_size
from stages.base import (
    AUDIO_SEND_WAIT_MS,
    MAX_AUDIO_BACKLOG_S,
    Stage,
    StageOptions,
    skip_queued_audio,
)

RATE_HZ = 48000
FRAME_SAMPLES = 960  # 20 ms


def audio(stream: str, index: int, pts_offset: int = 0) -> AudioFrame:
    header = MediaHeader(stream, index, pts_offset + index * FRAME_SAMPLES, Fraction(1, RATE_HZ), 0)
    return AudioFrame(header, RATE_HZ, 1, FRAME_SAMPLES, bytes(2 * FRAME_SAMPLES))


def opus(stream: str, index: int) -> EncodedPacket:
    header = MediaHeader(stream, index, index * FRAME_SAMPLES, Fraction(1, RATE_HZ), 0)
    return EncodedPacket(header, Codec.OPUS, True, b"\x78\x00")


def picture(stream: str, index: int) -> VideoFrame:
    return VideoFrame(MediaHeader(stream, index, index * 3000, Fraction(1, 90000), 0), 16, 16,
                      bytes(i420_size(16, 16)))


def seqs(messages: list[Message], stream: str) -> list[int]:
    return [m.header.seq for m in messages if getattr(m, "header", None) and m.header.stream_id == stream]  # type: ignore[union-attr]


def test_a_backlog_of_audio_keeps_only_the_newest_stretch_of_each_stream() -> None:
    # 1 s of alice (50 frames) queued behind a stall, 3 frames of bob, and video between them.
    batch: list[Message] = [audio("alice", i) for i in range(50)]
    batch[10:10] = [audio("bob", i) for i in range(3)]
    batch.append(picture("cam", 1))
    kept, dropped = skip_queued_audio(batch, MAX_AUDIO_BACKLOG_S)
    newest = round(MAX_AUDIO_BACKLOG_S / 0.02)  # frames within the bound of alice's last one (its own included)
    assert seqs(kept, "alice") == list(range(49 - newest, 50))
    assert seqs(kept, "bob") == [0, 1, 2]  # 40 ms of bob is no backlog
    assert seqs(kept, "cam") == [1]  # video is not this function's business
    assert dropped == 50 - (newest + 1)


def test_encoded_audio_is_judged_by_its_pts_like_raw_audio() -> None:
    kept, dropped = skip_queued_audio([opus("room", i) for i in range(30)], MAX_AUDIO_BACKLOG_S)
    assert seqs(kept, "room")[-1] == 29 and dropped == 30 - len(kept) > 0
    assert 29 * 0.02 - kept[0].header.pts / RATE_HZ <= MAX_AUDIO_BACKLOG_S  # type: ignore[union-attr]


def test_a_real_time_batch_loses_nothing() -> None:
    batch: list[Message] = [audio("alice", 7), picture("cam", 2), audio("alice", 8), audio("bob", 3)]
    assert skip_queued_audio(batch, MAX_AUDIO_BACKLOG_S) == (batch, 0)


def test_a_producer_that_restarted_its_clock_is_not_taken_for_a_backlog() -> None:
    # The stream's pts starts again from 0 mid-batch (its producer restarted): the old frames are ahead of the new
    # reference, not behind it, and the new ones are few: nothing is dropped.
    batch: list[Message] = [audio("alice", i, pts_offset=10 * RATE_HZ) for i in range(5)]
    batch += [audio("alice", i) for i in range(3)]
    assert skip_queued_audio(batch, MAX_AUDIO_BACKLOG_S) == (batch, 0)


class _FullConsumer:
    """Stands in for a stage's output socket whose consumer takes nothing until told to."""

    def __init__(self) -> None:
        self.room = False
        self.waits_ms: list[int] = []


def _stage_sending_to(consumer: _FullConsumer) -> Stage:
    stage = Stage(StageOptions(name="producer", output="ipc:///nowhere"))

    async def send_waiting(parts: list[Any], copy: bool, timeout_ms: int) -> bool:
        consumer.waits_ms.append(timeout_ms)
        return consumer.room

    stage._out = object()  # type: ignore[assignment]  # _send_waiting is the only use, replaced below
    stage._send_waiting = send_waiting  # type: ignore[method-assign]
    return stage


def test_a_stalled_consumer_costs_one_audio_wait_not_one_per_message() -> None:
    consumer = _FullConsumer()
    stage = _stage_sending_to(consumer)

    async def scenario() -> list[bool]:
        sent = [await stage.emit(audio("alice", i)) for i in range(5)]
        consumer.room = True
        sent += [await stage.emit(audio("alice", 5))]
        consumer.room = False
        sent += [await stage.emit(audio("alice", 6)), await stage.emit(audio("alice", 7))]
        return sent

    sent = asyncio.run(scenario())
    try:
        assert sent == [False] * 5 + [True] + [False, False]
        # The first message waits the full grace; while the consumer stays full the rest go at once; after a send
        # went through, the next blockage gets the grace again.
        assert consumer.waits_ms == [AUDIO_SEND_WAIT_MS, 0, 0, 0, 0, 0, AUDIO_SEND_WAIT_MS, 0]
        assert stage.drops["send_timeout"] == 7
    finally:
        stage._ctx.term()


def test_events_still_wait_for_room_while_audio_is_dropped_at_once() -> None:
    consumer = _FullConsumer()
    stage = _stage_sending_to(consumer)

    async def scenario() -> None:
        await stage.emit(audio("alice", 0))
        await stage.emit(Event(EventType.TRACK_ADDED, "bob/audio", {}))

    asyncio.run(scenario())
    try:
        assert consumer.waits_ms == [AUDIO_SEND_WAIT_MS, AUDIO_SEND_WAIT_MS]
    finally:
        stage._ctx.term()


class _Recording(Stage):
    """A real stage whose codec thread records what it was given, in which hand-off."""

    def __init__(self, options: StageOptions) -> None:
        super().__init__(options)
        self.handoffs: list[list[tuple[str, int]]] = []
        self.emitted: list[tuple[str, int]] = []

    def _process_batch(self, batch: list[Message], finished: Any) -> None:
        self.handoffs.append([(m.header.stream_id, m.header.seq) for m in batch])  # type: ignore[union-attr]
        super()._process_batch(batch, finished)

    def process(self, msg: Message) -> list[Message]:
        if msg.header.stream_id == "bad":  # type: ignore[union-attr]
            raise ValueError("corrupt")
        return [msg]

    async def emit(self, msg: Message) -> bool:
        self.emitted.append((msg.header.stream_id, msg.header.seq))  # type: ignore[union-attr]
        return True


def handle(stage: _Recording, batch: list[Message]) -> None:
    """One received batch through the stage's media path, then the stage's thread and context closed."""
    try:
        asyncio.run(stage._handle_media(batch, None))
    finally:
        stage._codec_thread.shutdown()
        stage._ctx.term()


# Video and audio interleaved, one corrupt picture among them.
MIXED_BATCH: list[Message] = [picture("cam", 1), audio("alice", 1), picture("bad", 1), picture("cam", 2),
                              audio("alice", 2)]


def test_a_batch_goes_to_the_codec_thread_once_audio_first_and_a_bad_message_drops_alone() -> None:
    stage = _Recording(StageOptions(name="rec"))
    handle(stage, MIXED_BATCH)
    assert stage.handoffs == [[("alice", 1), ("alice", 2), ("cam", 1), ("bad", 1), ("cam", 2)]]
    assert stage.emitted == [("alice", 1), ("alice", 2), ("cam", 1), ("cam", 2)]
    assert stage.drops["process_error"] == 1


class _WaitsForTheFirstOutput(_Recording):
    """Its second message's processing waits until the first message's output was sent."""

    def __init__(self, options: StageOptions) -> None:
        super().__init__(options)
        self.first_sent = threading.Event()
        self.seen_while_processing: list[bool] = []

    def process(self, msg: Message) -> list[Message]:
        if msg.header.seq == 2:  # type: ignore[union-attr]
            self.seen_while_processing.append(self.first_sent.wait(timeout=5.0))
        return [msg]

    async def emit(self, msg: Message) -> bool:
        if msg.header.seq == 1:  # type: ignore[union-attr]
            self.first_sent.set()
        return await super().emit(msg)


def test_outputs_leave_as_each_message_is_done_not_when_the_whole_batch_is() -> None:
    stage = _WaitsForTheFirstOutput(StageOptions(name="rec"))
    handle(stage, [picture("cam", 1), picture("cam", 2), picture("cam", 3)])
    assert stage.handoffs == [[("cam", 1), ("cam", 2), ("cam", 3)]]  # still one hand-off
    assert stage.seen_while_processing == [True]
    assert stage.emitted == [("cam", 1), ("cam", 2), ("cam", 3)]


class _OnLoop(_Recording):
    """Processing that is no codec work, done where its result is sent."""

    process_on_loop = True

    def __init__(self, options: StageOptions) -> None:
        super().__init__(options)
        self.threads: set[str] = set()

    def process(self, msg: Message) -> list[Message]:
        self.threads.add(threading.current_thread().name)
        return super().process(msg)


def test_a_stage_that_processes_on_its_loop_makes_no_hand_off_and_keeps_the_same_order() -> None:
    stage = _OnLoop(StageOptions(name="rec"))
    handle(stage, MIXED_BATCH)
    assert stage.handoffs == [] and stage.threads == {threading.current_thread().name}
    assert stage.emitted == [("alice", 1), ("alice", 2), ("cam", 1), ("cam", 2)]
    assert stage.drops["process_error"] == 1
