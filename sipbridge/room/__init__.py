"""The local room that stands in for a CPaaS: Janus VideoRoom, a small conference page, synthetic participants.

``sipbridge room serve`` serves the page; ``sipbridge room participant`` starts test-pattern participants
(Chromium pages, or with ``--engine aiortc`` browserless publishers sending a pre-encoded loop, see
sipbridge/room/cheap.py); ``sipbridge room viewer`` a receive-only participant that reports what it receives.
"""

from __future__ import annotations

import asyncio
import logging

import click

from sipbridge.room.cheap import DEFAULT_KEYFRAME_INTERVAL_S, DEFAULT_LOOP_S, ENGINES
from sipbridge.room.server import DEFAULT_JANUS_WS


@click.group()
def command() -> None:
    """The local conference room (Janus VideoRoom) and its synthetic participants."""


@command.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8480, show_default=True)
@click.option("--janus", "janus_url", default=DEFAULT_JANUS_WS, show_default=True,
              help="Janus WebSocket URL the page connects to.")
@click.option("--janus-secret-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The Janus API secret (`sipbridge janus-server` writes WORK_DIR/api_secret), handed to the pages.")
def serve(host: str, port: int, janus_url: str, janus_secret_file: str | None) -> None:
    """Serve the room page and, under /janus-demos/, Janus's own demo pages (Debian janus-demos) against the same
    Janus (which must run separately, see `sipbridge janus-server`)."""
    from pathlib import Path

    from sipbridge.room.server import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [room] %(message)s")
    secret = Path(janus_secret_file).read_text().strip() if janus_secret_file else None
    run_server(host, port, janus_url, secret or None)


@command.command()
@click.option("--room-url", default="http://127.0.0.1:8480/", show_default=True)
@click.option("--room", type=int, default=1234, show_default=True)
@click.option("--name", "names", multiple=True,
              help="Display name of a participant (repeat for several in one browser); default: alice, unless only "
                   "viewers are asked for.")
@click.option("--tone", "tones", type=float, multiple=True, default=[440.0], show_default=True,
              help="Tone of each participant in Hz (same order as --name; the last repeats).")
@click.option("--viewer", "viewers", multiple=True, help="A receive-only participant (repeatable).")
@click.option("--janus", default=None, help="Override the Janus URL the page uses.")
@click.option("--codec", type=click.Choice(["h264", "vp8", "vp9"]), default="h264", show_default=True)
@click.option("--size", default="640x480", show_default=True)
@click.option("--fps", type=int, default=30, show_default=True)
@click.option("--probe/--no-probe", default=False,
              help="Report received counters and tones as JSON lines (aiortc publishers receive nothing: --viewer).")
@click.option("--duration", type=float, default=None, help="Leave after this many seconds (default: until SIGTERM).")
@click.option("--sync-marks", is_flag=True, default=False,
              help="Lip-sync marks: every 2 s a bright bottom band and a 2.5 kHz burst at the same instant.")
@click.option("--engine", type=click.Choice(ENGINES), default="chromium", show_default=True,
              help="chromium: pages of a headless Chromium; aiortc: no browser, a pre-encoded loop (VP8 or H.264 + "
                   "Opus) sent as it is; publishers then only publish, --viewer names receive and report.")
@click.option("--loop-s", type=int, default=DEFAULT_LOOP_S, show_default=True,
              help="aiortc: length of the pre-encoded loop (a multiple of 2 s); frame counters wrap to 0 after it.")
