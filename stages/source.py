"""Synthetic source: moving test pattern with a frame counter, and tones (see stages/pattern.py)."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction
from typing import Any

import click
import numpy as np

from protocol import AudioFrame, KeyframeRequest, MediaHeader, VideoFrame
from stages.base import Stage, StageOptions
from stages.options import build_options, run, stage_options
from stages.pattern import PatternGenerator, tone

AUDIO_FRAME_S = 0.02
CONSUMER_WAIT_S = 10.0
BASE_TONE_HZ = 440.0
TONE_STEP_HZ = 220.0


class SourceStage(Stage):
    def __init__(
        self,
        options: StageOptions,
        *,
        video_streams: int,
        audio_streams: int,
        width: int,
        height: int,
        fps: float,
        frames: int,
        sample_rate: int,
        tones_hz: list[float],
        realtime: bool,
        prefix: str,
        wait_for_consumer: bool = True,
    ) -> None:
        super().__init__(options)
        self.video_ids = [f"{prefix}video{i}" for i in range(video_streams)]
        self.audio_ids = [f"{prefix}audio{i}" for i in range(audio_streams)]
        self.width, self.height, self.fps = width, height, fps
        self.frames = frames
        self.sample_rate = sample_rate
        self.tones_hz = [
            tones_hz[i] if i < len(tones_hz) else BASE_TONE_HZ + TONE_STEP_HZ * i for i in range(audio_streams)
        ]
        self.realtime = realtime
        self.wait_for_consumer = wait_for_consumer
        self._generators: list[PatternGenerator] = []
        self.video_time_base = Fraction(1, 90000)

    def setup(self) -> None:
        self._generators = [PatternGenerator(self.width, self.height, seed) for seed in range(len(self.video_ids))]

    def on_keyframe_request(self, request: KeyframeRequest) -> bool:
        return True  # every raw frame is already complete

    def extra_figures(self) -> dict[str, Any]:
        return {"tones_hz": dict(zip(self.audio_ids, self.tones_hz, strict=True))}

    def _video(self, index: int, capture_ns: int) -> list[VideoFrame]:
        pts = round(index / self.fps / self.video_time_base)
        return [
            VideoFrame(
                MediaHeader(sid, index, pts, self.video_time_base, capture_ns),
                self.width,
                self.height,
                gen.frame(index),
            )
            for sid, gen in zip(self.video_ids, self._generators, strict=True)
        ]

    def _audio(self, index: int, capture_ns: int) -> list[AudioFrame]:
        samples = round(self.sample_rate * AUDIO_FRAME_S)
        first = index * samples
        out = []
        for sid, freq in zip(self.audio_ids, self.tones_hz, strict=True):
            data: np.ndarray = tone(freq, self.sample_rate, first, samples)
            header = MediaHeader(sid, index, first, Fraction(1, self.sample_rate), capture_ns)
            out.append(AudioFrame(header, self.sample_rate, 1, samples, data))
        return out

    async def produce(self) -> None:
        if self.wait_for_consumer and not await self.wait_for_consumers(CONSUMER_WAIT_S):
            self.log.warning("no consumer connected after %.0f s; starting anyway", CONSUMER_WAIT_S)
        start = time.monotonic()
        video_index = audio_index = 0
        duration_s = self.frames / self.fps if self.frames else float("inf")
        video_period, audio_period = 1 / self.fps, AUDIO_FRAME_S
        while True:
            next_video = video_index * video_period if self.video_ids else float("inf")
            next_audio = audio_index * audio_period if self.audio_ids else float("inf")
            due = min(next_video, next_audio)
            if due >= duration_s or due == float("inf"):
                break
            if self.realtime:
                delay = start + due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            capture_ns = time.time_ns()
            if next_video <= next_audio:
                for frame in await self.run_codec(self._video, video_index, capture_ns):
                    await self.emit(frame)
                video_index += 1
            else:
                for chunk in self._audio(audio_index, capture_ns):
                    await self.emit(chunk)
                audio_index += 1
        self.log.info("produced %d video and %d audio frames per stream", video_index, audio_index)


@click.command("source")
@stage_options("source", has_inputs=False)
@click.option("--video-streams", type=int, default=1, help="Number of video test patterns.")
@click.option("--audio-streams", type=int, default=1, help="Number of tones.")
@click.option("--width", type=int, default=640)
@click.option("--height", type=int, default=480)
@click.option("--fps", type=float, default=30.0)
@click.option("--frames", type=int, default=0, help="Video frames per stream before end of stream; 0 = forever.")
@click.option("--sample-rate", type=int, default=48000)
@click.option("--tone-hz", "tones_hz", type=float, multiple=True, help="Tone of each audio stream (repeatable).")
@click.option("--realtime/--as-fast-as-possible", default=True, help="Pace output at the nominal rate.")
@click.option("--prefix", default="", help="Prefix of the stream ids (video0, audio0, ...).")
@click.option(
    "--wait-for-consumer/--no-wait-for-consumer",
    default=True,
    help="Hold the first frame until a consumer has connected.",
)
def command(**params: Any) -> None:
    """Synthetic test pattern and tone source."""
    options = build_options(params)
    params["tones_hz"] = list(params["tones_hz"])
    run(SourceStage(options, **params))
