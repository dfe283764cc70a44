"""Verifying sink: counts, checks frame counters and tones, measures latency, records MP4 and PNG.

At end of stream (or SIGTERM) it writes a JSON report that tests, the demo and benchmarks read.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import av
import click
import numpy as np

from protocol import AudioFrame, EncodedPacket, Message, VideoFrame
from stages.base import Stage, StageOptions, percentile
from stages.options import build_options, run, stage_options
from stages.pattern import COUNTER_BITS, dominant_frequency, i420_planes, read_counter, rms_dbfs

AUDIO_ANALYSIS_WINDOW_S = 1.0
MAX_AUDIO_KEPT_S = 10.0
RECORD_FPS = 30


class VideoCheck:
    def __init__(self) -> None:
        self.frames = 0
        self.counters: list[int] = []  # unwrapped counters read from pixels, in arrival order
        self.unreadable = 0
        self.out_of_order = 0
        self.duplicates = 0
        self.missing = 0
        self.latency_ms: list[float] = []
        self.size = (0, 0)
        self._last_raw: int | None = None
        self._wraps = 0

    def add(self, counter: int | None) -> None:
        self.frames += 1
        if counter is None:
            self.unreadable += 1
            return
        modulus = 1 << COUNTER_BITS
        if self._last_raw is not None and counter < self._last_raw and self._last_raw - counter > modulus // 2:
            self._wraps += 1
        value = counter + self._wraps * modulus
        if self.counters:
            last = self.counters[-1]
            if value == last:
                self.duplicates += 1
            elif value < last:
                self.out_of_order += 1
            else:
                self.missing += value - last - 1
        self.counters.append(value)
        self._last_raw = counter


class AudioCheck:
    def __init__(self) -> None:
        self.frames = 0
        self.samples = 0
        self.sample_rate = 0
        self.channels = 0
        self.kept: list[np.ndarray] = []
        self.kept_samples = 0
        self.latency_ms: list[float] = []
        self.pts_gaps = 0
        self._next_pts: int | None = None

    def add(self, frame: AudioFrame) -> None:
        self.frames += 1
        self.samples += frame.samples
        self.sample_rate, self.channels = frame.sample_rate, frame.channels
        if self._next_pts is not None and frame.header.pts != self._next_pts:
            self.pts_gaps += 1
        self._next_pts = frame.header.pts + frame.samples
        if self.kept_samples < MAX_AUDIO_KEPT_S * frame.sample_rate:
            mono = np.frombuffer(memoryview(frame.data), dtype=np.int16)[:: frame.channels].copy()
            self.kept.append(mono)
            self.kept_samples += mono.size


class Recorder:
    """Writes the first seconds of one stream to MP4 and PNG snapshots."""

    def __init__(self, directory: Path, stream_id: str, width: int, height: int, seconds: float) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stream_id)
        self.mp4_path = directory / f"{safe}.mp4"
        self.png_path = directory / f"{safe}.png"
        self.container = av.open(str(self.mp4_path), "w")
        self.stream = self.container.add_stream("libx264", rate=RECORD_FPS)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"preset": "ultrafast"}
        self.remaining = int(seconds * RECORD_FPS)
        self.index = 0
        self.last: av.VideoFrame | None = None

    def add(self, frame: VideoFrame) -> None:
        if self.remaining <= 0:
            return
        arr = np.frombuffer(memoryview(frame.data), dtype=np.uint8).reshape(frame.height * 3 // 2, frame.width)
        if (frame.width, frame.height) != (self.stream.width, self.stream.height):
            return
        av_frame = av.VideoFrame.from_ndarray(arr, format="yuv420p")
        av_frame.pts = self.index
        self.index += 1
        self.remaining -= 1
        self.last = av_frame
        for packet in self.stream.encode(av_frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        if self.last is not None:
            with av.open(str(self.png_path), "w", format="image2") as png:
                stream = png.add_stream("png", rate=1)
                stream.width, stream.height = self.last.width, self.last.height
                stream.pix_fmt = "rgb24"
                rgb = self.last.reformat(format="rgb24")
                rgb.pts = 0
                for packet in stream.encode(rgb):
                    png.mux(packet)
                for packet in stream.encode(None):
                    png.mux(packet)


class SinkStage(Stage):
    def __init__(
        self, options: StageOptions, *, report: str | None, record_dir: str | None, record_seconds: float
    ) -> None:
        super().__init__(options)
        self.report_path = report
        self.record_dir = Path(record_dir) if record_dir else None
        self.record_seconds = record_seconds
        self.video: dict[str, VideoCheck] = {}
        self.audio: dict[str, AudioCheck] = {}
        self.packets: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self.recorders: dict[str, Recorder] = {}
        self._reported = False

    def process(self, msg: Message) -> Iterable[Message]:
        now = time.time_ns()
        if isinstance(msg, VideoFrame):
            check = self.video.setdefault(msg.header.stream_id, VideoCheck())
            y, _, _ = i420_planes(msg.data, msg.width, msg.height)
            check.add(read_counter(y))
            check.size = (msg.width, msg.height)
            check.latency_ms.append((now - msg.header.capture_time_ns) / 1e6)
            if self.record_dir is not None:
                recorder = self.recorders.get(msg.header.stream_id)
                if recorder is None:
                    self.record_dir.mkdir(parents=True, exist_ok=True)
                    recorder = Recorder(
                        self.record_dir, msg.header.stream_id, msg.width, msg.height, self.record_seconds
                    )
                    self.recorders[msg.header.stream_id] = recorder
                recorder.add(msg)
        elif isinstance(msg, AudioFrame):
            audio = self.audio.setdefault(msg.header.stream_id, AudioCheck())
            audio.add(msg)
            audio.latency_ms.append((now - msg.header.capture_time_ns) / 1e6)
        elif isinstance(msg, EncodedPacket):
            self.packets[msg.header.stream_id] = self.packets.get(msg.header.stream_id, 0) + 1
        return ()

    def summary(self) -> dict[str, Any]:
        video = {}
        for sid, check in self.video.items():
            video[sid] = {
                "frames": check.frames,
                "size": list(check.size),
                "first_counter": check.counters[0] if check.counters else None,
                "last_counter": check.counters[-1] if check.counters else None,
                "unreadable": check.unreadable,
                "missing": check.missing,
                "out_of_order": check.out_of_order,
                "duplicates": check.duplicates,
                "latency_ms_p50": percentile(check.latency_ms, 0.5),
                "latency_ms_p95": percentile(check.latency_ms, 0.95),
            }
        audio = {}
        for sid, a in self.audio.items():
            samples = np.concatenate(a.kept) if a.kept else np.zeros(0, np.int16)
            window = samples[-int(AUDIO_ANALYSIS_WINDOW_S * a.sample_rate) :] if a.sample_rate else samples
            audio[sid] = {
                "frames": a.frames,
                "samples": a.samples,
                "sample_rate": a.sample_rate,
                "channels": a.channels,
                "pts_gaps": a.pts_gaps,
                "frequency_hz": round(dominant_frequency(window, a.sample_rate), 2) if a.sample_rate else None,
                "level_dbfs": round(rms_dbfs(window), 2),
                "latency_ms_p50": percentile(a.latency_ms, 0.5),
                "latency_ms_p95": percentile(a.latency_ms, 0.95),
            }
        return {
            "stage": self.name,
            "video": video,
            "audio": audio,
            "packets": self.packets,
            "drops": dict(self.drops),
            "errors": dict(self.errors),
            "recordings": {sid: str(r.mp4_path) for sid, r in self.recorders.items()},
        }

    def extra_figures(self) -> dict[str, Any]:
        return {
            "video_missing": {sid: c.missing for sid, c in self.video.items()},
            "video_unreadable": {sid: c.unreadable for sid, c in self.video.items()},
        }

    def teardown(self) -> None:
        if self._reported:
            return
        self._reported = True
        for recorder in self.recorders.values():
            try:
                recorder.close()
            except Exception as exc:
                self.log.error("could not finish recording %s: %r", recorder.mp4_path, exc)
        summary = self.summary()
        text = json.dumps(summary, indent=2, sort_keys=True)
        if self.report_path:
            tmp = f"{self.report_path}.tmp"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, self.report_path)
        self.log.info("report: %s", json.dumps(summary, sort_keys=True))


@click.command("sink")
@stage_options("sink", has_output=False)
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the JSON summary here.")
@click.option("--record-dir", type=click.Path(file_okay=False), default=None, help="Write MP4 and PNG per stream.")
@click.option("--record-seconds", type=float, default=3.0, show_default=True)
def command(**params: Any) -> None:
    """Verify and record what arrives: counters, tones, latency."""
    options = build_options(params, has_output=False)
    run(SinkStage(options, **params))