@click.option("--keyframe-interval-s", type=float, default=DEFAULT_KEYFRAME_INTERVAL_S, show_default=True,
              help="aiortc: keyframe spacing in the loop (keyframe requests are answered by the next one).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="aiortc: keep encoded loops under ~/.cache/sipbridge/room-loops.")
def participant(room_url: str, room: int, names: tuple[str, ...], tones: tuple[float, ...], viewers: tuple[str, ...],
                janus: str | None, codec: str, size: str, fps: int, probe: bool, duration: float | None,
                sync_marks: bool, engine: str, loop_s: int, keyframe_interval_s: float, cache: bool) -> None:
    """Join synthetic participants that publish a frame-counter pattern and a tone."""
    width, _, height = size.partition("x")
    names = publisher_names(names, viewers)
    if engine == "aiortc":
        from sipbridge.room.cheap import CHEAP_CODECS, PublisherSpec, run_cheap

        if codec not in CHEAP_CODECS:
            raise click.UsageError(f"--engine aiortc sends {' or '.join(CHEAP_CODECS)} (aiortc has no VP9)")
        if (loop_s * 1000) % 2000:
            raise click.UsageError("--loop-s must be a multiple of 2 (the sync-mark period)")
        _log_to_stderr()
        publishers = [PublisherSpec(name, tones[min(i, len(tones) - 1)]) for i, name in enumerate(names)]
        raise SystemExit(asyncio.run(run_cheap(room_url, room, publishers, list(viewers), janus=janus, codec=codec,
                                               width=int(width), height=int(height), fps=fps, duration_s=duration,
                                               sync_marks=sync_marks, loop_s=loop_s,
                                               keyframe_interval_s=keyframe_interval_s, use_cache=cache)))
    from sipbridge.room.participant import ParticipantSpec, run_participants

    specs = [ParticipantSpec(name, tones[min(i, len(tones) - 1)]) for i, name in enumerate(names)]
    specs += [ParticipantSpec(name, 0.0, publish=False) for name in viewers]
    raise SystemExit(asyncio.run(run_participants(room_url, room, specs, janus=janus, codec=codec, width=int(width),
                                                  height=int(height), fps=fps, probe=probe, duration_s=duration,
                                                  sync_marks=sync_marks)))


@command.command()
@click.option("--room-url", default="http://127.0.0.1:8480/", show_default=True)
@click.option("--room", type=int, default=1234, show_default=True)
@click.option("--name", default="viewer", show_default=True, help="Display name of the viewer.")
@click.option("--janus", default=None, help="Janus WebSocket URL (default: the one the room server gives its pages).")
@click.option("--codec", type=click.Choice(["h264", "vp8", "vp9"]), default="h264", show_default=True,
              help="The room's preferred codec, should the viewer be the one that creates the room.")
@click.option("--engine", type=click.Choice(ENGINES), default="aiortc", show_default=True)
@click.option("--duration", type=float, default=None, help="Leave after this many seconds (default: until SIGTERM).")
@click.option("--sync-marks", is_flag=True, default=False, help="Also find the lip-sync marks in what arrives.")
def viewer(room_url: str, room: int, name: str, janus: str | None, codec: str, engine: str, duration: float | None,
           sync_marks: bool) -> None:
    """A receive-only participant that prints what it receives from each publisher as JSON lines (the probe's
    ``received`` records: counters, tone, marks)."""
    if engine == "aiortc":
        from sipbridge.room.cheap import run_cheap

        _log_to_stderr()
        raise SystemExit(asyncio.run(run_cheap(room_url, room, [], [name], janus=janus, codec=codec, width=0,
                                               height=0, fps=0, duration_s=duration, sync_marks=sync_marks)))
    from sipbridge.room.participant import ParticipantSpec, run_participants

    raise SystemExit(asyncio.run(run_participants(room_url, room, [ParticipantSpec(name, 0.0, publish=False)],
                                                  janus=janus, codec=codec, width=640, height=480, fps=30,
                                                  probe=True, duration_s=duration, sync_marks=sync_marks)))


def publisher_names(names: tuple[str, ...], viewers: tuple[str, ...]) -> tuple[str, ...]:
    """The publishers to start: those named, else one "alice", but none when only viewers were asked for (a
    ``--viewer`` alone must not put a publishing participant into the room)."""
    if names or viewers:
        return names
    return ("alice",)


def _log_to_stderr() -> None:
    """stdout carries the JSON lines; logs go to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [room] %(name)s %(message)s")
